"""BitLinear (BitNet b1.58): ternary weights and 8-bit activations from the first step.

Forward of a quantized BitLinear, for input x (..., in) and latent fp32 weight W (out, in):

    x' = RMSNorm(x) · g                                   (own learnable g; `norm=True`)
    s_x = absmax_per_token(x') / Q_a,  Q_a = 2^(act_bits-1) - 1          (127 for 8 bits)
    x_q = clamp(round(x' / s_x), -Q_a - 1, Q_a) · s_x     (straight-through: x' + (x_q - x').detach())
    W_q = weight codes · s_w                               (straight-through: W + (W_q - W).detach())
    y   = x_q @ W_q^T

Weight quantization at `bits` (a per-tensor scale, eps-guarded):

    Q   = 2^(bits-1) - 1 levels on each side of zero (1.58 bits -> Q = 1; 8 bits -> Q = 127)
    s_w = min(mean|W|, max|W| / Q)
    codes = clamp(round(W / s_w), -Q, Q)

For 1.58 bits this is exactly BitNet b1.58: s_w = mean|W| (absmean), codes in {-1, 0, 1}.
For many levels (8 bits) max|W|/Q is the smaller and it is symmetric absmax quantization.
In between the step is absmax but never larger than the mean magnitude, so few-level widths
(3 bits) clip outliers instead of rounding most weights to zero. Symmetric 2 bits has Q = 1,
i.e. it is the same ternary quantizer as 1.58.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nativelm.model.params import TERNARY_BITS, check_bits


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) · weight, computed in fp32 (ORT SimplifiedLayerNormalization)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def levels(bits: float) -> int:
    """Q, the number of non-zero levels on each side of zero at a weight width."""
    return 1 if bits == TERNARY_BITS else 2 ** (int(bits) - 1) - 1


def weight_codes(w: Tensor, bits: float = TERNARY_BITS, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Integer codes (as a float tensor, in [-Q, Q]) and the per-tensor scale of `w` at `bits`."""
    q = levels(bits)
    wf = w.detach().float()
    absw = wf.abs()
    scale = torch.minimum(absw.mean(), absw.amax() / q).clamp(min=eps)
    return (wf / scale).round().clamp(-q, q), scale


def quantize_weight(w: Tensor, bits: float = TERNARY_BITS, eps: float = 1e-5) -> Tensor:
    """Fake-quantized weight codes · scale, with a straight-through gradient to `w`."""
    codes, scale = weight_codes(w, bits, eps)
    return w + ((codes * scale).to(w.dtype) - w).detach()


def quantize_activation(x: Tensor, bits: int = 8, eps: float = 1e-5) -> Tensor:
    """Per-token (last dim) symmetric absmax quantization, straight-through gradient."""
    q = 2 ** (bits - 1) - 1
    xf = x.detach().float()
    scale = xf.abs().amax(-1, keepdim=True).clamp(min=eps) / q
    xq = (xf / scale).round().clamp(-q - 1, q) * scale
    return x + (xq.to(x.dtype) - x).detach()


class BitLinear(nn.Module):
    """Linear layer with latent fp32 weights trained through ternary (or b-bit) quantization.

    quantize=False: plain ``nn.Linear`` behaviour (no norm, no quantizer): the fp baseline.
    norm=True: RMSNorm with its own weight before the activation quantizer.
    act_bits=None: weights-only quantization (activations stay in floating point).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        quantize: bool = True,
        norm: bool = True,
        act_bits: int | None = 8,
        weight_bits: float = TERNARY_BITS,
        eps: float = 1e-5,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quantize = quantize
        self.act_bits = act_bits
        self.eps = eps
        self.weight_bits = check_bits(weight_bits)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.norm = RMSNorm(in_features, norm_eps) if (quantize and norm) else None

    def extra_repr(self) -> str:
        q = f"bits={self.weight_bits}, act_bits={self.act_bits}" if self.quantize else "fp"
        return f"{self.in_features} -> {self.out_features}, {q}, norm={self.norm is not None}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.quantize:
            return F.linear(x, self.weight)
        if self.norm is not None:
            x = self.norm(x)
        if self.act_bits is not None:
            x = quantize_activation(x, self.act_bits, self.eps)
        return F.linear(x, quantize_weight(self.weight, self.weight_bits, self.eps))

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """Codes (int8 for <= 8 bits, else int16) and fp32 scale at the current width."""
        codes, scale = weight_codes(self.weight, self.weight_bits, self.eps)
        return codes.to(torch.int8 if levels(self.weight_bits) <= 127 else torch.int16), scale

    def ternary_weight(self) -> tuple[Tensor, Tensor]:
        """(codes int8 in {-1, 0, 1} of shape (out, in), scale: 0-d fp32): W_q = codes · scale.

        Always the 1.58-bit quantization (what the ONNX exporter packs), whatever the current width.
        """
        codes, scale = weight_codes(self.weight, TERNARY_BITS, self.eps)
        return codes.to(torch.int8), scale


def bitlinears(model: nn.Module) -> Iterator[BitLinear]:
    """Every BitLinear inside `model`."""
    return (m for m in model.modules() if isinstance(m, BitLinear))


def set_weight_bits(model: nn.Module, bits: float) -> None:
    """Set the weight width of every BitLinear in `model` (1.58 = ternary)."""
    bits = check_bits(bits)
    for m in bitlinears(model):
        m.weight_bits = bits
    if hasattr(model, "weight_bits"):
        model.weight_bits = bits


class BitSchedule:
    """Progressive precision: weight width by fraction of training.

    ``stages`` are (fraction_of_training, bits) pairs, the first at 0.0 and fractions increasing;
    from each fraction on, its width applies (e.g. ((0, 8), (0.25, 4), (0.5, 3), (0.75, 1.58))).
    """

    def __init__(self, stages: list[tuple[float, float]] | tuple[tuple[float, float], ...]) -> None:
        stages = [(float(f), check_bits(b)) for f, b in stages]
        if not stages or stages[0][0] != 0.0:
            raise ValueError("a bit schedule needs a first stage at fraction 0.0")
        if any(b[0] <= a[0] for a, b in zip(stages, stages[1:])):
            raise ValueError("bit schedule fractions must increase")
        self.stages = stages

    @classmethod
    def from_params(cls, params) -> BitSchedule:  # noqa: ANN001 - ModelParams (avoid a cycle in hints)
        """The schedule of ``ModelParams.bit_schedule``."""
        return cls(params.schedule_stages())

    def bits_at(self, step: int, total_steps: int) -> float:
        """Weight width at optimizer step `step` (0-based) of a run of `total_steps` steps."""
        frac = step / max(total_steps, 1)
        bits = self.stages[0][1]
        for start, b in self.stages:
            if frac >= start:
                bits = b
        return bits

    def __repr__(self) -> str:
        return f"BitSchedule({self.stages})"
