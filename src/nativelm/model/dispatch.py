"""Tokens to experts and back: the sorted dispatch of N·k assignments and the grouped expert matmuls.

The assignments are sorted by expert (stable), every token's row copied k times into that layout,
the experts applied as one grouped matmul over the expert groups (``torch._grouped_mm`` inside the
custom operator ``nativelm::grouped_mm``, whole under torch.compile: see docs/training.md; a
zero-padded ``torch.bmm`` where that is unavailable), and each token's k rows summed back in slot
order with fp32 accumulation. No host synchronisation and no atomics (gathers and reductions only:
the same result run to run), a constant number of kernels whatever the number of experts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

GROUPED_BACKENDS = ("auto", "grouped_mm", "bmm")
backend = "auto"
"""How expert matmuls run: ``auto`` (``torch._grouped_mm`` where a one-time check on the device,
dtype and shape passes, else ``bmm``), or forced ``grouped_mm`` / ``bmm`` (benchmarks)."""

_GROUPED_MM_OK: dict[tuple, bool] = {}


@dataclass
class Dispatch:
    """The N·k assignments of N tokens to top-k experts, sorted by expert (stable).

    Row r of the sorted layout is assignment ``order[r]`` = (token ``order[r] // k``, slot
    ``order[r] % k``) and belongs to expert ``row_experts[r]``; expert e owns rows
    ``offsets[e] - counts[e] .. offsets[e] - 1``.
    """

    order: Tensor  # (M,) sorted row -> assignment index
    tokens: Tensor  # (M,) sorted row -> token (order // k)
    inverse: Tensor  # (M,) assignment index -> sorted row
    row_experts: Tensor  # (M,) expert of each sorted row
    counts: Tensor  # (E,) rows per expert (int64)
    offsets: Tensor  # (E,) int32 cumulative row ends (the `offs` of torch._grouped_mm)

    @classmethod
    def from_experts(cls, experts: Tensor, n_experts: int) -> Dispatch:
        """From the chosen experts (N, k); all on the device, no host synchronisation."""
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        row_experts = flat.index_select(0, order)
        ends = torch.searchsorted(row_experts, torch.arange(1, n_experts + 1, device=flat.device, dtype=flat.dtype))
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return cls(order, order // experts.shape[-1], inverse, row_experts, counts, ends.to(torch.int32))


@torch.library.custom_op("nativelm::grouped_mm", mutates_args=())
def _grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Rows x (M, in) grouped by `offsets` times their expert's w (E, out, in) transposed: (M, out).

    A custom operator (opaque to torch.compile, with its own backward below), so a model-wide compile
    runs PyTorch's grouped GEMM kernels without a graph break: compiled, PyTorch 2.11 lowered the
    weight-gradient grouped matmul so that expert groups had to be multiples of 8 rows (a device-side
    assert otherwise); this operator keeps the eager kernels, which take any group size."""
    return torch._grouped_mm(x, w.transpose(-2, -1), offs=offsets)


@_grouped_mm.register_fake
def _(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], w.shape[-2])


