"""The grouped expert GEMM operator (nativelm::grouped_mm): forward and gradients against per-expert
matmuls, eagerly and inside torch.compile (one graph, no break), groups of any size, empty ones included."""

from __future__ import annotations

import pytest
import torch

from nativelm.model import dispatch as dispatch_module

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]
COUNTS = [5, 0, 11, 3]  # not multiples of 8, one empty expert


def _case(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = torch.randn(sum(COUNTS), 24, generator=gen).to(device, dtype)
    w = torch.randn(len(COUNTS), 40, 24, generator=gen).to(device, dtype)
    g = torch.randn(sum(COUNTS), 40, generator=gen).to(device, dtype)
    offsets = torch.tensor(COUNTS).cumsum(0).to(device, torch.int32)
    return x, w, g, offsets


def _reference(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    xs, gs, wd = x.double().cpu().split(COUNTS), g.double().cpu().split(COUNTS), w.double().cpu()
    y = torch.cat([a @ wd[e].T for e, a in enumerate(xs)])
    gx = torch.cat([b @ wd[e] for e, b in enumerate(gs)])
    gw = torch.stack([b.T @ a for a, b in zip(xs, gs)])
    return y, gx, gw


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
def test_grouped_mm_matches_per_expert_matmuls(device: str, compiled: bool) -> None:
    x, w, g, offsets = _case(device)
    if not dispatch_module._check_grouped_mm(torch.device(device), x.dtype, 24, 40):
        pytest.skip(f"torch._grouped_mm does not run for {x.dtype} on {device} with this PyTorch build")
    x.requires_grad_()
    w.requires_grad_()
    fn = dispatch_module._grouped_mm
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True)  # fullgraph: a graph break would raise
    y = fn(x, w, offsets)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    ref_y, ref_gx, ref_gw = _reference(x.detach(), w.detach(), g)
    tol = 2e-2 if x.dtype == torch.bfloat16 else 1e-5
    assert _rel(y.detach(), ref_y) < tol
    assert _rel(gx, ref_gx) < tol
    assert _rel(gw[[0, 2, 3]], ref_gw[[0, 2, 3]]) < tol
    assert not gw[1].any()  # the empty expert gets exactly no gradient


@pytest.mark.parametrize("quantize", [False, True])
def test_moe_model_traces_as_one_graph(quantize: bool) -> None:
    """A model-wide torch.compile sees the whole MoE model as one graph: no break at the expert GEMMs
    (each break costs a host round trip per layer and keeps the compiler from fusing across it)."""
    from nativelm.model import ModelParams, build_model

    params = ModelParams(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, window=16,
                         n_experts=8, expert_ffn=32, top_k=2, quantize=quantize)
    model = build_model(params, 128, seed=0)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, ids)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
