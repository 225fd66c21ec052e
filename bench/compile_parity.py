"""Compiled against eager training, step by step, from one initial model on the same batches.

    python bench/compile_parity.py [--family openelm] [--preset gpu] [--steps 20] [--precision bf16|fp32]
                                   [--batch 16] [--device cuda] [--set model.KEY=VALUE ...]

Trains four copies of one model for `--steps` AdamW steps on the same token batches: eager, eager
again (the noise floor of the GPU's own non-determinism), eager with every weight scaled by
(1 + 2^-23) (how far one rounding's change carries: quantized models round activations and weights
to a few levels, so tiny changes flip codes) and ``torch.compile``d. Prints the loss of
every step for each, and after the first backward the parameters whose compiled gradient differs
most from eager (cosine, relative norm of the difference), next to the eager-vs-eager figure. With
``--precision fp32`` (TF32 off) a correct compile agrees with eager to about 1e-5 relative at step 1;
bf16 autocast gives both about 1e-2, and over many steps the bf16 runs drift apart like different
seeds. Writes ``$OUT/compile_parity_<family>_<precision>.json``. On the GPU machine: PYTHONPATH=src
and data/prepared carried along.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from gpu_training import params_with
from nativelm.model import build_model
from nativelm.params.model import with_preset
from nativelm.train.data import BatchSampler, load_token_data
from nativelm.train.optim import build_optimizer


def _run(params: Any, vocab: int, batches: list[tuple[torch.Tensor, torch.Tensor]], compiled: bool, bf16: bool,
         device: torch.device, nudge: float = 0.0) -> tuple[list[float], dict[str, torch.Tensor], float]:
    """Losses of every step, gradients after the first backward, seconds of the steps after the first."""
    torch._dynamo.reset()
    model = build_model(with_preset(params.model, params.train.preset), vocab, seed=params.seed).to(device)
    if nudge:  # every weight scaled by (1 + nudge): one rounding's worth of change, the chaos floor
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + nudge)
    optimizer = build_optimizer(model, params.train.resolved(), fused=True if device.type == "cuda" else None)
    forward = torch.compile(model) if compiled else model  # as train.compile does
    losses, first_grads = [], {}
    started = 0.0
    for step, (x, y) in enumerate(batches):
        if step == 1:
            _sync(device)
            started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = forward(x, y)
        out.loss.backward()
        if step == 0:
            first_grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                           if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    _sync(device)
    return losses, first_grads, time.perf_counter() - started


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    rows = {}
    for name, g in a.items():
        h = b.get(name, torch.zeros_like(g))
        cos = float((g * h).sum() / (g.norm() * h.norm()).clamp_min(1e-30))
        rel = float((g - h).norm() / g.norm().clamp_min(1e-30))
        rows[name] = {"cos": cos, "rel": rel, "norm": float(g.norm()), "zero": bool(not h.any())}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="openelm")
    parser.add_argument("--preset", default="gpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    bf16 = args.precision == "bf16"
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = bf16
    torch.backends.cudnn.allow_tf32 = bf16
    params = params_with({"model": {"family": args.family}, "train": {"preset": args.preset}}, args.set)
    data = load_token_data(Path(params.data.out_dir))
    sampler = BatchSampler(data.train, args.batch, args.seq, seed=params.seed)
    batches = [tuple(t.to(device) for t in sampler.next_batch()) for _ in range(args.steps)]
    ulp = 2.0 ** -23
    runs = {name: _run(params, data.vocab_size, batches, compiled, bf16, device, nudge)
            for name, compiled, nudge in (("eager", False, 0.0), ("eager2", False, 0.0), ("nudged", False, ulp),
                                          ("compiled", True, 0.0))}
    noise = _compare(runs["eager"][1], runs["eager2"][1])
    chaos = _compare(runs["eager"][1], runs["nudged"][1])
    diff = _compare(runs["eager"][1], runs["compiled"][1])
    worst = sorted(diff, key=lambda n: diff[n]["rel"], reverse=True)[:12]
    print(f"{args.family} {args.precision}: step losses (eager / eager again / eager with weights x (1 + 2^-23) / compiled)")
    for step in range(args.steps):
        print(f"  {step:3d} " + " ".join(f"{runs[k][0][step]:.5f}" for k in ("eager", "eager2", "nudged", "compiled")))
    print("first-step gradients, worst compiled-vs-eager (rel, cos) next to eager again and nudged eager (rel):")
    for name in worst:
        print(f"  {name:48s} rel {diff[name]['rel']:.3g} cos {diff[name]['cos']:.5f}  noise rel "
              f"{noise[name]['rel']:.3g} nudged rel {chaos[name]['rel']:.3g}{'  ZERO' if diff[name]['zero'] else ''}")
    summary = {"family": args.family, "precision": args.precision, "steps": args.steps,
               "losses": {k: v[0] for k, v in runs.items()}, "seconds": {k: v[2] for k, v in runs.items()},
               "max_rel_compiled": max(d["rel"] for d in diff.values()),
               "max_rel_noise": max(d["rel"] for d in noise.values()),
               "max_rel_nudged": max(d["rel"] for d in chaos.values()), "grads": diff, "noise": noise, "nudged": chaos}
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compile_parity_{args.family}_{args.precision}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("SUMMARY", json.dumps({k: summary[k] for k in ("family", "precision", "max_rel_compiled", "max_rel_noise",
                                                                 "max_rel_nudged")}
                                | {"final": {k: v[0][-1] for k, v in runs.items()}}))


if __name__ == "__main__":
    main()
