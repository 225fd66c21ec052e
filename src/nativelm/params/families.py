"""Model families (`model.family`): named sets of model knobs, one line each in FAMILIES.

A family fills the knobs its entry names when params.yaml leaves them out (or null); a value
written in params.yaml always wins, and `train.preset`'s shape fills what both leave open
(preset < family < written, `params/model.py: with_preset`). Every knob stays overridable.
"""

from __future__ import annotations

from typing import Any, Literal

Family = Literal["smallthinker", "bitnet", "phi3", "openelm"]
DEFAULT_FAMILY = "smallthinker"

# plain RoPE on every layer, full causal attention: what the dense families are built with
_FULL_ROPE: dict[str, Any] = {"window": 0, "nope_every": 0}

FAMILIES: dict[str, dict[str, Any]] = {
    # fine-grained ternary MoE of ReGLU experts, pre-attention routing, sliding-window RoPE + NoPE
    # layers, GQA: the field defaults (and train.preset's shapes) as they are
    "smallthinker": {},
    # dense ternary: BitLinear in every attention and FFN linear (embedding and head stay higher precision)
    "bitnet": {"ffn": "dense", "quantize": True, "ffn_act": "swiglu", **_FULL_ROPE},
    # dense, full precision
    "phi3": {"ffn": "dense", "quantize": False, "ffn_act": "swiglu", **_FULL_ROPE},
    # layer-wise scaling of heads and FFN widths, dense; ternary by default
    "openelm": {"ffn": "dense", "quantize": True, "ffn_act": "swiglu", "layer_scaling": True, **_FULL_ROPE},
}

FAMILY_KEYS = frozenset(key for knobs in FAMILIES.values() for key in knobs)  # what a family may set


def family_knobs(name: Any) -> dict[str, Any]:
    """The knobs family `name` sets ({} for an unknown name: the `family` field's check names it)."""
    return dict(FAMILIES.get(name, {})) if isinstance(name, str) else {}
