"""Optimizers: AdamW or RAdam (torch.optim), with weight decay only where it makes sense.

Decision: decoupled weight decay applies to every parameter with two or more dimensions
(linear / BitLinear latent weights, expert matrices, the router, an untied LM head) and never
to 1-D parameters (norm gains, biases) nor to embedding tables (``nn.Embedding`` weights and
anything tied to them, e.g. a tied LM head). Decaying norm gains fights the normalisation,
and decaying embeddings pulls rare tokens' rows to zero, which hurts a small vocabulary model.
For BitLinear the latent weights are decayed: that keeps them near the ternary thresholds'
scale, as in BitNet b1.58 training recipes.
"""

from __future__ import annotations

import torch
from torch import nn

from nativelm.params.train import ResolvedTrain


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed (>= 2-D, not embeddings) and not decayed; each parameter once, in model order."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim >= 2 and id(param) not in embedding_ids:
            decay.append(param)
        else:
            no_decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: ResolvedTrain, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW or RAdam (decoupled weight decay) over `param_groups`; lr is set each step by the loop."""
    groups = param_groups(model, cfg.weight_decay)
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    return torch.optim.RAdam(groups, decoupled_weight_decay=True, **kwargs)
