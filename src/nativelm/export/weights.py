"""The weights of the PyTorch model as the exporter reads them: float matrices, integer codes, scales.

A quantized layer exports either the weights its forward multiplies with (integer codes x scale,
kept as codes when they fit in int8) or its latent full-precision weights; which one is the
variant's choice (`nativelm.export.variants`). The helpers here only read and re-quantize.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from nativelm.errors import NativelmError
from nativelm.export import pack

EXPERT_MATRICES = ("gate", "up", "down")

# {gate, up, down}: (float weight (E, out, in), int8 codes or None, per-expert scales (E,) or None)
ExpertWeights = dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


def as_numpy(t: Any) -> np.ndarray:
    """A tensor (or array-like) as float32 numpy."""
    return t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)


@dataclass
class Linear:
    """One BitLinear (or plain linear) as the exporter sees it."""

    name: str
    weight: np.ndarray  # float32 (out, in) the chosen source multiplies with
    codes: np.ndarray | None  # int8 codes (out, in) of a quantized layer (None: source is float)
    scale: float | None
    norm: np.ndarray | None  # RMSNorm gain in front of the quantizer
    norm_eps: float
    act_bits: int | None  # per-token activation quantization of the forward (None: none, or latent weights)
    act_eps: float


def _fits_int8(codes: np.ndarray) -> bool:
    return bool(np.abs(codes).max(initial=0) <= 127)


def latent_linear(module: Any, name: str) -> Linear:
    """The latent (master) weights of a BitLinear, or the weights of an nn.Linear-like module."""
    norm = getattr(module, "norm", None)
    gain = as_numpy(norm.weight) if norm is not None else None
    eps = float(norm.eps) if norm is not None else 1e-5
    return Linear(name, as_numpy(module.weight), None, None, gain, eps, None, float(getattr(module, "eps", 1e-5)))


def coded_linear(module: Any, name: str, codes: Any, scale: Any) -> Linear:
    """The forward weights of a quantized BitLinear: integer `codes` x `scale`, with its activation bits."""
    latent = latent_linear(module, name)
    codes_np = codes.cpu().numpy().astype(np.int32)
    scale_f = float(scale)
    weight = (codes_np.astype(np.float32) * np.float32(scale_f)).astype(np.float32)
    return Linear(name, weight, codes_np.astype(np.int8) if _fits_int8(codes_np) else None, scale_f, latent.norm,
                  latent.norm_eps, module.act_bits, latent.act_eps)


def integer_weight(lin: Linear, bits: int, block_size: int) -> tuple[np.ndarray, Any]:
    """(w_int, scales) at `bits`: the layer's own codes when they fit, else symmetric per block."""
    limit = (1 << (bits - 1)) - 1 if bits > 2 else 1
    if lin.codes is not None and np.abs(lin.codes).max(initial=0) <= limit:
        return lin.codes, np.float32(lin.scale)
    if bits == 2:
        raise NativelmError(f"export ternary: {lin.name} has no ternary codes")  # guarded by Ternary.refuse
    return pack.quantize_symmetric(lin.weight, bits, block_size)


def ternary_experts(moe: Any) -> ExpertWeights:
    """The ternary codes and per-expert scales of an MoE layer's experts."""
    t = moe.ternary_experts()
    out = {}
    for name in EXPERT_MATRICES:
        codes, scale = t[name].cpu().numpy().astype(np.int8), as_numpy(t[f"{name}_scale"]).reshape(-1)
        out[name] = (codes.astype(np.float32) * scale[:, None, None], codes, scale)
    return out


def coded_experts(moe: Any, forward: Callable[[Any], bool]) -> ExpertWeights:
    """Each expert matrix: its forward codes x scales where `forward(module)`, else its latent weights."""
    out = {}
    for name in EXPERT_MATRICES:
        lin = getattr(moe.experts, name)
        if not forward(lin):
            out[name] = (as_numpy(lin.weight), None, None)
            continue
        codes, scale = lin.weight_codes()
        codes_np, scale_np = codes.cpu().numpy(), as_numpy(scale).reshape(-1)
        weight = codes_np.astype(np.float32) * scale_np[:, None, None]
        out[name] = (weight, codes_np.astype(np.int8) if _fits_int8(codes_np) else None, scale_np)
    return out


def quantize_experts(weight: np.ndarray, bits: int, block: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric absmax quantization of expert matrices (E, N, K): per block of K, or per row (block None)."""
    e, n, k = weight.shape
    if block is None:
        qmax = (1 << (bits - 1)) - 1
        absmax = np.abs(weight).max(axis=2)
        scales = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
        w_int = np.clip(np.round(weight / scales[:, :, None]), -qmax, qmax).astype(np.int8)
        return w_int, scales
    w_int, scales = pack.quantize_symmetric(weight.reshape(e * n, k), bits, block)
    return w_int.reshape(e, n, k), scales.reshape(e, n, -1)
