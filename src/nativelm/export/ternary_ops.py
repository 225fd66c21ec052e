"""Builders of nativelm's own ONNX operators (domain ``nativelm``, opset 1): TernaryMatMul and TernaryMoE.

The operators and their packed-weight layout are described in docs/kernels.md; the library that
runs them is built from native/ and loaded by `nativelm.runtime.custom_ops`. Like `ops`, every
builder returns `(nodes, initializers)` with constants named `<name>.<role>`.

Both compute what the PyTorch model computes: TernaryMatMul is a BitLinear (optional RMSNorm gain,
per-token absmax int8 activations, integer accumulation, one weight scale per matrix), TernaryMoE
is the MoE layer of ternary experts, weight-only or with per-row int8 inputs (softmax over all
experts, top k renormalised, ReGLU experts). Weights are five trits per byte (`nativelm.formats.ternary_pack`).
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from nativelm.export.ops import Parts
from nativelm.formats.ternary_pack import pack_ternary

DOMAIN = "nativelm"
OPSET = 1
OP_TYPES = ("TernaryMatMul", "TernaryMoE")


def _ternary_codes(codes: np.ndarray, what: str) -> np.ndarray:
    """int8 codes in {-1, 0, 1}; anything else is a ValueError naming `what`."""
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer) or (codes.size and np.abs(codes).max() > 1):
        raise ValueError(f"{what} must hold ternary codes in {{-1, 0, 1}}")
    return codes.astype(np.int8)


def ternary_matmul(name: str, x: str, codes: np.ndarray, scale: float, *, act_bits: int, act_eps: float,
                   gain: np.ndarray | None = None, norm_eps: float = 1e-5, output: str | None = None) -> Parts:
    """Y = BitLinear(x) for ternary `codes` (N out, K in) x `scale`; `gain` fuses the layer's RMSNorm.

    act_bits 8: per-row absmax int8 activations (BitLinear's quantizer); 0: float activations.
    """
    if act_bits not in (0, 8):
        raise ValueError(f"{name}: TernaryMatMul takes act_bits 8 or 0, got {act_bits}")
    codes = _ternary_codes(codes, f"{name} weight")
    n, k = codes.shape
    inits = [numpy_helper.from_array(pack_ternary(codes), f"{name}.weight"),
             numpy_helper.from_array(np.array(scale, np.float32), f"{name}.scale")]
    inputs = [x, f"{name}.weight", f"{name}.scale"]
    if gain is not None:
        gain = np.asarray(gain, np.float32)
        if gain.shape != (k,):
            raise ValueError(f"{name}: gain must be ({k},), got {gain.shape}")
        inits.append(numpy_helper.from_array(gain, f"{name}.gain"))
        inputs.append(f"{name}.gain")
    node = helper.make_node("TernaryMatMul", inputs, [output or name], name=name, domain=DOMAIN, K=k, N=n,
                            act_bits=act_bits, act_eps=float(act_eps), norm_eps=float(norm_eps))
    return [node], inits


def ternary_moe(name: str, x: str, router_logits: str, codes: dict[str, np.ndarray], scales: dict[str, np.ndarray],
                *, top_k: int, act_bits: int = 0, act_eps: float = 1e-5, output: str | None = None) -> Parts:
    """One MoE layer: x (..., d) rows, router logits (..., E) (as many rows), ReGLU experts of ternary codes;
    the output has x's shape.

    codes: gate, up (E, W, d) and down (E, d, W), rows = output features; scales: one per expert
    and matrix, (E,) each. act_bits 0: float expert inputs (qmoe experts); 8: x and the hidden
    activation quantized per row as BitLinear without a gain (int8 experts).
    """
    if act_bits not in (0, 8):
        raise ValueError(f"{name}: TernaryMoE takes act_bits 8 or 0, got {act_bits}")
    gate, up, down = (_ternary_codes(codes[m], f"{name} {m} experts") for m in ("gate", "up", "down"))
    n_experts, width, hidden = gate.shape
    if up.shape != gate.shape or down.shape != (n_experts, hidden, width):
        raise ValueError(f"{name}: experts must be gate/up (E, W, d) = {gate.shape} and down (E, d, W), "
                         f"got up {up.shape}, down {down.shape}")
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"{name}: top_k={top_k} must lie in [1, {n_experts}] experts")
    inputs, inits = [x, router_logits], []
    for which, matrix in (("gate", gate), ("up", up), ("down", down)):
        scale = np.asarray(scales[which], np.float32).reshape(-1)
        if scale.shape != (n_experts,):
            raise ValueError(f"{name}: {which} scales must be ({n_experts},), got {scale.shape}")
        inits += [numpy_helper.from_array(pack_ternary(matrix), f"{name}.{which}.weight"),
                  numpy_helper.from_array(scale, f"{name}.{which}.scale")]
        inputs += [f"{name}.{which}.weight", f"{name}.{which}.scale"]
    node = helper.make_node("TernaryMoE", inputs, [output or name], name=name, domain=DOMAIN, top_k=top_k,
                            act_bits=act_bits, act_eps=float(act_eps))
    return [node], inits
