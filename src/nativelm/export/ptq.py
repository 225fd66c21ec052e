"""Which precision an export is at, relative to the one the model was trained in: native or PTQ.

An export at a lower precision than training is post-training quantization (PTQ):

- ``ternary`` of an fp model (``model.quantize: false``) or of one trained at 3+ bits: opt-in
  (``export.ptq``). The graph is built from the model's ternarized twin: the same network as a
  quantized NativeLM (BitLinear's absmean ternary weights per matrix, its per-token activation
  quantizer, weight-only ternary experts), loaded with the trained weights. So the graph is the
  native kind (2-bit MatMulNBits + QMoE) and the twin's PyTorch forward is what it computes; no
  quantizer is written twice.
- ``int4`` of an fp model or of one trained at 5+ bits (codes that do not fit 4 bits): block-wise
  symmetric absmax re-quantization (`weights.integer_weight`); allowed as ever, now labelled.

``native`` (the default) resolves to the variant of the training precision (`native_variant`), or
with ``export.ptq`` to ternary for a model trained above it; `plan` records why (``reason``), and
`nativelm.export.ops_choice` then takes a ternary one onto nativelm's own operators where they fit. The label
(`ExportPlan.label`) goes to the manifest, metrics, MLflow and the release, never into the graph:
the ONNX bytes of an export do not depend on what it is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nativelm.model.quantizers import levels
from nativelm.model.transformer import build_model
from nativelm.params.export import TERNARY_VARIANTS, ExportParams, Variant
from nativelm.params.model import TERNARY_BITS, ModelParams

if TYPE_CHECKING:
    from nativelm.model import NativeLM

TERNARY_WIDTHS = (1.58, 2.0)  # symmetric 2-bit codes are the ternary quantizer (BitLinear docstring)
INT4_LEVELS = 7  # codes of at most 7 levels a side (3- and 4-bit widths) are stored by int4 exactly
ACT_BITS = 8  # the per-token activation width a ternary PTQ export of an fp model quantizes to


def is_ternary(model: NativeLM) -> bool:
    """Whether the model's forward is ternary (quantized at 1.58 or symmetric 2 bits)."""
    return bool(model.params.quantize) and float(model.weight_bits) in TERNARY_WIDTHS


def native_variant(model: NativeLM) -> Variant:
    """The variant of the precision the model was trained in: ternary, int4 (3-4 bits) or fp32."""
    if is_ternary(model):
        return "ternary"
    if model.params.quantize and levels(float(model.weight_bits)) <= INT4_LEVELS:
        return "int4"
    return "fp32"


def native_reason(model: NativeLM) -> str:
    """Why `native_variant` chose what it did, in a few words for the manifest and the stage's output."""
    if not model.params.quantize:
        return "the model was trained without quantization (model.quantize: false)"
    bits = f"{float(model.weight_bits):g} bits"
    if is_ternary(model):
        return f"the model was trained ternary ({bits})"
    if native_variant(model) == "int4":
        return f"the model was trained at {bits} (int4 stores its codes exactly)"
    return f"the model was trained at {bits} (more levels than int4 stores)"


def resolved(params: ExportParams, model: NativeLM) -> tuple[ExportParams, str | None]:
    """`params` with ``variant: native`` replaced by the variant it means for `model`, and why (None when
    a variant was named). ``export.ptq`` asks for ternary of a model trained above it."""
    if params.variant != "native":
        return params, None
    variant, reason = native_variant(model), native_reason(model)
    if params.ptq and variant != "ternary":
        variant, reason = "ternary", f"{reason}; export.ptq: true quantizes it to ternary"
    return params.model_copy(update={"variant": variant}), reason


def ptq_method(model: NativeLM, params: ExportParams) -> str | None:
    """What post-training quantization the (resolved) variant applies to `model`; None when it is exact."""
    p = params
    if p.variant in TERNARY_VARIANTS and not is_ternary(model):
        act_bits = model.params.act_bits if model.params.quantize else ACT_BITS
        return f"absmean-ternary per-matrix, int{act_bits} activations"
    from_forward = p.comparison_weights == "forward" or not model.params.quantize  # an fp model has one kind
    if p.variant == "int4" and from_forward and native_variant(model) == "fp32":
        experts = f", experts block {p.moe_block_size}" if model.params.ffn == "moe" else ""
        return f"int4 block-wise symmetric, block {p.block_size}{experts}"
    return None


def ternarized(model: NativeLM) -> NativeLM:
    """The quantized twin of `model` at 1.58 bits, holding its trained weights (eval mode).

    A quantized model keeps its own norms, activation width and expert kind; an fp model has no
    BitLinear norms, so its twin has none either, quantizes activations to `ACT_BITS` and has
    weight-only ternary experts (what QMoE computes).
    """
    update: dict[str, Any] = {"quantize": True, "bit_schedule": [[0.0, TERNARY_BITS]]}
    if not model.params.quantize:
        update.update(bitlinear_norm=False, expert_quant="qmoe", act_bits=ACT_BITS)
    params = ModelParams.model_validate({**model.params.model_dump(), **update})
    twin = build_model(params, model.vocab_size)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@dataclass(frozen=True)
class ExportPlan:
    """What an export builds: the resolved params, the model the graph is built from, its PTQ label."""

    params: ExportParams  # variant resolved (never native)
    model: NativeLM  # the trained model, or its ternarized twin (ternary PTQ)
    requested: Variant  # the variant params asked for (native, or the same as params.variant)
    method: str | None  # the PTQ applied; None: the export is at the training precision (or above)
    reason: str | None = None  # why ``native`` resolved to params.variant; None: the variant was named

    @property
    def ptq(self) -> bool:
        return self.method is not None

    def label(self) -> dict[str, Any]:
        """The PTQ label of the manifest, metrics file and release: ptq, ptq_method (when PTQ)."""
        return {"ptq": self.ptq, **({"ptq_method": self.method} if self.method else {})}


def plan(model: NativeLM, params: ExportParams) -> ExportPlan:
    """The export of `model` that `params` ask for; ternary PTQ builds from the twin only with ``params.ptq``
    (without it the variant refuses the model, naming ``export.ptq``)."""
    concrete, reason = resolved(params, model)
    method = ptq_method(model, concrete)
    source = model
    if concrete.variant in TERNARY_VARIANTS and method is not None:
        if not params.ptq:
            return ExportPlan(concrete, model, params.variant, None, reason)
        source = ternarized(model)
    return ExportPlan(concrete, source, params.variant, method, reason)
