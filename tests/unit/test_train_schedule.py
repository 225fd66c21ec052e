"""Learning-rate schedules: warmup, stable and decay phases and their endpoints."""

from __future__ import annotations

import pytest
import torch

from nativelm.params.train import TrainParams
from nativelm.train.optim import build_optimizer
from nativelm.train.schedule import StepSchedule, cosine_lr, wsd_lr


def test_wsd_warmup_stable_decay_endpoints() -> None:
    kw = {"lr": 1.0, "max_steps": 100, "warmup_steps": 10, "decay_frac": 0.2, "min_lr_ratio": 0.1}
    lrs = [wsd_lr(s, **kw) for s in range(100)]
    assert lrs[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # warmup rises
    assert lrs[9] < 1.0 and lrs[10] == 1.0
    assert all(v == 1.0 for v in lrs[10:80])  # stable phase
    assert all(a > b for a, b in zip(lrs[79:99], lrs[80:100], strict=True))  # decay falls
    assert lrs[80] < 1.0 and lrs[99] == pytest.approx(0.1)  # last step at the floor


@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_decay_shapes_reach_the_floor(shape: str) -> None:
    kw = {"lr": 2.0, "max_steps": 50, "warmup_steps": 0, "decay_frac": 0.5, "shape": shape}
    assert wsd_lr(0, **kw) == 2.0 and wsd_lr(24, **kw) == 2.0
    assert wsd_lr(49, **kw) == pytest.approx(0.0)
    mid = wsd_lr(37, **kw)
    assert 0.0 < mid < 2.0


def test_sqrt_decay_drops_faster_than_linear_at_first() -> None:
    kw = {"lr": 1.0, "max_steps": 100, "warmup_steps": 0, "decay_frac": 0.5}
    assert wsd_lr(55, **kw, shape="sqrt") < wsd_lr(55, **kw, shape="linear")


def test_cosine_shape() -> None:
    kw = {"lr": 1.0, "max_steps": 101, "warmup_steps": 0, "min_lr_ratio": 0.0}
    assert cosine_lr(0, **kw) == pytest.approx(1.0)
    assert cosine_lr(50, **kw) == pytest.approx(0.5)
    assert cosine_lr(100, **kw) == pytest.approx(0.0, abs=1e-12)
    lrs = [cosine_lr(s, **kw) for s in range(101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def test_cosine_with_warmup_and_floor() -> None:
    kw = {"lr": 1.0, "max_steps": 60, "warmup_steps": 10, "min_lr_ratio": 0.1}
    assert cosine_lr(9, **kw) < 1.0 and cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(59, **kw) == pytest.approx(0.1)


def test_step_schedule_follows_params() -> None:
    cfg = TrainParams(schedule="cosine", max_steps=100, warmup_steps=0, lr=0.5).resolved()
    assert StepSchedule(cfg).lr(99) == pytest.approx(0.0, abs=1e-12)
    cfg = TrainParams(max_steps=100, warmup_steps=0, lr=0.5).resolved()
    assert StepSchedule(cfg).lr(50) == 0.5


def test_bitnet_recipe_cuts_the_rate_and_the_decay_at_the_split() -> None:
    standard = StepSchedule(TrainParams(max_steps=100, warmup_steps=10, lr=0.5, weight_decay=0.1).resolved())
    bitnet = StepSchedule(TrainParams(max_steps=100, warmup_steps=10, lr=0.5, weight_decay=0.1, recipe="bitnet",
                                      recipe_split=0.6, recipe_lr_drop=0.25).resolved())
    assert bitnet.second_stage == 60 and standard.second_stage is None
    for step in range(60):
        assert bitnet.lr(step) == standard.lr(step) and bitnet.weight_decay(step) == 0.1
    for step in range(60, 100):
        assert bitnet.lr(step) == pytest.approx(0.25 * standard.lr(step)) and bitnet.weight_decay(step) == 0.0
    assert all(standard.weight_decay(s) == 0.1 for s in range(100))


def test_step_schedule_sets_decay_only_on_the_decayed_group() -> None:
    cfg = TrainParams(max_steps=10, warmup_steps=0, lr=0.5, recipe="bitnet", recipe_split=0.5).resolved()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, cfg)
    schedule = StepSchedule(cfg)
    assert schedule.apply(opt, 0) == 0.5
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.1, "no_decay": 0.0}
    assert schedule.apply(opt, 5) == pytest.approx(0.25)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.0, "no_decay": 0.0}
    assert all(g["lr"] == pytest.approx(0.25) for g in opt.param_groups)
