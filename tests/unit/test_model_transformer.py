"""The LM: variants build and train, determinism, sizes, metrics, parameter validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from nativelm.model import (
    PRESETS,
    ModelParams,
    build_model,
    expert_load_matrix,
    flat_metrics,
    param_counts,
    preset_params,
)

SMALL = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, expert_ffn=16, top_k=2,
             dense_ffn=32, max_seq_len=32, window=8, nope_every=2)
VOCAB = 64


def _batch(b: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t + 1), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", [{}, {"quantize": False}, {"ffn": "dense"}, {"ffn": "dense", "quantize": False},
                                     {"expert_quant": "qmoe"}, {"expert_quant": "int8"}, {"tie_embeddings": False, "router_z_weight": 0.001},
                                     {"bitlinear_norm": False, "pre_attention_routing": False}])
def test_variants_build_run_and_count(variant: dict) -> None:
    params = ModelParams(**{**SMALL, **variant})
    model = build_model(params, VOCAB)
    ids = _batch()
    out = model(ids[:, :-1], ids[:, 1:])
    assert out.logits.shape == (4, 16, VOCAB) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" not in n)
    counts = param_counts(params, VOCAB)
    assert counts["total"] == model.num_params() and counts["active"] == model.active_params()
    assert counts["non_embedding"] == model.num_params(non_embedding=True)
    if params.ffn == "moe":
        assert model.active_params() < model.num_params(non_embedding=True)
    assert model(ids).loss is None


def test_few_steps_on_a_repeated_batch_reduce_loss() -> None:
    model = build_model(ModelParams(**SMALL), VOCAB, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _batch()
    losses = []
    for _ in range(25):
        out = model(ids[:, :-1], ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_deterministic_init() -> None:
    params = ModelParams(**SMALL)
    a, b, c = build_model(params, VOCAB, seed=7), build_model(params, VOCAB, seed=7), build_model(params, VOCAB, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["embed.weight"], sc["embed.weight"])
    tied = build_model(params, VOCAB)
    assert tied.lm_head.weight is tied.embed.weight


def test_metrics_and_load_matrix() -> None:
    model = build_model(ModelParams(**SMALL), VOCAB)
    ids = _batch()
    out = model(ids[:, :-1], ids[:, 1:])
    m = flat_metrics(out, model)
    for i in range(2):
        for name in ("expert_load_cv", "router_entropy", "neuron_sparsity"):
            assert f"layer{i}/{name}" in m
        assert 0.0 < m[f"layer{i}/neuron_sparsity"] < 1.0
    assert m["bits"] == 1.58
    assert abs(m["ternary/share_neg"] + m["ternary/share_zero"] + m["ternary/share_pos"] - 1.0) < 1e-9
    for name in ("loss", "ce_loss", "aux_loss", "lb_loss", "z_loss"):
        assert name in m
    load = expert_load_matrix([out, out])
    assert load.shape == (2, 4)
    torch.testing.assert_close(load.sum(1), torch.ones(2))
    dense = build_model(ModelParams(**{**SMALL, "ffn": "dense", "quantize": False}), VOCAB)
    dm = flat_metrics(dense(ids), dense)
    assert "layer0/neuron_sparsity" in dm and "layer0/expert_load_cv" not in dm
    assert dm["bits"] == 32.0 and "ternary/share_zero" not in dm
    assert expert_load_matrix(dense(ids)).shape == (0, 0)


def test_sequence_longer_than_max_seq_len_is_refused() -> None:
    model = build_model(ModelParams(**SMALL), VOCAB)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_presets() -> None:
    assert ModelParams() == preset_params("tiny")
    gpu = preset_params("gpu")
    for vocab in (4096, 32000):
        counts = param_counts(gpu, vocab)
        assert counts["total"] >= 100_000_000
        assert counts["active"] <= counts["non_embedding"] / 4
        assert counts["active_with_embedding"] <= counts["total"] / 4
    assert set(PRESETS) == {"tiny", "gpu"}
    with pytest.raises(ValueError, match="unknown model preset"):
        preset_params("huge")


@pytest.mark.parametrize(("fields", "message"), [
    ({"d_model": 30, "n_heads": 4}, "n_heads (4) must divide d_model (30)"),
    ({"d_model": 192, "n_heads": 6, "n_kv_heads": 4}, "n_kv_heads (4) must divide n_heads (6)"),
    ({"n_experts": 4, "top_k": 5}, "top_k (5) must not exceed n_experts (4)"),
    ({"d_model": 36, "n_heads": 4}, "must be even"),
    ({"bit_schedule": [[0.2, 8]]}, "must start at fraction 0.0"),
    ({"bit_schedule": [[0, 8], [0.5, 5.5]]}, "weight bits must be 1.58"),
    ({"bit_schedule": [[0, 8], [0.5, 4], [0.4, 2]]}, "fractions must increase"),
    ({"bit_schedule": [[0, 8, 1]]}, "must be [fraction_of_training, bits]"),
    ({"ffn": "sparse"}, "moe"),
    ({"n_layers": "4"}, "valid integer"),
    ({"windw": 8}, "Extra inputs"),
])
def test_bad_params_raise_clear_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        ModelParams.model_validate(fields)
    assert message in str(info.value)
