"""Fine-grained mixture of ReGLU experts, its router, and the dense ReGLU FFN.

Routing follows ONNX Runtime's ``QMoE`` with ``normalize_routing_weights=1``: softmax over
ALL experts, take the top k, renormalise those k weights to sum to 1. An expert is ReGLU:
``down(relu(gate(x)) * up(x))``, so many hidden neurons of an active expert are exactly zero.

The experts of a layer are stacked (:class:`~nativelm.model.bitlinear.ExpertLinear`: one
(E, out, in) weight per projection, each expert's matrix with its own absmean scale, all quantized
in one fused call per forward) and applied to all tokens at once through `dispatch`: gate and up
are one grouped matmul over the expert groups, ReGLU and the routing weight one fused elementwise
pass (down is linear, so weighting its input is weighting its output), down a second grouped matmul.
Experts with quantized activations (``expert_quant: int8``, ``act_bits``) quantize x once per row for gate and up
(one matmul for both) and h per row for down, whose output then takes the routing weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nativelm.model.bitlinear import BitLinear, ExpertLinear, compute_dtype
from nativelm.model.compiled import fused_call
from nativelm.model.quantizers import quantize_weight_groups
from nativelm.model.dispatch import Dispatch, GatherRows, combine_rows, grouped_linear


@dataclass
class Routing:
    """Routing decisions for N tokens: probabilities over all experts, chosen experts and weights."""

    logits: Tensor  # (N, E) fp32 router logits
    probs: Tensor  # (N, E) softmax over all experts
    experts: Tensor  # (N, k) chosen expert indices, by decreasing probability
    weights: Tensor  # (N, k) renormalised top-k probabilities (sum to 1 per token)


def route(logits: Tensor, top_k: int) -> Routing:
    """Softmax over all experts, top-k, renormalise over the k (QMoE normalize_routing_weights=1)."""
    logits = logits.float()
    probs = logits.softmax(-1)
    weights, experts = probs.topk(top_k, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    return Routing(logits, probs, experts, weights)


def load_balancing_loss(routing: Routing, n_experts: int) -> Tensor:
    """Switch-style n_experts · Σ_i f_i · P_i; f_i = share of the N·k assignments, P_i = mean prob.

    1.0 for perfectly uniform routing, up to n_experts / k when routing collapses.
    """
    flat = routing.experts.reshape(-1)
    # = bincount, without bincount's host sync on CUDA (adding ones in fp32 is exact)
    ones = torch.ones(flat.shape, device=flat.device)
    counts = torch.zeros(n_experts, device=flat.device).scatter_add_(0, flat, ones)
    f = counts / counts.sum()
    p = routing.probs.mean(0)
    return n_experts * (f * p).sum()


def z_loss(routing: Routing) -> Tensor:
    """Router z-loss: mean over tokens of logsumexp(logits)^2 (keeps logits small)."""
    return routing.logits.logsumexp(-1).pow(2).mean()


class Router(nn.Module):
    """A small full-precision linear d_model -> n_experts giving logits (always fp32, no autocast)."""

    def __init__(self, d_model: int, n_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


GATE_ACTS = {"reglu": F.relu, "swiglu": F.silu}  # the gate's activation of each gated FFN kind


class ReGLU(nn.Module):
    """down(relu(gate(x)) * up(x)); all three BitLinear (or plain linear when not quantized).
    `act` "swiglu" makes it down(silu(gate(x)) * up(x)) (dense FFN only: the experts are ReGLU)."""

    def __init__(self, d_model: int, hidden: int, linear_kwargs: dict | None = None, act: str = "reglu") -> None:
        super().__init__()
        kw = linear_kwargs or {}
        self.act = GATE_ACTS[act]
        self.gate = BitLinear(d_model, hidden, **kw)
        self.up = BitLinear(d_model, hidden, **kw)
        self.down = BitLinear(hidden, d_model, **kw)

    def quant_groups(self) -> list[list[Tensor]]:
        """Latent weights to quantize together (see ``Block``): gate, up, down; empty when not quantized."""
        return [[self.gate.weight], [self.up.weight], [self.down.weight]] if self.gate.quantize else []

    def forward(self, x: Tensor, weights: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Output (N, d_model) and the number of exact zeros in the hidden activation (0-d).
        `weights`: the quantized gate, up, down weights when the caller computed them."""
        wg, wu, wd = weights if weights else (None, None, None)
        h = self.act(self.gate(x, wg)) * self.up(x, wu)
        return self.down(h, wd), (h.detach() == 0).sum()


