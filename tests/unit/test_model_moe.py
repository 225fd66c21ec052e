"""MoE: QMoE routing convention, load-balancing loss, per-expert dispatch, pre-attention routing."""

from __future__ import annotations

import math

import torch

from nativelm.model import MoE, ModelParams, build_model, load_balancing_loss, route


def test_topk_routing_picks_largest_and_renormalises() -> None:
    torch.manual_seed(0)
    logits = torch.randn(20, 8)
    r = route(logits, 3)
    probs = logits.softmax(-1)
    torch.testing.assert_close(r.probs, probs)
    top = probs.sort(-1, descending=True)
    assert torch.equal(r.experts, top.indices[:, :3])
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(20))
    torch.testing.assert_close(r.weights, top.values[:, :3] / top.values[:, :3].sum(-1, keepdim=True))


def test_load_balancing_loss_uniform_vs_collapsed() -> None:
    n, e, k = 64, 8, 2
    # uniform probabilities and every expert chosen equally often: loss = 1
    uniform = route(torch.zeros(n, e), k)
    uniform.experts = torch.arange(n * k).remainder(e).view(n, k)
    assert abs(float(load_balancing_loss(uniform, e)) - 1.0) < 1e-6
    # collapsed: one expert takes all the probability and every token
    logits = torch.full((n, e), -10.0)
    logits[:, 0] = 10.0
    logits[:, 1] = 0.0
    collapsed = route(logits, k)
    assert float(load_balancing_loss(collapsed, e)) > 3.0
    # through the model: loss = weight · lb_loss
    p = ModelParams(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, n_experts=4, expert_ffn=8, top_k=2,
                    max_seq_len=16, router_aux_weight=0.5, router_z_weight=0.0)
    model = build_model(p, 50)
    with torch.no_grad():
        model.blocks[0].ffn.router.weight.zero_()  # uniform router probabilities
    ids = torch.randint(0, 50, (2, 16))
    out = model(ids, ids)
    torch.testing.assert_close(out.aux_loss, 0.5 * out.lb_loss)
    torch.testing.assert_close(out.loss, out.ce_loss + out.aux_loss)
    assert out.lb_loss >= 1.0 - 1e-6


def _reference_moe(moe: MoE, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    r = route(logits, moe.top_k)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(moe.top_k):
            y, _ = moe.experts[int(r.experts[t, slot])](x[t : t + 1])
            out[t] += r.weights[t, slot] * y[0]
    return out


def test_dispatch_matches_per_token_reference_with_idle_experts() -> None:
    torch.manual_seed(1)
    moe = MoE(16, n_experts=6, expert_ffn=8, top_k=2)
    x = torch.randn(10, 16)
    logits = torch.randn(10, 6)
    logits[:, 3:] -= 20.0  # experts 3, 4, 5 get no token
    y, routing, stats = moe(x.view(2, 5, 16), logits.view(2, 5, 6))
    torch.testing.assert_close(y.view(10, 16), _reference_moe(moe, x, logits), atol=1e-5, rtol=1e-4)
    assert stats["expert_counts"][3:].sum() == 0 and stats["expert_counts"].sum() == 20
    assert 0.0 < float(stats["neuron_sparsity"]) < 1.0
    assert 0.0 <= float(stats["router_entropy"]) <= math.log(6)
    torch.testing.assert_close(stats["router_prob_mean"].sum(), torch.tensor(1.0))
    y.sum().backward()
    assert all(e.gate.weight.grad is None for e in moe.experts[3:])
    assert all(e.gate.weight.grad.abs().sum() > 0 for e in moe.experts[:3])


def _capture_router_logits(model, ids):
    seen = []
    hooks = [b.ffn.register_forward_hook(lambda mod, args, out: seen.append(args[1].detach().clone()))
             for b in model.blocks]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_pre_attention_routing_ignores_attention() -> None:
    common = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4, expert_ffn=8, top_k=2, max_seq_len=16)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    for pre in (True, False):
        model = build_model(ModelParams(pre_attention_routing=pre, **common), 50, seed=3)
        before = _capture_router_logits(model, ids)
        with torch.no_grad():
            for proj in (model.blocks[0].attn.v_proj, model.blocks[0].attn.o_proj):
                proj.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(9))
        after = _capture_router_logits(model, ids)
        if pre:  # layer 0's routing depends only on its input (the embeddings)
            assert torch.equal(before[0], after[0])
            h = model.blocks[0].attn_norm(model.embed(ids))
            torch.testing.assert_close(before[0], model.blocks[0].ffn.router(h))
        else:
            assert not torch.allclose(before[0], after[0])
