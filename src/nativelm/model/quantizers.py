"""The quantizers behind BitLinear: weight codes and scales at a width, per-token activation absmax,
and their straight-through forms (the formulas: `nativelm.model.bitlinear`'s module docstring).

Functions whose name starts with ``_`` are what `fused_call` compiles on CUDA (a few fused kernels
instead of about ten memory passes each); the public ones pick the compiled or eager twin.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from nativelm.model.compiled import fused_call
from nativelm.params.model import TERNARY_BITS


def levels(bits: float) -> int:
    """Q, the number of non-zero levels on each side of zero at a weight width."""
    return 1 if bits == TERNARY_BITS else 2 ** (int(bits) - 1) - 1


_LEVELS: dict[tuple, Tensor] = {}


def level_arg(bits: float, device: torch.device) -> int | Tensor:
    """Q at `bits` as the quantizers take it, for callers that give a width rather than a layer: a
    cached 0-d fp32 tensor on `device` (a compiled quantizer sees every width as the same input), a
    plain int while tracing (no tensor is created inside a compiled region)."""
    q = levels(bits)
    if torch.compiler.is_compiling():
        return q
    key = (q, device.type, device.index)
    if key not in _LEVELS:
        _LEVELS[key] = torch.tensor(float(q), device=device)
    return _LEVELS[key]


def weight_codes(w: Tensor, bits: float = TERNARY_BITS, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Integer codes (as a float tensor, in [-Q, Q]) and the per-matrix scale of `w` at `bits`.

    `w` is one matrix (out, in) -> 0-d scale, or a stack of matrices (E, out, in) -> scales (E,),
    each matrix quantized on its own (its own absmean / absmax), all in one set of ops.
    """
    return _codes(w, levels(bits), eps)


def _codes(w: Tensor, q: int | Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`weight_codes` with Q given (an int, or a 0-d tensor from `level_arg`: the same IEEE results)."""
    wf = w.detach().float()
    absw = wf.abs()
    if wf.dim() <= 2:
        scale = torch.minimum(absw.mean(), absw.amax() / q).clamp(min=eps)
        return torch.clamp((wf / scale).round(), -q, q), scale
    dims = (-2, -1)
    scale = torch.minimum(absw.mean(dims), absw.amax(dims) / q).clamp(min=eps)
    return torch.clamp((wf / scale[..., None, None]).round_(), -q, q), scale


def _fake_quant_weight(w: Tensor, q: int | Tensor, eps: float) -> Tensor:
    """codes · scale of `w` (per matrix) at Q levels, fp32, no gradient."""
    codes, scale = _codes(w, q, eps)
    return codes.mul_(scale[..., None, None] if scale.dim() else scale)


def _fake_quant_activation(x: Tensor, bits: int, eps: float) -> Tensor:
    """Per-token absmax fake quantization of `x` (fp32, no gradient)."""
    q = 2 ** (bits - 1) - 1
    xf = x.detach().float()
    # max |x| per token: one reduction kernel on CUDA; abs + amax is faster on CPU (both exact)
    if xf.is_cuda:
        absmax = torch.linalg.vector_norm(xf, ord=math.inf, dim=-1, keepdim=True)
    else:
        absmax = xf.abs().amax(-1, keepdim=True)
    scale = absmax.clamp_(min=eps).div_(q)
    return (xf / scale).round_().clamp_(-q - 1, q).mul_(scale)


class _QuantizeWeight(torch.autograd.Function):
    """codes · scale (cast to `dtype`) forward; straight-through (identity) gradient to the latent `w`."""

    @staticmethod
    def forward(ctx, w: Tensor, q: int | Tensor, eps: float, dtype: torch.dtype) -> Tensor:
        ctx.w_dtype = w.dtype
        return _fake_quant_weight(w, q, eps).to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return grad.to(ctx.w_dtype), None, None, None


class _QuantizeActivation(torch.autograd.Function):
    """Per-token absmax fake quantization forward; straight-through (identity) gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int, eps: float) -> Tensor:
        return _fake_quant_activation(x, bits, eps).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad, None, None


