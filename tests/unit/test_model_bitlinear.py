"""BitLinear: the b1.58 forward formula, straight-through gradients, progressive precision."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from nativelm.model import (
    BitLinear,
    BitSchedule,
    ModelParams,
    build_model,
    compiled,
    set_weight_bits,
    weight_code_shares,
)
from nativelm.model import quantizers as bl
from nativelm.model.bitlinear import bitlinears


def _layer(seed: int = 0, **kw) -> BitLinear:
    torch.manual_seed(seed)
    layer = BitLinear(16, 12, **kw)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.05)
        if layer.norm is not None:
            layer.norm.weight.uniform_(0.5, 1.5)
    return layer


def test_forward_equals_hand_formula() -> None:
    layer = _layer()
    x = torch.randn(3, 5, 16) * 3.0
    # RMSNorm with its own weight
    xn = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.norm.weight
    # per-token 8-bit absmax
    s_x = 127.0 / xn.abs().amax(-1, keepdim=True)
    xq = (xn * s_x).round().clamp(-128, 127) / s_x
    # ternary weights x absmean
    w = layer.weight.detach()
    gamma = w.abs().mean()
    wq = (w / gamma).round().clamp(-1, 1) * gamma
    expected = xq @ wq.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_ternary_weight_method_matches_forward() -> None:
    layer = _layer(1)
    codes, scale = layer.ternary_weight()
    assert codes.dtype == torch.int8 and codes.shape == (12, 16) and scale.dim() == 0
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    torch.testing.assert_close(scale, layer.weight.detach().abs().mean())
    x = torch.randn(4, 16)
    no_quant_act = _layer(1, act_bits=None, norm=False)
    torch.testing.assert_close(no_quant_act(x), x @ (codes.float() * scale).T)


def test_unquantized_is_plain_linear() -> None:
    layer = _layer(2, quantize=False)
    assert layer.norm is None
    x = torch.randn(2, 3, 16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_gradients_reach_latent_weights() -> None:
    layer = _layer(3)
    layer(torch.randn(8, 16)).pow(2).sum().backward()
    for p in (layer.weight, layer.norm.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_quantized_weights_take_three_values_and_shares_sum_to_one() -> None:
    layer = _layer(4)
    codes, scale = layer.weight_codes()
    wq = codes.float() * scale
    assert len(torch.unique(wq)) == 3
    shares = weight_code_shares(layer)
    assert set(shares) == {"ternary/share_neg", "ternary/share_zero", "ternary/share_pos"}
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    assert all(0 < v < 1 for v in shares.values())


def test_progressive_bits_more_levels_at_higher_width() -> None:
    layer = _layer(5)
    distinct = {}
    for bits in (8, 4, 3, 2, 1.58):
        layer.weight_bits = float(bits)
        codes, _ = layer.weight_codes()
        distinct[bits] = len(torch.unique(codes))
        assert codes.abs().max() <= (1 if bits == 1.58 else 2 ** (int(bits) - 1) - 1)
    assert distinct[8] > distinct[4] > distinct[1.58] == 3
    assert distinct[2] <= 3  # symmetric 2 bits: levels -1, 0, 1
    # 8 bits is close to the latent weights; ternary is not
    layer.weight_bits = 8.0
    codes, scale = layer.weight_codes()
    assert (codes.float() * scale - layer.weight).abs().max() < 0.01


def test_bit_schedule_lookup() -> None:
    sched = BitSchedule([(0.0, 8), (0.25, 4), (0.5, 3), (0.75, 1.58)])
    assert [sched.bits_at(s, 100) for s in (0, 24, 25, 49, 50, 74, 75, 99, 100)] == [8, 8, 4, 4, 3, 3, 1.58, 1.58, 1.58]
    default = BitSchedule.from_params(ModelParams())
    assert default.bits_at(0, 10) == 1.58
    p = ModelParams(bit_schedule=[[0, 8], [0.5, 1.58]])
    assert BitSchedule.from_params(p).bits_at(4, 10) == 8 and BitSchedule.from_params(p).bits_at(5, 10) == 1.58
    with pytest.raises(ValueError):
        BitSchedule([(0.1, 8)])


def test_set_weight_bits_on_model() -> None:
    model = build_model(ModelParams(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=4,
                                    expert_ffn=8, top_k=2, max_seq_len=16), 50)
    assert model.bits == 1.58
    set_weight_bits(model, 4)
    assert model.bits == 4.0 and all(m.weight_bits == 4.0 for m in bitlinears(model))
    with pytest.raises(ValueError):
        set_weight_bits(model, 5.5)


def test_compiled_quantizer_is_checked_against_eager_and_dropped_when_it_differs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(compiled, "FUSE", "on")
    monkeypatch.setattr(compiled, "_COMPILE_FAILED", set())
    monkeypatch.setattr(compiled, "_CHECKED", set())
    # stand-in for a miscompiled quantizer: the right values but no gradient (seen with PyTorch 2.11)
    monkeypatch.setattr(compiled, "_COMPILED", {"_norm_quantize": lambda *args: bl._norm_quantize(*args).detach(),
                                          "_quantize_weight": bl._quantize_weight})
    layer = _layer(6)
    x = torch.randn(5, 16, requires_grad=True)
    y = bl.norm_quantize(x, layer.norm.weight, 1e-5, 8, 1e-5)
    y.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and layer.norm.weight.grad.abs().sum() > 0
    assert compiled._COMPILE_FAILED == {"_norm_quantize"}
    assert "unusable" in capsys.readouterr().err
    # a compiled version that agrees is checked once, then used
    w = bl.quantize_weight(layer.weight, 1.58, 1e-5)
    assert "_quantize_weight" not in compiled._COMPILE_FAILED and len(compiled._CHECKED) == 1
    codes, scale = layer.weight_codes()
    assert torch.equal(w, codes.float() * scale)


def test_fused_quantizer_keeps_a_compiled_variant_for_every_layer_width(monkeypatch: pytest.MonkeyPatch,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """openelm's layers each have their own widths: every one must run compiled, none fall back to eager
    because dynamo's recompile limit (8 by default) ran out (parameters are compiled with static shapes)."""
    monkeypatch.setattr(compiled, "FUSE", "on")
    caplog.set_level(logging.WARNING, logger="torch._dynamo")
    for width in range(16, 16 + 8 * 11, 8):  # 11 widths, each forward and backward
        w = torch.nn.Parameter(torch.randn(width, 32))
        out = bl.quantize_weight_groups([[w]], bl.level_arg(1.58, w.device), 1e-5, torch.float32)
        out[0].sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
    assert "recompile_limit" not in caplog.text
    assert not compiled._COMPILE_FAILED


