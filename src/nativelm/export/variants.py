"""The export variants (`ExportParams.variant`): how each stores a linear layer, the MoE and the tables.

- ``ternary``: the native model. Needs a quantized model at 1.58 (or symmetric 2) bits: 2-bit
  MatMulNBits and QMoE on the ternary codes. Other models only with ``export.ptq``, from their
  ternarized twin (`nativelm.export.ptq`, which also resolves ``native``).
- ``ternary-ops``: the same model on nativelm's own operators (`ternary_ops`: TernaryMatMul,
  TernaryMoE; five trits per byte), exact; the export folder keeps the ``ternary`` graph beside it
  as the fallback for a board without the operator library.
- ``int4``: MatMulNBits / QMoE at 4 bits. From the forward weights (default), integer codes of at most
  7 levels a side (ternary, 3- and 4-bit widths) are stored as they are with their scale: exact.
- ``fp32``: standard ONNX except GroupQueryAttention and the skip norms: MatMul with the weights the
  forward multiplies with, BitLinear's per-token 8-bit activation quantization as Round/Clip ops (so
  it is the PyTorch forward, op for op), the MoE as a dense computation of all experts weighted by the
  routing weights (`moe_graph.dense_moe`). Embedding and head stay fp32.

``expert_quant: bitlinear`` (each expert with its own RMSNorm gain and 8-bit activations): QMoE has
no per-expert input norm or activation quantizer, so ternary / int4 exports refuse it (a
ParamsError: the variant does not fit the model, exit code 2); the fp32 variant represents it
exactly (per-expert norm and quantizer in the dense MoE). ``expert_quant: int8`` (no norm, each
expert input quantized per row): exact on ``ternary-ops`` (TernaryMoE ``act_bits`` 8) and fp32; the
ternary / int4 graphs quantize x per row with standard ops in front of QMoE and leave the hidden
activation float, an approximation they note (parity decides).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nativelm.errors import ParamsError
from nativelm.export import kernels, moe_graph, ops, ternary_ops
from nativelm.export.builder import GraphBuilder
from nativelm.export.ptq import is_ternary
from nativelm.export.weights import (
    ExpertWeights,
    Linear,
    coded_experts,
    coded_linear,
    integer_weight,
    latent_linear,
    ternary_experts,
)
from nativelm.params.export import ExportParams, Variant

if TYPE_CHECKING:
    from nativelm.model import NativeLM
    from nativelm.params.model import ModelParams

PTQ_HINT = "or set export.ptq: true to quantize it to ternary after training (post-training quantization)"


class ExportVariant:
    """What one variant decides: weights it reads, operators it emits, bits of its tables, its refusals."""

    name: Variant
    flat_router = True  # router logits flattened to (tokens, n_experts), as ORT's QMoE takes them

    def __init__(self, params: ExportParams) -> None:
        self.params = params

    # ---- the model's weights ----------------------------------------------------------------------
    def forward_weights(self, module: Any) -> bool:
        """Whether `module` exports the quantized weights its forward uses (else its latent weights)."""
        return bool(getattr(module, "quantize", False)) and self.params.comparison_weights == "forward"

    def codes(self, module: Any) -> tuple[Any, Any]:
        """(integer codes, scale) of a quantized BitLinear's forward weights."""
        return module.weight_codes()

    def linear(self, module: Any, name: str) -> Linear:
        """Weights of a BitLinear (or an nn.Linear-like module) for this variant and source."""
        if not self.forward_weights(module):
            return latent_linear(module, name)
        return coded_linear(module, name, *self.codes(module))

    def experts(self, moe: Any) -> ExpertWeights:
        return coded_experts(moe, self.forward_weights)

    # ---- the graph ----------------------------------------------------------------------------------
    def emit_linear(self, b: GraphBuilder, lin: Linear, x: str, part: str, output: str | None = None) -> str:
        """RMSNorm (BitLinear's own gain) then the matmul of the variant; returns the output name."""
        output = output or lin.name
        b.count(part, lin.weight.size + (lin.norm.size if lin.norm is not None else 0))
        h = b.rms(f"{lin.name}.norm", x, lin.norm, lin.norm_eps, part) if lin.norm is not None else x
        return self.matmul(b, lin, h, part, output)

    def matmul(self, b: GraphBuilder, lin: Linear, h: str, part: str, output: str) -> str:
        raise NotImplementedError

    def emit_moe(self, b: GraphBuilder, prefix: str, moe: Any, h: str, router: str, output: str) -> None:
        raise NotImplementedError

    def table_bits(self, requested: int) -> int:
        """Bits of the embedding table / LM head, given the ones `params` ask for."""
        return requested

    def model_notes(self, p: ModelParams) -> list[str]:
        """Approximations the model forces on this variant, noted before the graph is built."""
        return []

    def refuse(self, model: NativeLM) -> None:
        """Raise one clear ParamsError line if this variant cannot represent `model`."""

    def opsets(self) -> list[tuple[str, int]]:
        """(domain, version) of the operator sets the graph uses beyond ai.onnx and com.microsoft."""
        return []

    def model_props(self) -> tuple[str, dict[str, str]]:
        """(doc_string, metadata props) of the ONNX model."""
        return f"nativelm decoder, variant {self.name}", {"nativelm.variant": self.name}


