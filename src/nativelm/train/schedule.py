"""Learning-rate schedules as pure functions of the step, so resuming needs no scheduler state.

``step`` counts optimizer steps from 0 (the rate used for the first update) to
``max_steps - 1`` (the last update). Both schedules warm up linearly from ``lr / (warmup+1)``
to ``lr`` over ``warmup_steps`` steps, and reach ``lr * min_lr_ratio`` at the last step.

- ``wsd`` (warmup-stable-decay): constant ``lr`` after warmup, then a final decay over the last
  ``decay_frac`` of the run (linear, 1-sqrt or cosine shaped). The stable phase lets a run be
  continued or branched; the decay is where the loss drops.
- ``cosine``: half a cosine from ``lr`` right after warmup down to the floor at the last step.

``train.recipe: bitnet`` (BitNet b1.58's two-stage recipe, docs/training.md) keeps either
schedule's shape but multiplies the rate by ``recipe_lr_drop`` from the step at ``recipe_split``
on, and turns weight decay off there: the second stage lets the ternary codes settle.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nativelm.params.train import DecayShape, ResolvedTrain, recipe_split_step, wsd_decay_steps


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


def base_schedule(cfg: ResolvedTrain) -> Callable[[int], float]:
    """The schedule chosen in the parameters, as `step -> learning rate`, before any recipe."""
    if cfg.schedule == "wsd":
        return lambda step: wsd_lr(step, lr=cfg.lr, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                                   decay_frac=cfg.decay_frac, min_lr_ratio=cfg.min_lr_ratio, shape=cfg.decay_shape)
    return lambda step: cosine_lr(step, lr=cfg.lr, max_steps=cfg.max_steps, warmup_steps=cfg.warmup_steps,
                                  min_lr_ratio=cfg.min_lr_ratio)


class StepSchedule:
    """Learning rate and weight decay of every step: pure functions of the step, so a resume needs no state."""

    def __init__(self, cfg: ResolvedTrain) -> None:
        self.cfg = cfg
        self._base = base_schedule(cfg)

    @property
    def second_stage(self) -> int | None:
        """First step of the bitnet recipe's second stage (None for the standard recipe)."""
        if self.cfg.recipe != "bitnet":
            return None
        return recipe_split_step(self.cfg.max_steps, self.cfg.recipe_split)

    def lr(self, step: int) -> float:
        rate = self._base(step)
        split = self.second_stage
        return rate * self.cfg.recipe_lr_drop if split is not None and step >= split else rate

    def weight_decay(self, step: int) -> float:
        split = self.second_stage
        return 0.0 if split is not None and step >= split else self.cfg.weight_decay

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set step `step`'s rate on every group and its decay on the decayed group; returns the rate."""
        lr, decay = self.lr(step), self.weight_decay(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("name") == "decay":
                group["weight_decay"] = decay
        return lr

