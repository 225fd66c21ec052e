"""Checks that stop a run early, with one clear line, instead of training something silently wrong."""

from __future__ import annotations

from torch import nn

from nativelm.errors import NativelmError


def check_every_parameter_learns(model: nn.Module) -> None:
    """After the first backward: every trainable parameter has a gradient with a non-zero entry.

    A parameter that gets none does not train (a broken compiled backward once gave every expert
    exactly zero); checked once per run, it costs one reduction per parameter.
    """
    dead = [name for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not bool(p.grad.any()))]
    if dead:
        more = f" and {len(dead) - 3} more" if len(dead) > 3 else ""
        raise NativelmError(f"train: {len(dead)} trainable parameter(s) got no gradient in the first step "
                            f"({', '.join(dead[:3])}{more}); the model would not learn them (with train.compile: "
                            "true, try false)")
