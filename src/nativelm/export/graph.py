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
    y        = QMoE(h2, router)      2-bit experts, ReGLU as fused SwiGLU (alpha 1e6, beta 0), top-k
    logits   = LM head(final norm(x + y))   MatMulNBits 8 (or 4) bits, or fp16/fp32 MatMul

Model I/O: the onnxruntime-genai decoder convention of `nativelm.formats.export_folder`.

Variants (`ExportParams.variant`):

- ``ternary``: the native model. Needs a quantized model at 1.58 (or symmetric 2) bits.
- ``int4``: MatMulNBits / QMoE at 4 bits. From the forward weights (default), integer codes of at most
  7 levels a side (ternary, 3- and 4-bit widths) are stored as they are with their scale: exact.
- ``fp32``: standard ONNX except GroupQueryAttention and the skip norms: MatMul with the weights the
  forward multiplies with, BitLinear's per-token 8-bit activation quantization as Round/Clip ops (so
  it is the PyTorch forward, op for op), the MoE as a dense computation of all experts weighted by the
  routing weights (zero for the experts a token does not use). Embedding and head stay fp32.

QMoE fallbacks (never a failure): when `kernels.qmoe_is_fast` rejects 2-bit experts at the chosen block,
the other fast blocks are tried, then the ternary codes are stored as 4-bit codes (exact, twice the
memory), then row-wise scales (exact, slow). Every choice lands in `ExportGraph.choices` / `notes`.

