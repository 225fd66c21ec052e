"""MatMulNBits kernel paths side by side: one GEMV (1 × K @ K × N), every configuration in one run.

    python bench/matmul_nbits_kernels.py [--n 2048] [--k 2048] [--block-sizes 32,128] [--threads 2] [--seconds 8]

Prints the median time per call of each configuration and the ratios that matter: 2-bit with
accuracy_level=0 (ORT's generic kernel) against accuracy_level=4 (prepacked MLAS int8 kernel), and
each quantized path against a float32 MatMul. Configurations are timed in interleaved rounds so a
busy machine slows them all alike. Whether each node's weights were prepacked (the fast path) is
read from an ORT profile, as the unit tests do.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nativelm.export import kernels, ops, pack


def model_of(parts: ops.Parts, k: int, n: int) -> onnx.ModelProto:
    nodes, inits = parts
    graph = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=ops.opset_imports())


def configurations(n: int, k: int, block_sizes: list[int]) -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, k)).astype(np.float32)
    dense = ([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
             [numpy_helper.from_array(np.ascontiguousarray(w.T), "w")])
    models = {"fp32 MatMul": model_of(dense, k, n)}
    for block_size in block_sizes:
        ternary, ternary_scales = pack.ternarize_blocks(w, block_size)
        for level, zero_point in [(0, None), (4, None), (4, 1)]:
            label = f"2-bit bs={block_size} acc={level}" + (" zp=1" if zero_point else "")
            models[label] = model_of(ops.matmul_nbits("mm", "x", ternary, ternary_scales, 2, block_size, level,
                                                      output="y", zero_point=zero_point, allow_slow_kernel=True), k, n)
        for bits, level in [(4, 0), (4, 4), (8, 4)]:
            w_int, scales = pack.quantize_symmetric(w, bits, block_size)
            models[f"{bits}-bit bs={block_size} acc={level}"] = model_of(
                ops.matmul_nbits("mm", "x", w_int, scales, bits, block_size, level, output="y"), k, n)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--block-sizes", default="32,128", help="comma-separated block sizes to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0, help="total timing budget (split across configurations)")
    args = parser.parse_args()
    block_sizes = [int(b) for b in args.block_sizes.split(",")]

    models = configurations(args.n, args.k, block_sizes)
    feeds = {"x": np.random.default_rng(1).standard_normal((1, args.k)).astype(np.float32)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions, prepacked = {}, {}
    for label, model in models.items():
        run = kernels.profile_kernels(model, feeds)[0]
        prepacked[label] = "mm.weight" in kernels.prepacked_inputs(model, run) if run.op_type == "MatMulNBits" else None
        sessions[label] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        for _ in range(3):
            sessions[label].run(None, feeds)

    samples: dict[str, list[float]] = {label: [] for label in sessions}
    rounds = 10
    slice_s = args.seconds / rounds / len(sessions)
    for _ in range(rounds):
        for label, sess in sessions.items():
            calls, start = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - start) < slice_s or calls < 2:
                sess.run(None, feeds)
                calls += 1
            samples[label].append(elapsed / calls)
    median = {label: statistics.median(values) * 1e6 for label, values in samples.items()}

    print(f"MatMulNBits GEMV 1x{args.k} @ {args.k}x{args.n}, {args.threads} threads, ORT {ort.__version__}")
    print(f"{'configuration':26s} {'us/call':>10s} {'vs fp32':>8s}  prepacked")
    for label, us in median.items():
        mark = "" if prepacked[label] is None else ("yes" if prepacked[label] else "no (generic kernel)")
        print(f"{label:26s} {us:10.1f} {us / median['fp32 MatMul']:7.2f}x  {mark}")
    for bs in block_sizes:
        fast, slow, zp = (median[f"2-bit bs={bs} acc={level}"] for level in ("4", "0", "4 zp=1"))
        print(f"bs={bs}: ratio 2-bit accuracy_level 0 / 4: {slow / fast:.1f}x;  zp=1 / default zp: {zp / fast:.2f}x")


if __name__ == "__main__":
    main()
