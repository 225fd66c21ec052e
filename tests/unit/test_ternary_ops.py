"""nativelm's ONNX Runtime operators (native/, docs/kernels.md) in real ORT sessions against the numpy
reference: integer paths bit for bit, float paths within 1e-5 of the result's scale; every SIMD kernel
bit for bit against the portable one (here and, under qemu-user, the ARM64 build)."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nativelm.formats.ternary_pack import pack_ternary
from nativelm.runtime import custom_ops
from nativelm.runtime.errors import ModelLoadError
from nativelm.formats.ternary_reference import route, ternary_matmul, ternary_moe

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "native" / "build.sh"
QEMU_LIBS = Path("/usr/aarch64-linux-gnu")
FLOAT_RTOL = 1e-5  # float paths: |y - ref| <= 1e-5 * max|ref| (fp32 sums in another order)


@pytest.fixture(scope="module")
def library() -> Path:
    """The host build of the library, built from the checkout's sources (gcc is part of the set-up)."""
    subprocess.run(["bash", str(BUILD)], check=True, capture_output=True, text=True)
    path = custom_ops.find_library()
    assert path is not None and path.is_file()
    return path


def _session(nodes: list, inputs: list, initializers: dict[str, np.ndarray], library: Path,
             threads: int = 2) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("nativelm", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    assert custom_ops.load_library(options, library) is not None
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _matmul(library: Path, x: np.ndarray, codes: np.ndarray, scale: float, act_bits: int,
            gain: np.ndarray | None = None, threads: int = 2) -> np.ndarray:
    N, K = codes.shape
    names = ["X", "W", "s"] + (["g"] * (gain is not None))
    node = helper.make_node("TernaryMatMul", names, ["Y"], domain="nativelm", K=K, N=N, act_bits=act_bits)
    inits = {"W": pack_ternary(codes), "s": np.array(scale, np.float32)}
    if gain is not None:
        inits["g"] = gain.astype(np.float32)
    x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))
    return _session([node], [x_info], inits, library, threads).run(None, {"X": x})[0]


def _codes(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-1, 2, size=shape).astype(np.int8)


def _assert_float_close(y: np.ndarray, ref: np.ndarray) -> None:
    np.testing.assert_allclose(y, ref, rtol=0, atol=FLOAT_RTOL * max(float(np.abs(ref).max()), 1e-30))


@pytest.mark.parametrize("K", [1, 4, 7, 64, 159, 160, 161, 333, 768])
@pytest.mark.parametrize("act_bits", [8, 0])
def test_matmul_matches_reference(library: Path, K: int, act_bits: int) -> None:
    rng = np.random.default_rng(K + act_bits)
    codes, x = _codes(rng, 37, K), rng.standard_normal((2, 3, K)).astype(np.float32)  # batch (2, 3)
    y = _matmul(library, x, codes, 0.731, act_bits)
    ref = ternary_matmul(x, pack_ternary(codes), 0.731, K, act_bits)
    assert y.shape == (2, 3, 37)
    if act_bits == 8:
        np.testing.assert_array_equal(y, ref)
    else:
        _assert_float_close(y, ref)


@pytest.mark.parametrize("K", [160, 333, 768])
def test_activation_quantizer_rounds_halves_to_even_and_clamps(library: Path, K: int) -> None:
    """x / s_x landing exactly on .5 (s_x = 1: max |x| is 127) and the extremes, in the full blocks (the
    vectorised quantizer's part) and in the tail: codes as BitLinear rounds them, so the integer sums
    equal the reference's bit for bit; a one-unit rounding slip of any activation changes them."""
    rng = np.random.default_rng(K)
    halves = (rng.integers(-127, 127, size=(4, K)) + 0.5).astype(np.float32)
    halves[:, 0], halves[1, 1], halves[2, 1] = 127.0, -127.0, -126.5
    codes = np.eye(K, dtype=np.int8)[: min(K, 64)]  # each output reads one activation's code
    y = _matmul(library, halves, codes, 1.0, 8)
    ref = ternary_matmul(halves, pack_ternary(codes), 1.0, K, 8)
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(y[:, 2:], np.round(halves[:, 2: codes.shape[0]]))  # numpy: half to even


