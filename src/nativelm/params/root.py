"""The whole params.yaml: every knob in one place, every mistake one clear line.

Composes the section models of this package and turns YAML or validation problems into a single
:class:`ParamsError` line that names the file, the key path and the problem.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError

from nativelm.errors import ParamsError
from nativelm.params.base import StrictModel
from nativelm.params.data import DataParams
from nativelm.params.evaluate import EvaluateParams
from nativelm.params.export import ExportParams
from nativelm.params.fleet import FleetParams
from nativelm.params.gate import GateParams
from nativelm.params.model import ModelParams
from nativelm.params.serve import ServeParams
from nativelm.params.stack import StackParams
from nativelm.params.study import StudyParams
from nativelm.params.tracking import TrackingParams
from nativelm.params.train import TrainParams
from nativelm.yamlio import load_yaml, read_yaml_text, validation_line

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
    study: StudyParams = StudyParams()


def parse_params(text: str, source: str = "params.yaml") -> Params:
    """Validate the YAML text of a params file; raise ParamsError with one line on any problem."""
    raw = load_yaml(text, source, ParamsError)
    if raw is None:
        raise ParamsError(f"{source} is empty (write at least one section, e.g. `seed: 1234`; see the repository's "
                          "params.yaml)")
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(validation_line(source, exc)) from None


def load_params(path: Path | str | None = None) -> Params:
    """Read params.yaml from the current folder, or the file given with --params PATH."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    return parse_params(read_params_text(path), str(path))


def read_params_text(path: Path) -> str:
    """The text of a parameters file, read within the YAML bounds (a FIFO or a huge file is one line)."""
    return read_yaml_text(path, ParamsError, "parameters file not found (run from the project folder or pass "
                                             "--params PATH)")
