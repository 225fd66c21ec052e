"""The graph under construction: its nodes and initializers, and what `ExportGraph` reports about them.

`GraphBuilder` is the plumbing every part of the decoder writes through (`graph`, `variants`,
`moe_graph`, `tables`): an `ops` builder's output lands here with the part it belongs to, small
constants are shared, parameter counts add up per part, choices and notes are recorded once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nativelm.errors import NativelmError
from nativelm.export import ops
from nativelm.export.kernels import QUANTIZED_OPS


class GraphBuilder:
    """Nodes, initializers (tagged by part), parameter counts, choices and notes of one export."""

    def __init__(self, variant: str) -> None:
        self.variant = variant
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.parts: dict[str, str] = {}
        self.part_params: dict[str, int] = {}
        self.choices: dict[str, Any] = {}
        self.notes: list[str] = []
        self.quantized_nodes: list[str] = []
        self._consts: dict[str, str] = {}
        self._noted: set[str] = set()

    def add(self, parts: ops.Parts, part: str) -> None:
        """Append an `ops` builder's nodes and initializers; its initializers count towards `part`."""
        nodes, inits = parts
        self.nodes += nodes
        for init in inits:
            self.parts[init.name] = part
        self.inits += inits
        self.quantized_nodes += [n.name for n in nodes if n.op_type in QUANTIZED_OPS]

    def node(self, op: str, inputs: list[str], output: str, **attrs: Any) -> str:
        """One standard node named after its single output; returns the output."""
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

    def note_once(self, key: str, message: str) -> None:
        """Record `message` the first time `key` comes up (one note for all layers of a kind)."""
        if key not in self._noted:
            self._noted.add(key)
            self.notes.append(message)

    def guard(self, name: str, build: Callable[[], ops.Parts]) -> ops.Parts:
        """Run an ops builder; a ValueError (shape it cannot pack) becomes one clear NativelmError line."""
        try:
            return build()
        except ValueError as exc:
            raise NativelmError(f"export {self.variant}: cannot build {name}: {exc}") from None

    # ---- small compositions of standard operators ---------------------------------------------------
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