class DenseFFN(nn.Module):
    """One gated FFN, ReGLU or SwiGLU (`act`): the dense families and the dense comparison model."""

    def __init__(self, d_model: int, hidden: int, linear_kwargs: dict | None = None, act: str = "reglu") -> None:
        super().__init__()
        self.hidden = hidden
        self.ffn = ReGLU(d_model, hidden, linear_kwargs, act)

    def quant_groups(self) -> list[list[Tensor]]:
        return self.ffn.quant_groups()

    def forward(self, x: Tensor, weights: list[Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, T, d) -> (B, T, d), stats {neuron_sparsity}."""
        y, zeros = self.ffn(x, weights)
        return y, {"neuron_sparsity": zeros.float() / max(x.shape[:-1].numel() * self.hidden, 1)}


def _reglu_weighted(gu: Tensor, row_weights: Tensor, hidden: int) -> tuple[Tensor, Tensor]:
    """relu(gate) · up · routing weight of rows gu = [gate | up] (M, 2·hidden), and the number of exact
    zeros of relu(gate) · up (before the weight)."""
    g, u = gu[:, :hidden], gu[:, hidden:]
    h = F.relu(g) * u
    zeros = (h.detach() == 0).sum()
    return h * row_weights.to(h.dtype)[:, None], zeros


# --------------------------------------------------------------------------- the MoE layer


class Experts(nn.Module):
    """n_experts ReGLU experts ``down(relu(gate(x)) * up(x))`` as three stacked ExpertLinear
    (gate, up: (E, hidden, d_model); down: (E, d_model, hidden))."""

    def __init__(self, d_model: int, n_experts: int, hidden: int, linear_kwargs: dict | None = None) -> None:
        super().__init__()
        kw = linear_kwargs or {}
        self.n_experts, self.hidden = n_experts, hidden
        self.gate = ExpertLinear(n_experts, d_model, hidden, **kw)
        self.up = ExpertLinear(n_experts, d_model, hidden, **kw)
        self.down = ExpertLinear(n_experts, hidden, d_model, **kw)

    @property
    def weight_only(self) -> bool:
        """True when the experts quantize only their weights (qmoe) or nothing (fp): no norm, fp activations."""
        return self.gate.norm_weights is None and self.gate.act_bits is None

    @property
    def shared_input(self) -> bool:
        """True when gate and up read the same input (no per-expert norm gain: qmoe, int8, fp), so one
        (quantized) input and one matmul serve both; False for BitLinear experts (a gain each)."""
        return self.gate.norm_weights is None

    def quant_groups(self) -> list[list[Tensor]]:
        """Latent weights to quantize together: shared-input experts (gate, up concatenated), down;
        BitLinear experts gate, up, down; empty when not quantized."""
        if not self.gate.quantize:
            return []
        if self.shared_input:
            return [[self.gate.weight, self.up.weight], [self.down.weight]]
        return [[self.gate.weight], [self.up.weight], [self.down.weight]]

    def quantized_weights(self, dtype: torch.dtype) -> list[Tensor]:
        """What `forward` multiplies by, in `dtype`, in the layout of `quant_groups` (fp: the same
        layout, plain casts): shared input (gate|up (E, 2·hidden, d_model), down); else (gate, up, down)."""
        if not self.gate.quantize:
            g, u, d = (lin.weight.to(dtype) for lin in (self.gate, self.up, self.down))
            return [torch.cat((g, u), dim=1), d] if self.shared_input else [g, u, d]
        return quantize_weight_groups(self.quant_groups(), self.gate.q_levels, self.gate.eps, dtype)

    def forward(self, x: Tensor, d: Dispatch, row_weights: Tensor,
                weights: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Rows x (M, d_model) sorted by expert -> each row's expert output times its routing weight
        `row_weights` (M,), (M, d_model) in the matmul dtype; and the number of exact zeros of the
        hidden activation (0-d). `weights`: `quantized_weights` when the caller computed them."""
        dtype = compute_dtype(x)
        if weights is None:
            weights = self.quantized_weights(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if self.weight_only:
                # qmoe / fp: gate and up read the same input: one matmul for both, then ReGLU and the
                # routing weight in one fused pass (down is linear: weighting its (M, hidden) input is
                # weighting its output, on half the elements)
                w_gu, w_down = weights
                gu = grouped_linear(x.to(dtype), w_gu, d)
                h, zeros = fused_call(_reglu_weighted, gu.is_cuda, gu, row_weights, self.hidden)
                return grouped_linear(h, w_down, d), zeros
            if self.shared_input:
                # int8: x quantized once per row for gate and up (one matmul for both), h per row for down
                w_gu, w_down = weights
                gu = grouped_linear(self.gate.prepare_input(x, d.row_experts).to(dtype), w_gu, d)
                g, u = gu[:, :self.hidden], gu[:, self.hidden:]
            else:
                w_gate, w_up, w_down = weights
                g = grouped_linear(self.gate.prepare_input(x, d.row_experts).to(dtype), w_gate, d)
                u = grouped_linear(self.up.prepare_input(x, d.row_experts).to(dtype), w_up, d)
            h = F.relu(g) * u
            zeros = (h.detach() == 0).sum()
            # down quantizes (BitLinear: also normalises) its input per row, which would undo a routing
            # weight applied before it: the weight goes on its output
            y = grouped_linear(self.down.prepare_input(h, d.row_experts).to(dtype), w_down, d)
            return y * row_weights.to(dtype)[:, None], zeros

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints of the per-expert layout (``{e}.gate.weight``, ``{e}.gate.norm.weight``, ...)
        for name in ("gate", "up", "down"):
            old = [f"{prefix}{e}.{name}.weight" for e in range(self.n_experts)]
            if all(k in state_dict for k in old):
                state_dict[f"{prefix}{name}.weight"] = torch.stack([state_dict.pop(k) for k in old])
            for e in range(self.n_experts):
                key = f"{prefix}{e}.{name}.norm.weight"
                if key in state_dict:
                    state_dict[f"{prefix}{name}.norm_weights.{e}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MoE(nn.Module):
    """n_experts small ReGLU experts, top-k routed; all experts applied at once by grouped matmuls."""

    def __init__(
        self, d_model: int, n_experts: int, expert_ffn: int, top_k: int, linear_kwargs: dict | None = None
    ) -> None:
        super().__init__()
        self.n_experts, self.expert_ffn, self.top_k = n_experts, expert_ffn, top_k
        self.router = Router(d_model, n_experts)
        self.experts = Experts(d_model, n_experts, expert_ffn, linear_kwargs)

    def expert_params(self) -> int:
        """Parameters of one expert (gate, up, down matrices and, for BitLinear experts, their norm gains)."""
        return sum(p.numel() for p in self.experts.parameters()) // self.n_experts

    @torch.no_grad()
    def ternary_experts(self) -> dict[str, Tensor]:
        """What the exporter packs: ``{gate, up, down}`` int8 codes in {-1, 0, 1}, (E, out, in) each
        ((E, expert_ffn, d_model) for gate and up, (E, d_model, expert_ffn) for down), and
        ``{gate, up, down}_scale`` fp32 (E,): expert e's matrix is ``codes[e] · scale[e]``."""
        out: dict[str, Tensor] = {}
        for name in ("gate", "up", "down"):
            codes, scale = getattr(self.experts, name).ternary_weight()
            out[name], out[f"{name}_scale"] = codes, scale
        return out

    def quant_groups(self) -> list[list[Tensor]]:
        return self.experts.quant_groups()

    def forward(self, x: Tensor, logits: Tensor,
                weights: list[Tensor] | None = None) -> tuple[Tensor, Routing, dict[str, Tensor]]:
        """x (B, T, d) and router logits (B, T, E) (from wherever the router read) -> output, routing, stats.
        `weights`: the experts' `quantized_weights` when the caller computed them."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = route(logits.reshape(-1, self.n_experts), self.top_k)
        n, k = routing.experts.shape
        d = Dispatch.from_experts(routing.experts, self.n_experts)

        # every token repeated k times and sorted by expert; weight-only experts read it in the matmul
        # dtype (cast once, before the copy), BitLinear and int8 experts normalise / quantize it first,
        # in its own precision
        dtype = compute_dtype(flat) if self.experts.weight_only else flat.dtype
        rows = GatherRows.apply(flat, d.tokens, d.inverse, k, dtype)
        y, zeros = self.experts(rows, d, routing.weights.reshape(-1).index_select(0, d.order), weights)
        out = combine_rows(y, d, k, flat.dtype)

        with torch.no_grad():
            p = routing.probs
            stats = {
                "router_prob_mean": p.mean(0),
                "expert_counts": d.counts.float(),
                "router_entropy": -(p * p.clamp_min(1e-12).log()).sum(-1).mean(),
                "neuron_sparsity": zeros.float() / max(n * k * self.expert_ffn, 1),
            }
        return out.view(shape), routing, stats
