"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state.

``step`` counts optimizer steps from 0 (the rate used for the first update) to
``max_steps - 1`` (the last update). Both schedules warm up linearly from ``lr / (warmup+1)``
to ``lr`` over ``warmup_steps`` steps, and reach ``lr * min_lr_ratio`` at the last step.

- ``wsd`` (warmup-stable-decay): constant ``lr`` after warmup, then a final decay over the last
  ``decay_frac`` of the run (linear, 1-sqrt or cosine shaped). The stable phase lets a run be
  continued or branched; the decay is where the loss drops.
- ``cosine``: half a cosine from ``lr`` right after warmup down to the floor at the last step.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from nativelm.params.train import DecayShape, ResolvedTrain, wsd_decay_steps


def _warmup(step: int, lr: float, warmup_steps: int) -> float | None:
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    return None


def _decay_factor(progress: float, shape: DecayShape) -> float:
    """1 at progress 0, 0 at progress 1."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - progress
    if shape == "sqrt":
        return 1.0 - math.sqrt(progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def wsd_lr(step: int, *, lr: float, max_steps: int, warmup_steps: int, decay_frac: float,
           min_lr_ratio: float = 0.0, shape: DecayShape = "linear") -> float:
    """Warmup-stable-decay: warmup, constant `lr`, then decay to `lr * min_lr_ratio` at the last step."""
    warm = _warmup(step, lr, warmup_steps)
    if warm is not None:
        return warm
    decay = wsd_decay_steps(max_steps, decay_frac)
    start = max_steps - decay  # first step of the decay phase
    if step < start:
        return lr
    floor = lr * min_lr_ratio
    progress = (step - start + 1) / decay  # the last step (max_steps - 1) has progress 1
    return floor + (lr - floor) * _decay_factor(progress, shape)


def cosine_lr(step: int, *, lr: float, max_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup, then half a cosine from `lr` to `lr * min_lr_ratio` at the last step."""
    warm = _warmup(step, lr, warmup_steps)
    if warm is not None:
        return warm
    span = max(1, max_steps - 1 - warmup_steps)
    progress = (step - warmup_steps) / span
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * _decay_factor(progress, "cosine")


def make_schedule(cfg: ResolvedTrain) -> Callable[[int], float]:
    """The schedule chosen in the parameters, as `step -> learning rate`."""
    if cfg.schedule == "wsd":
        return lambda step: wsd_lr(step, lr=cfg.lr, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                                   decay_frac=cfg.decay_frac, min_lr_ratio=cfg.min_lr_ratio, shape=cfg.decay_shape)
    return lambda step: cosine_lr(step, lr=cfg.lr, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                                  min_lr_ratio=cfg.min_lr_ratio)
