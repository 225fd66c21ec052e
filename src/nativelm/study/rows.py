"""The study's rows: what each trains and how it is exported (docs/study.md).

A row is a *training* (a model family with overrides, trained once per learning rate and seed) and
an *export* of it. Rows that share a training — an fp model and its post-training-quantized
exports — train once. The ``equal_bytes_*`` trainings have no fixed shape: the study sizes them
(`study/sizing.py`) so that their int4 export has the total and active bytes of a native ternary row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Method = Literal["fp", "native", "ptq"]
PROGRESSIVE = [[0.0, 8.0], [0.25, 4.0], [0.5, 3.0], [0.75, 1.58]]


@dataclass(frozen=True)
class Training:
    """One training of the study: a family and overrides of the `model` and `train` sections."""

    name: str
    family: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    sized_like: str | None = None  # equal bytes: sized so its int4 export matches this training's ternary export


@dataclass(frozen=True)
class Row:
    """One line of the table: a training and the export variant it is measured in."""

    name: str
    training: str
    variant: str
    method: Method

    @property
    def ptq(self) -> bool:
        return self.method == "ptq"


TRAININGS: dict[str, Training] = {t.name: t for t in (
    Training("fp_dense", "phi3"),
    Training("fp_moe", "smallthinker", model={"quantize": False}),
    Training("ternary_moe", "smallthinker"),
    Training("ternary_dense", "bitnet"),
    Training("openelm", "openelm"),
    Training("progressive", "smallthinker", model={"bit_schedule": PROGRESSIVE}),
    Training("bitnet_recipe", "smallthinker", train={"recipe": "bitnet"}),
    Training("equal_bytes_moe", "smallthinker", model={"quantize": False}, sized_like="ternary_moe"),
    Training("equal_bytes_dense", "phi3", sized_like="ternary_dense"),
)}

ROWS: dict[str, Row] = {r.name: r for r in (
    Row("fp_dense", "fp_dense", "fp32", "fp"),
    Row("fp_moe", "fp_moe", "fp32", "fp"),
    Row("ternary_moe", "ternary_moe", "ternary", "native"),
    Row("ternary_dense", "ternary_dense", "ternary", "native"),
    Row("openelm", "openelm", "ternary", "native"),
    Row("progressive", "progressive", "ternary", "native"),
    Row("bitnet_recipe", "bitnet_recipe", "ternary", "native"),
    Row("fp_moe_ternary_ptq", "fp_moe", "ternary", "ptq"),
    Row("fp_moe_int4_ptq", "fp_moe", "int4", "ptq"),
    Row("fp_dense_ternary_ptq", "fp_dense", "ternary", "ptq"),
    Row("fp_dense_int4_ptq", "fp_dense", "int4", "ptq"),
    Row("equal_bytes_moe_int4_ptq", "equal_bytes_moe", "int4", "ptq"),
    Row("equal_bytes_dense_int4_ptq", "equal_bytes_dense", "int4", "ptq"),
)}


def trainings_of(rows: list[str]) -> list[Training]:
    """The trainings `rows` need, each once, in the order of `rows` (a sized one needs only a shape)."""
    needed = dict.fromkeys(ROWS[row].training for row in rows)
    return [TRAININGS[n] for n in needed]
