"""The model on CUDA (skipped without a GPU): grouped expert matmuls and compiled quantizers against
the CPU / eager paths, bf16 autocast, and no host synchronisation inside a training step."""

from __future__ import annotations

import pytest
import torch

from nativelm.model import ModelParams, MoE, ReGLU, build_model, compiled, quantizers, route
from nativelm.model import dispatch as dispatch_module

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _moe(seed: int, expert_kw: dict, d_model: int = 64, n_experts: int = 8, hidden: int = 32) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(d_model, n_experts=n_experts, expert_ffn=hidden, top_k=2, linear_kwargs=expert_kw)
    with torch.no_grad():
        for name in ("gate", "up", "down"):
            getattr(moe.experts, name).weight.normal_(0.0, 0.2)
    return moe


def _reference(moe: MoE, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """fp32 CPU per-expert loop with the old per-expert BitLinear modules."""
    ex = moe.experts
    kw = {"quantize": ex.gate.quantize, "norm": ex.gate.norm_weights is not None, "act_bits": ex.gate.act_bits}
    refs = []
    for e in range(moe.n_experts):
        ref = ReGLU(ex.gate.in_features, ex.hidden, kw)
        with torch.no_grad():
            for name in ("gate", "up", "down"):
                getattr(ref, name).weight.copy_(getattr(ex, name).weight[e].detach().cpu())
                if getattr(ex, name).norm_weights is not None:
                    getattr(ref, name).norm.weight.copy_(getattr(ex, name).norm_weights[e].detach().cpu())
        refs.append(ref)
    r = route(logits, moe.top_k)
    out = torch.zeros_like(x)
    for e in range(moe.n_experts):
        tok, slot = (r.experts == e).nonzero(as_tuple=True)
        if len(tok):
            y, _ = refs[e](x[tok])
            out.index_add_(0, tok, y * r.weights[tok, slot, None])
    return out


@pytest.mark.parametrize("backend", ["auto", "bmm"])
@pytest.mark.parametrize("kind", ["qmoe", "int8", "bitlinear", "fp"])
def test_moe_bf16_on_cuda_matches_fp32_cpu_reference(kind: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch_module, "backend", backend)
    kw = {"qmoe": {"norm": False, "act_bits": None}, "int8": {"norm": False}, "bitlinear": {},
          "fp": {"quantize": False}}[kind]
    moe = _moe(0, kw)
    x = torch.randn(300, 64)
    logits = torch.randn(300, 8)
    logits[:, 6:] -= 30.0  # two idle experts
    ref = _reference(moe, x, logits)
    moe = moe.to(CUDA)
    xc = x.to(CUDA).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _, stats = moe(xc.view(3, 100, 64), logits.to(CUDA).view(3, 100, 8))
    assert y.dtype == torch.float32
    assert _rel(y.view(300, 64), ref) < 2e-2
    y.float().pow(2).sum().backward()
    assert torch.isfinite(xc.grad).all()
    assert not moe.experts.gate.weight.grad[6:].any() and moe.experts.gate.weight.grad[:6].abs().sum() > 0
    assert stats["expert_counts"].sum().item() == 600


def test_grouped_mm_is_used_for_the_gpu_preset_widths() -> None:
    """Information for the benchmark: which expert-matmul backend the gpu preset gets (auto)."""
    p = ModelParams.model_validate({"d_model": 768, "expert_ffn": 384})
    for n_in, n_out in ((p.d_model, 2 * p.expert_ffn), (p.expert_ffn, p.d_model)):
        backend = dispatch_module.grouped_backend(CUDA, torch.bfloat16, n_in, n_out)
        print(f"bf16 {n_in}->{n_out}: {backend}")
        assert backend == "grouped_mm"


def test_compiled_weight_quantizer_gives_exactly_the_eager_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(3)
    attn = [torch.randn(96, 64, generator=gen) * 0.02 for _ in range(2)]
    experts = [torch.randn(8, 48, 64, generator=gen) * 0.02 for _ in range(2)]
    groups = [[w.to(CUDA).requires_grad_()] for w in attn] + [[w.to(CUDA).requires_grad_() for w in experts]]
    for bits in (1.58, 4.0):
        monkeypatch.setattr(compiled, "FUSE", "auto")
        fused = quantizers.quantize_weight_groups(groups, quantizers.level_arg(bits, CUDA), 1e-5, torch.bfloat16)
        monkeypatch.setattr(compiled, "FUSE", "off")
        eager = quantizers.quantize_weight_groups(groups, quantizers.level_arg(bits, CUDA), 1e-5, torch.bfloat16)
        for a, b in zip(fused, eager):
            mismatched = int((a != b).sum())
            print(f"bits {bits}: {mismatched} of {a.numel()} quantized weights differ")
            assert mismatched == 0
        sum(f.float().sum() for f in fused).backward()
        for group in groups:
            for w in group:
                assert torch.equal(w.grad, torch.ones_like(w))  # straight-through
                w.grad = None
    assert not compiled._COMPILE_FAILED


def test_compiled_activation_quantizer_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(4)
    x0 = (torch.randn(4096, 256, generator=gen) * 3).to(CUDA)
    gains0 = [(torch.rand(256, generator=gen) + 0.5).to(CUDA) for _ in range(3)]
    g_out = [torch.randn(4096, 256, generator=gen).to(CUDA) for _ in range(3)]
    results = {}
    for mode in ("off", "auto"):
        monkeypatch.setattr(compiled, "FUSE", mode)
        x = x0.clone().requires_grad_()
        gains = [g.clone().requires_grad_() for g in gains0]
        outs = quantizers.norm_quantize_many(x, gains, 1e-5, 8, 1e-5, torch.bfloat16)
        sum((o.float() * g).sum() for o, g in zip(outs, g_out)).backward()
        results[mode] = ([o.detach() for o in outs], x.grad, [g.grad for g in gains])
    (o0, gx0, gg0), (o1, gx1, gg1) = results["off"], results["auto"]
    for a, b in zip(o1, o0):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 1e-2
    assert _rel(gx1, gx0) < 1e-3
    for a, b in zip(gg1, gg0):
        assert _rel(a, b) < 1e-3
    assert not compiled._COMPILE_FAILED


@pytest.mark.parametrize("autocast", [False, True])
def test_one_layer_model_fused_matches_eager(autocast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer: its routing reads the embeddings only, so both runs route identically and the
    gradients compare (deeper, a bf16 rounding difference can flip a near-tied top-k choice)."""
    params = ModelParams(d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, n_experts=8, expert_ffn=32, top_k=2,
                         max_seq_len=64)
    ids = torch.randint(0, 100, (4, 33), generator=torch.Generator().manual_seed(1)).to(CUDA)
    results = {}
    for mode in ("off", "auto"):
        monkeypatch.setattr(compiled, "FUSE", mode)
        model = build_model(params, 100, seed=0).to(CUDA)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()
        results[mode] = (out.loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
    assert not compiled._COMPILE_FAILED
    (loss0, g0), (loss1, g1) = results["off"], results["auto"]
    assert abs(float(loss0) - float(loss1)) < (1e-2 if autocast else 1e-5)
    diffs = {n: _rel(g1[n], g0[n]) for n in g0 if g0[n].abs().sum() > 0}
    print("largest gradient differences:", sorted(diffs.items(), key=lambda kv: -kv[1])[:4])
    assert max(diffs.values()) < (5e-2 if autocast else 1e-2)
    # the CPU fp32 model agrees with the CUDA one
    cpu = build_model(params, 100, seed=0)
    with torch.no_grad():
        assert abs(float(cpu(ids[:, :-1].cpu(), ids[:, 1:].cpu()).loss) - float(loss1)) < 2e-2


def test_training_step_has_no_host_sync() -> None:
    params = ModelParams(d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=8, expert_ffn=64, top_k=2,
                         max_seq_len=128, window=32)
    model = build_model(params, 256, seed=0).to(CUDA)
    ids = torch.randint(0, 256, (4, 65), device=CUDA)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids[:, :-1], ids[:, 1:])
        out.loss.backward()

    step()  # first call: backend checks and compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("family", ["ternary-moe", "ternary-moe-int8", "fp-moe", "ternary-dense", "fp-dense",
                                    "ternary-openelm"])
def test_compiled_training_gradients_match_eager_parameter_by_parameter(family: str) -> None:
    quantize, ffn = family.startswith("ternary"), family.split("-")[1]
    extra = {"ffn": "dense", "family": "openelm", "window": 0, "nope_every": 0} if ffn == "openelm" else {"ffn": ffn}
    if family.endswith("-int8"):
        extra["expert_quant"] = "int8"
    params = ModelParams(**{"d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "max_seq_len": 256,
                            "window": 64, "n_experts": 16, "expert_ffn": 128, "top_k": 2, "dense_ffn": 256,
                            "quantize": quantize, **extra})
    ids = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(1)).to(CUDA)

    def gradients(compiled: bool) -> tuple[float, dict[str, torch.Tensor]]:
        torch._dynamo.reset()
        model = build_model(params, 512, seed=0).to(CUDA)
        forward = torch.compile(model) if compiled else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = forward(ids, ids)
        out.loss.backward()
        return out.loss.item(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}

    eager_loss, eager = gradients(False)
    compiled_loss, compiled = gradients(True)
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-3)
    for name, g in eager.items():
        c = compiled[name]
        assert c.any() or not g.any(), f"{name}: no gradient when compiled"
        cosine = float((c * g).sum() / (c.norm() * g.norm()).clamp_min(1e-30))
        assert cosine > 0.98, f"{name}: compiled gradient differs from eager (cosine {cosine:.4f})"
