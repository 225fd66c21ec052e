"""The ONNX decoder graph of a NativeLM, built from the operator builders of `ops` (docs/architecture.md, "The export").

One block of the graph, ternary variant (the PyTorch block of `nativelm.model.transformer`):

    h        = RMSNorm(x)            attn_norm (layer 0) or SkipSimplifiedLayerNormalization that also
                                     adds the previous block's FFN output to the residual stream
    router   = MatMul(h, W_r)        fp32 router logits, before attention (pre-attention routing)
    q, k, v  = MatMulNBits(RMSNorm_q(h)), ...   each BitLinear keeps its own RMSNorm gain; 2 bits,
                                     accuracy_level 4 (int8 activations per block of K: close to, not
                                     bit-identical with, BitLinear's per-token 8-bit activations)
    a        = GroupQueryAttention(q, k, v, past)   do_rotary + local_window_size=window on RoPE
                                     layers, do_rotary=0 and -1 on NoPE layers; present = past + new
    h2, x    = SkipSimplifiedLayerNormalization(MatMulNBits(RMSNorm_o(a)), x)   ffn_norm, residual
    y        = QMoE(h2, router)      2-bit experts, ReGLU as fused SwiGLU (alpha 1e6, beta 0), top-k;
                                     a dense FFN is gate/up/down linears with Relu (ReGLU) or
                                     x·Sigmoid(x) (SwiGLU) between
    logits   = LM head(final norm(x + y))   MatMulNBits 8 (or 4) bits, or fp16/fp32 MatMul, on the last
                                     num_logits_to_keep positions (a Slice; the input's default 0: all)

Model I/O: the onnxruntime-genai decoder convention of `nativelm.formats.export_folder`. Under
layer-wise scaling each GroupQueryAttention has its layer's num_heads (q_proj / o_proj and the FFN
linears take their layer's widths from the weights); head size and kv heads, so the cache, are uniform.

The variants (`variants`: one object per variant decides how a linear layer, the MoE and the
tables are stored), the MoE layer (`moe_graph`), the embedding and LM head (`tables`) and the
graph plumbing (`builder`) live in their own modules; this one assembles the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from nativelm.export import ops, ops_choice, ptq, tables
from nativelm.export.builder import GraphBuilder
from nativelm.export.ptq import ExportPlan
from nativelm.export.variants import ExportVariant, variant_for
from nativelm.export.weights import as_numpy
from nativelm.formats.export_folder import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
    LOGITS_TO_KEEP,
    PAST_KEY,
    PAST_VALUE,
    PRESENT_KEY,
    PRESENT_VALUE,
)
from nativelm.params.export import ExportParams

if TYPE_CHECKING:
    from nativelm.model import NativeLM

SEQLENS_K = "attention.seqlens_k"
TOTAL_LENGTH = "attention.total_sequence_length"
ROPE = "rope"


@dataclass
class ExportGraph:
    """A built decoder graph and what the builder chose on the way."""

    model: onnx.ModelProto
    variant: str
    choices: dict[str, Any]  # per part: operator, bits, block size, kernel path
    notes: list[str]  # fallbacks and approximations, one sentence each
    parts: dict[str, str]  # initializer name -> part (embedding, lm_head, attention, ffn, router, norms, rope)
    part_params: dict[str, int]  # weights of the PyTorch model each part stands for
    quantized_nodes: list[str] = field(default_factory=list)  # MatMulNBits / QMoE nodes (expected prepacked)
    io: dict[str, Any] = field(default_factory=dict)  # input / output names and shapes
    _sizes: dict[str, int] = field(default_factory=dict, repr=False)

    def part_bytes(self) -> dict[str, int]:
        """Bytes of the initializers of each part (measured when built: saving with external data
        empties the in-memory tensors)."""
        if not self._sizes:
            for init in self.model.graph.initializer:
                part = self.parts.get(init.name, "other")
                self._sizes[part] = self._sizes.get(part, 0) + _tensor_bytes(init)
        return dict(self._sizes)


def io_names(n_layers: int) -> dict[str, Any]:
    """The graph's input and output names (genai_config.json and the runtime use the same)."""
    return {"inputs": [INPUT_IDS, ATTENTION_MASK] + [n % i for i in range(n_layers) for n in (PAST_KEY, PAST_VALUE)]
            + [LOGITS_TO_KEEP],
            "outputs": [LOGITS] + [n % i for i in range(n_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]}


def _tensor_bytes(init: TensorProto) -> int:
    if init.raw_data:
        return len(init.raw_data)
    return numpy_helper.to_array(init).nbytes


class _Decoder:
    """Assembles the decoder of one model for one variant, block by block."""

    def __init__(self, model: NativeLM, params: ExportParams, variant: ExportVariant) -> None:
        self.model, self.params, self.p, self.variant = model, params, model.params, variant
        self.b = GraphBuilder(variant.name)

    def build(self) -> onnx.ModelProto:
        p, model, b = self.p, self.model, self.b
        b.notes += self.variant.model_notes(p)
        b.add(ops.attention_lengths("attention", ATTENTION_MASK, SEQLENS_K, TOTAL_LENGTH), "constants")
        if any(not p.is_nope_layer(i) for i in range(p.n_layers)):
            b.add(ops.rotary_caches(ROPE, p.head_dim, p.max_seq_len, p.rope_theta), "rope")
        x = tables.embedding(b, model, self.params, self.variant.table_bits(self.params.embed_bits))
        pending: tuple[str, str] | None = None  # (FFN output, residual) still to be added
        for i, block in enumerate(model.blocks):
            x, pending = self.block(i, block, x, pending)
        assert pending is not None
        h = b.skip_rms("final_norm", pending[0], pending[1], as_numpy(model.norm.weight), model.norm.eps, None)
        b.count("norms", model.norm.weight.numel())
        tables.lm_head(b, model, self.params, self.variant.table_bits(self.params.lm_head_bits), self.kept(h))
        inputs, outputs = self.value_infos()
        graph = helper.make_graph(b.nodes, "nativelm_decoder", inputs, outputs, b.inits)
        opsets = [helper.make_opsetid("", self.params.opset), helper.make_opsetid(ops.MS_DOMAIN, ops.MS_OPSET)]
        opsets += [helper.make_opsetid(domain, version) for domain, version in self.variant.opsets()]
        onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="nativelm")
        onnx_model.doc_string, props = self.variant.model_props()
        helper.set_model_props(onnx_model, props)
        return onnx_model

    def kept(self, h: str) -> str:
        """`h` [B, S, d] cut to its last `LOGITS_TO_KEEP` positions (Slice from -N; 0, the default, keeps
        all): a generating runtime asks for one, so the LM head runs on one row per sequence."""
        b = self.b
        b.init(LOGITS_TO_KEEP, np.zeros(1, np.int64), "constants")  # the input's default value
        start = b.node("Neg", [LOGITS_TO_KEEP], "logits.start")
        return b.node("Slice", [h, start, b.const([np.iinfo(np.int64).max]), b.const([1])], "logits.kept")

    def value_infos(self) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        """The typed graph inputs and outputs (names of `io_names`, dynamic batch and lengths)."""
        p, kv, hd = self.p, self.p.n_kv_heads, self.p.head_dim
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info(INPUT_IDS, i64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info(ATTENTION_MASK, i64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info(LOGITS, f32, ["batch_size", "logits_length", self.model.vocab_size])]
        for i in range(p.n_layers):
            for name in (PAST_KEY % i, PAST_VALUE % i):
                inputs.append(helper.make_tensor_value_info(name, f32, ["batch_size", kv, "past_sequence_length", hd]))
            for name in (PRESENT_KEY % i, PRESENT_VALUE % i):
                outputs.append(helper.make_tensor_value_info(name, f32,
                                                             ["batch_size", kv, "total_sequence_length", hd]))
        inputs.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, i64, [1]))
        return inputs, outputs

    def linear(self, module: Any, name: str, x: str, part: str, output: str | None = None) -> str:
        return self.variant.emit_linear(self.b, self.variant.linear(module, name), x, part, output)

    def block(self, i: int, block: Any, x: str, pending: tuple[str, str] | None) -> tuple[str, tuple[str, str]]:
        p, b, prefix = self.p, self.b, f"layers.{i}"
        gain, eps = as_numpy(block.attn_norm.weight), block.attn_norm.eps
        b.count("norms", gain.size + block.ffn_norm.weight.numel())
        if pending is None:
            h = b.rms(f"{prefix}.attn_norm", x, gain, eps, "norms")
        else:
            x = f"{prefix}.input"
            h = b.skip_rms(f"{prefix}.attn_norm", pending[0], pending[1], gain, eps, x)
        moe = p.ffn == "moe"
        router = self.router(prefix, block.ffn, h) if moe and p.pre_attention_routing else None

        attn = block.attn
        q = self.linear(attn.q_proj, f"{prefix}.attn.q_proj", h, "attention")
        k = self.linear(attn.k_proj, f"{prefix}.attn.k_proj", h, "attention")
        v = self.linear(attn.v_proj, f"{prefix}.attn.v_proj", h, "attention")
        rope = not p.is_nope_layer(i)
        window = p.window if (rope and p.window > 0) else -1
        a = f"{prefix}.attn.gqa"
        b.add(ops.group_query_attention(
            a, q, k, v, PAST_KEY % i, PAST_VALUE % i, SEQLENS_K, TOTAL_LENGTH, f"{ROPE}.cos" if rope else None,
            f"{ROPE}.sin" if rope else None, num_heads=attn.n_heads, kv_num_heads=p.n_kv_heads, do_rotary=rope,
            local_window_size=window, outputs=(a, PRESENT_KEY % i, PRESENT_VALUE % i)), "attention")
        b.choices.setdefault("attention", []).append({"layer": i, "do_rotary": int(rope), "local_window_size": window})
        if p.scaling is not None:  # per-layer query heads and FFN widths, recorded next to the graph
            b.choices.setdefault("layer_scaling", []).append(
                {"layer": i, "num_heads": attn.n_heads, "ffn_width": block.ffn.hidden})
        o = self.linear(attn.o_proj, f"{prefix}.attn.o_proj", a, "attention")

        mid = f"{prefix}.attn_residual"
        h2 = b.skip_rms(f"{prefix}.ffn_norm", o, x, as_numpy(block.ffn_norm.weight), block.ffn_norm.eps, mid)
        out = f"{prefix}.ffn"
        if moe:
            if router is None:
                router = self.router(prefix, block.ffn, h2)
            self.variant.emit_moe(b, prefix, block.ffn, h2, router, out)
        else:
            ffn = block.ffn.ffn
            g = self.linear(ffn.gate, f"{prefix}.ffn.gate", h2, "ffn")
            u = self.linear(ffn.up, f"{prefix}.ffn.up", h2, "ffn")
            hidden = b.node("Mul", [self.gate_act(prefix, g), u], f"{prefix}.ffn.hidden")
            self.linear(ffn.down, f"{prefix}.ffn.down", hidden, "ffn", output=out)
        return x, (out, mid)

    def gate_act(self, prefix: str, g: str) -> str:
        """The dense FFN's gate activation: Relu (ReGLU), or g · Sigmoid(g) (SwiGLU: silu in opset 23)."""
        if self.p.ffn_act == "reglu":
            return self.b.node("Relu", [g], f"{prefix}.ffn.relu")
        return self.b.node("Mul", [g, self.b.node("Sigmoid", [g], f"{prefix}.ffn.sigmoid")], f"{prefix}.ffn.silu")

    def router(self, prefix: str, moe: Any, h: str) -> str:
        """fp32 router logits, flattened to (tokens, n_experts) where the variant's MoE wants them so."""
        b, weight = self.b, as_numpy(moe.router.weight)
        b.count("router", weight.size)
        logits = b.node("MatMul", [h, b.init(f"{prefix}.router.weight", weight.T, "router")],
                        f"{prefix}.router.logits")
        if not self.variant.flat_router:
            return logits
        return b.node("Reshape", [logits, b.const([-1, weight.shape[0]])], f"{prefix}.router")


def check_model(model: NativeLM, params: ExportParams) -> ExportPlan:
    """The export plan of `model` (`ptq.plan`, ``native`` on nativelm's operators where they fit:
    `ops_choice`), after refusing, with one clear line, a model the chosen variant cannot represent."""
    plan = ops_choice.with_custom_ops(ptq.plan(model, params))
    variant_for(plan.params).refuse(plan.model)
    return plan


def build_graph(model: NativeLM, params: ExportParams | None = None) -> ExportGraph:
    """The ONNX decoder of `model` (in eval mode, on CPU) for `params.variant` (``native`` resolved;
    ternary PTQ from the ternarized twin, `ptq.plan`); see the module docstring."""
    plan = check_model(model, params or ExportParams())
    model, params = plan.model, plan.params
    variant = variant_for(params)
    decoder = _Decoder(model, params, variant)
    with torch.no_grad():
        onnx_model = decoder.build()
    b = decoder.b
    graph = ExportGraph(model=onnx_model, variant=params.variant, choices=b.choices, notes=b.notes, parts=b.parts,
                        part_params=b.part_params, quantized_nodes=b.quantized_nodes,
                        io=io_names(model.params.n_layers))
    graph.part_bytes()
    return graph
