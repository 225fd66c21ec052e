"""nativelm's ternary kernels against ONNX Runtime's MatMulNBits and the memory-bandwidth roofline.

    python bench/ternary_kernels.py [--threads 2] [--repeats 5] [--roofline-mib 2048] [--dram]
                                    [--kernels avx512vnni,avxvnni] [--shapes gpu-moe,...]

Decode shapes (one token, M=1), each a chain of nodes with distinct weights so one run() reads them all:
  gemv-4096x11008   4 GEMVs alternating 4096->11008 and 11008->4096 (the issue's GEMV, 36 MB ternary)
  gpu-dense-768     24 GEMVs 768->768 (the gpu preset's d_model)
  gpu-moe           8 MoE layers of the gpu preset: 32 experts, top-4, expert width 384 (router MatMul
                    in front of each TernaryMoE; bytes counted: the router and the 4 active experts),
                    float expert inputs (act_bits 0: expert_quant qmoe)
  gpu-moe-int8      the same with int8 expert inputs (act_bits 8: expert_quant int8, the integer path)
and one prefill shape (gemv-4096x11008 at M=512, time per token). `--dram` adds gemv-dram: one
TernaryMatMul 4096 -> 704512 (577 MB of packed weights, far above the last-level cache; ternary only:
the MatMulNBits models of that size pass protobuf's 2 GB limit or the machine's memory). For each: TernaryMatMul / TernaryMoE
(the kernel the library picks), MatMulNBits 2-bit (block 128, accuracy_level 4) and 4-bit (block 32,
accuracy_level 4); GB/s of weights read per call and % of the roofline: the C read loop
(native/bench/read_bandwidth.c) over a buffer far larger than the last-level cache, same threads.
`--kernels` runs the ternary models once per named kernel (NATIVELM_OPS_KERNEL, docs/kernels.md) side
by side, each ternary row then also given as a ratio (tok/s) to the first kernel named; `--shapes`
keeps only the named shapes. Everything runs in interleaved rounds, `--repeats` times; each figure is
given as its range.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nativelm.export import ops, pack
from nativelm.formats.ternary_pack import packed_row_bytes
from nativelm.runtime import custom_ops
from nativelm.runtime.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
Model = tuple[onnx.ModelProto, int, dict[str, np.ndarray]]  # (model, weight bytes read per call, feeds)


def _model(nodes: list, inits: list, inputs: dict[str, tuple[int, ...]], opsets: list) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s))
                                               for n, s in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=opsets)


def _nbytes(inits: list) -> int:
    return sum(numpy_helper.to_array(t).nbytes for t in inits)


def random_packed(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Packed rows of random ternary codes (..., n, packed_row_bytes(k)), made byte-wise: no int32 codes
    of the whole matrix in memory (the DRAM shape has 2.9 G weights)."""
    *lead, n, k = shape
    byte_of_value = ((np.arange(243) * 256 + 242) // 243).astype(np.uint8)  # q of each base-3 value
    return byte_of_value[rng.integers(0, 243, size=(*lead, n, packed_row_bytes(k)), dtype=np.uint8)]


def linear_chain(kind: str, dims: list[int], m: int, rng: np.random.Generator) -> Model:
    """x [m, dims[0]] through len(dims)-1 linears dims[i] -> dims[i+1] of `kind` (ternary, 2bit, 4bit)."""
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        out = "y" if i == len(dims) - 2 else f"h{i}"
        if kind == "ternary":
            nodes.append(helper.make_node("TernaryMatMul", [x, f"w{i}", f"s{i}"], [out], domain="nativelm",
                                          K=k, N=n, act_bits=8))
            inits += [numpy_helper.from_array(random_packed(rng, n, k), f"w{i}"),
                      numpy_helper.from_array(np.array(0.02, np.float32), f"s{i}")]
        else:
            w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
            if kind == "2bit":
                w_int, scales = pack.ternarize_blocks(w, 128)
                part = ops.matmul_nbits(f"mm{i}", x, w_int, scales, 2, 128, 4, output=out)
            else:
                w_int, scales = pack.quantize_symmetric(w, 4, 32)
                part = ops.matmul_nbits(f"mm{i}", x, w_int, scales, 4, 32, 4, output=out)
            nodes += part[0]
            inits += part[1]
        x = out
    opsets = ops.opset_imports() + [helper.make_opsetid("nativelm", 1)]
    feeds = {"x": rng.standard_normal((m, dims[0])).astype(np.float32)}
    return _model(nodes, inits, {"x": (m, dims[0])}, opsets), _nbytes(inits), feeds


def moe_chain(layers: int, d: int, experts: int, top_k: int, width: int, rng: np.random.Generator,
              act_bits: int = 0) -> Model:
    """`layers` gpu-preset MoE layers (router MatMul + TernaryMoE at `act_bits`); bytes: router + the
    active experts."""
    nodes, inits, x, active = [], [], "x", 0
    for i in range(layers):
        out = "y" if i == layers - 1 else f"h{i}"
        router = rng.standard_normal((d, experts)).astype(np.float32)
        stacks = {"g": (width, d), "u": (width, d), "d": (d, width)}
        names = [x, f"l{i}"]
        inits.append(numpy_helper.from_array(router, f"r{i}"))
        for key, shape in stacks.items():
            packed = random_packed(rng, experts, *shape)
            inits += [numpy_helper.from_array(packed, f"W{key}{i}"),
                      numpy_helper.from_array(np.full(experts, 0.02, np.float32), f"s{key}{i}")]
            names += [f"W{key}{i}", f"s{key}{i}"]
            active += packed[0].nbytes * top_k
        active += router.nbytes
        nodes += [helper.make_node("MatMul", [x, f"r{i}"], [f"l{i}"]),
                  helper.make_node("TernaryMoE", names, [out], domain="nativelm", top_k=top_k,
                                   act_bits=act_bits)]
        x = out
    opsets = ops.opset_imports() + [helper.make_opsetid("nativelm", 1)]
    feeds = {"x": rng.standard_normal((1, d)).astype(np.float32)}
    return _model(nodes, inits, {"x": (1, d)}, opsets), active, feeds


def session(model: onnx.ModelProto, threads: int, kernel: str | None = None) -> ort.InferenceSession:
    """An ORT session; `kernel` (a ternary model) forces that kernel, chosen when the session builds its
    operators (a name this CPU does not run: one line, exit 2)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    saved = os.environ.get(custom_ops.ENV_KERNEL)
    if kernel:
        os.environ[custom_ops.ENV_KERNEL] = kernel
    try:
        custom_ops.load_library(options)
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except ModelLoadError as exc:
        fail(f"--kernels: {exc}")
    finally:
        os.environ.pop(custom_ops.ENV_KERNEL, None)
        if saved is not None:
            os.environ[custom_ops.ENV_KERNEL] = saved


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit 2."""
    print(f"bench/ternary_kernels.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def time_call(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], seconds: float) -> float:
    """Median seconds per run() over about `seconds` of calls."""
    sess.run(None, feeds)
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def roofline(mib: int, threads: int, reps: int) -> list[float]:
    """GB/s of the tuned C read loop, one figure per repetition."""
    # the checkout's build (the library itself may come from $NATIVELM_OPS_LIBRARY: an A/B of two builds)
    binary = custom_ops.source_build(platform.machine()).parent / "read_bandwidth"
    out = subprocess.run([str(binary), str(mib), str(threads), str(reps)], capture_output=True, text=True, check=True)
    return [float(v) for v in out.stdout.split()]


def span(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per configuration and repeat")
    parser.add_argument("--roofline-mib", type=int, default=2048, help="read-loop buffer (far above the LLC)")
    parser.add_argument("--dram", action="store_true", help="add a 577 MB ternary GEMV (weights from memory)")
    parser.add_argument("--kernels", default="", help="comma-separated kernels to run the ternary models with, side by side")
    parser.add_argument("--shapes", default="", help="comma-separated shapes to keep (default: all)")
    args = parser.parse_args()
    kernels = [k for k in args.kernels.split(",") if k] or [None]
    if custom_ops.find_library() is None:
        raise SystemExit("bench/ternary_kernels.py: build the library first: native/build.sh")
    rng = np.random.default_rng(0)
    big, dense = [4096, 11008, 4096, 11008, 4096], [768] * 25
    shapes = {
        "gemv-4096x11008": {k: linear_chain(k, big, 1, rng) for k in ("ternary", "2bit", "4bit")},
        "gpu-dense-768": {k: linear_chain(k, dense, 1, rng) for k in ("ternary", "2bit", "4bit")},
        "gpu-moe": {"ternary": moe_chain(8, 768, 32, 4, 384, rng)},
        "gpu-moe-int8": {"ternary": moe_chain(8, 768, 32, 4, 384, rng, act_bits=8)},
        "prefill-512x4096x11008": {k: linear_chain(k, big[:3], 512, rng) for k in ("ternary", "4bit")},
    }
    if args.dram:
        shapes["gemv-dram-4096x704512"] = {"ternary": linear_chain("ternary", [4096, 704512], 1, rng)}
    if args.shapes:
        unknown = sorted(set(args.shapes.split(",")) - set(shapes))
        if unknown:
            fail(f"unknown --shapes {','.join(unknown)} (choose from: {', '.join(shapes)})")
        shapes = {name: runs for name, runs in shapes.items() if name in args.shapes.split(",")}
    sessions = {}
    for s, runs in shapes.items():
        for k, (m, b, f) in runs.items():
            for kernel in kernels if k == "ternary" else [None]:
                label = f"{k}:{kernel}" if kernel else k
                sessions[s, label] = (session(m, args.threads, kernel), b, f)
    gbps: dict[tuple[str, str], list[float]] = {key: [] for key in sessions}
    tok_s: dict[tuple[str, str], list[float]] = {key: [] for key in sessions}
    roof: list[float] = []
    for _ in range(args.repeats):
        roof += roofline(args.roofline_mib, args.threads, 1)
        for key, (sess, nbytes, feeds) in sessions.items():
            dt = time_call(sess, feeds, args.seconds)
            gbps[key].append(nbytes / dt / 1e9)
            tok_s[key].append(next(iter(feeds.values())).shape[0] / dt)
    print(f"ternary kernels: {custom_ops.kernel_name(custom_ops.find_library())}, {args.threads} threads, "
          f"ORT {ort.__version__}, {args.repeats} repeats (ranges)")
    print(f"roofline (C read loop, {args.roofline_mib} MiB): {span(roof)} GB/s")
    first = f"ternary:{kernels[0]}" if kernels[0] else "ternary"
    print(f"{'shape':24} {'kernel':18} {'MB/call':>8} {'GB/s':>11} {'% roofline':>11} {'tok/s':>13} {'vs 4-bit':>10}"
          f" {'vs ' + first:>20}")
    for (shape, kind), (_, nbytes, _) in sessions.items():
        ratio, vs_first = "", ""
        if kind != "4bit" and (shape, "4bit") in tok_s:
            ratio = span([a / b for a, b in zip(tok_s[shape, kind], tok_s[shape, "4bit"])], "{:.2f}") + "x"
        if kind.startswith("ternary") and len(kernels) > 1:
            vs_first = span([a / b for a, b in zip(tok_s[shape, kind], tok_s[shape, first])], "{:.2f}") + "x"
        pct = [100 * g / r for g, r in zip(gbps[shape, kind], roof)]
        print(f"{shape:24} {kind:18} {nbytes / 1e6:8.2f} {span(gbps[shape, kind]):>11} {span(pct, '{:.0f}'):>11} "
              f"{span(tok_s[shape, kind], '{:.0f}'):>13} {ratio:>10} {vs_first:>20}")


if __name__ == "__main__":
    main()
