"""The first-step gradient guard: a parameter that gets no gradient stops the run with one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nativelm.errors import NativelmError
from nativelm.model import build_model
from nativelm.params.model import ModelParams
from nativelm.train.guards import check_every_parameter_learns


@pytest.mark.parametrize("overrides", [{}, {"quantize": False}, {"ffn": "dense"}])
def test_every_parameter_of_the_model_families_learns(overrides: dict) -> None:
    params = ModelParams(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32, window=8, n_experts=4,
                         expert_ffn=16, top_k=2, dense_ffn=32, **overrides)
    model = build_model(params, 64, seed=0)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    model(ids, ids).loss.backward()
    check_every_parameter_learns(model)


def test_a_parameter_without_gradient_is_one_line() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model(torch.ones(2, 3)).sum().backward()
    model[1].weight.grad.zero_()  # as a broken backward leaves it
    with pytest.raises(NativelmError, match=r"1 trainable parameter\(s\) got no gradient .*1\.weight") as info:
        check_every_parameter_learns(model)
    assert "\n" not in str(info.value)
