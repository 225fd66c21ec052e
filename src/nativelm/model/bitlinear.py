"""BitLinear (BitNet b1.58): ternary weights and 8-bit activations from the first step.

Forward of a quantized BitLinear, for input x (..., in) and latent fp32 weight W (out, in):

    x' = RMSNorm(x) · g                                   (own learnable g; `norm=True`)
    s_x = absmax_per_token(x') / Q_a,  Q_a = 2^(act_bits-1) - 1          (127 for 8 bits)
    x_q = clamp(round(x' / s_x), -Q_a - 1, Q_a) · s_x     (straight-through: x' + (x_q - x').detach())
    W_q = weight codes · s_w                               (straight-through: W + (W_q - W).detach())
    y   = x_q @ W_q^T

Weight quantization at `bits` (one scale per weight matrix, eps-guarded):

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

from nativelm.model.quantizers import levels, norm_quantize, quantize_activation, quantize_weight_at, weight_codes
from nativelm.params.model import TERNARY_BITS, check_bits


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) · weight, computed in fp32 (ORT SimplifiedLayerNormalization)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # F.rms_norm is the same formula (bit-identical on CPU) and one fused kernel on recent CUDA builds
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class _WeightCodes:
    """Integer codes of a quantized weight, shared by BitLinear (out, in) and ExpertLinear (E, out, in).

    The width lives twice: `weight_bits` (a float, for the exporter and the logs) and the buffer
    `q_levels` (Q as a 0-d fp32 tensor, not saved), which is what the forward reads. A compiled model
    sees a tensor whose value changes in place, so a switch of the progressive schedule recompiles
    nothing (docs/training.md)."""

    weight: Tensor
    eps: float
    q_levels: Tensor

    def _init_width(self, bits: float) -> None:
        self.register_buffer("q_levels", torch.tensor(float(levels(check_bits(bits)))), persistent=False)
        self._weight_bits = check_bits(bits)

    @property
    def weight_bits(self) -> float:
        return self._weight_bits

    @weight_bits.setter
    def weight_bits(self, bits: float) -> None:
        self._weight_bits = check_bits(bits)
        with torch.no_grad():
            self.q_levels.fill_(float(levels(self._weight_bits)))

    def weight_codes(self) -> tuple[Tensor, Tensor]:
        """Codes (int8 for <= 8 bits, else int16) and fp32 scale(s) at the current width:
        W_q = codes · scale, one scale per matrix (per expert for stacked experts)."""
        codes, scale = weight_codes(self.weight, self.weight_bits, self.eps)
        return codes.to(torch.int8 if levels(self.weight_bits) <= 127 else torch.int16), scale

    def ternary_weight(self) -> tuple[Tensor, Tensor]:
        """Codes int8 in {-1, 0, 1} (the weight's shape) and fp32 scale(s): W_q = codes · scale.

        Always the 1.58-bit quantization (what the ONNX exporter packs), whatever the current width.
        """
        codes, scale = weight_codes(self.weight, TERNARY_BITS, self.eps)
        return codes.to(torch.int8), scale


class BitLinear(_WeightCodes, nn.Module):
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
        self._init_width(weight_bits)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.norm = RMSNorm(in_features, norm_eps) if (quantize and norm) else None

    def extra_repr(self) -> str:
        q = f"bits={self.weight_bits}, act_bits={self.act_bits}" if self.quantize else "fp"
        return f"{self.in_features} -> {self.out_features}, {q}, norm={self.norm is not None}"

    def forward(self, x: Tensor, weight: Tensor | None = None) -> Tensor:
        """x (..., in) -> (..., out). `weight`: this layer's `quantized_weight`, when the caller has
        already computed it (many layers' weights in one fused call)."""
        if not self.quantize:
            return F.linear(x, self.weight)
        dtype = compute_dtype(x)  # both operands straight in the matmul dtype (what autocast would cast to)
        if weight is None:
            weight = self.quantized_weight(dtype)
        return F.linear(self.prepare_input(x, dtype), weight)

    @property
    def gain(self) -> Tensor | None:
        """The RMSNorm gain in front of the quantizer (None without a norm)."""
        return self.norm.weight if self.norm is not None else None

    def prepare_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The matmul's input: RMSNorm (if any), activation quantization (if any), in `dtype`."""
        norm_eps = self.norm.eps if self.norm is not None else 0.0
        return norm_quantize(x, self.gain, norm_eps, self.act_bits, self.eps, dtype)

    def quantized_weight(self, dtype: torch.dtype) -> Tensor:
        """The weight the forward multiplies by (codes · scale, straight-through), in `dtype`."""
        if not self.quantize:
            return self.weight.to(dtype)
        return quantize_weight_at(self.weight, self.q_levels, self.eps, dtype)


class ExpertLinear(_WeightCodes, nn.Module):
    """`n_experts` BitLinear maps in_features -> out_features, stacked: one (E, out, in) latent weight.

    Expert e computes exactly what ``BitLinear(in_features, out_features, ...)`` with weight
    ``weight[e]`` computes (own absmean / absmax weight scale per expert matrix; with `norm`, its
    own RMSNorm gain ``norm_weights[e]``; with `act_bits`, per-token absmax activations), but the
    whole stack is quantized in one set of ops and applied by one grouped matmul (see
    :mod:`nativelm.model.moe`). `quantize=False`: plain full-precision matrices.
    """

    def __init__(
        self,
        n_experts: int,
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
        self.n_experts, self.in_features, self.out_features = n_experts, in_features, out_features
        self.quantize = quantize
        self.act_bits = act_bits if quantize else None
        self.eps, self.norm_eps = eps, norm_eps
        self._init_width(weight_bits)
        self.weight = nn.Parameter(torch.empty(n_experts, out_features, in_features))
        bound = 1.0 / math.sqrt(in_features)  # what BitLinear's kaiming_uniform_(a=sqrt(5)) gives per expert
        nn.init.uniform_(self.weight, -bound, bound)
        # one 1-D gain per expert (a norm gain: never weight-decayed, initialised to 1)
        self.norm_weights = (nn.ParameterList(nn.Parameter(torch.ones(in_features)) for _ in range(n_experts))
                             if (quantize and norm) else None)

    def extra_repr(self) -> str:
        q = f"bits={self.weight_bits}, act_bits={self.act_bits}" if self.quantize else "fp"
        return (f"{self.n_experts} x ({self.in_features} -> {self.out_features}), {q}, "
                f"norm={self.norm_weights is not None}")

    def quantized_weight(self, dtype: torch.dtype) -> Tensor:
        """(E, out, in) weights as the forward uses them, in `dtype` (straight-through to the latent weight)."""
        if not self.quantize:
            return self.weight.to(dtype)
        return quantize_weight_at(self.weight, self.q_levels, self.eps, dtype)

    def prepare_input(self, x: Tensor, row_experts: Tensor) -> Tensor:
        """RMSNorm (each row with its expert's gain) and activation quantization of rows x (M, in)
        grouped by expert (`row_experts` (M,): the expert of each row); identity for weight-only experts."""
        if self.norm_weights is not None:
            gains = torch.stack(tuple(self.norm_weights)).float().index_select(0, row_experts)
            x = (F.rms_norm(x.float(), (x.shape[-1],), None, self.norm_eps) * gains).to(x.dtype)
        if self.act_bits is not None:
            x = quantize_activation(x, self.act_bits, self.eps)
        return x


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in here: the autocast dtype when autocast is on, else x's dtype."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def bitlinears(model: nn.Module) -> Iterator[BitLinear | ExpertLinear]:
    """Every quantization-aware linear inside `model`: BitLinear layers and stacked expert matrices."""
    return (m for m in model.modules() if isinstance(m, (BitLinear, ExpertLinear)))


def set_weight_bits(model: nn.Module, bits: float) -> None:
    """Set the weight width of every BitLinear in `model` (1.58 = ternary)."""
    bits = check_bits(bits)
    for m in bitlinears(model):
        m.weight_bits = bits
    for m in model.modules():
        if hasattr(m, "one_width"):
            m.one_width()  # refresh what a compiled forward reads
    if hasattr(model, "weight_bits"):
        model.weight_bits = bits
