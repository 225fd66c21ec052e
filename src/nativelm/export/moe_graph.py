"""The MoE layer of the decoder: one QMoE node (ternary, int4) or a dense standard-ONNX computation (fp32).

QMoE fallbacks (never a failure): when `kernels.qmoe_is_fast` rejects 2-bit experts at the chosen
block, the other fast blocks are tried, then the ternary codes are stored as 4-bit codes (exact,
twice the memory), then row-wise scales (exact, slow). Every choice lands in `ExportGraph.choices`
/ `notes`. The dense form runs every expert on every token, weighted by the routing weights (zero
for the experts a token does not use), with BitLinear experts' own norm gains and activation
quantizer, or int8 experts' quantizer (x once for gate and up, h for down): exact, E / k times the FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from onnx import helper

from nativelm.export import kernels, ops
from nativelm.export.builder import GraphBuilder
from nativelm.export.kernels import FAST_BLOCKS
from nativelm.export.weights import ExpertWeights, as_numpy, quantize_experts


class MoePlan(NamedTuple):
    """The QMoE configuration of every layer: expert bits, block size (None: row-wise), fast kernel."""

    bits: int
    block: int | None
    fast: bool


def moe_plan(b: GraphBuilder, bits: int, wanted: int, hidden: int, inter: int) -> MoePlan:
    """The QMoE configuration for experts (hidden, inter) at `bits`, block `wanted` first; fallbacks noted."""
    blocks = [wanted] + [x for x in FAST_BLOCKS if x != wanted]
    for block in blocks:
        if kernels.qmoe_is_fast(bits, block, hidden, inter):
            if block != wanted:
                b.notes.append(f"QMoE: {bits}-bit experts at block {wanted} miss ORT's fast-kernel rules for "
                               f"d_model {hidden}, expert_ffn {inter}; block {block} is used instead")
            return MoePlan(bits, block, True)
    if bits == 2:
        for block in blocks:
            if kernels.qmoe_is_fast(4, block, hidden, inter):
                b.notes.append(f"QMoE: no 2-bit fast kernel for d_model {hidden}, expert_ffn {inter} "
                               f"(ops.qmoe_is_fast); the ternary expert codes are stored as 4-bit codes at "
                               f"block {block} instead (exact, fast, twice the expert memory)")
                return MoePlan(4, block, True)
    b.notes.append(f"QMoE: no fast kernel for d_model {hidden}, expert_ffn {inter}; experts use row-wise "
                   f"{bits}-bit scales, which ORT dequantizes on every call (exact but slow)")
    return MoePlan(bits, None, False)


def qmoe(b: GraphBuilder, prefix: str, moe: Any, h: str, router: str, output: str, weights: ExpertWeights,
         plan: MoePlan) -> None:
    """One QMoE node for the layer: the experts' own codes where they fit `plan.bits`, else re-quantized."""
    bits, block, fast = plan
    ints: dict[str, np.ndarray] = {}
    scales: dict[str, np.ndarray] = {}
    for which, (weight, codes, scale) in weights.items():
        limit = 1 if bits == 2 else (1 << (bits - 1)) - 1
        if codes is not None and np.abs(codes).max(initial=0) <= limit:
            ints[which], scales[which] = codes, scale
        else:
            ints[which], scales[which] = quantize_experts(weight, bits, block)
    name = f"{prefix}.moe"
    b.add(b.guard(name, lambda: ops.qmoe(
        name, h, router, gate=ints["gate"], gate_scales=scales["gate"], up=ints["up"], up_scales=scales["up"],
        down=ints["down"], down_scales=scales["down"], k=moe.top_k, bits=bits, activation="reglu",
        block_size=block, output=output, allow_slow_kernel=True)), "ffn")
    path = ("lut-2bit (fast, approximate ~1% of the output scale)" if bits == 2 and fast else
            "qnbit-4bit (fast, exact for ternary codes)" if fast else "dequantize per call (exact, slow)")
    b.choices.setdefault("moe", {"op": "QMoE", "expert_weight_bits": bits, "block_size": block,
                                 "activation": "reglu via swiglu_fusion (alpha 1e6, beta 0)",
                                 "top_k": moe.top_k, "fast_kernel": fast, "path": path})