def test_switching_weight_width_compiles_nothing_new(monkeypatch: pytest.MonkeyPatch) -> None:
    """The progressive schedule switches widths mid-run: the compiled quantizer takes Q as a tensor input,
    so every width runs the one compiled graph (a recompile would stall training for seconds)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled, "FUSE", "on")
    monkeypatch.setattr(compiled, "_COMPILE_FAILED", set())
    torch._dynamo.reset()
    w = torch.randn(3, 24, 16, generator=torch.Generator().manual_seed(2)).requires_grad_()
    graphs = []
    for bits in (8.0, 4.0, 3.0, 1.58):
        (q,) = bl.quantize_weight_groups([[w]], bl.level_arg(bits, w.device), 1e-5, torch.float32)
        codes, scale = bl.weight_codes(w, bits, 1e-5)
        # compiled on CPU the absmean may differ from eager by its summation order (an ulp of the scale)
        torch.testing.assert_close(q, codes * scale[:, None, None], rtol=1e-6, atol=0.0)
        graphs.append(counters["stats"]["unique_graphs"])
    assert not compiled._COMPILE_FAILED
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], f"compiled graphs after each width: {graphs}"


def test_model_wide_compile_recompiles_nothing_when_the_schedule_switches_width() -> None:
    """`train.compile` wraps the whole model: the layers' widths reach the compiled forward as their
    `q_levels` buffers (changed in place), so 8 -> 4 -> 3 -> 1.58 bits runs the one graph, and each
    width's output is the eager model's at that width."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    params = ModelParams(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, n_experts=4, top_k=2, expert_ffn=16,
                         max_seq_len=16, bit_schedule=[[0.0, 8.0], [0.5, 1.58]])
    model = build_model(params, 64)
    fast = torch.compile(model, backend="eager", fullgraph=True)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    graphs = []
    for bits in (8.0, 4.0, 3.0, 1.58):
        set_weight_bits(model, bits)
        assert all(float(m.q_levels) == bl.levels(bits) for m in bitlinears(model))
        got = fast(tokens).logits
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(got, model(tokens).logits, rtol=0.0, atol=0.0)
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], f"compiled graphs after each width: {graphs}"
