"""Typed parameters loaded from params.yaml: every knob in one place, every mistake one clear line.

Each stage owns its section model (``data/params.py``, ``stack/params.py`` ...); this module
composes them and turns YAML or validation problems into a single :class:`ParamsError` line
that names the file, the key path and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from nativelm.data.params import DataParams
from nativelm.errors import ParamsError
from nativelm.evaluate.params import EvaluateParams
from nativelm.export.params import ExportParams
from nativelm.fleet.params import FleetParams
from nativelm.gate.params import GateParams
from nativelm.orchestration.params import ServeParams
from nativelm.model.params import ModelParams
from nativelm.paramsbase import StrictModel
from nativelm.stack.params import StackParams
from nativelm.tracking.params import TrackingParams
from nativelm.train.params import TrainParams

DEFAULT_PARAMS = Path("params.yaml")


class Params(StrictModel):
    """The whole of params.yaml."""

    seed: int = Field(1234, ge=0, le=2**32 - 1)
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    gate: GateParams = GateParams()
    tracking: TrackingParams = TrackingParams()
    stack: StackParams = StackParams()
    serve: ServeParams = ServeParams()
    fleet: FleetParams = FleetParams()


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


def _format_validation(source: str, err: ValidationError) -> str:
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


def parse_params(text: str, source: str = "params.yaml") -> Params:
    """Validate the YAML text of a params file; raise ParamsError with one line on any problem."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ParamsError(f"{where}: invalid YAML: {problem}".replace("\n", " ")) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_validation(source, exc)) from None


def load_params(path: Path | str | None = None) -> Params:
    """Read params.yaml from the current folder, or the file given with --params PATH."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: parameters file not found (run from the project folder or pass --params PATH)") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: is a folder, expected a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_params(text, str(path))
