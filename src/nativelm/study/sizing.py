"""Sizing the equal-bytes rows: an fp model whose int4 export has a native row's total and active bytes.

Bytes are a function of the shape alone, so they are measured by exporting randomly initialised
models through the real exporter (no training). The expert (or dense FFN) width sets the bytes read
per token, the expert count the total; one export of the base shape gives each part's bytes, the
FFN and router parts scale linearly with width x count, and the chosen shape is exported once more
to report what it really weighs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nativelm.export.graph import build_graph
from nativelm.model import build_model
from nativelm.params.export import ExportParams
from nativelm.params.model import ModelParams

NOT_WEIGHTS = ("rope", "constants")  # tables read in part per token, and scalars
WIDTH_STEP = 32  # expert / dense widths stay multiples of this (MatMulNBits / QMoE blocks)


@dataclass(frozen=True)
class Bytes:
    """What an export of a shape weighs: the file's weights, and those read to decode one token."""

    total: int
    active_per_token: float

    def mismatch(self, other: Bytes) -> float:
        """The larger relative difference of the two figures against `other`."""
        return max(abs(self.total - other.total) / other.total,
                   abs(self.active_per_token - other.active_per_token) / other.active_per_token)


def _part_bytes(model_params: ModelParams, vocab_size: int, export: ExportParams) -> dict[str, int]:
    model = build_model(model_params, vocab_size)
    return {k: v for k, v in build_graph(model, export).part_bytes().items() if k not in NOT_WEIGHTS}


def _experts(p: ModelParams) -> tuple[int, int, int]:
    """(experts, width, experts read per token) of the FFN: a dense FFN is one expert, always read."""
    return (p.n_experts, p.expert_ffn, p.top_k) if p.ffn == "moe" else (1, p.dense_ffn, 1)


def bytes_of(parts: dict[str, int], p: ModelParams, vocab_size: int) -> Bytes:
    """Total and per-token bytes from an export's part sizes (embedding: one row per token)."""
    n, _, k = _experts(p)
    per_token = sum(v for key, v in parts.items() if key not in ("embedding", "ffn"))
    per_token += parts.get("embedding", 0) / vocab_size + parts.get("ffn", 0) * k / n
    return Bytes(sum(parts.values()), per_token)


def export_bytes(p: ModelParams, vocab_size: int, export: ExportParams) -> Bytes:
    """What `p` weighs exported with `export` (a random-init model through the real exporter)."""
    return bytes_of(_part_bytes(p, vocab_size, export), p, vocab_size)


def _with_ffn(p: ModelParams, n_experts: int, width: int) -> ModelParams:
    changes: dict[str, Any] = ({"n_experts": n_experts, "expert_ffn": width} if p.ffn == "moe"
                               else {"dense_ffn": width})
    return ModelParams.model_validate({**p.model_dump(), **changes})


def size_to_match(base: ModelParams, target: Bytes, vocab_size: int, export: ExportParams) -> tuple[ModelParams, Bytes]:
    """The FFN width (and expert count, for an MoE) of `base` whose export is closest to `target`."""
    parts = _part_bytes(base, vocab_size, export)
    n0, w0, k = _experts(base)
    best: tuple[float, ModelParams] | None = None
    counts = range(k, 4 * n0 + 1) if base.ffn == "moe" else (1,)
    for n in counts:
        for width in range(WIDTH_STEP, 4 * w0 + 1, WIDTH_STEP):
            scale = (n * width) / (n0 * w0)
            guess = {**parts, "ffn": round(parts.get("ffn", 0) * scale)}
            if "router" in parts:
                guess["router"] = round(parts["router"] * n / n0)
            candidate = _with_ffn(base, n, width)
            miss = bytes_of(guess, candidate, vocab_size).mismatch(target)
            if best is None or miss < best[0]:
                best = (miss, candidate)
    assert best is not None
    return best[1], export_bytes(best[1], vocab_size, export)