@pytest.mark.parametrize("act_bits", [8, 0])
def test_matmul_with_gain(library: Path, act_bits: int) -> None:
    rng = np.random.default_rng(3)
    K = 200
    codes, x = _codes(rng, 19, K), (rng.standard_normal((4, K)) * 3).astype(np.float32)
    gain = rng.uniform(0.5, 1.5, K).astype(np.float32)
    y = _matmul(library, x, codes, 0.5, act_bits, gain)
    ref = ternary_matmul(x, pack_ternary(codes), 0.5, K, act_bits, gain=gain)
    if act_bits == 8:
        np.testing.assert_array_equal(y, ref)
    else:
        _assert_float_close(y, ref)


def test_prefill_rows_up_to_the_context(library: Path) -> None:
    rng = np.random.default_rng(5)
    K, N = 256, 96
    codes, x = _codes(rng, N, K), rng.standard_normal((1, 512, K)).astype(np.float32)
    np.testing.assert_array_equal(_matmul(library, x, codes, 0.25, 8),
                                  ternary_matmul(x, pack_ternary(codes), 0.25, K, 8))


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_zero_rows_and_extreme_scales(library: Path, scale: float) -> None:
    rng = np.random.default_rng(7)
    K = 161
    codes = _codes(rng, 9, K)
    codes[4] = 0  # an all-zero weight row
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[1] = 0.0  # an all-zero activation row: s_x = act_eps / 127, every code 0
    x[2] *= np.float32(1e-30)  # below act_eps: quantizes to zero as well
    y = _matmul(library, x, codes, scale, 8)
    np.testing.assert_array_equal(y, ternary_matmul(x, pack_ternary(codes), scale, K, 8))
    assert (y[1] == 0).all() and (y[:, 4] == 0).all() and np.isfinite(y).all()


def _moe_inputs(rng: np.random.Generator, M: int, d: int, E: int, W: int) -> dict[str, np.ndarray]:
    return {"X": rng.standard_normal((M, d)).astype(np.float32),
            "logits": rng.standard_normal((M, E)).astype(np.float32),
            "Wg": pack_ternary(_codes(rng, E, W, d)), "sg": rng.uniform(0.1, 1, E).astype(np.float32),
            "Wu": pack_ternary(_codes(rng, E, W, d)), "su": rng.uniform(0.1, 1, E).astype(np.float32),
            "Wd": pack_ternary(_codes(rng, E, d, W)), "sd": rng.uniform(0.1, 1, E).astype(np.float32)}


def _moe(library: Path, t: dict[str, np.ndarray], top_k: int, act_bits: int) -> np.ndarray:
    names = ["X", "logits", "Wg", "sg", "Wu", "su", "Wd", "sd"]
    node = helper.make_node("TernaryMoE", names, ["Y"], domain="nativelm", top_k=top_k, act_bits=act_bits)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(t[n].shape)) for n in names[:2]]
    session = _session([node], inputs, {n: t[n] for n in names[2:]}, library)
    return session.run(None, {"X": t["X"], "logits": t["logits"]})[0]


def _moe_reference(t: dict[str, np.ndarray], top_k: int, act_bits: int) -> np.ndarray:
    return ternary_moe(t["X"], t["logits"], t["Wg"], t["sg"], t["Wu"], t["su"], t["Wd"], t["sd"], top_k, act_bits)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
@pytest.mark.parametrize("act_bits", [0, 8])
def test_moe_matches_reference(library: Path, top_k: int, act_bits: int) -> None:
    rng = np.random.default_rng(top_k * 10 + act_bits)
    t = _moe_inputs(rng, 7, 96, 4, 48)
    _assert_float_close(_moe(library, t, top_k, act_bits), _moe_reference(t, top_k, act_bits))


