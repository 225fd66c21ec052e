"""Layer-wise scaling (OpenELM): each layer its own number of query heads and dense FFN width.

Layer i of N interpolates alpha and beta linearly from their first value (layer 0) to their second
(layer N-1); a one-layer model takes the second (full) values. Layer i gets
``n_heads_i = alpha_i · d_model / head_dim`` query heads, rounded to a multiple of n_kv_heads (at
least n_kv_heads), and a dense FFN of ``beta_i · d_model`` hidden units, rounded to a multiple of
`width_multiple` (at least one). head_dim and n_kv_heads stay those of the whole model, so the KV
cache has one shape in every layer (what onnxruntime-genai and the board runtime expect); the
default multiple 128 keeps every width on a MatMulNBits block boundary (export.block_size <= 128).
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from nativelm.params.base import StrictModel


class LayerScaling(StrictModel):
    """`model.layer_scaling`: the (first, last) alpha and beta of the layers and the width rounding."""

    alpha: list[float] = Field([0.5, 1.0], description="query-head scale [layer 0, last layer]")
    beta: list[float] = Field([0.5, 4.0], description="dense FFN width / d_model [layer 0, last layer]")
    width_multiple: int = Field(128, ge=1, description="FFN widths are rounded to a multiple of this")

    @model_validator(mode="after")
    def _pairs(self) -> LayerScaling:
        for name in ("alpha", "beta"):
            pair = getattr(self, name)
            if len(pair) != 2 or min(pair) <= 0:
                raise ValueError(f"layer_scaling.{name} must be [first, last], both > 0, got {pair}")
        return self

    @staticmethod
    def _at(pair: list[float], layer: int, n_layers: int) -> float:
        t = layer / (n_layers - 1) if n_layers > 1 else 1.0
        return pair[0] + (pair[1] - pair[0]) * t

    def heads(self, layer: int, n_layers: int, n_heads: int, n_kv_heads: int) -> int:
        """Query heads of `layer`: alpha_i · n_heads (= alpha_i · d_model / head_dim), a multiple of n_kv_heads."""
        groups = math.floor(self._at(self.alpha, layer, n_layers) * n_heads / n_kv_heads + 0.5)
        return n_kv_heads * max(1, groups)

    def width(self, layer: int, n_layers: int, d_model: int) -> int:
        """Dense FFN hidden width of `layer`: beta_i · d_model, a multiple of width_multiple."""
        m = self.width_multiple
        return m * max(1, math.floor(self._at(self.beta, layer, n_layers) * d_model / m + 0.5))
