"""Parameters of `nativelm study` (the `study` section of params.yaml): native against compressed.

A study trains and exports a set of *rows* on the same prepared data, seeds and token budget, each
at every learning rate of a small grid, and reports each row at its best rate (docs/study.md).
The row names are fixed here; what each row is (family, precision, export) is `study/rows.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, ValidationError, model_validator

from nativelm.errors import ParamsError
from nativelm.params.base import StrictModel
from nativelm.yamlio import validation_line
from nativelm.params.train import Device, PresetName

RowName = Literal[
    "fp_dense", "fp_moe", "ternary_moe", "ternary_dense", "openelm", "progressive", "bitnet_recipe",
    "fp_moe_ternary_ptq", "fp_moe_int4_ptq", "fp_dense_ternary_ptq", "fp_dense_int4_ptq",
    "equal_bytes_moe_int4_ptq", "equal_bytes_dense_int4_ptq",
]
ALL_ROWS: tuple[str, ...] = RowName.__args__  # type: ignore[attr-defined]
# the CPU default: three trainings (fp MoE, native ternary MoE, the fp MoE sized to the ternary one's
# bytes after int4) and five rows, since the PTQ rows reuse the fp MoE's training
DEFAULT_ROWS = ["fp_moe", "ternary_moe", "fp_moe_int4_ptq", "fp_moe_ternary_ptq", "equal_bytes_moe_int4_ptq"]


class StudyParams(StrictModel):
    """The whole `study` section."""

    name: str = Field("default", min_length=1, max_length=80, pattern=r"^[A-Za-z0-9._-]+$",
                      description="the study's name: its folder under out_dir and its MLflow parent run")
    rows: list[RowName] = Field(DEFAULT_ROWS, min_length=1, description="rows to run (`all` on the CLI: every row)")
    preset: PresetName = Field("tiny", description="model shape and run size of every row: tiny (CPU) | gpu (CUDA)")
    steps: int | None = Field(None, ge=1, le=10_000_000, description="optimizer steps of every row (null: preset's)")
    seeds: list[int] = Field([1234], min_length=1, max_length=16, description="seeds; several give mean and spread")
    lrs: list[float] = Field([], max_length=16, description="learning-rate grid ([]: the preset's rate only)")
    model: dict[str, Any] = Field({}, description="model-section overrides applied to every row (e.g. d_model)")
    device: Device = Field("auto", description="auto | cpu | cuda")
    devices: list[Annotated[str, StringConstraints(pattern=r"^(cpu|cuda:[0-9]+)$")]] = Field(
        [], max_length=64, description="train this many cells at once, one per device (cpu or cuda:N; a device "
                                       "named twice takes two), exports one at a time ([]: one after another on "
                                       "`device`)")
    boards: list[str] = Field([], max_length=256, description=(
        "boards of fleet.inventory each row is also benchmarked on, without going live ([]: none; [all]: every board)"))
    out_dir: str = Field("studies", min_length=1, description="where studies keep their rows, table and charts")
    experiment: str = Field("nativelm-study", min_length=1, max_length=200, description="MLflow experiment")

    @model_validator(mode="after")
    def _consistent(self) -> StudyParams:
        if len(set(self.rows)) != len(self.rows):
            raise ValueError(f"rows name a row twice: {self.rows}")
        if any(not 0.0 < lr <= 1.0 for lr in self.lrs):
            raise ValueError(f"every learning rate must be in (0, 1], got {self.lrs}")
        if len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be distinct and >= 0, got {self.seeds}")
        if "all" in self.boards and len(self.boards) > 1:
            raise ValueError(f"boards: `all` stands alone, got {self.boards}")
        return self

    def with_overrides(self, overrides: dict[str, Any], source: str) -> StudyParams:
        """This section with `overrides` (None values skipped) on top, validated as one; one line if not."""
        raw = {**self.model_dump(mode="json"), **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return StudyParams.model_validate(raw)
        except ValidationError as exc:
            raise ParamsError(validation_line(source, exc)) from None