@torch.library.custom_op("nativelm::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward(grad: Tensor, x: Tensor, w: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of `_grouped_mm`: rows grad (M, out) times their expert's w -> (M, in); and per expert
    grad_e^T x_e -> (E, out, in), exactly zero for an expert without rows."""
    grad = grad.contiguous()
    gx = torch._grouped_mm(grad, w, offs=offsets)
    gw = torch._grouped_mm(grad.transpose(0, 1), x, offs=offsets)
    return gx, gw


@_grouped_mm_backward.register_fake
def _(grad: Tensor, x: Tensor, w: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), w.new_empty(w.shape)


def _grouped_mm_setup(ctx, inputs: tuple, output: Tensor) -> None:
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_grad(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
    x, w, offsets = ctx.saved_tensors
    gx, gw = _grouped_mm_backward(grad, x, w, offsets)
    return gx, gw, None


_grouped_mm.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup)


@torch.compiler.disable
def _padded_bmm(x: Tensor, w: Tensor, d: Dispatch) -> Tensor:
    """Fallback: rows scattered into a zero-padded (E, C, in) batch (C = the largest group, one host
    sync, so a graph break under torch.compile), one bmm against (E, in, out), rows gathered back."""
    m = x.shape[0]
    cap = int(d.counts.max()) if m else 0
    starts = (d.offsets.long() - d.counts).index_select(0, d.row_experts)
    slot = torch.arange(m, device=x.device) - starts
    padded = x.new_zeros(w.shape[0], cap, x.shape[1]).index_put((d.row_experts, slot), x)
    return torch.bmm(padded, w.transpose(-2, -1))[d.row_experts, slot]


@torch.compiler.disable
def _check_grouped_mm(device: torch.device, dtype: torch.dtype, n_in: int, n_out: int) -> bool:
    """Whether torch._grouped_mm runs here (device, dtype, widths) and matches per-expert matmuls,
    forward and backward, empty groups included (their weight gradient must be exactly zero)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        counts = [5, 0, 11]
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            x = torch.randn(sum(counts), n_in, generator=gen).to(device, dtype).requires_grad_()
            w = torch.randn(len(counts), n_out, n_in, generator=gen).to(device, dtype).requires_grad_()
            g = torch.randn(sum(counts), n_out, generator=gen).to(device, dtype)
            offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
            y = _grouped_mm(x, w, offsets)
            gx, gw = torch.autograd.grad(y, (x, w), g)
        xs, gs = x.detach().double().split(counts), g.double().split(counts)
        wd = w.detach().double()
        ref_y = torch.cat([a @ wd[e].T for e, a in enumerate(xs)])
        ref_gx = torch.cat([b @ wd[e] for e, b in enumerate(gs)])
        ref_gw = torch.stack([b.T @ a for a, b in zip(xs, gs)])
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2

        def close(a: Tensor, b: Tensor) -> bool:
            a = a.detach().double()
            return bool(torch.isfinite(a).all()) and float((a - b).norm() / b.norm().clamp_min(1e-30)) < tol

        return (tuple(y.shape) == (sum(counts), n_out) and close(y, ref_y) and close(gx, ref_gx)
                and close(gw[0], ref_gw[0]) and close(gw[2], ref_gw[2]) and not bool(gw[1].any()))
    except Exception:  # noqa: BLE001 - any failure means: not usable here
        return False


@torch._dynamo.assume_constant_result
def grouped_backend(device: torch.device, dtype: torch.dtype, n_in: int, n_out: int) -> str:
    """The backend expert matmuls of these widths use on `device` in `dtype` (checked once, cached;
    a constant to torch.compile, which runs the check while tracing instead of breaking the graph)."""
    if backend != "auto":
        return backend
    key = (device.type, device.index, dtype, n_in, n_out)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _check_grouped_mm(device, dtype, n_in, n_out)
        if not _GROUPED_MM_OK[key]:
            print(f"nativelm.model.moe: torch._grouped_mm unusable for {dtype} {n_in}->{n_out} on {device}; "
                  "experts use a padded bmm (one host sync per matmul)", file=sys.stderr, flush=True)
    return "grouped_mm" if _GROUPED_MM_OK[key] else "bmm"


def grouped_linear(x: Tensor, w: Tensor, d: Dispatch) -> Tensor:
    """Rows x (M, in) grouped by expert -> (M, out): row r times ``w[row_experts[r]].T``; w (E, out, in).

    Inside a model-wide torch.compile the grouped GEMMs stay one opaque operator each (no graph
    break, see `_grouped_mm`); the padded bmm fallback needs a host sync, so it breaks the graph."""
    if grouped_backend(x.device, x.dtype, w.shape[-1], w.shape[-2]) == "grouped_mm":
        return _grouped_mm(x, w, d.offsets)
    return _padded_bmm(x, w, d)


class GatherRows(torch.autograd.Function):
    """rows[r] = x[token of sorted row r] (in `dtype`): every token k times, grouped by expert.

    Backward: each token's gradient is the sum of its k rows' gradients, gathered and reduced in
    fp32 (no atomics: deterministic)."""

    @staticmethod
    def forward(ctx, x: Tensor, tokens: Tensor, inverse: Tensor, k: int, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k, ctx.x_dtype = k, x.dtype
        return x.to(dtype).index_select(0, tokens)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1, dtype=torch.float32)
        return g.to(ctx.x_dtype), None, None, None, None


def combine_rows(y: Tensor, d: Dispatch, k: int, dtype: torch.dtype) -> Tensor:
    """out[token] = sum of the token's k rows of y (sorted by expert), in slot order, accumulated in
    fp32 and returned in `dtype`.

    Plain ops whose backward is a gather (the source gradient of index_copy is an index_select): no
    atomics, so deterministic, and torch.compile differentiates it (a custom autograd.Function here
    received no gradient under torch.compile on CUDA, torch 2.11: every expert weight and ffn_norm
    got exactly zero)."""
    slots = y.new_empty(y.shape).index_copy(0, d.order, y)  # slots[assignment] = its sorted row
    return slots.view(-1, k, y.shape[-1]).sum(1, dtype=torch.float32).to(dtype)
