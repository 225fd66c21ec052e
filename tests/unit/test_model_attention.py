"""Attention: window convention i - w < j <= i, GQA grouping, RoPE vs NoPE layers, causality."""

from __future__ import annotations

import math

import torch

from nativelm.model import Attention, ModelParams, apply_rope, attention_mask, build_model


def test_mask_window_convention() -> None:
    mask = attention_mask(8, window=3)
    for i in range(8):
        for j in range(8):
            assert bool(mask[i, j]) == (i - 3 < j <= i), (i, j)
    assert int(mask.sum(1).max()) == 3  # w keys, itself included
    assert torch.equal(attention_mask(8, window=0), torch.ones(8, 8, dtype=torch.bool).tril())
    # with an offset the queries sit at positions offset.. and see keys from 0
    off = attention_mask(2, window=3, offset=5)
    assert off.shape == (2, 7)
    assert off[0].nonzero().flatten().tolist() == [3, 4, 5] and off[1].nonzero().flatten().tolist() == [4, 5, 6]


def test_attention_matches_explicit_gqa_reference() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, rope=True, window=3, max_seq_len=16, linear_kwargs={"quantize": False})
    x = torch.randn(2, 7, 32)
    q = attn.q_proj(x).view(2, 7, 4, 8).transpose(1, 2)
    k = attn.k_proj(x).view(2, 7, 2, 8).transpose(1, 2)
    v = attn.v_proj(x).view(2, 7, 2, 8).transpose(1, 2)
    q, k = apply_rope(q, attn.rope_cos[:7], attn.rope_sin[:7]), apply_rope(k, attn.rope_cos[:7], attn.rope_sin[:7])
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # head h uses kv head h // 2
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(~attention_mask(7, window=3), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 32)
    torch.testing.assert_close(attn(x), attn.o_proj(y), atol=1e-5, rtol=1e-5)


def _model(**kw):
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, n_experts=4, expert_ffn=8, top_k=2, max_seq_len=32)
    return build_model(ModelParams(**{**base, **kw}), 50, seed=1).eval()


def _changed_positions(model, t: int = 20, at: int = 0) -> list[int]:
    ids = torch.randint(1, 50, (1, t), generator=torch.Generator().manual_seed(5))
    other = ids.clone()
    other[0, at] = (other[0, at] + 7) % 50
    with torch.no_grad():
        diff = (model(ids).logits - model(other).logits).abs().amax(-1)[0]
    return [i for i in range(t) if diff[i] > 1e-6]


def test_rope_layers_never_look_beyond_the_window() -> None:
    one = _model(n_layers=1, window=4, nope_every=0)
    assert _changed_positions(one) == [0, 1, 2, 3]  # position i sees 0 only while i - 4 < 0
    two = _model(n_layers=2, window=4, nope_every=0)
    assert max(_changed_positions(two)) <= 6  # receptive field of two windows: 2 · (4 - 1)


def test_nope_layer_sees_the_whole_prefix() -> None:
    nope = _model(n_layers=1, window=4, nope_every=1)
    assert not nope.blocks[0].attn.rope
    assert _changed_positions(nope) == list(range(20))
    mixed = _model(n_layers=2, window=4, nope_every=2)  # layer 0 RoPE + window, layer 1 NoPE
    assert [b.attn.rope for b in mixed.blocks] == [True, False]
    assert _changed_positions(mixed) == list(range(20))


def test_nope_layer_placement() -> None:
    p = ModelParams(n_layers=8, nope_every=4)
    assert [i for i in range(8) if p.is_nope_layer(i)] == [3, 7]
    assert not any(ModelParams(n_layers=8, nope_every=0).is_nope_layer(i) for i in range(8))


def test_causality_future_tokens_do_not_change_past_logits() -> None:
    for kw in ({"nope_every": 2}, {"ffn": "dense"}, {"quantize": False}):
        model = _model(n_layers=2, window=6, **kw)
        assert min(_changed_positions(model, t=16, at=10)) == 10


def test_position_offset_shifts_rope_positions() -> None:
    torch.manual_seed(0)
    attn = Attention(32, 4, 2, rope=True, window=0, max_seq_len=32)
    x = torch.randn(1, 5, 32)
    # RoPE scores depend on relative positions only: a shifted sequence attends the same way
    torch.testing.assert_close(attn(x, offset=3), attn(x), atol=1e-5, rtol=1e-4)
    q = torch.randn(1, 1, 5, 8)
    shifted = apply_rope(q, attn.rope_cos[3:8], attn.rope_sin[3:8])
    assert not torch.allclose(shifted, apply_rope(q, attn.rope_cos[:5], attn.rope_sin[:5]))
    try:
        attn(x, offset=28)
    except ValueError as exc:
        assert "max_seq_len" in str(exc)
    else:
        raise AssertionError("offset beyond max_seq_len accepted")
