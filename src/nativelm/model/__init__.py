"""The model: BitLinear (1.58-bit), fine-grained ReGLU MoE with pre-attention routing,
GQA attention with RoPE + sliding window and NoPE global layers, and the LM around them."""

from nativelm.model.attention import Attention, apply_rope, attention_mask, rope_tables
from nativelm.model.bit_schedule import BitSchedule
from nativelm.model.bitlinear import (
    BitLinear,
    ExpertLinear,
    RMSNorm,
    bitlinears,
    set_weight_bits,
)
from nativelm.model.dispatch import Dispatch
from nativelm.model.moe import (
    DenseFFN,
    Experts,
    MoE,
    ReGLU,
    Router,
    Routing,
    load_balancing_loss,
    route,
    z_loss,
)
from nativelm.model.quantizers import quantize_activation, quantize_weight, weight_codes
from nativelm.model.stats import (
    expert_load_matrix,
    flat_metrics,
    layer_metrics,
    model_metrics,
    weight_code_shares,
)
from nativelm.model.transformer import (
    Block,
    ModelOutput,
    NativeLM,
    build_model,
    param_counts,
)
from nativelm.params.model import PRESETS, TERNARY_BITS, ModelParams, preset_params

__all__ = [
    "PRESETS", "TERNARY_BITS", "Attention", "BitLinear", "BitSchedule", "Block", "DenseFFN", "Dispatch",
    "ExpertLinear", "Experts", "MoE", "ModelOutput", "ModelParams", "NativeLM", "RMSNorm", "ReGLU", "Router",
    "Routing", "apply_rope", "attention_mask", "bitlinears", "build_model", "expert_load_matrix", "flat_metrics",
    "layer_metrics", "load_balancing_loss", "model_metrics", "param_counts", "preset_params", "quantize_activation",
    "quantize_weight", "route", "rope_tables", "set_weight_bits", "weight_code_shares", "weight_codes", "z_loss",
]
