"""Each exported operator, run alone in ONNX Runtime (CPU), against a numpy reference — and on the right kernel.

Tolerances: float32 results are compared with atol = 1e-5 · max|reference| (observed ~3e-7). MatMulNBits
with accuracy_level=4 quantizes its input to int8 per block of K, so its reference quantizes the input
the same way (`pack.int8_block_activations`); against plain float32 it would be off by ~5e-3.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from nativelm.export import kernels, ops, pack

RNG_SEED = 1234
ValueInfo = tuple[str, int, list]


def build_model(parts: ops.Parts, inputs: list[ValueInfo], outputs: list[ValueInfo],
                check: bool = True) -> onnx.ModelProto:
    nodes, inits = parts
    graph = helper.make_graph(nodes, "test", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=ops.opset_imports())
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def assert_close(actual: np.ndarray, expected: np.ndarray, rel: float = 1e-5) -> None:
    scale = float(np.abs(expected).max()) or 1.0
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    assert diff <= rel * scale, f"max abs diff {diff:.3e} > {rel:g} x max|ref| {scale:.3e}"


# --------------------------------------------------------------------------- packing


def test_pack_bits_lowest_bits_first_and_round_trips() -> None:
    assert pack.pack_bits(np.array([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack.pack_bits(np.array([0x3, 0xA]), 4).tolist() == [0xA3]
    rng = np.random.default_rng(RNG_SEED)
    for bits in pack.SUPPORTED_BITS:
        codes = rng.integers(0, 1 << bits, (3, 5, 16)).astype(np.uint8)
        packed = pack.pack_bits(codes, bits)
        assert packed.shape == (3, 5, 16 * bits // 8)
        assert np.array_equal(pack.unpack_bits(packed, bits), codes)


def test_ternarize_is_bitnet_absmean() -> None:
    rng = np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    w_int, scale = pack.ternarize(w)
    assert scale == pytest.approx(float(np.abs(w).mean()), rel=1e-6)
    assert np.array_equal(w_int, np.clip(np.round(w / np.float32(scale)), -1, 1))
    assert set(np.unique(w_int)) <= {-1, 0, 1} and w_int.dtype == np.int8
    assert pack.ternarize(np.zeros((2, 4)))[1] == pytest.approx(pack.TERNARY_EPS)

    rows_int, rows = pack.ternarize_rows(w)
    assert np.allclose(rows, np.abs(w).mean(axis=1)) and rows_int.shape == w.shape
    blocks_int, blocks = pack.ternarize_blocks(w[:, :48], 32)  # one full block, one partial block of 16
    assert blocks.shape == (8, 2)
    assert np.allclose(blocks[:, 1], np.abs(w[:, 32:48]).mean(axis=1))
    assert np.array_equal(blocks_int[:, 32:], np.clip(np.round(w[:, 32:48] / blocks[:, 1:]), -1, 1))
    # a per-tensor scale repeats into MatMulNBits' per-block scales
    assert np.array_equal(pack.block_scales(scale, 8, 64, 32), np.full((8, 2), scale, np.float32))


def test_quantize_symmetric_error_is_half_a_step() -> None:
    rng = np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((16, 128)).astype(np.float32)
    for bits in (4, 8):
        w_int, scales = pack.quantize_symmetric(w, bits, 32)
        qmax = (1 << (bits - 1)) - 1
        assert np.abs(w_int).max() == qmax and scales.shape == (16, 4)
        error = np.abs(pack.dequantize_blocks(w_int, scales, 32) - w)
        assert np.all(error <= pack.expand_block_scales(scales, 128, 32) / 2 + 1e-6)


def test_pack_matmul_nbits_layout() -> None:
    w_int = np.array([[-1, 0, 1, 1] * 8 + [0] * 16])  # N=1, K=48: one full block and a partial one
    scales = np.array([[0.5, 0.25]], np.float32)
    default = pack.pack_matmul_nbits(w_int, scales, 2, 32)
    assert default.B.shape == (1, 2, 8) and default.B.dtype == np.uint8
    assert default.B[0, 0, 0] == 1 | 2 << 2 | 3 << 4 | 3 << 6  # q = w + 2
    assert np.all(default.B[0, 1] == 0b10101010)  # zeros and padding: code 2
    assert default.scales.tolist() == [0.5, 0.25] and default.zero_points is None
    explicit = pack.pack_matmul_nbits(w_int, scales, 2, 32, zero_point=1)
    assert explicit.B[0, 0, 0] == 0 | 1 << 2 | 2 << 4 | 2 << 6  # q = w + 1
    assert explicit.zero_points.tolist() == [0b0101]  # two 2-bit zero points, row padded to a byte
    with pytest.raises(ValueError, match="out of range"):
        pack.pack_matmul_nbits(w_int * 2, scales, 2, 32)
    with pytest.raises(ValueError, match="block_size"):
        pack.pack_matmul_nbits(w_int, scales, 2, 24)


def test_pack_qmoe_experts_layout() -> None:
    w_int = np.array([[[-1, 0, 1, 0]], [[1, 1, -1, -1]]])  # E=2, N=1, K=4
    packed, scales = pack.pack_qmoe_experts(w_int, np.array([0.5, 2.0]), 2)
    assert packed.shape == (2, 1, 1)
    assert packed[0, 0, 0] == 1 | 2 << 2 | 3 << 4 | 2 << 6
    assert np.array_equal(scales, [[0.5], [2.0]])
    gate, up = np.zeros((1, 2, 4)), np.ones((1, 2, 4))
    assert pack.interleave_gate_up(gate, up)[0, :, 0].tolist() == [0, 1, 0, 1]  # g0, u0, g1, u1
    with pytest.raises(ValueError, match="whole bytes"):
        pack.pack_qmoe_experts(np.zeros((1, 1, 6), np.int8), np.ones(1), 2)


# --------------------------------------------------------------------------- MatMulNBits


def matmul_case(bits: int, block_size: int, accuracy_level: int, n: int = 24, k: int = 160, m: int = 3,
                zero_point: int | None = None, bias: bool = False, allow_slow: bool = False):
    """A MatMulNBits model, its feeds, the reference of what it computes, and the unquantized-input result."""
    rng = np.random.default_rng(RNG_SEED + bits + block_size)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if bits == 2:
        w_int, scales = pack.ternarize_blocks(w, block_size)
    else:
        w_int, scales = pack.quantize_symmetric(w, bits, block_size)
    bias_values = rng.standard_normal(n).astype(np.float32) if bias else None
    parts = ops.matmul_nbits("proj", "x", w_int, scales, bits, block_size, accuracy_level, output="y",
                             zero_point=zero_point, bias=bias_values, allow_slow_kernel=allow_slow)
    model = build_model(parts, [("x", TensorProto.FLOAT, ["batch", "seq", k])],
                        [("y", TensorProto.FLOAT, ["batch", "seq", n])])
    x = rng.standard_normal((2, m, k)).astype(np.float32)
    xq = pack.int8_block_activations(x, block_size) if accuracy_level == 4 else x
    weight = pack.dequantize_blocks(w_int, scales, block_size).T.astype(np.float64)
    reference = xq.astype(np.float64) @ weight + (bias_values if bias else 0.0)
    return model, {"x": x}, reference, x.astype(np.float64) @ weight + (bias_values if bias else 0.0)


@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("zero_point", [None, 1])
def test_matmul_nbits_ternary_is_exact(block_size: int, zero_point: int | None) -> None:
    model, feeds, reference, _ = matmul_case(2, block_size, 4, zero_point=zero_point)
    assert_close(session(model).run(None, feeds)[0], reference)


@pytest.mark.parametrize(("block_size", "k"), [(32, 80), (128, 200)])
def test_matmul_nbits_ternary_with_bias_and_padded_k(block_size: int, k: int) -> None:
    """K not a multiple of the block: padded with the zero code; 3 or 2 blocks: zero-point rows padded to a byte."""
    model, feeds, reference, _ = matmul_case(2, block_size, 4, n=33, k=k, bias=True, zero_point=1)
    assert_close(session(model).run(None, feeds)[0], reference)


def test_matmul_nbits_takes_a_per_tensor_ternary_scale() -> None:
    rng = np.random.default_rng(RNG_SEED)
    w_int, scale = pack.ternarize(rng.standard_normal((16, 256)))
    model = build_model(ops.matmul_nbits("proj", "x", w_int, scale, 2, 128, output="y"),
                        [("x", TensorProto.FLOAT, ["m", 256])], [("y", TensorProto.FLOAT, ["m", 16])])
    x = rng.standard_normal((4, 256)).astype(np.float32)
    reference = pack.int8_block_activations(x, 128).astype(np.float64) @ (w_int.astype(np.float64) * scale).T
    assert_close(session(model).run(None, {"x": x})[0], reference)


def test_matmul_nbits_int8_activations_are_per_block() -> None:
    """Against unquantized float32 input the 2-bit fast path is off by ~activation rounding, not exact."""
    model, feeds, _, float_reference = matmul_case(2, 32, 4)
    y = session(model).run(None, feeds)[0]
    drift = np.abs(y - float_reference).max() / np.abs(float_reference).max()
    assert 1e-5 < drift < 3e-2


@pytest.mark.parametrize(("bits", "accuracy_level"), [(4, 0), (4, 4), (8, 4)])
def test_matmul_nbits_4_and_8_bit(bits: int, accuracy_level: int) -> None:
    model, feeds, reference, _ = matmul_case(bits, 32, accuracy_level)
    assert_close(session(model).run(None, feeds)[0], reference)


def test_matmul_nbits_refuses_slow_configurations() -> None:
    w_int, scales = pack.ternarize_blocks(np.ones((4, 64)), 32)
    for bits, block_size, level in [(2, 32, 0), (2, 16, 4), (2, 256, 4), (8, 32, 0)]:
        assert not kernels.matmul_nbits_is_fast(bits, block_size, level)
        with pytest.raises(ValueError, match="generic"):
            ops.matmul_nbits("p", "x", w_int, pack.block_scales(1.0, 4, 64, block_size), bits, block_size, level)


# --------------------------------------------------------------------------- kernel paths


FAST_CASES = [(2, 32, 4), (2, 64, 4), (2, 128, 4), (4, 32, 0), (4, 32, 4), (4, 128, 4), (8, 32, 4)]


@pytest.mark.parametrize(("bits", "block_size", "accuracy_level"), FAST_CASES)
def test_matmul_nbits_runs_prepacked_cpu_kernel(bits: int, block_size: int, accuracy_level: int) -> None:
    """The weights every emitted MatMulNBits configuration carries are prepacked by the CPU kernel (fast path)."""
    model, feeds, _, _ = matmul_case(bits, block_size, accuracy_level, zero_point=1 if bits == 2 else None, bias=True)
    (run,) = kernels.profile_kernels(model, feeds)
    assert (run.node, run.op_type, run.provider) == ("proj", "MatMulNBits", "CPUExecutionProvider")
    assert "proj.weight" in kernels.prepacked_inputs(model, run)


@pytest.mark.parametrize(("bits", "block_size", "accuracy_level"), [(2, 32, 0), (2, 16, 4), (8, 32, 0)])
def test_profile_exposes_the_generic_fallback(bits: int, block_size: int, accuracy_level: int) -> None:
    """Negative control: the slow configurations keep reading the packed bytes, so the check has teeth."""
    model, feeds, _, _ = matmul_case(bits, block_size, accuracy_level, allow_slow=True)
    (run,) = kernels.profile_kernels(model, feeds)
    assert run.provider == "CPUExecutionProvider"
    assert kernels.prepacked_inputs(model, run) == []
    assert ("uint8", tuple(model.graph.initializer[0].dims)) in run.inputs


def test_profile_kernels_reads_a_path_a_session_and_refuses_one_without_profiling(tmp_path) -> None:
    model, feeds, _, _ = matmul_case(2, 32, 4)
    onnx.save(model, tmp_path / "model.onnx")
    (run,) = kernels.profile_kernels(tmp_path / "model.onnx", feeds)
    assert run.op_type == "MatMulNBits" and run.inputs[0] == ("float", (2, 3, 160))
    options = ort.SessionOptions()
    options.enable_profiling = True
    runs = kernels.profile_kernels(ort.InferenceSession(model.SerializeToString(), options,
                                                    providers=["CPUExecutionProvider"]), feeds, runs=2)
    assert [r.node for r in runs] == ["proj", "proj"] and all(r.duration_us >= 0 for r in runs)
    with pytest.raises(ValueError, match="enable_profiling"):
        kernels.profile_kernels(session(model), feeds)
    # a function of the session runs instead of feeds (an I/O-bound step), as often as asked
    calls: list[object] = []

    def step(profiled: ort.InferenceSession) -> None:
        calls.append(profiled)
        profiled.run(None, feeds)
    runs = kernels.profile_kernels(model, step, runs=3)
    assert [r.node for r in runs] == ["proj"] * 3 and len(calls) == 3


# --------------------------------------------------------------------------- QMoE


def moe_reference(x: np.ndarray, logits: np.ndarray, k: int, gate: np.ndarray, up: np.ndarray | None,
                  down: np.ndarray, quantize=lambda a: a) -> np.ndarray:
    """Top-k MoE of ReGLU (or ReLU, up=None) experts: softmax over all experts, renormalised over the top k.

    `quantize` is applied to each GEMM's input (the int8 activations of 8-bit experts).
    """
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    out = np.zeros(x.shape, dtype=np.float64)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:k]
        weights = probs[t, top] / probs[t, top].sum()
        token = quantize(x[t:t + 1])[0].astype(np.float64)
        for e, weight in zip(top, weights):
            hidden = np.maximum(gate[e] @ token, 0)
            if up is not None:
                hidden = hidden * (up[e] @ token)
            out[t] += weight * (down[e] @ quantize(hidden[None].astype(np.float32))[0])
    return out


def moe_case(bits: int = 2, activation: str = "reglu", block_size: int | None = 32, experts: int = 4,
             hidden: int = 128, inter: int = 64, k: int = 2, tokens: int = 5, normalize: int = 1,
             allow_slow: bool = False, quantize_activations: bool = False):
    """A QMoE model, its feeds, and the float64 reference of what it should compute."""
    rng = np.random.default_rng(RNG_SEED + bits + hidden + inter)
    limit = (1 << (bits - 1)) - 1
    mats = {"gate": (experts, inter, hidden), "up": (experts, inter, hidden), "down": (experts, hidden, inter)}
    ints = {key: rng.integers(-limit, limit + 1, shape).astype(np.int8) for key, shape in mats.items()}
    scales = {key: rng.uniform(0.05, 0.2, shape[:2] + ((shape[2] // block_size,) if block_size else ()))
              .astype(np.float32) for key, shape in mats.items()}
    dense = {key: ints[key] * (np.repeat(scales[key], block_size, axis=2) if block_size else scales[key][..., None])
             for key in mats}
    use_up = activation == "reglu"
    parts = ops.qmoe("moe", "x", "router", gate=ints["gate"], gate_scales=scales["gate"], down=ints["down"],
                     down_scales=scales["down"], up=ints["up"] if use_up else None,
                     up_scales=scales["up"] if use_up else None, k=k, bits=bits, activation=activation,
                     normalize_routing_weights=normalize, block_size=block_size, output="y",
                     allow_slow_kernel=allow_slow)
    model = build_model(parts, [("x", TensorProto.FLOAT, ["tokens", hidden]),
                                ("router", TensorProto.FLOAT, ["tokens", experts])],
                        [("y", TensorProto.FLOAT, ["tokens", hidden])])
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    logits = rng.standard_normal((tokens, experts)).astype(np.float32)
    quantize = (lambda a: pack.int8_block_activations(a, block_size)) if quantize_activations else (lambda a: a)
    reference = moe_reference(x, logits, k, dense["gate"], dense["up"] if use_up else None, dense["down"], quantize)
    return model, {"x": x, "router": logits}, reference


@pytest.mark.parametrize("activation", ["reglu", "relu"])
def test_qmoe_ternary_lut_fast_path_is_within_one_percent(activation: str) -> None:
    """2-bit block-wise experts run MLAS LUT GEMM (prepacked): fast, approximate to ~1% of the output scale."""
    model, feeds, reference = moe_case(activation=activation, inter=128 if activation == "relu" else 64)
    (run,) = kernels.profile_kernels(model, feeds)
    assert (run.op_type, run.provider) == ("QMoE", "CPUExecutionProvider")
    assert kernels.prepacked_inputs(model, run) == ["moe.fc1.weight", "moe.fc2.weight"]
    y = session(model).run(None, feeds)[0]
    assert_close(y, reference, rel=3e-2)
    assert np.abs(y - reference).max() > 1e-4 * np.abs(reference).max()  # not exact: if it becomes so, say so


@pytest.mark.parametrize(("activation", "block_size"), [("reglu", 32), ("relu", 32), ("reglu", None)])
def test_qmoe_ternary_fallback_is_exact(activation: str, block_size: int | None) -> None:
    """Shapes LUT GEMM rejects (and row-wise scales) dequantize to float32: exact, but slow and refused by default."""
    with pytest.raises(ValueError, match="fallback"):
        moe_case(activation=activation, block_size=block_size, hidden=64, inter=32)
    model, feeds, reference = moe_case(activation=activation, block_size=block_size, hidden=64, inter=32,
                                       allow_slow=True)
    (run,) = kernels.profile_kernels(model, feeds)
    assert kernels.prepacked_inputs(model, run) == []
    assert_close(session(model).run(None, feeds)[0], reference)


def test_qmoe_4bit_experts_are_exact_and_prepacked() -> None:
    """Ternary experts as 4-bit codes: the exact fast alternative (float32 activations at accuracy_level 0)."""
    model, feeds, reference = moe_case(bits=4)
    (run,) = kernels.profile_kernels(model, feeds)
    assert kernels.prepacked_inputs(model, run) == ["moe.fc1.weight", "moe.fc2.weight"]
    assert_close(session(model).run(None, feeds)[0], reference)


def test_qmoe_8bit_experts_use_int8_block_activations() -> None:
    model, feeds, reference = moe_case(bits=8, quantize_activations=True)
    assert_close(session(model).run(None, feeds)[0], reference)


def test_qmoe_routing_ignores_normalize_flag_on_cpu() -> None:
    """ORT 1.32 CPU renormalises over the top k whatever normalize_routing_weights says (pinned fact)."""
    model, feeds, reference = moe_case(normalize=0, hidden=64, inter=32, allow_slow=True)
    assert_close(session(model).run(None, feeds)[0], reference)


def test_qmoe_single_token_top1_and_all_experts() -> None:
    for k, tokens in [(1, 1), (4, 3)]:
        model, feeds, reference = moe_case(k=k, tokens=tokens, hidden=64, inter=32, allow_slow=True)
        assert_close(session(model).run(None, feeds)[0], reference)


def test_qmoe_is_fast_rules() -> None:
    assert kernels.qmoe_is_fast(2, 32, 1536, 768)  # SmallThinker 4B shapes
    assert kernels.qmoe_is_fast(2, 64, 128, 128) and kernels.qmoe_is_fast(4, 32, 64, 32)
    assert not kernels.qmoe_is_fast(2, 64, 128, 64)  # fc2 K = one block of 64: not prepacked
    assert not kernels.qmoe_is_fast(2, None, 1536, 768)  # row-wise scales
    assert not kernels.qmoe_is_fast(2, 16, 1536, 768)
    assert not kernels.qmoe_is_fast(2, 32, 192, 64)  # hidden % 128
    assert not kernels.qmoe_is_fast(2, 32, 128, 96, "relu")  # gate rows % 128
    assert not kernels.qmoe_is_fast(2, 128, 128, 256)  # K = one block: not prepacked


@pytest.mark.parametrize(("bits", "block_size", "hidden", "inter", "activation"), [
    (2, 32, 128, 64, "reglu"), (2, 64, 128, 64, "reglu"), (2, 32, 192, 64, "reglu"), (2, 32, 128, 96, "relu"),
    (2, 16, 128, 64, "reglu"), (2, 128, 256, 256, "relu"), (4, 32, 64, 32, "reglu"), (8, 32, 64, 32, "relu")])
def test_qmoe_is_fast_matches_the_profile(bits: int, block_size: int, hidden: int, inter: int, activation: str) -> None:
    """`qmoe_is_fast` agrees with what ORT prepacks (block-wise scales; row-wise 4-bit prepacks but stays slow)."""
    model, feeds, _ = moe_case(bits=bits, activation=activation, block_size=block_size, hidden=hidden, inter=inter,
                               tokens=2, allow_slow=True)
    (run,) = kernels.profile_kernels(model, feeds)
    both = kernels.prepacked_inputs(model, run) == ["moe.fc1.weight", "moe.fc2.weight"]
    assert both == kernels.qmoe_is_fast(bits, block_size, hidden, inter, activation)


def test_qmoe_builder_rejects_bad_arguments() -> None:
    w = np.zeros((2, 128, 128), np.int8)
    s = np.ones((2, 128), np.float32)
    with pytest.raises(ValueError, match="needs up"):
        ops.qmoe("m", "x", "r", gate=w, gate_scales=s, down=w, down_scales=s, k=1)
    with pytest.raises(ValueError, match="k=3"):
        ops.qmoe("m", "x", "r", gate=w, gate_scales=s, down=w, down_scales=s, k=3, activation="relu")
    with pytest.raises(ValueError, match="K/block_size"):
        ops.qmoe("m", "x", "r", gate=w, gate_scales=np.ones((2, 128, 3)), down=w, down_scales=s, k=1, activation="relu")


# --------------------------------------------------------------------------- GroupQueryAttention


HEADS, KV_HEADS, HEAD = 4, 2, 16


def rope(x: np.ndarray, positions: np.ndarray, interleaved: bool) -> np.ndarray:
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, HEAD, 2) / HEAD)
    angles = np.outer(positions, inv_freq)
    cos, sin = np.cos(angles), np.sin(angles)
    if interleaved:
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, odd * cos + even * sin
        return out
    first, second = x[..., : HEAD // 2], x[..., HEAD // 2:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, rotary: bool, window: int,
                        interleaved: bool = False) -> np.ndarray:
    """Causal GQA over a whole sequence; window w: query i sees keys j with i - w < j <= i."""
    batch, length, _ = q.shape
    heads = lambda t, n: t.reshape(batch, length, n, HEAD).transpose(0, 2, 1, 3).astype(np.float64)  # noqa: E731
    Q, K, V = heads(q, HEADS), heads(k, KV_HEADS), heads(v, KV_HEADS)
    positions = np.arange(length)
    if rotary:
        Q, K = rope(Q, positions, interleaved), rope(K, positions, interleaved)
    K, V = np.repeat(K, HEADS // KV_HEADS, axis=1), np.repeat(V, HEADS // KV_HEADS, axis=1)
    scores = Q @ K.transpose(0, 1, 3, 2) / np.sqrt(HEAD)
    visible = positions[None, :] <= positions[:, None]
    if window > 0:
        visible &= positions[None, :] > positions[:, None] - window
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    return (probs @ V).transpose(0, 2, 1, 3).reshape(batch, length, HEADS * HEAD)


def gqa_model(rotary: bool, window: int, interleaved: bool = False, max_positions: int = 32,
              dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """One GQA layer fed by input/past tensors and an attention_mask, as in the exported decoder."""
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    nodes, inits = ops.attention_lengths("lengths", "attention_mask", "seqlens_k", "total_len")
    if rotary:
        inits += ops.rotary_caches("rope", HEAD, max_positions, dtype=np_dtype)[1]
    parts = ops.group_query_attention(
        "attn", "q", "k", "v", "past_key", "past_value", "seqlens_k", "total_len",
        "rope.cos" if rotary else None, "rope.sin" if rotary else None, num_heads=HEADS, kv_num_heads=KV_HEADS,
        do_rotary=rotary, local_window_size=window, rotary_interleaved=interleaved,
        outputs=("out", "present_key", "present_value"))
    kv = KV_HEADS * HEAD
    return build_model(
        (nodes + parts[0], inits + parts[1]),
        [("q", dtype, ["batch", "seq", HEADS * HEAD]), ("k", dtype, ["batch", "seq", kv]),
         ("v", dtype, ["batch", "seq", kv]), ("past_key", dtype, ["batch", KV_HEADS, "past", HEAD]),
         ("past_value", dtype, ["batch", KV_HEADS, "past", HEAD]),
         ("attention_mask", TensorProto.INT64, ["batch", "total"])],
        [("out", dtype, ["batch", "seq", HEADS * HEAD]), ("present_key", dtype, ["batch", KV_HEADS, "total", HEAD]),
         ("present_value", dtype, ["batch", KV_HEADS, "total", HEAD])])


def gqa_feeds(q, k, v, past_key, past_value, total: int) -> dict[str, np.ndarray]:
    return {"q": q, "k": k, "v": v, "past_key": past_key, "past_value": past_value,
            "attention_mask": np.ones((q.shape[0], total), np.int64)}


@pytest.mark.parametrize(("rotary", "window", "interleaved"),
                         [(False, -1, False), (False, 3, False), (True, -1, False), (True, 3, False), (True, 4, True)])
def test_gqa_prefill_then_decode_equals_full_recomputation(rotary: bool, window: int, interleaved: bool) -> None:
    rng = np.random.default_rng(RNG_SEED)
    batch, length = 2, 8
    q = rng.standard_normal((batch, length, HEADS * HEAD)).astype(np.float32)
    k = rng.standard_normal((batch, length, KV_HEADS * HEAD)).astype(np.float32)
    v = rng.standard_normal((batch, length, KV_HEADS * HEAD)).astype(np.float32)
    full = attention_reference(q, k, v, rotary, window, interleaved)
    run = session(gqa_model(rotary, window, interleaved))
    empty = np.zeros((batch, KV_HEADS, 0, HEAD), np.float32)
    prompt = length - 1
    first = gqa_feeds(q[:, :prompt], k[:, :prompt], v[:, :prompt], empty, empty, prompt)
    out, present_key, present_value = run.run(None, first)
    assert_close(out, full[:, :prompt])
    assert present_key.shape == (batch, KV_HEADS, prompt, HEAD)
    cached_keys = k[:, :prompt].reshape(batch, prompt, KV_HEADS, HEAD).transpose(0, 2, 1, 3)
    expected_cache = rope(cached_keys, np.arange(prompt), interleaved) if rotary else cached_keys
    assert_close(present_key, expected_cache)  # the cache holds keys after rotary
    out, present_key, _ = run.run(None, gqa_feeds(q[:, prompt:], k[:, prompt:], v[:, prompt:],
                                                  present_key, present_value, length))
    assert_close(out, full[:, prompt:])
    assert present_key.shape == (batch, KV_HEADS, length, HEAD)


def test_gqa_rope_differs_from_nope() -> None:
    rng = np.random.default_rng(RNG_SEED)
    q, k, v = (rng.standard_normal((1, 5, n * HEAD)).astype(np.float32) for n in (HEADS, KV_HEADS, KV_HEADS))
    empty = np.zeros((1, KV_HEADS, 0, HEAD), np.float32)
    rope_out = session(gqa_model(True, -1)).run(None, gqa_feeds(q, k, v, empty, empty, 5))[0]
    nope_out = session(gqa_model(False, -1)).run(None, gqa_feeds(q, k, v, empty, empty, 5))[0]
    assert np.abs(rope_out - nope_out).max() > 1e-2


def test_gqa_sliding_window_convention() -> None:
    """With one-hot values the output is the attention map: query i sees exactly keys i - w < j <= i."""
    window, length = 3, 6
    q = np.zeros((1, length, HEADS * HEAD), np.float32)  # uniform scores: every visible key weighs the same
    k = np.zeros((1, length, KV_HEADS * HEAD), np.float32)
    v = np.zeros((1, length, KV_HEADS, HEAD), np.float32)
    v[0, np.arange(length), :, np.arange(length)] = 1.0
    empty = np.zeros((1, KV_HEADS, 0, HEAD), np.float32)
    feeds = gqa_feeds(q, k, v.reshape(1, length, -1), empty, empty, length)
    out = session(gqa_model(False, window)).run(None, feeds)[0]
    attention = out.reshape(length, HEADS, HEAD)[:, 0, :length]
    i, j = np.meshgrid(np.arange(length), np.arange(length), indexing="ij")
    visible = (j <= i) & (j > i - window)
    assert np.array_equal(attention > 0, visible)
    assert np.allclose(attention[visible], (1.0 / visible.sum(axis=1, keepdims=True).repeat(length, 1))[visible])


def test_gqa_float16_and_short_rotary_cache() -> None:
    rng = np.random.default_rng(RNG_SEED)
    q, k, v = (rng.standard_normal((1, 6, n * HEAD)) for n in (HEADS, KV_HEADS, KV_HEADS))
    empty = np.zeros((1, KV_HEADS, 0, HEAD), np.float16)
    half = [t.astype(np.float16) for t in (q, k, v)]
    out = session(gqa_model(True, 3, dtype=TensorProto.FLOAT16)).run(None, gqa_feeds(*half, empty, empty, 6))[0]
    assert_close(out.astype(np.float32), attention_reference(*half, True, 3), rel=5e-3)
    short = session(gqa_model(True, -1, max_positions=4))
    with pytest.raises(Exception, match="cos_cache dimension 0"):
        short.run(None, gqa_feeds(*(t.astype(np.float32) for t in (q, k, v)), empty.astype(np.float32),
                                  empty.astype(np.float32), 6))


def test_gqa_builder_rejects_bad_arguments() -> None:
    common = dict(outputs=("o", "pk", "pv"), kv_num_heads=3)
    with pytest.raises(ValueError, match="multiple"):
        ops.group_query_attention("a", *"qkv", "pk", "pv", "s", "t", None, None, num_heads=4, do_rotary=False, **common)
    with pytest.raises(ValueError, match="cos_cache"):
        ops.group_query_attention("a", *"qkv", "pk", "pv", "s", "t", None, None, num_heads=6, do_rotary=True, **common)


# --------------------------------------------------------------------------- norms


def rms_reference(x: np.ndarray, gamma: np.ndarray, epsilon: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + epsilon) * gamma


def test_rms_norm_and_simplified_layer_norm_agree() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x = rng.standard_normal((2, 3, 48)).astype(np.float32)
    gamma = rng.standard_normal(48).astype(np.float32)
    io = ([("x", TensorProto.FLOAT, ["b", "s", 48])], [("y", TensorProto.FLOAT, ["b", "s", 48])])
    standard = build_model(ops.rms_norm("norm", "x", gamma, 1e-6, output="y"), *io)
    assert_close(session(standard).run(None, {"x": x})[0], rms_reference(x, gamma, 1e-6))
    ort_only = build_model(ops.simplified_layer_norm("norm", "x", gamma, 1e-6, output="y"), *io, check=False)
    assert_close(session(ort_only).run(None, {"x": x})[0], rms_reference(x, gamma, 1e-6))
    with pytest.raises(onnx.checker.ValidationError, match="SimplifiedLayerNormalization"):
        onnx.checker.check_model(ort_only)


def test_skip_simplified_layer_norm_returns_norm_and_residual_sum() -> None:
    rng = np.random.default_rng(RNG_SEED)
    x, skip = rng.standard_normal((2, 2, 3, 32)).astype(np.float32)
    gamma = rng.standard_normal(32).astype(np.float32)
    parts = ops.skip_simplified_layer_norm("norm", "x", "skip", gamma, 1e-5, output="y", sum_output="residual")
    model = build_model(parts, [("x", TensorProto.FLOAT, ["b", "s", 32]), ("skip", TensorProto.FLOAT, ["b", "s", 32])],
                        [("y", TensorProto.FLOAT, ["b", "s", 32]), ("residual", TensorProto.FLOAT, ["b", "s", 32])])
    y, residual = session(model).run(None, {"x": x, "skip": skip})
    assert_close(y, rms_reference(x + skip, gamma, 1e-5))
    assert np.array_equal(residual, x + skip)


# --------------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gather_block_quantized(bits: int, dtype: type) -> None:
    rng = np.random.default_rng(RNG_SEED + bits)
    table = rng.standard_normal((40, 64)).astype(np.float32)
    w_int, scales = pack.ternarize_blocks(table, 32) if bits == 2 else pack.quantize_symmetric(table, bits, 32)
    out_type = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    parts = ops.gather_block_quantized("embed", "ids", w_int, scales, bits, 32, output="h", dtype=dtype)
    model = build_model(parts, [("ids", TensorProto.INT64, ["b", "s"])], [("h", out_type, ["b", "s", 64])])
    ids = np.array([[3, 0, 39], [7, 7, 1]], np.int64)
    expected = pack.dequantize_blocks(w_int, scales.astype(dtype).astype(np.float32), 32)[ids]
    assert_close(session(model).run(None, {"ids": ids})[0].astype(np.float32), expected,
                 rel=1e-3 if dtype == np.float16 else 1e-6)


def test_gather_fp16_embedding() -> None:
    table = np.random.default_rng(RNG_SEED).standard_normal((10, 16))
    model = build_model(ops.gather_fp16("embed", "ids", table, output="h"), [("ids", TensorProto.INT64, ["b", "s"])],
                        [("h", TensorProto.FLOAT, ["b", "s", 16])])
    ids = np.array([[9, 2]], np.int64)
    h = session(model).run(None, {"ids": ids})[0]
    assert h.dtype == np.float32 and np.array_equal(h, table.astype(np.float16).astype(np.float32)[ids])


def test_every_builder_names_its_initializers_after_the_node() -> None:
    w_int, scales = pack.ternarize_blocks(np.ones((4, 64)), 32)
    nodes, inits = ops.matmul_nbits("layers.0.q_proj", "x", w_int, scales, 2, 32, zero_point=1, bias=np.zeros(4))
    assert [i.name for i in inits] == [f"layers.0.q_proj.{r}" for r in ("weight", "scales", "zero_points", "bias")]
    assert list(nodes[0].input) == ["x", "layers.0.q_proj.weight", "layers.0.q_proj.scales",
                                    "layers.0.q_proj.zero_points", "", "layers.0.q_proj.bias"]
    assert nodes[0].domain == ops.MS_DOMAIN and nodes[0].output == ["layers.0.q_proj"]
