"""YAML files a user writes (params.yaml, fleet inventories): strict, bounded loading and one-line errors.

A key given twice is an error (PyYAML silently keeps the last), and both a YAML syntax error and a
schema error become a single line naming the file, the place and the problem. What a file may hold
is bounded before anything is built from it (size, nesting, nodes counted with every alias
expanded, so a "billion laughs" file fails at once, and the length of an integer literal); a
mapping key must be a plain value. Booleans are YAML 1.2's (`true` / `false` only), as DVC reads
params.yaml: `resume: off` is the word `off`, as params.yaml documents it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from nativelm.errors import NativelmError
from nativelm.fsutil import BoundedReadError, read_bounded

MAX_YAML_BYTES = 16 << 20
MAX_DEPTH = 64
MAX_NODES = 1_000_000
MAX_INT_DIGITS = 1000  # refused before conversion (Python itself stops at 4300 digits); 64 bits are checked after
INT64 = (-(2**63), 2**63 - 1)
_BOOL_TAG = "tag:yaml.org,2002:bool"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently), a key
    that is a list or a mapping, nesting deeper than MAX_DEPTH and integers beyond 64 bits."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        """Refuse nesting deeper than MAX_DEPTH before the composer's recursion reaches Python's limit."""
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """A value PyYAML's constructors fail on with a bare exception (`!!int ""`, `!!timestamp x`) is
        refused as a YAML error at its place."""
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, IndexError, OverflowError, KeyError) as exc:
            shown = repr(node.value)[:40] if isinstance(node, yaml.ScalarNode) else "value"
            raise _refuse(node, f"{node.tag.rsplit(':', 1)[-1]} {shown} cannot be read ({type(exc).__name__})"
                          ) from None


_UniqueKeyLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))


def _refuse(node: yaml.Node, problem: str) -> yaml.constructor.ConstructorError:
    return yaml.constructor.ConstructorError(None, None, problem, node.start_mark)


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *anchor`: merged (and checked) by PyYAML's construct_mapping below
        if not isinstance(key_node, yaml.ScalarNode):
            kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
            raise _refuse(key_node, f"a mapping key must be a plain value, found a {kind}")
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise _refuse(key_node, f"key {key!r} given twice (line {mark.line + 1})")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


def _construct_int(loader: _UniqueKeyLoader, node: yaml.ScalarNode) -> int:
    if len(node.value) > MAX_INT_DIGITS:
        raise _refuse(node, f"integer literal of {len(node.value)} characters (at most {MAX_INT_DIGITS})")
    return loader.construct_yaml_int(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _wide_integer(data: Any) -> tuple[tuple[Any, ...], int] | None:
    """(key path, value) of the first integer in `data` that does not fit in 64 bits, else None."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), data)]
    while stack:
        loc, item = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool) and not INT64[0] <= item <= INT64[1]:
            return loc, item
        if isinstance(item, dict):
            stack.extend(((*loc, key), value) for key, value in item.items())
        elif isinstance(item, list):
            stack.extend(((*loc, i), value) for i, value in enumerate(item))
    return None


def _check_expanded(root: yaml.Node) -> None:
    """Count nodes and depth as if every alias were copied out; refuse a cycle, too many or too deep.

    Aliases share one node, so PyYAML builds a "billion laughs" file cheaply; whatever walks the
    result (validation, a dump) would not. Iterative, memoised per node: cost is the file's size.
    """
    sizes: dict[int, tuple[int, int]] = {}  # id(node) -> (expanded nodes, expanded depth)
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        kids = _children(node)
        if done:
            open_nodes.discard(id(node))
            count = 1 + sum(sizes[id(k)][0] for k in kids)
            depth = 1 + max((sizes[id(k)][1] for k in kids), default=0)
            if count > MAX_NODES:
                raise _refuse(node, f"more than {MAX_NODES} values once aliases are expanded")
            if depth > MAX_DEPTH:
                raise _refuse(node, f"nested deeper than {MAX_DEPTH} levels once aliases are expanded")
            sizes[id(node)] = (count, depth)
            continue
        if id(node) in open_nodes:
            raise _refuse(node, "an alias refers to a value that contains it")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((kid, False) for kid in kids if id(kid) not in sizes)


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
    """Parse YAML text within the bounds above; any problem raises `error` with `source:line:column`."""
    if len(text) > MAX_YAML_BYTES:
        raise error(f"{source}: {len(text)} characters, more than the {MAX_YAML_BYTES >> 20} MiB a YAML file may hold")
    loader = None
    try:
        loader = _UniqueKeyLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded(node)
        data = loader.construct_document(node)
    except yaml.reader.ReaderError as exc:
        raise error(f"{source}: invalid YAML: {exc.reason} (character #x{exc.character:04x} at offset "
                    f"{exc.position})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(f"{where}: invalid YAML: {problem}".replace("\n", " ")) from None
    finally:
        if loader is not None:
            loader.dispose()
    wide = _wide_integer(data)
    if wide is not None:
        raise error(f"{source}: {_format_loc(wide[0])}: integer {wide[1]} does not fit in 64 bits")
    return data


def read_yaml_text(path: Path, error: type[NativelmError], missing: str) -> str:
    """The UTF-8 text of a user's YAML file, read within MAX_YAML_BYTES; any problem is one `error` line
    naming the file (`missing`: what to do when it is not there)."""
    try:
        data = read_bounded(path, MAX_YAML_BYTES)
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except BoundedReadError as exc:
        raise error(f"{path}: {exc}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
