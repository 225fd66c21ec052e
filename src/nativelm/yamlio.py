"""YAML files a user writes (params.yaml, fleet inventories): strict loading and one-line errors.

A key given twice is an error (PyYAML silently keeps the last), and both a YAML syntax error and a
schema error become a single line naming the file, the place and the problem.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from nativelm.errors import NativelmError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (line {mark.line + 1})", mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def validation_line(source: str, err: ValidationError) -> str:
    """A pydantic error as one line: the file, the key path of the first problem, then the others."""
    problems = []
    for item in err.errors():
        loc = _format_loc(tuple(item["loc"]))
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in item and item["type"] not in ("missing",):
            shown = repr(item["input"])
            msg = f"{msg} (got {shown[:60]})"
        problems.append(f"{loc}: {msg}")
    more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
    return f"{source}: {problems[0]}{more}".replace("\n", " ")




def load_yaml(text: str, source: str, error: type[NativelmError]) -> Any:
    """Parse YAML text; a syntax error or a duplicated key raises `error` with `source:line:column`."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{where}: invalid YAML: {problem}".replace("\n", " ")) from None
