"""One pure builder per ONNX Runtime operator the exporter emits (`kernels` says which path ORT takes).

Every builder returns `(nodes, initializers)`; constant tensors are named `<name>.<role>`, so one
unique node name per call keeps a graph free of clashes. Target: ONNX Runtime 1.32, CPU provider,
opsets `opset_imports()` (ai.onnx 23 for the standard RMSNormalization, com.microsoft 1).

What ORT 1.32 (CPU) does with these operators, measured and pinned by tests/unit/test_export_ops.py:

- MatMulNBits has a fast (MLAS, weights prepacked at session start) and a generic path. 2-bit
  weights are fast only with accuracy_level=4 (int8 activations, quantized per block of K) and
  block_size 32, 64 or 128 (128 is ~3x faster than 32; with a per-tensor ternary scale the block
  size changes only how finely the activations are quantized); 8-bit only with accuracy_level=4;
  4-bit always. `matmul_nbits` refuses the slow combinations unless asked. `kernels.profile_kernels` and
  `kernels.prepacked_inputs` tell the paths apart. Fast kernels measured on x86 AVX-512/VNNI.
- QMoE on CPU: no separate gate matrix (fc3); SwiGLU only fused (gate/up rows interleaved). ReGLU
  is SwiGLU with activation_alpha=1e6, activation_beta=0. Routing is always softmax over all
  experts, renormalised over the top k (normalize_routing_weights 0 and 1 give the same result).
  Row-wise scales dequantize every expert per call (exact, ~80x slower): experts need block-wise
  scales. Block-wise 2-bit experts run MLAS LUT GEMM — fast but approximate (~1% of the output
  scale) and only for shapes `kernels.qmoe_is_fast` accepts; block-wise 4-bit experts are exact with
  float32 activations (accuracy_level 0), so ternary experts stored as 4-bit codes are the exact
  alternative at twice the memory.
- GroupQueryAttention: float32 and float16; local_window_size=w lets query i see keys
  i - w < j <= i; cos/sin caches need at least total_sequence_length rows; the KV cache holds
  keys after rotary; rotary_interleaved=0 rotates halves (x[:d/2], x[d/2:]).
- SimplifiedLayerNormalization exists only in ORT's build of the ai.onnx domain: ORT runs it but
  onnx.checker rejects it. RMSNormalization (ai.onnx 23) is the same computation, checker-clean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from nativelm.export import pack
from nativelm.export.kernels import matmul_nbits_is_fast, qmoe_is_fast

MS_DOMAIN = "com.microsoft"
AI_ONNX_OPSET = 23  # first opset with RMSNormalization; ORT 1.32 knows opsets up to 28
MS_OPSET = 1

Parts = tuple[list[NodeProto], list[TensorProto]]


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    """The opset imports of every exported graph: ai.onnx 23 and com.microsoft 1."""
    return [helper.make_opsetid("", AI_ONNX_OPSET), helper.make_opsetid(MS_DOMAIN, MS_OPSET)]


# --------------------------------------------------------------------------- MatMulNBits


def matmul_nbits(name: str, x: str, w_int: np.ndarray, scales: np.ndarray, bits: int, block_size: int,
                 accuracy_level: int = 4, *, output: str | None = None, zero_point: int | None = None,
                 bias: np.ndarray | None = None, allow_slow_kernel: bool = False) -> Parts:
    """y = x @ W^T for block-quantized W = w_int (N, K) * scales: ternary/4/8-bit linears.

    scales: per block (N, k_blocks), per row (N,) or one per tensor (scalar), repeated to per block.

    Weights stay packed in the file and in memory; accuracy_level=4 lets the kernel quantize x to
    int8 per block of K (that is what makes 2-bit fast; see `pack.int8_block_activations`).
    For ternary weights prefer block_size=128 (fastest). Output `output` (default: `name`).
    """
    if not allow_slow_kernel and not matmul_nbits_is_fast(bits, block_size, accuracy_level):
        raise ValueError(f"{name}: MatMulNBits bits={bits} block_size={block_size} accuracy_level={accuracy_level} "
                         "runs on ORT's generic (slow) kernel; use accuracy_level=4 and block_size 32, 64 or 128")
    n, k = np.asarray(w_int).shape
    packed = pack.pack_matmul_nbits(w_int, pack.block_scales(scales, n, k, block_size), bits, block_size, zero_point)
    inits = [numpy_helper.from_array(packed.B, f"{name}.weight"),
             numpy_helper.from_array(packed.scales, f"{name}.scales")]
    inputs = [x, f"{name}.weight", f"{name}.scales", ""]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, f"{name}.zero_points"))
        inputs[3] = f"{name}.zero_points"
    if bias is not None:
        bias = np.asarray(bias, dtype=np.float32)
        if bias.shape != (n,):
            raise ValueError(f"{name}: bias must be ({n},), got {bias.shape}")
        inits.append(numpy_helper.from_array(bias, f"{name}.bias"))
        inputs += ["", f"{name}.bias"]  # input 4 (g_idx) is deprecated
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("MatMulNBits", inputs, [output or name], name=name, domain=MS_DOMAIN,
                            K=k, N=n, bits=bits, block_size=block_size, accuracy_level=accuracy_level)
    return [node], inits


# --------------------------------------------------------------------------- QMoE


def qmoe(name: str, x: str, router_logits: str, *, gate: np.ndarray, gate_scales: np.ndarray,
         down: np.ndarray, down_scales: np.ndarray, k: int, up: np.ndarray | None = None,
         up_scales: np.ndarray | None = None, bits: int = 2, activation: str = "reglu",
         block_size: int | None = 32, normalize_routing_weights: int = 1, accuracy_level: int | None = None,
         output: str | None = None, allow_slow_kernel: bool = False) -> Parts:
    """A top-k mixture of block-quantized FFN experts in one node (the ternary MoE layer).

    Integer weights per expert: gate, up (E, I, H), down (E, H, I), signed, rows = output features;
    scales (E,), (E, rows) or (E, rows, cols / block_size), repeated to per block. `router_logits`
    (tokens, E) are raw logits: the kernel applies the softmax, keeps the top k and renormalises.
    activation "reglu" = relu(gate)·up, built as fused SwiGLU with alpha=1e6, beta=0 (gate/up rows
    interleaved, since CPU has no separate fc3); "relu" = relu(gate), no up. `block_size=None`
    (row-wise scales) and shapes `qmoe_is_fast` rejects are refused unless `allow_slow_kernel`.
    accuracy_level (4/8-bit only): 4 lets 4-bit experts use int8 activations; 8-bit always does.
    """
    if activation not in ("reglu", "relu"):
        raise ValueError(f"{name}: activation must be 'reglu' or 'relu', got {activation!r}")
    if (activation == "reglu") != (up is not None and up_scales is not None):
        verb = "needs" if activation == "reglu" else "takes no"
        raise ValueError(f"{name}: activation {activation!r} {verb} up/up_scales")
    gate, down = np.asarray(gate), np.asarray(down)
    n_experts, inter, hidden = gate.shape
    if down.shape != (n_experts, hidden, inter):
        raise ValueError(f"{name}: down must be (E, H, I) = {(n_experts, hidden, inter)}, got {down.shape}")
    if not 1 <= k <= n_experts:
        raise ValueError(f"{name}: k={k} must lie in [1, {n_experts}] experts")
    if not allow_slow_kernel and not qmoe_is_fast(bits, block_size, hidden, inter, activation):
        raise ValueError(f"{name}: QMoE bits={bits} block_size={block_size} hidden={hidden} inter={inter} "
                         "runs on ORT's "
                         "dequantize-per-call fallback; use block-wise scales (block 32/64/128) and, for 2 bits, "
                         "hidden and gate+up rows that are multiples of 128")
    if activation == "reglu":
        fc1 = pack.interleave_gate_up(gate, np.asarray(up))
        fc1_scales = pack.interleave_gate_up(*(_row_scales(s, n_experts, inter) for s in (gate_scales, up_scales)))
    else:
        fc1, fc1_scales = gate, np.asarray(gate_scales)
    fc1_packed, fc1_scales = pack.pack_qmoe_experts(fc1, fc1_scales, bits, block_size)
    fc2_packed, fc2_scales = pack.pack_qmoe_experts(down, down_scales, bits, block_size)
    inits = [numpy_helper.from_array(fc1_packed, f"{name}.fc1.weight"),
             numpy_helper.from_array(fc1_scales, f"{name}.fc1.scales"),
             numpy_helper.from_array(fc2_packed, f"{name}.fc2.weight"),
             numpy_helper.from_array(fc2_scales, f"{name}.fc2.scales")]
    inputs = [x, router_logits, f"{name}.fc1.weight", f"{name}.fc1.scales", "",
              f"{name}.fc2.weight", f"{name}.fc2.scales"]
    attrs: dict[str, object] = {"k": k, "expert_weight_bits": bits,
                               "normalize_routing_weights": normalize_routing_weights}
    if activation == "reglu":
        attrs.update(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1e6, activation_beta=0.0)
    else:
        attrs.update(activation_type="relu")
    if block_size is not None:
        attrs["block_size"] = block_size
    if accuracy_level is not None:
        attrs["accuracy_level"] = accuracy_level
    node = helper.make_node("QMoE", inputs, [output or name], name=name, domain=MS_DOMAIN, **attrs)
    return [node], inits


def _row_scales(scales: np.ndarray, n_experts: int, rows: int) -> np.ndarray:
    """Per-expert scales (E,) → (E, rows), so gate and up scales can be interleaved row by row."""
    scales = np.asarray(scales, dtype=np.float32)
    return np.repeat(scales[:, None], rows, axis=1) if scales.shape == (n_experts,) else scales


# --------------------------------------------------------------------------- attention


def rotary_caches(name: str, head_size: int, max_positions: int, theta: float = 10000.0,
                  dtype: type = np.float32) -> Parts:
    """cos/sin tables (max_positions, head_size / 2) for GroupQueryAttention's rotary embedding.

    Row p, column i holds cos/sin(p * theta**(-2i / head_size)); named `<name>.cos`, `<name>.sin`.
    They must have at least as many rows as the longest total sequence (ORT checks).
    """
    if head_size % 2:
        raise ValueError(f"{name}: rotary head_size must be even, got {head_size}")
    inv_freq = 1.0 / theta ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    return [], [numpy_helper.from_array(np.cos(angles).astype(dtype), f"{name}.cos"),
                numpy_helper.from_array(np.sin(angles).astype(dtype), f"{name}.sin")]


def attention_lengths(name: str, attention_mask: str, seqlens_k: str, total_sequence_length: str) -> Parts:
    """GroupQueryAttention's length inputs from a (batch, total) int64 attention_mask of ones.

    seqlens_k = sum(mask, axis 1) - 1 as int32 (batch,); total_sequence_length = mask.shape[1] as an
    int32 scalar: the onnxruntime-genai convention, computed once and shared by every layer.
    """
    inits = [numpy_helper.from_array(np.array([1], np.int64), f"{name}.axes"),
             numpy_helper.from_array(np.array(1, np.int64), f"{name}.one")]
    nodes = [
        helper.make_node("ReduceSum", [attention_mask, f"{name}.axes"], [f"{name}.sum"], name=f"{name}.sum",
                         keepdims=0),
        helper.make_node("Sub", [f"{name}.sum", f"{name}.one"], [f"{name}.last"], name=f"{name}.last"),
        helper.make_node("Cast", [f"{name}.last"], [seqlens_k], name=f"{name}.seqlens_k", to=TensorProto.INT32),
        helper.make_node("Shape", [attention_mask], [f"{name}.total64"], name=f"{name}.shape", start=1, end=2),
        helper.make_node("Squeeze", [f"{name}.total64"], [f"{name}.total_scalar"], name=f"{name}.squeeze"),
        helper.make_node("Cast", [f"{name}.total_scalar"], [total_sequence_length], name=f"{name}.total",
                         to=TensorProto.INT32),
    ]
    return nodes, inits


def group_query_attention(name: str, query: str, key: str, value: str, past_key: str, past_value: str,
                          seqlens_k: str, total_sequence_length: str, cos_cache: str | None,
                          sin_cache: str | None, *, num_heads: int, kv_num_heads: int, do_rotary: bool,
                          local_window_size: int = -1, outputs: Sequence[str],
                          rotary_interleaved: bool = False, scale: float | None = None) -> Parts:
    """Causal grouped-query attention with KV cache, RoPE (do_rotary) or NoPE, optional sliding window.

    query (B, S, num_heads*D), key/value (B, S, kv_num_heads*D); past/present (B, kv_num_heads, T, D)
    with present = past + new (rotated keys). local_window_size=w: query i sees i - w < j <= i;
    -1 = global. outputs = (output, present_key, present_value).
    """
    if num_heads % kv_num_heads:
        raise ValueError(f"{name}: num_heads {num_heads} is not a multiple of kv_num_heads {kv_num_heads}")
    if local_window_size == 0 or local_window_size < -1:
        raise ValueError(f"{name}: local_window_size must be -1 (global) or positive, got {local_window_size}")
    if len(outputs) != 3:
        raise ValueError(f"{name}: outputs must name (output, present_key, present_value)")
    inputs = [query, key, value, past_key, past_value, seqlens_k, total_sequence_length]
    if do_rotary:
        if not cos_cache or not sin_cache:
            raise ValueError(f"{name}: do_rotary needs cos_cache and sin_cache")
        inputs += [cos_cache, sin_cache]
    attrs: dict[str, object] = {"num_heads": num_heads, "kv_num_heads": kv_num_heads, "do_rotary": int(do_rotary),
                               "local_window_size": local_window_size}
    if do_rotary and rotary_interleaved:
        attrs["rotary_interleaved"] = 1
    if scale is not None:
        attrs["scale"] = float(scale)
    node = helper.make_node("GroupQueryAttention", inputs, list(outputs), name=name, domain=MS_DOMAIN, **attrs)
    return [node], []


# --------------------------------------------------------------------------- norms


def rms_norm(name: str, x: str, gamma: np.ndarray, epsilon: float = 1e-5, *, output: str | None = None) -> Parts:
    """RMSNorm over the last axis with the standard ai.onnx RMSNormalization (opset 23).

    Same result as ORT's SimplifiedLayerNormalization, runs on ORT's CPU kernel, and passes
    onnx.checker: the default norm of exported graphs.
    """
    init = numpy_helper.from_array(np.asarray(gamma, dtype=np.float32), f"{name}.weight")
    node = helper.make_node("RMSNormalization", [x, init.name], [output or name], name=name,
                            axis=-1, epsilon=float(epsilon))
    return [node], [init]


def simplified_layer_norm(name: str, x: str, gamma: np.ndarray, epsilon: float = 1e-5, *,
                          output: str | None = None) -> Parts:
    """RMSNorm with ORT's own SimplifiedLayerNormalization (ai.onnx domain, as ORT's fusions emit it).

    ORT runs it, but onnx.checker rejects the node (not an ONNX operator): prefer `rms_norm` unless a
    consumer expects this exact op.
    """
    init = numpy_helper.from_array(np.asarray(gamma, dtype=np.float32), f"{name}.weight")
    node = helper.make_node("SimplifiedLayerNormalization", [x, init.name], [output or name], name=name,
                            axis=-1, epsilon=float(epsilon), stash_type=1)
    return [node], [init]


def skip_simplified_layer_norm(name: str, x: str, skip: str, gamma: np.ndarray, epsilon: float = 1e-5, *,
                               output: str | None = None, sum_output: str | None = None) -> Parts:
    """Residual add and RMSNorm in one kernel: output = rmsnorm(x + skip), sum_output = x + skip.

    `sum_output` (the new residual stream) is optional; without it only the norm is produced.
    """
    init = numpy_helper.from_array(np.asarray(gamma, dtype=np.float32), f"{name}.weight")
    outputs = [output or name] + (["", "", sum_output] if sum_output else [])
    node = helper.make_node("SkipSimplifiedLayerNormalization", [x, skip, init.name], outputs, name=name,
                            domain=MS_DOMAIN, epsilon=float(epsilon))
    return [node], [init]


# --------------------------------------------------------------------------- embeddings


def gather_block_quantized(name: str, indices: str, w_int: np.ndarray, scales: np.ndarray, bits: int,
                           block_size: int, *, output: str | None = None, dtype: type = np.float32) -> Parts:
    """Embedding lookup from a block-quantized table w_int (V, H) * scales (V, H / block_size).

    The table stays packed (uint8, 2/4/8 bits, default zero point); rows are dequantized on gather.
    Output dtype = scales dtype (float32 or float16). Out-of-range ids give zero rows, not errors.
    """
    data, scales = pack.pack_gather_block_quantized(w_int, scales, bits, block_size)
    inits = [numpy_helper.from_array(data, f"{name}.weight"),
             numpy_helper.from_array(scales.astype(dtype), f"{name}.scales")]
    node = helper.make_node("GatherBlockQuantized", [f"{name}.weight", indices, f"{name}.scales"],
                            [output or name], name=name, domain=MS_DOMAIN, bits=bits, block_size=block_size,
                            gather_axis=0, quantize_axis=1)
    return [node], inits


def gather_fp16(name: str, indices: str, table: np.ndarray, *, output: str | None = None) -> Parts:
    """Embedding lookup from a float16 table, cast to float32: the unquantized embedding option."""
    init = numpy_helper.from_array(np.asarray(table, dtype=np.float16), f"{name}.weight")
    nodes = [helper.make_node("Gather", [init.name, indices], [f"{name}.fp16"], name=f"{name}.gather", axis=0),
             helper.make_node("Cast", [f"{name}.fp16"], [output or name], name=name, to=TensorProto.FLOAT)]
    return nodes, [init]
