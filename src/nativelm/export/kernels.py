"""Which kernel path ONNX Runtime 1.32 (CPU) takes for a quantized node: the fast-kernel rules and the profiler.

The rules (`matmul_nbits_is_fast`, `qmoe_is_fast`) are what ORT was measured to do (docs in
`nativelm.export.ops`, pinned by tests/unit/test_export_ops.py); `profile_kernels` and
`prepacked_inputs` measure it on a real session: a weight the kernel prepacked at session start
means the fast MLAS path.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

QUANTIZED_OPS = ("MatMulNBits", "QMoE")  # the nodes whose weights must be prepacked (fast kernels)
FAST_BLOCKS = (128, 64, 32)  # the block sizes of the fast 2-bit MatMulNBits / QMoE kernels, preferred first


def matmul_nbits_is_fast(bits: int, block_size: int, accuracy_level: int) -> bool:
    """Whether ORT 1.32 CPU runs this MatMulNBits configuration on its prepacked MLAS kernel.

    Measured: 2-bit needs accuracy_level=4 and block_size 32/64/128 (else a generic kernel,
    ~50-100x slower); 8-bit needs accuracy_level=4; 4-bit is fast at every level.
    """
    if bits == 2:
        return accuracy_level == 4 and block_size in (32, 64, 128)
    if bits == 8:
        return accuracy_level == 4
    return bits == 4


def qmoe_is_fast(bits: int, block_size: int | None, hidden: int, inter: int, activation: str = "reglu") -> bool:
    """Whether ORT 1.32 CPU runs both expert GEMMs of this QMoE on a prepacked fast kernel.

    Measured: row-wise scales (no block_size) always dequantize every expert to float32 per call
    (exact but ~80x slower). Block-wise 4/8-bit run MLAS QNBit kernels. Block-wise 2-bit runs MLAS
    LUT GEMM, prepacked when each GEMM has N % 128 == 0 and K >= 2 * block_size (block 32/64/128);
    LUT GEMM is approximate (~1% of the output scale), not exact. (Row-wise 4-bit weights are
    prepacked too, yet still dequantized per call: a prepacked profile is not proof there.)
    """
    if block_size is None or hidden % block_size or inter % block_size:
        return False
    if bits != 2:
        return bits in (4, 8)
    fc1_rows = 2 * inter if activation == "reglu" else inter
    return (block_size in (32, 64, 128) and fc1_rows % 128 == 0 and hidden % 128 == 0
            and min(hidden, inter) >= 2 * block_size)


class KernelRun(NamedTuple):
    """One node execution in an ORT profile."""

    node: str
    op_type: str
    provider: str
    duration_us: int
    inputs: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of the inputs the kernel still received


def profile_kernels(session_or_model: object, feeds: Mapping[str, np.ndarray] | Callable[[Any], object],
                    runs: int = 1) -> list[KernelRun]:
    """Run `feeds` through a model with ORT profiling on; one KernelRun per node execution.

    `feeds` may instead be a function of the session that runs it once (e.g. with an I/O binding).

    Accepts a model path, serialized bytes, a ModelProto (a CPU session is made with profiling on),
    or an InferenceSession created with `enable_profiling` (its profile is ended). A weight the
    kernel prepacked at session start is missing from `inputs`: see `prepacked_inputs`.
    """
    with tempfile.TemporaryDirectory(prefix="nativelm-profile-") as folder:
        if isinstance(session_or_model, ort.InferenceSession):
            session = session_or_model
            if not session.get_session_options().enable_profiling:
                raise ValueError("profile_kernels needs a session created with SessionOptions.enable_profiling = True")
        else:
            source = session_or_model
            if isinstance(source, onnx.ModelProto):
                source = source.SerializeToString()
            elif isinstance(source, os.PathLike):
                source = os.fspath(source)
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(folder) / "profile")
            options.log_severity_level = 3  # errors only (the optional num_logits_to_keep input is a warning)
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            if callable(feeds):
                feeds(session)
            else:
                session.run(None, dict(feeds))
        profile = Path(session.end_profiling())
        try:
            events = json.loads(profile.read_text())
        finally:
            profile.unlink(missing_ok=True)
    records = []
    for event in events:
        args = event.get("args", {})
        if event.get("cat") != "Node" or "op_name" not in args:
            continue
        inputs = tuple((dtype, tuple(shape)) for entry in args.get("input_type_shape", [])
                       for dtype, shape in entry.items())
        node = event["name"].removesuffix("_kernel_time")
        records.append(KernelRun(node, args["op_name"], args.get("provider", ""), int(event.get("dur", 0)), inputs))
    return records


_PROFILE_DTYPES = {TensorProto.FLOAT: "float", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
                   TensorProto.DOUBLE: "double", TensorProto.UINT8: "uint8", TensorProto.INT8: "int8",
                   TensorProto.INT32: "int32", TensorProto.INT64: "int64", TensorProto.BOOL: "bool"}


def prepacked_inputs(model: onnx.ModelProto, run: KernelRun) -> list[str]:
    """Initializers of `run`'s node that its kernel prepacked (consumed at session start).

    ORT drops a prepacked weight from the node's profiled inputs. For MatMulNBits a prepacked B
    means the fast MLAS path; the generic fallback keeps reading the packed bytes every call.
    """
    node = next((n for n in model.graph.node if n.name == run.node), None)
    if node is None:
        raise ValueError(f"node {run.node!r} of the profile is not in the model (renamed by a graph optimization?)")
    initializers = {init.name: init for init in model.graph.initializer}
    position = 0
    consumed = []
    for name in (i for i in node.input if i):
        init = initializers.get(name)
        expected = (_PROFILE_DTYPES.get(init.data_type), tuple(init.dims)) if init is not None else None
        if position < len(run.inputs) and (expected is None or run.inputs[position] == expected):
            position += 1
        elif init is not None:
            consumed.append(name)
    return consumed