class _QuantizedVariant(ExportVariant):
    """MatMulNBits linears and one QMoE node per MoE layer at `bits`."""

    bits: int

    def __init__(self, params: ExportParams) -> None:
        super().__init__(params)
        self._plan: moe_graph.MoePlan | None = None  # one QMoE configuration for every layer

    def matmul(self, b: GraphBuilder, lin: Linear, h: str, part: str, output: str) -> str:
        bits, block, level = self.bits, self.params.block_size, self.params.accuracy_level
        w_int, scales = integer_weight(lin, bits, block)
        fast = kernels.matmul_nbits_is_fast(bits, block, level)
        b.add(b.guard(lin.name, lambda: ops.matmul_nbits(
            lin.name, h, w_int, scales, bits, block, level, output=output, allow_slow_kernel=True)), part)
        b.choices.setdefault("linear", {"op": "MatMulNBits", "bits": bits, "block_size": block,
                                        "accuracy_level": level, "fast_kernel": fast})
        if not fast:
            b.note_once("linear", f"MatMulNBits bits={bits} block_size={block} accuracy_level={level} runs on "
                                  "ORT's generic (slow) kernel; use accuracy_level 4 and block_size 32/64/128 for "
                                  "the fast one")
        return output

    def emit_moe(self, b: GraphBuilder, prefix: str, moe: Any, h: str, router: str, output: str) -> None:
        n_experts, inter, hidden = moe.experts.gate.weight.shape
        b.count("ffn", 3 * n_experts * inter * hidden)
        weights = self.experts(moe)
        if self._plan is None:
            self._plan = moe_graph.moe_plan(b, self.bits, self.params.moe_block_size, hidden, inter)
        gate = moe.experts.gate
        if gate.act_bits is not None and self.forward_weights(gate):  # int8 experts: x per row (see model_notes)
            h = b.fake_quant(f"{prefix}.moe.act", h, gate.act_bits, gate.eps)
        moe_graph.qmoe(b, prefix, moe, h, router, output, weights, self._plan)

    def model_notes(self, p: ModelParams) -> list[str]:
        if not p.quantize:
            return []
        notes = []
        if p.act_bits != 8:
            notes.append(f"the model quantizes BitLinear activations to {p.act_bits} bits; MatMulNBits (accuracy_level "
                         f"{self.params.accuracy_level}) uses int8 or float activations, so the export only "
                         "approximates it (parity decides)")
        if p.ffn == "moe" and p.expert_quant == "int8":
            notes.append(f"the experts quantize their inputs per row to {p.act_bits} bits (model.expert_quant: int8); "
                         "QMoE has no activation quantizer, so the export quantizes the expert input with standard ops "
                         "in front of QMoE and leaves the ReGLU hidden activation float: it only approximates the "
                         "experts (parity decides; variant ternary-ops computes them exactly)")
        return notes

    def refuse(self, model: NativeLM) -> None:
        if model.params.ffn == "moe" and not model.blocks[0].ffn.experts.shared_input:
            raise ParamsError(
                f"export {self.name}: model.expert_quant is 'bitlinear' (each expert has its own RMSNorm gain and "
                "8-bit activations); ORT QMoE has no per-expert norm or activation quantizer, so it cannot represent "
                "these experts exactly. Retrain with expert_quant: qmoe (or int8), or export variant fp32 (exact, standard ONNX)")


class Ternary(_QuantizedVariant):
    """The native model: 2-bit MatMulNBits and QMoE on the ternary codes of its forward."""

    name = "ternary"
    bits = 2

    def forward_weights(self, module: Any) -> bool:
        return bool(getattr(module, "quantize", False))

    def codes(self, module: Any) -> tuple[Any, Any]:
        return module.ternary_weight()

    def experts(self, moe: Any) -> ExpertWeights:
        return ternary_experts(moe)

    def refuse(self, model: NativeLM) -> None:
        if not model.params.quantize:
            raise ParamsError(f"export {self.name}: the model was trained without quantization (model.quantize: "
                              f"false); its weights have no ternary codes. Export variant fp32 or int4, {PTQ_HINT}")
        if not is_ternary(model):
            raise ParamsError(f"export {self.name}: the model's weights are at {model.weight_bits} bits (bit_schedule "
                              f"did not end at 1.58); its forward is not ternary. Export variant int4 or fp32, "
                              f"{PTQ_HINT}")
        super().refuse(model)