``expert_quant: bitlinear`` (each expert with its own RMSNorm gain and 8-bit activations): QMoE has
no per-expert input norm or activation quantizer, so ternary / int4 exports refuse it with a
NativelmError; the fp32 variant represents it exactly (per-expert norm and quantizer in the dense MoE).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nativelm.errors import NativelmError
from nativelm.export import kernels, ops, pack
from nativelm.export.kernels import FAST_BLOCKS, QUANTIZED_OPS
from nativelm.formats.export_folder import (
    ATTENTION_MASK,
    INPUT_IDS,
    LOGITS,
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
TERNARY_WIDTHS = (1.58, 2.0)  # symmetric 2-bit codes are the ternary quantizer (BitLinear docstring)


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
    return {"inputs": [INPUT_IDS, ATTENTION_MASK] + [n % i for i in range(n_layers) for n in (PAST_KEY, PAST_VALUE)],
            "outputs": [LOGITS] + [n % i for i in range(n_layers) for n in (PRESENT_KEY, PRESENT_VALUE)]}


def _tensor_bytes(init: TensorProto) -> int:
    if init.raw_data:
        return len(init.raw_data)
    return numpy_helper.to_array(init).nbytes


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().float().numpy() if hasattr(t, "detach") else np.asarray(t, dtype=np.float32)


@dataclass
class _Linear:
    """One BitLinear (or plain linear) as the exporter sees it."""

    name: str
    weight: np.ndarray  # float32 (out, in) the chosen source multiplies with
    codes: np.ndarray | None  # int8 codes (out, in) of a quantized layer (None: source is float)
    scale: float | None
    norm: np.ndarray | None  # RMSNorm gain in front of the quantizer
    norm_eps: float
    act_bits: int | None  # per-token activation quantization of the forward (None: none, or latent weights)
    act_eps: float


class _Builder:
    def __init__(self, model: NativeLM, params: ExportParams) -> None:
        self.model, self.params, self.p = model, params, model.params
        self.variant = params.variant
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.parts: dict[str, str] = {}
        self.part_params: dict[str, int] = {}
        self.choices: dict[str, Any] = {}
        self.notes: list[str] = []
        self.quantized_nodes: list[str] = []
        self._consts: dict[str, str] = {}
        self._noted: set[str] = set()

    # ---- plumbing ---------------------------------------------------------------------------------
    def add(self, parts: ops.Parts, part: str) -> None:
        nodes, inits = parts
        self.nodes += nodes
        for init in inits:
            self.parts[init.name] = part
        self.inits += inits
        self.quantized_nodes += [n.name for n in nodes if n.op_type in QUANTIZED_OPS]

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        domain = attrs.pop("domain", "")
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def init(self, name: str, array: np.ndarray, part: str) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        self.parts[name] = part
        return name

    def const(self, values: list[int] | float, dtype: type = np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        array = np.array(values, dtype=dtype)
        key = f"{array.dtype}:{array.shape}:{array.tolist()}"
        if key not in self._consts:
            self._consts[key] = self.init(f"const.{len(self._consts)}", array, "constants")
        return self._consts[key]

    def count(self, part: str, n: int) -> None:
        self.part_params[part] = self.part_params.get(part, 0) + int(n)

    def guard(self, name: str, build: Any) -> ops.Parts:
        """Run an ops builder; a ValueError (shape it cannot pack) becomes one clear NativelmError line."""
        try:
            return build()
        except ValueError as exc:
            raise NativelmError(f"export {self.variant}: cannot build {name}: {exc}") from None

    # ---- weights ----------------------------------------------------------------------------------
    def linear(self, module: Any, name: str) -> _Linear:
        """Weights of a BitLinear (or an nn.Linear-like module) for the chosen variant and source."""
        latent = _np(module.weight)
        norm = getattr(module, "norm", None)
        gain = _np(norm.weight) if norm is not None else None
        eps = float(norm.eps) if norm is not None else 1e-5
        act_eps = float(getattr(module, "eps", 1e-5))
        if not self.forward_weights(module):
            return _Linear(name, latent, None, None, gain, eps, None, act_eps)
        codes, scale = module.ternary_weight() if self.variant == "ternary" else module.weight_codes()
        codes_np = codes.cpu().numpy().astype(np.int32)
        scale_f = float(scale)
        weight = (codes_np.astype(np.float32) * np.float32(scale_f)).astype(np.float32)
        small = np.abs(codes_np).max(initial=0) <= 127
        return _Linear(name, weight, codes_np.astype(np.int8) if small else None, scale_f, gain, eps,
                       module.act_bits, act_eps)

    def forward_weights(self, module: Any) -> bool:
        """Whether `module` exports the quantized weights its forward uses (else its latent weights)."""
        if not getattr(module, "quantize", False):
            return False
        return self.variant == "ternary" or self.params.comparison_weights == "forward"

    # ---- operators --------------------------------------------------------------------------------
    def rms(self, name: str, x: str, gain: np.ndarray, eps: float, part: str, output: str | None = None) -> str:
        self.add(ops.rms_norm(name, x, gain, eps, output=output), part)
        return output or name

    def skip_rms(self, name: str, x: str, skip: str, gain: np.ndarray, eps: float, sum_output: str | None) -> str:
        self.add(ops.skip_simplified_layer_norm(name, x, skip, gain, eps, output=name, sum_output=sum_output),
                 "norms")
        return name

    def fake_quant(self, name: str, x: str, bits: int, eps: float) -> str:
        """BitLinear's per-token absmax activation quantization with standard ops (fp32 variant)."""
        q = float(2 ** (bits - 1) - 1)
        absmax = self.node("ReduceMax", [self.node("Abs", [x], f"{name}.abs"), self.const([-1])], f"{name}.absmax",
                           keepdims=1)
        step = self.node("Div", [self.node("Max", [absmax, self.const(eps, np.float32)], f"{name}.floor"),
                                 self.const(q, np.float32)], f"{name}.step")
        rounded = self.node("Round", [self.node("Div", [x, step], f"{name}.scaled")], f"{name}.round")
        clipped = self.node("Clip", [rounded, self.const(-q - 1, np.float32), self.const(q, np.float32)],
                            f"{name}.clip")
        return self.node("Mul", [clipped, step], f"{name}.dequant")

    def emit_linear(self, lin: _Linear, x: str, part: str, output: str | None = None) -> str:
        """RMSNorm (BitLinear's own gain) then the matmul of the variant; returns the output name."""
        output = output or lin.name
        self.count(part, lin.weight.size + (lin.norm.size if lin.norm is not None else 0))
        h = self.rms(f"{lin.name}.norm", x, lin.norm, lin.norm_eps, part) if lin.norm is not None else x
        if self.variant == "fp32":
            if lin.act_bits is not None:
                h = self.fake_quant(f"{lin.name}.act", h, lin.act_bits, lin.act_eps)
            weight = self.init(f"{lin.name}.weight", lin.weight.T, part)
            return self.node("MatMul", [h, weight], output)
        bits = 2 if self.variant == "ternary" else 4
        w_int, scales = self.integer_weight(lin, bits, self.params.block_size)
        fast = kernels.matmul_nbits_is_fast(bits, self.params.block_size, self.params.accuracy_level)
        self.add(self.guard(lin.name, lambda: ops.matmul_nbits(
            lin.name, h, w_int, scales, bits, self.params.block_size, self.params.accuracy_level, output=output,
            allow_slow_kernel=True)), part)
        self.choices.setdefault("linear", {"op": "MatMulNBits", "bits": bits, "block_size": self.params.block_size,
                                           "accuracy_level": self.params.accuracy_level, "fast_kernel": fast})
        if not fast and "linear" not in self._noted:
            self._noted.add("linear")
            self.notes.append(f"MatMulNBits bits={bits} block_size={self.params.block_size} accuracy_level="
                              f"{self.params.accuracy_level} runs on ORT's generic (slow) kernel; use "
                              "accuracy_level 4 and block_size 32/64/128 for the fast one")
        return output

    def integer_weight(self, lin: _Linear, bits: int, block_size: int) -> tuple[np.ndarray, Any]:
        """(w_int, scales) at `bits`: the layer's own codes when they fit, else symmetric per block."""
        limit = (1 << (bits - 1)) - 1 if bits > 2 else 1
        if lin.codes is not None and np.abs(lin.codes).max(initial=0) <= limit:
            return lin.codes, np.float32(lin.scale)
        if bits == 2:
            raise NativelmError(f"export ternary: {lin.name} has no ternary codes")  # guarded by check_model
        return pack.quantize_symmetric(lin.weight, bits, block_size)

    # ---- the graph ------------------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        p, model = self.p, self.model
        hd = p.head_dim
        if self.variant != "fp32" and p.quantize and p.act_bits != 8:
            self.notes.append(f"the model quantizes BitLinear activations to {p.act_bits} bits; MatMulNBits "
                              f"(accuracy_level {self.params.accuracy_level}) uses int8 or float activations, so "
                              "the export only approximates it (parity decides)")
        self.add(ops.attention_lengths("attention", ATTENTION_MASK, SEQLENS_K, TOTAL_LENGTH), "constants")
        if any(not p.is_nope_layer(i) for i in range(p.n_layers)):
            self.add(ops.rotary_caches(ROPE, hd, p.max_seq_len, p.rope_theta), "rope")
        x = self.embedding()
        pending: tuple[str, str] | None = None  # (FFN output, residual) still to be added
        for i, block in enumerate(model.blocks):
            x, pending = self.block(i, block, x, pending)
        assert pending is not None
        h = self.skip_rms("final_norm", pending[0], pending[1], _np(model.norm.weight), model.norm.eps, None)
        self.count("norms", model.norm.weight.numel())
        self.lm_head(h)

        kv = p.n_kv_heads
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64
        inputs = [helper.make_tensor_value_info(INPUT_IDS, i64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info(ATTENTION_MASK, i64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info(LOGITS, f32, ["batch_size", "sequence_length", model.vocab_size])]
        for i in range(p.n_layers):
            for name in (PAST_KEY % i, PAST_VALUE % i):
                inputs.append(helper.make_tensor_value_info(name, f32, ["batch_size", kv, "past_sequence_length", hd]))
            for name in (PRESENT_KEY % i, PRESENT_VALUE % i):
                outputs.append(helper.make_tensor_value_info(name, f32,
                                                             ["batch_size", kv, "total_sequence_length", hd]))
        graph = helper.make_graph(self.nodes, "nativelm_decoder", inputs, outputs, self.inits)
        opsets = [helper.make_opsetid("", self.params.opset), helper.make_opsetid(ops.MS_DOMAIN, ops.MS_OPSET)]
        onnx_model = helper.make_model(graph, opset_imports=opsets, producer_name="nativelm")
        onnx_model.doc_string = f"nativelm decoder, variant {self.variant}"
        helper.set_model_props(onnx_model, {"nativelm.variant": self.variant})
        return onnx_model

    def embedding(self) -> str:
        table = _np(self.model.embed.weight)
        self.count("embedding", table.size)
        bits = 32 if self.variant == "fp32" else self.params.embed_bits
        d = table.shape[1]
        block = next((b for b in (self.params.block_size, *FAST_BLOCKS, 16) if d % b == 0), None)
        if bits in (4, 8) and block is None:
            self.notes.append(f"embedding: d_model {d} is not a multiple of 16, so GatherBlockQuantized cannot "
                              f"take it; the table is stored in fp16 instead of {bits} bits")
            bits = 16
        if bits in (4, 8):
            w_int, scales = pack.quantize_symmetric(table, bits, block)
            self.add(ops.gather_block_quantized("embed", INPUT_IDS, w_int, scales, bits, block, output="embed"),
                     "embedding")
            self.choices["embedding"] = {"op": "GatherBlockQuantized", "bits": bits, "block_size": block}
        elif bits == 16:
            self.add(ops.gather_fp16("embed", INPUT_IDS, table, output="embed"), "embedding")
            self.choices["embedding"] = {"op": "Gather", "bits": 16}
        else:
            weight = self.init("embed.weight", table, "embedding")
            self.node("Gather", [weight, INPUT_IDS], "embed", axis=0)
            self.choices["embedding"] = {"op": "Gather", "bits": 32}
        if self.p.tie_embeddings:
            self.choices["embedding"]["tied_with_lm_head"] = True
        return "embed"

    def lm_head(self, h: str) -> None:
        weight = _np(self.model.lm_head.weight)
        self.count("lm_head", weight.size)  # a tied matrix counts in both parts (stored once per use)
        bits = 32 if self.variant == "fp32" else self.params.lm_head_bits
        block = self.params.block_size
        if bits in (4, 8):
            w_int, scales = pack.quantize_symmetric(weight, bits, block)
            level = self.params.accuracy_level
            self.add(self.guard("lm_head", lambda: ops.matmul_nbits("lm_head", h, w_int, scales, bits, block, level,
                                                                     output=LOGITS, allow_slow_kernel=True)), "lm_head")
            fast = kernels.matmul_nbits_is_fast(bits, block, level)
            self.choices["lm_head"] = {"op": "MatMulNBits", "bits": bits, "block_size": block,
                                       "accuracy_level": level, "fast_kernel": fast}
            if not fast:
                self.notes.append(f"lm_head: MatMulNBits bits={bits} accuracy_level={level} runs on ORT's generic "
                                  "(slow) kernel (8 bits needs accuracy_level 4)")
        elif bits == 16:
            w16 = self.init("lm_head.weight", weight.T.astype(np.float16), "lm_head")
            w32 = self.node("Cast", [w16], "lm_head.weight_fp32", to=TensorProto.FLOAT)
            self.node("MatMul", [h, w32], LOGITS)
            self.choices["lm_head"] = {"op": "MatMul", "bits": 16}
        else:
            self.node("MatMul", [h, self.init("lm_head.weight", weight.T, "lm_head")], LOGITS)
            self.choices["lm_head"] = {"op": "MatMul", "bits": 32}
        if self.p.tie_embeddings:
            self.choices["lm_head"]["tied_with_embedding"] = True

    def block(self, i: int, block: Any, x: str, pending: tuple[str, str] | None) -> tuple[str, tuple[str, str]]:
        p, prefix = self.p, f"layers.{i}"
        gain, eps = _np(block.attn_norm.weight), block.attn_norm.eps
        self.count("norms", gain.size + block.ffn_norm.weight.numel())
        if pending is None:
            h = self.rms(f"{prefix}.attn_norm", x, gain, eps, "norms")
        else:
            x = f"{prefix}.input"
            h = self.skip_rms(f"{prefix}.attn_norm", pending[0], pending[1], gain, eps, x)
        moe = p.ffn == "moe"
        router = self.router(prefix, block.ffn, h) if moe and p.pre_attention_routing else None

        attn = block.attn
        q = self.emit_linear(self.linear(attn.q_proj, f"{prefix}.attn.q_proj"), h, "attention")
        k = self.emit_linear(self.linear(attn.k_proj, f"{prefix}.attn.k_proj"), h, "attention")
        v = self.emit_linear(self.linear(attn.v_proj, f"{prefix}.attn.v_proj"), h, "attention")
        rope = not p.is_nope_layer(i)
        window = p.window if (rope and p.window > 0) else -1
        a = f"{prefix}.attn.gqa"
        self.add(ops.group_query_attention(
            a, q, k, v, PAST_KEY % i, PAST_VALUE % i, SEQLENS_K, TOTAL_LENGTH, f"{ROPE}.cos" if rope else None,
            f"{ROPE}.sin" if rope else None, num_heads=p.n_heads, kv_num_heads=p.n_kv_heads, do_rotary=rope,
            local_window_size=window, outputs=(a, PRESENT_KEY % i, PRESENT_VALUE % i)), "attention")
        self.choices.setdefault("attention", []).append({"layer": i, "do_rotary": int(rope),
                                                        "local_window_size": window})
        o = self.emit_linear(self.linear(attn.o_proj, f"{prefix}.attn.o_proj"), a, "attention")

        mid = f"{prefix}.attn_residual"
        h2 = self.skip_rms(f"{prefix}.ffn_norm", o, x, _np(block.ffn_norm.weight), block.ffn_norm.eps, mid)
        out = f"{prefix}.ffn"
        if moe:
            if router is None:
                router = self.router(prefix, block.ffn, h2)
            if self.variant == "fp32":
                self.dense_moe(prefix, block.ffn, h2, router, out)
            else:
                self.qmoe(prefix, block.ffn, h2, router, out)
        else:
            ffn = block.ffn.ffn
            g = self.emit_linear(self.linear(ffn.gate, f"{prefix}.ffn.gate"), h2, "ffn")
            u = self.emit_linear(self.linear(ffn.up, f"{prefix}.ffn.up"), h2, "ffn")
            hidden = self.node("Mul", [self.node("Relu", [g], f"{prefix}.ffn.relu"), u], f"{prefix}.ffn.hidden")
            self.emit_linear(self.linear(ffn.down, f"{prefix}.ffn.down"), hidden, "ffn", output=out)
        return x, (out, mid)

    def router(self, prefix: str, moe: Any, h: str) -> str:
        """fp32 router logits, flattened to (tokens, n_experts) as QMoE wants them."""
        weight = _np(moe.router.weight)
        self.count("router", weight.size)
        logits = self.node("MatMul", [h, self.init(f"{prefix}.router.weight", weight.T, "router")],
                           f"{prefix}.router.logits")
        return self.node("Reshape", [logits, self.const([-1, weight.shape[0]])], f"{prefix}.router")

    # ---- MoE ------------------------------------------------------------------------------------
    def experts(self, moe: Any) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """{gate, up, down}: (float weight (E, out, in), int8 codes or None, per-expert scales (E,) or None)."""
        experts = moe.experts
        out = {}
        if self.variant == "ternary":
            t = moe.ternary_experts()
            for name in ("gate", "up", "down"):
                codes, scale = t[name].cpu().numpy().astype(np.int8), _np(t[f"{name}_scale"]).reshape(-1)
                out[name] = (codes.astype(np.float32) * scale[:, None, None], codes, scale)
            return out
        for name in ("gate", "up", "down"):
            lin = getattr(experts, name)
            if not self.forward_weights(lin):
                out[name] = (_np(lin.weight), None, None)
                continue
            codes, scale = lin.weight_codes()
            codes_np, scale_np = codes.cpu().numpy(), _np(scale).reshape(-1)
            weight = codes_np.astype(np.float32) * scale_np[:, None, None]
            small = np.abs(codes_np).max(initial=0) <= 127
            out[name] = (weight, codes_np.astype(np.int8) if small else None, scale_np)
        return out

    def qmoe(self, prefix: str, moe: Any, h: str, router: str, output: str) -> None:
        experts = moe.experts
        if not experts.weight_only:
            raise NativelmError(
                f"export {self.variant}: model.expert_quant is 'bitlinear' (each expert has its own RMSNorm gain "
                "and 8-bit activations); ORT QMoE has no per-expert norm or activation quantizer, so it cannot "
                "represent these experts exactly. Retrain with expert_quant: qmoe, or export variant fp32 "
                "(exact, standard ONNX)")
        n_experts, inter, hidden = experts.gate.weight.shape
        self.count("ffn", 3 * n_experts * inter * hidden)
        weights = self.experts(moe)
        want_bits = 2 if self.variant == "ternary" else 4
        bits, block, fast = self.moe_plan(want_bits, hidden, inter)
        ints: dict[str, np.ndarray] = {}
        scales: dict[str, np.ndarray] = {}
        for name, (weight, codes, scale) in weights.items():
            limit = 1 if bits == 2 else (1 << (bits - 1)) - 1
            if codes is not None and np.abs(codes).max(initial=0) <= limit:
                ints[name], scales[name] = codes, scale
            else:
                ints[name], scales[name] = _quantize_experts(weight, bits, block)
        name = f"{prefix}.moe"
        self.add(self.guard(name, lambda: ops.qmoe(
            name, h, router, gate=ints["gate"], gate_scales=scales["gate"], up=ints["up"], up_scales=scales["up"],
            down=ints["down"], down_scales=scales["down"], k=moe.top_k, bits=bits, activation="reglu",
            block_size=block, output=output, allow_slow_kernel=True)), "ffn")
        path = ("lut-2bit (fast, approximate ~1% of the output scale)" if bits == 2 and fast else
                "qnbit-4bit (fast, exact for ternary codes)" if fast else "dequantize per call (exact, slow)")
        self.choices.setdefault("moe", {"op": "QMoE", "expert_weight_bits": bits, "block_size": block,
                                        "activation": "reglu via swiglu_fusion (alpha 1e6, beta 0)",
                                        "top_k": moe.top_k, "fast_kernel": fast, "path": path})

    def moe_plan(self, bits: int, hidden: int, inter: int) -> tuple[int, int | None, bool]:
        """(bits, block_size, fast): the chosen QMoE configuration, with fallbacks noted once."""
        if "moe_plan" in self.choices:
            return self.choices["moe_plan"]
        wanted = self.params.moe_block_size
        blocks = [wanted] + [b for b in FAST_BLOCKS if b != wanted]
        plan: tuple[int, int | None, bool] | None = None
        for b in blocks:
            if kernels.qmoe_is_fast(bits, b, hidden, inter):
                plan = (bits, b, True)
                if b != wanted:
                    self.notes.append(f"QMoE: {bits}-bit experts at block {wanted} miss ORT's fast-kernel rules for "
                                      f"d_model {hidden}, expert_ffn {inter}; block {b} is used instead")
                break
        if plan is None and bits == 2:
            for b in blocks:
                if kernels.qmoe_is_fast(4, b, hidden, inter):
                    plan = (4, b, True)
                    self.notes.append(f"QMoE: no 2-bit fast kernel for d_model {hidden}, expert_ffn {inter} "
                                      f"(ops.qmoe_is_fast); the ternary expert codes are stored as 4-bit codes at "
                                      f"block {b} instead (exact, fast, twice the expert memory)")
                    break
        if plan is None:
            plan = (bits, None, False)
            self.notes.append(f"QMoE: no fast kernel for d_model {hidden}, expert_ffn {inter}; experts use row-wise "
                              f"{bits}-bit scales, which ORT dequantizes on every call (exact but slow)")
        self.choices["moe_plan"] = plan
        return plan

    def dense_moe(self, prefix: str, moe: Any, h: str, router: str, output: str) -> None:
        """Standard-ONNX MoE: every expert on every token, weighted by the (top-k, renormalised) routing
        weights, which are exactly zero for the experts a token does not use. Exact; E / k times the FLOPs."""
        experts = moe.experts
        n_experts, inter, hidden = experts.gate.weight.shape
        k = moe.top_k
        self.count("ffn", 3 * n_experts * inter * hidden)
        name = f"{prefix}.moe"
        # routing: softmax over all experts, top k, renormalised, scattered into a dense (tokens, E) matrix
        probs = self.node("Softmax", [router], f"{name}.probs", axis=-1)
        top = f"{name}.top"
        self.nodes.append(helper.make_node("TopK", [probs, self.const([k])], [f"{top}.values", f"{top}.indices"],
                                           name=top, axis=-1, largest=1, sorted=1))
        total = self.node("ReduceSum", [f"{top}.values", self.const([-1])], f"{name}.top_sum", keepdims=1)
        weights = self.node("Div", [f"{top}.values", total], f"{name}.top_weights")
        zeros = self.node("Mul", [probs, self.const(0.0, np.float32)], f"{name}.zeros")
        dense = self.node("ScatterElements", [zeros, f"{top}.indices", weights], f"{name}.routing", axis=1)
        scale = self.node("Unsqueeze", [self.node("Transpose", [dense], f"{name}.routing_t", perm=[1, 0]),
                                        self.const([-1])], f"{name}.routing_e")  # (E, tokens, 1)

        flat = self.node("Reshape", [h, self.const([-1, hidden])], f"{name}.input")  # (tokens, d)
        source = self.node("Unsqueeze", [flat, self.const([0])], f"{name}.input_e")  # (1, tokens, d)
        weights_by_name = self.experts(moe)
        sub = {"gate": experts.gate, "up": experts.up, "down": experts.down}

        def project(which: str, x: str) -> str:
            lin = sub[which]
            weight = weights_by_name[which][0]  # (E, out, in)
            gains = lin.norm_weights
            if gains is not None:  # BitLinear experts: RMSNorm (no gain) then each expert's own gain
                width = weight.shape[2]
                normed = self.rms(f"{name}.{which}.norm", x, np.ones(width, np.float32), lin.norm_eps, "ffn")
                gain = np.stack([_np(g) for g in gains])[:, None, :]  # (E, 1, in)
                self.count("ffn", gain.size)
                x = self.node("Mul", [normed, self.init(f"{name}.{which}.norm_gains", gain, "ffn")],
                              f"{name}.{which}.normed")
            if lin.act_bits is not None and self.forward_weights(lin):
                x = self.fake_quant(f"{name}.{which}.act", x, lin.act_bits, lin.eps)
            w = self.init(f"{name}.{which}.weight", np.transpose(weight, (0, 2, 1)), "ffn")  # (E, in, out)
            return self.node("MatMul", [x, w], f"{name}.{which}")  # (E, tokens, out)

        g, u = project("gate", source), project("up", source)
        hidden_act = self.node("Mul", [self.node("Relu", [g], f"{name}.relu"), u], f"{name}.hidden")
        y = project("down", hidden_act)  # (E, tokens, d)
        mixed = self.node("ReduceSum", [self.node("Mul", [y, scale], f"{name}.weighted"), self.const([0])],
                          f"{name}.sum", keepdims=0)
        self.node("Reshape", [mixed, self.node("Shape", [h], f"{name}.shape")], output)
        self.choices.setdefault("moe", {"op": "dense standard ONNX (all experts, weighted by routing)",
                                        "top_k": k, "fast_kernel": None})


def _quantize_experts(weight: np.ndarray, bits: int, block: int | None) -> tuple[np.ndarray, np.ndarray]:
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


def check_model(model: NativeLM, params: ExportParams) -> None:
    """Refuse, with one clear line, a model the chosen variant cannot represent."""
    p = model.params
    if params.variant == "ternary":
        if not p.quantize:
            raise NativelmError("export ternary: the model was trained without quantization (model.quantize: false); "
                                "its weights have no ternary codes. Export variant fp32 or int4")
        if float(model.weight_bits) not in TERNARY_WIDTHS:
            raise NativelmError(f"export ternary: the model's weights are at {model.weight_bits} bits (bit_schedule "
                                "did not end at 1.58); its forward is not ternary. Export variant int4 or fp32")
    if p.ffn == "moe" and params.variant != "fp32" and not model.blocks[0].ffn.experts.weight_only:
        raise NativelmError(
            f"export {params.variant}: model.expert_quant is 'bitlinear' (each expert has its own RMSNorm gain and "
            "8-bit activations); ORT QMoE has no per-expert norm or activation quantizer, so it cannot represent "
            "these experts exactly. Retrain with expert_quant: qmoe, or export variant fp32 (exact, standard ONNX)")


def build_graph(model: NativeLM, params: ExportParams | None = None) -> ExportGraph:
    """The ONNX decoder of `model` (in eval mode, on CPU) for `params.variant`; see the module docstring."""
    import torch

    params = params or ExportParams()
    check_model(model, params)
    builder = _Builder(model, params)
    with torch.no_grad():
        onnx_model = builder.build()
    choices = {k: v for k, v in builder.choices.items() if k != "moe_plan"}
    graph = ExportGraph(model=onnx_model, variant=params.variant, choices=choices, notes=builder.notes,
                        parts=builder.parts, part_params=builder.part_params,
                        quantized_nodes=builder.quantized_nodes, io=io_names(model.params.n_layers))
    graph.part_bytes()
    return graph