@pytest.mark.parametrize("act_bits", [0, 8])
def test_moe_one_task_per_expert_equals_the_two_phase_path(library: Path, act_bits: int) -> None:
    """Up to 8 tokens (decode) the operator runs each expert's gate, up and down as one task; more run
    gate/up for all experts, then down. Rows are independent, so 20 rows at once (two phases) and the
    same rows 8, 8, 4 at a time (one task per expert) must agree bit for bit."""
    rng = np.random.default_rng(5 + act_bits)
    t = _moe_inputs(rng, 20, 96, 6, 48)
    whole = _moe(library, t, 3, act_bits)
    parts = [_moe(library, dict(t, X=t["X"][i:i + 8], logits=t["logits"][i:i + 8]), 3, act_bits)
             for i in range(0, 20, 8)]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
    _assert_float_close(whole, _moe_reference(t, 3, act_bits))


@pytest.mark.parametrize("act_bits", [0, 8])
def test_moe_takes_rows_with_any_leading_dimensions(library: Path, act_bits: int) -> None:
    """The exported graph feeds TernaryMoE (batch, sequence, d) and (batch, sequence, E) as they are:
    the same rows as the flat (tokens, d) call, bit for bit, and the output keeps X's shape."""
    rng = np.random.default_rng(23 + act_bits)
    t = _moe_inputs(rng, 12, 96, 5, 48)
    flat = _moe(library, t, 2, act_bits)
    shaped = _moe(library, dict(t, X=t["X"].reshape(2, 6, 96), logits=t["logits"].reshape(2, 6, 5)), 2, act_bits)
    assert shaped.shape == (2, 6, 96)
    np.testing.assert_array_equal(shaped.reshape(12, 96), flat)
    with pytest.raises(Exception, match="X must be \\[..., d\\] and logits \\[..., E\\] with as many rows"):
        _moe(library, dict(t, logits=t["logits"][:11]), 2, act_bits)


def test_moe_routing_ties_take_the_lower_expert(library: Path) -> None:
    rng = np.random.default_rng(11)
    t = _moe_inputs(rng, 3, 64, 4, 32)
    t["logits"][:] = np.array([0.5, 2.0, 2.0, 2.0], np.float32)  # experts 1, 2, 3 tie
    experts, _ = route(t["logits"], 2)
    assert (experts == [1, 2]).all()
    only_1_2 = dict(t, logits=np.tile(np.array([-30, 2, 2, -30], np.float32), (3, 1)))
    y = _moe(library, t, 2, 0)
    _assert_float_close(y, _moe_reference(t, 2, 0))
    _assert_float_close(y, _moe(library, only_1_2, 2, 0))  # the same two experts, the same weights


def _with_kernel(monkeypatch: pytest.MonkeyPatch, kernel: str | None) -> None:
    if kernel is None:
        monkeypatch.delenv(custom_ops.ENV_KERNEL, raising=False)
    else:
        monkeypatch.setenv(custom_ops.ENV_KERNEL, kernel)