class TernaryOps(Ternary):
    """The native model on nativelm's own operators: TernaryMatMul per BitLinear (its RMSNorm gain
    fused), one TernaryMoE per MoE layer; attention, norms and tables as `Ternary`. Exact: the
    operators compute BitLinear's per-token int8 activations, the weight-only experts (TernaryMoE
    act_bits 0) and the int8 experts (act_bits 8) as PyTorch."""

    name = "ternary-ops"
    flat_router = False  # TernaryMoE takes (batch, sequence, d) and (batch, sequence, E) as they are

    def emit_linear(self, b: GraphBuilder, lin: Linear, x: str, part: str, output: str | None = None) -> str:
        output = output or lin.name
        b.count(part, lin.weight.size + (lin.norm.size if lin.norm is not None else 0))
        b.add(b.guard(lin.name, lambda: ternary_ops.ternary_matmul(
            lin.name, x, lin.codes, float(lin.scale), act_bits=lin.act_bits or 0, act_eps=lin.act_eps,
            gain=lin.norm, norm_eps=lin.norm_eps, output=output)), part)
        b.choices.setdefault("linear", {"op": f"{ternary_ops.DOMAIN}:TernaryMatMul", "act_bits": lin.act_bits or 0,
                                        "fused_norm": lin.norm is not None})
        return output

    def emit_moe(self, b: GraphBuilder, prefix: str, moe: Any, h: str, router: str, output: str) -> None:
        n_experts, inter, hidden = moe.experts.gate.weight.shape
        b.count("ffn", 3 * n_experts * inter * hidden)
        weights = self.experts(moe)
        name = f"{prefix}.moe"
        codes = {which: w[1] for which, w in weights.items()}
        scales = {which: w[2] for which, w in weights.items()}
        gate = moe.experts.gate
        act_bits = gate.act_bits or 0  # 8 for int8 experts (custom_refusal: model.act_bits is 8), 0 for qmoe
        b.add(b.guard(name, lambda: ternary_ops.ternary_moe(name, h, router, codes, scales, top_k=moe.top_k,
                                                            act_bits=act_bits, act_eps=gate.eps,
                                                            output=output)), "ffn")
        b.choices.setdefault("moe", {"op": f"{ternary_ops.DOMAIN}:TernaryMoE", "top_k": moe.top_k,
                                     "act_bits": act_bits, "activation": "reglu"})

    def model_notes(self, p: ModelParams) -> list[str]:
        return []

    def custom_refusal(self, model: NativeLM) -> str | None:
        """What of a ternary `model` the operators cannot compute exactly (beyond `Ternary`'s refusals);
        None: nothing."""
        if model.params.act_bits not in (8,):
            return (f"TernaryMatMul quantizes activations to 8 bits; the model quantizes them to "
                    f"{model.params.act_bits} (model.act_bits)")
        return None

    def refuse(self, model: NativeLM) -> None:
        super().refuse(model)
        refusal = self.custom_refusal(model)
        if refusal is not None:
            raise ParamsError(f"export {self.name}: {refusal}. Export variant ternary")

    def opsets(self) -> list[tuple[str, int]]:
        return [(ternary_ops.DOMAIN, ternary_ops.OPSET)]


class Int4(_QuantizedVariant):
    """4-bit MatMulNBits and QMoE: the forward's codes where they fit, else symmetric per block."""

    name = "int4"
    bits = 4


class Fp32(ExportVariant):
    """Standard ONNX MatMuls with the forward's weights and activation quantizer, the MoE dense."""

    name = "fp32"

    def matmul(self, b: GraphBuilder, lin: Linear, h: str, part: str, output: str) -> str:
        if lin.act_bits is not None:
            h = b.fake_quant(f"{lin.name}.act", h, lin.act_bits, lin.act_eps)
        return b.node("MatMul", [h, b.init(f"{lin.name}.weight", lin.weight.T, part)], output)

    def emit_moe(self, b: GraphBuilder, prefix: str, moe: Any, h: str, router: str, output: str) -> None:
        n_experts, inter, hidden = moe.experts.gate.weight.shape
        b.count("ffn", 3 * n_experts * inter * hidden)
        moe_graph.dense_moe(b, prefix, moe, h, router, output, self.experts(moe), self.forward_weights)

    def table_bits(self, requested: int) -> int:
        return 32


VARIANTS: dict[str, type[ExportVariant]] = {v.name: v for v in (Ternary, TernaryOps, Int4, Fp32)}


def variant_for(params: ExportParams) -> ExportVariant:
    """The variant object of `params.variant` (one per build: it remembers the QMoE plan)."""
    return VARIANTS[params.variant](params)