def _ste_weight(w: Tensor, q: int | Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Quantized `w` in `dtype`, straight-through to `w`. Eagerly an autograd.Function (no extra
    kernels); under torch.compile the same as plain ops, ``q + (w - w.detach())`` (exactly q forward,
    identity gradient), which the compiler fuses away: PyTorch 2.11 was seen to return zero gradients
    through a compiled autograd.Function whose backward passes its gradient through unchanged."""
    if torch.compiler.is_compiling():
        return _fake_quant_weight(w, q, eps).to(dtype) + (w - w.detach()).to(dtype)
    return _QuantizeWeight.apply(w, q, eps, dtype)


def _ste_activation(x: Tensor, bits: int, eps: float) -> Tensor:
    """Fake-quantized `x` (in x's dtype), straight-through; see `_ste_weight` for the two forms."""
    if torch.compiler.is_compiling():
        return _fake_quant_activation(x, bits, eps).to(x.dtype) + (x - x.detach())
    return _QuantizeActivation.apply(x, bits, eps)


def _quantize_weight(w: Tensor, q: int | Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    return _ste_weight(w, q, eps, dtype)


def _norm_quantize(x: Tensor, gain: Tensor | None, norm_eps: float, bits: int | None, eps: float,
                   dtype: torch.dtype) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):
        if gain is not None:
            x = F.rms_norm(x.float(), (x.shape[-1],), gain.float(), norm_eps).to(x.dtype)
        if bits is not None:
            x = _ste_activation(x, bits, eps)
        return x.to(dtype)


def _norm_quantize_many(x: Tensor, gains: list[Tensor | None], norm_eps: float, bits: int | None, eps: float,
                        dtype: torch.dtype) -> list[Tensor]:
    if all(g is None for g in gains):  # no norms: one quantized input serves them all
        return [_norm_quantize(x, None, norm_eps, bits, eps, dtype)] * len(gains)
    return [_norm_quantize(x, g, norm_eps, bits, eps, dtype) for g in gains]


def _quantize_weight_groups(groups: list[list[Tensor]], q: int | Tensor, eps: float,
                            dtype: torch.dtype) -> list[Tensor]:
    out = []
    for group in groups:
        qs = [_ste_weight(w, q, eps, dtype) for w in group]
        out.append(qs[0] if len(qs) == 1 else torch.cat(qs, dim=-2))
    return out


def quantize_weight(w: Tensor, bits: float = TERNARY_BITS, eps: float = 1e-5,
                    dtype: torch.dtype | None = None) -> Tensor:
    """Fake-quantized weight codes · scale (per matrix of `w`), with a straight-through gradient to `w`.

    `dtype`: the dtype of the result (default `w`'s), e.g. the autocast dtype, so no second cast is needed.
    """
    return quantize_weight_at(w, level_arg(bits, w.device), eps, dtype or w.dtype)


def quantize_weight_at(w: Tensor, q: int | Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """`quantize_weight` with Q given (a layer's `q_levels` buffer, or `level_arg`)."""
    return fused_call(_quantize_weight, w.is_cuda, w, q, eps, dtype)


def quantize_activation(x: Tensor, bits: int = 8, eps: float = 1e-5) -> Tensor:
    """Per-token (last dim) symmetric absmax quantization, straight-through gradient (under torch.compile
    in plain ops: see `_ste_weight`; the autograd.Function form gave the int8 experts' inputs no gradient)."""
    return _ste_activation(x, bits, eps)


def norm_quantize(x: Tensor, gain: Tensor | None, norm_eps: float, bits: int | None, eps: float,
                  dtype: torch.dtype | None = None) -> Tensor:
    """BitLinear's input path: RMSNorm with `gain` (None: no norm), then per-token `bits`-bit absmax
    quantization (None: none), straight-through; the result in `dtype` (default x's)."""
    return fused_call(_norm_quantize, x.is_cuda, x, gain, norm_eps, bits, eps, dtype or x.dtype)


def norm_quantize_many(x: Tensor, gains: list[Tensor | None], norm_eps: float, bits: int | None, eps: float,
                       dtype: torch.dtype | None = None) -> list[Tensor]:
    """`norm_quantize` of one input for several BitLinear layers (each its own gain) in one fused call:
    the input is read once and its gradients are summed in the same kernel."""
    return fused_call(_norm_quantize_many, x.is_cuda, x, list(gains), norm_eps, bits, eps, dtype or x.dtype)


def quantize_weight_groups(groups: list[list[Tensor]], q: Tensor, eps: float, dtype: torch.dtype) -> list[Tensor]:
    """`quantize_weight` of many weights in one fused call (one scale per matrix, as ever) at Q = `q`
    (the layers' `q_levels`); the members of a group of several are concatenated along the output dim
    (dim -2) in the same pass."""
    return fused_call(_quantize_weight_groups, groups[0][0].is_cuda, groups, q, eps, dtype)