def test_simd_kernel_matches_portable_bit_for_bit(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(13)
    codes, x = _codes(rng, 300, 1000), rng.standard_normal((5, 1000)).astype(np.float32)
    moe = _moe_inputs(rng, 6, 160, 8, 64)
    results = {}
    for kernel in (None, "portable"):
        _with_kernel(monkeypatch, kernel)
        results[kernel] = [_matmul(library, x[:1], codes, 0.3, 0), _matmul(library, x[:1], codes, 0.3, 8),
                           _matmul(library, x, codes, 0.3, 0),
                           _matmul(library, x, codes, 0.3, 8), _moe(library, moe, 3, 0), _moe(library, moe, 3, 8)]
    assert custom_ops.kernel_name(library) == "portable"
    for simd, portable in zip(results[None], results["portable"]):
        np.testing.assert_array_equal(simd, portable)


def test_threads_do_not_change_the_result(library: Path) -> None:
    rng = np.random.default_rng(17)
    codes, x = _codes(rng, 700, 512), rng.standard_normal((3, 512)).astype(np.float32)
    np.testing.assert_array_equal(_matmul(library, x, codes, 1.0, 0, threads=1), _matmul(library, x, codes, 1.0, 0))


def test_kernel_check_driver_on_the_host(library: Path) -> None:
    result = subprocess.run([str(library.parent / "kernel_check")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "agree with portable" in result.stdout


@pytest.mark.skipif(not shutil.which("aarch64-linux-gnu-gcc") or not shutil.which("qemu-aarch64"),
                    reason="needs gcc-aarch64-linux-gnu and qemu-user (infra/setup.sh dev installs them)")
@pytest.mark.parametrize("cpu", ["max", "cortex-a53"])  # with and without the dot-product extension
def test_aarch64_kernels_match_portable_under_qemu(library: Path, cpu: str) -> None:
    subprocess.run(["bash", str(BUILD), "aarch64"], check=True, capture_output=True, text=True)
    driver = ROOT / "native" / "build" / "aarch64-linux-gnu" / "kernel_check"
    result = subprocess.run(["qemu-aarch64", "-cpu", cpu, "-L", str(QEMU_LIBS), str(driver)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = "neon-dot neon portable" if cpu == "max" else "neon portable"
    assert f"kernels: {expected} agree" in result.stdout


def test_slot_table_reaches_the_build_info(library: Path) -> None:
    options = ort.SessionOptions()
    custom_ops.load_library(options, library)
    lib = ctypes.CDLL(str(library))
    lib.nativelm_ops_ort_build_info.restype = ctypes.c_char_p
    assert lib.nativelm_ops_ort_build_info().decode().startswith("ORT Build Info")
    assert lib.nativelm_ops_threaded() == 1


def test_bad_inputs_are_one_clear_error(library: Path) -> None:
    rng = np.random.default_rng(19)
    codes = _codes(rng, 8, 64)
    with pytest.raises(Exception, match="X's last dimension is 65, expected K=64"):
        _wrong_k(library, codes)
    with pytest.raises(Exception, match="act_bits must be 8 or 0, got 4"):
        _matmul(library, rng.standard_normal((2, 64)).astype(np.float32), codes, 1.0, 4)


def _wrong_k(library: Path, codes: np.ndarray) -> None:
    node = helper.make_node("TernaryMatMul", ["X", "W", "s"], ["Y"], domain="nativelm", K=64, N=8, act_bits=8)
    x_info = helper.make_tensor_value_info("X", TensorProto.FLOAT, None)
    session = _session([node], [x_info], {"W": pack_ternary(codes), "s": np.array(1.0, np.float32)}, library)
    session.run(None, {"X": np.zeros((2, 65), np.float32)})


def test_missing_library_is_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(custom_ops, "candidates", lambda: [tmp_path / "missing" / custom_ops.LIBRARY])
    assert custom_ops.load_library(ort.SessionOptions()) is None


def test_library_found_through_the_environment(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(custom_ops.ENV_LIBRARY, str(library))
    assert custom_ops.candidates()[0] == library and custom_ops.find_library() == library


def test_library_next_to_the_zipapp(library: Path, tmp_path: Path) -> None:
    from nativelm.runtime.pack import build_zipapp

    app = build_zipapp(tmp_path / "nativelm-runtime.pyz")
    shutil.copy(library, tmp_path / custom_ops.LIBRARY)
    code = "from nativelm.runtime import custom_ops; print(custom_ops.find_library())"
    env = {k: v for k, v in os.environ.items() if k != custom_ops.ENV_LIBRARY}
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(app)!r}); {code}"],
                         capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert out == str(tmp_path / custom_ops.LIBRARY)


def test_broken_library_is_one_error_line(tmp_path: Path) -> None:
    broken = tmp_path / custom_ops.LIBRARY
    broken.write_bytes(b"\x7fELF not really")
    with pytest.raises(ModelLoadError, match="not a loadable nativelm operator library") as info:
        custom_ops.load_library(ort.SessionOptions(), broken)
    assert "\n" not in str(info.value)


def test_unknown_kernel_name_is_refused(library: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(custom_ops.ENV_KERNEL, "sse9")
    with pytest.raises(ModelLoadError, match="NATIVELM_OPS_KERNEL='sse9': not a kernel this CPU runs .*portable"):
        custom_ops.load_library(ort.SessionOptions(), library)


def test_host_triple_is_known() -> None:
    assert platform.machine().lower() in custom_ops.TRIPLES
