"""Fine-grained mixture of ReGLU experts, its router, and the dense ReGLU FFN.

Routing follows ORT ``QMoE`` with ``normalize_routing_weights=1`` (DESIGN §4): softmax over
ALL experts, take the top k, renormalise those k weights to sum to 1. An expert is ReGLU:
``down(relu(gate(x)) * up(x))``, so many hidden neurons of an active expert are exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nativelm.model.bitlinear import BitLinear


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
    counts = torch.bincount(routing.experts.reshape(-1), minlength=n_experts).float()
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


class ReGLU(nn.Module):
    """down(relu(gate(x)) * up(x)); all three BitLinear (or plain linear when not quantized)."""

    def __init__(self, d_model: int, hidden: int, linear_kwargs: dict | None = None) -> None:
        super().__init__()
        kw = linear_kwargs or {}
        self.gate = BitLinear(d_model, hidden, **kw)
        self.up = BitLinear(d_model, hidden, **kw)
        self.down = BitLinear(hidden, d_model, **kw)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Output (N, d_model) and the number of exact zeros in the hidden activation (0-d)."""
        h = F.relu(self.gate(x)) * self.up(x)
        return self.down(h), (h.detach() == 0).sum()


class DenseFFN(nn.Module):
    """One ReGLU FFN (the dense comparison model)."""

    def __init__(self, d_model: int, hidden: int, linear_kwargs: dict | None = None) -> None:
        super().__init__()
        self.hidden = hidden
        self.ffn = ReGLU(d_model, hidden, linear_kwargs)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x (B, T, d) -> (B, T, d), stats {neuron_sparsity}."""
        y, zeros = self.ffn(x)
        return y, {"neuron_sparsity": zeros.float() / max(x.shape[:-1].numel() * self.hidden, 1)}


class MoE(nn.Module):
    """n_experts small ReGLU experts, top-k routed; tokens dispatched per expert (gather / index_add)."""

    def __init__(
        self, d_model: int, n_experts: int, expert_ffn: int, top_k: int, linear_kwargs: dict | None = None
    ) -> None:
        super().__init__()
        self.n_experts, self.expert_ffn, self.top_k = n_experts, expert_ffn, top_k
        self.router = Router(d_model, n_experts)
        self.experts = nn.ModuleList(ReGLU(d_model, expert_ffn, linear_kwargs) for _ in range(n_experts))

    def forward(self, x: Tensor, logits: Tensor) -> tuple[Tensor, Routing, dict[str, Tensor]]:
        """x (B, T, d) and router logits (B, T, E) (from wherever the router read) -> output, routing, stats."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = route(logits.reshape(-1, self.n_experts), self.top_k)
        n, k = routing.experts.shape

        flat_experts = routing.experts.reshape(-1)  # (N·k,) assignment a -> token a // k
        order = flat_experts.argsort(stable=True)
        tokens = order // k
        weights = routing.weights.reshape(-1)[order]
        counts = torch.bincount(flat_experts, minlength=self.n_experts)

        out = torch.zeros_like(flat)
        zeros = flat.new_zeros((), dtype=torch.long)
        start = 0
        for e, c in enumerate(counts.tolist()):  # one host sync; experts without tokens are skipped
            if c == 0:
                continue
            idx = tokens[start : start + c]
            y, z = self.experts[e](flat.index_select(0, idx))
            out.index_add_(0, idx, (y * weights[start : start + c, None].to(y.dtype)).to(out.dtype))
            zeros = zeros + z
            start += c

        with torch.no_grad():
            p = routing.probs
            stats = {
                "router_prob_mean": p.mean(0),
                "expert_counts": counts.float(),
                "router_entropy": -(p * p.clamp_min(1e-12).log()).sum(-1).mean(),
                "neuron_sparsity": zeros.float() / max(n * k * self.expert_ffn, 1),
            }
        return out.view(shape), routing, stats