def dense_moe(b: GraphBuilder, prefix: str, moe: Any, h: str, router: str, output: str, weights: ExpertWeights,
              forward: Callable[[Any], bool]) -> None:
    """Standard-ONNX MoE: every expert on every token, weighted by the (top-k, renormalised) routing
    weights, which are exactly zero for the experts a token does not use. Exact; E / k times the FLOPs."""
    experts = moe.experts
    hidden = experts.gate.weight.shape[2]
    name = f"{prefix}.moe"
    scale = _dense_routing(b, name, router, moe.top_k)  # (E, tokens, 1)
    flat = b.node("Reshape", [h, b.const([-1, hidden])], f"{name}.input")  # (tokens, d)
    source = b.node("Unsqueeze", [flat, b.const([0])], f"{name}.input_e")  # (1, tokens, d)

    def prepare(which: str, x: str) -> str:
        """The input of expert matrix `which`: each expert's norm gain (BitLinear experts), the per-row
        activation quantizer (BitLinear and int8 experts, forward weights)."""
        lin = getattr(experts, which)
        gains = lin.norm_weights
        if gains is not None:  # BitLinear experts: RMSNorm (no gain) then each expert's own gain
            width = lin.in_features
            normed = b.rms(f"{name}.{which}.norm", x, np.ones(width, np.float32), lin.norm_eps, "ffn")
            gain = np.stack([as_numpy(g) for g in gains])[:, None, :]  # (E, 1, in)
            b.count("ffn", gain.size)
            x = b.node("Mul", [normed, b.init(f"{name}.{which}.norm_gains", gain, "ffn")], f"{name}.{which}.normed")
        if lin.act_bits is not None and forward(lin):
            x = b.fake_quant(f"{name}.{which}.act", x, lin.act_bits, lin.eps)
        return x

    def project(which: str, x: str) -> str:
        w = b.init(f"{name}.{which}.weight", np.transpose(weights[which][0], (0, 2, 1)), "ffn")  # (E, in, out)
        return b.node("MatMul", [x, w], f"{name}.{which}")  # (E, tokens, out)

    # without norm gains (qmoe, int8) gate and up read one input, quantized once
    gate_in = prepare("gate", source)
    g = project("gate", gate_in)
    u = project("up", gate_in if experts.shared_input else prepare("up", source))
    hidden_act = b.node("Mul", [b.node("Relu", [g], f"{name}.relu"), u], f"{name}.hidden")
    y = project("down", prepare("down", hidden_act))  # (E, tokens, d): the routing weight after down
    mixed = b.node("ReduceSum", [b.node("Mul", [y, scale], f"{name}.weighted"), b.const([0])], f"{name}.sum",
                   keepdims=0)
    b.node("Reshape", [mixed, b.node("Shape", [h], f"{name}.shape")], output)
    b.choices.setdefault("moe", {"op": "dense standard ONNX (all experts, weighted by routing)",
                                 "top_k": moe.top_k, "fast_kernel": None})


def _dense_routing(b: GraphBuilder, name: str, router: str, k: int) -> str:
    """Softmax over all experts, top k, renormalised, scattered into (E, tokens, 1) weights."""
    probs = b.node("Softmax", [router], f"{name}.probs", axis=-1)
    top = f"{name}.top"
    b.nodes.append(helper.make_node("TopK", [probs, b.const([k])], [f"{top}.values", f"{top}.indices"],
                                    name=top, axis=-1, largest=1, sorted=1))
    total = b.node("ReduceSum", [f"{top}.values", b.const([-1])], f"{name}.top_sum", keepdims=1)
    weights = b.node("Div", [f"{top}.values", total], f"{name}.top_weights")
    zeros = b.node("Mul", [probs, b.const(0.0, np.float32)], f"{name}.zeros")
    dense = b.node("ScatterElements", [zeros, f"{top}.indices", weights], f"{name}.routing", axis=1)
    return b.node("Unsqueeze", [b.node("Transpose", [dense], f"{name}.routing_t", perm=[1, 0]), b.const([-1])],
                  f"{name}.routing_e")
