"""Training-step throughput: the ternary MoE against full-precision models of the same active size.

    python bench/train_throughput.py [--preset tiny|gpu] [--device cpu|cuda] [--steps N] [--batch B] [--seq T]
                                     [--warmup W] [--threads N] [--moe-backend auto|grouped_mm|bmm]
                                     [--fuse auto|off|on] [--compile] [--only CONFIGS] [--profile] [--json PATH]

Three models of the preset's shape, built side by side and timed in interleaved rounds (one
training step of each per round, after warm-up steps), median over the rounds:

- ``ternary MoE``: the preset as trained (BitLinear attention, ternary ``qmoe`` experts);
- ``fp MoE``: the same MoE with ``quantize: false`` (cost of routing without quantization);
- ``fp dense``: ``ffn: dense`` with ``dense_ffn = top_k × expert_ffn``, ``quantize: false``: the
  full-precision model with the same active parameters.

A step is what the training loop does: forward under autocast (bf16 on CUDA, fp32 on CPU),
backward, global-norm clipping, AdamW (fused on CUDA), zero_grad; timed with
``torch.cuda.synchronize`` on CUDA. Prints ms/step, tokens/s, MFU on CUDA (6 · active params ·
tokens + attention FLOPs, ``nativelm.train.metrics``, against the GPU's dense bf16 peak) and the
step-time ratios ternary MoE / fp dense, fp MoE / fp dense, ternary MoE / fp MoE. ``--profile``
also counts the CUDA kernels of one step of each model and their summed GPU time. The first
(warm-up) step of the ternary model includes compiling its quantizers on CUDA (``--fuse``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nativelm.model import build_model, compiled, preset_params
from nativelm.model import dispatch as dispatch_module
from nativelm.params.train import TRAIN_PRESETS
from nativelm.train.metrics import device_peak_flops, flops_per_token, mfu
from nativelm.train.optim import param_groups


def configurations(preset: str) -> dict[str, dict]:
    base = preset_params(preset)
    return {
        "ternary MoE": {},
        "fp MoE": {"quantize": False},
        "fp dense": {"ffn": "dense", "dense_ffn": base.top_k * base.expert_ffn, "quantize": False},
    }


class Runner:
    """One model, its optimizer and its training step."""

    def __init__(self, name: str, preset: str, overrides: dict, vocab: int, device: torch.device,
                 batches: list[tuple[torch.Tensor, torch.Tensor]], compile_model: bool = False) -> None:
        self.name, self.device, self.batches = name, device, batches
        self.params = preset_params(preset, **overrides)
        self.model = build_model(self.params, vocab, seed=0).to(device)
        self.model.train()
        self.forward = torch.compile(self.model) if compile_model else self.model
        fused = True if device.type == "cuda" else None
        self.opt = torch.optim.AdamW(param_groups(self.model, 0.1), lr=1e-4, betas=(0.9, 0.95), fused=fused)
        self.dtype = torch.bfloat16 if device.type == "cuda" else None
        self.times: list[float] = []
        self.i = 0

    def step(self) -> None:
        inputs, targets = self.batches[self.i % len(self.batches)]
        self.i += 1
        if self.dtype is not None:
            with torch.autocast(self.device.type, dtype=self.dtype):
                out = self.forward(inputs, targets)
        else:
            out = self.forward(inputs, targets)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def timed_step(self) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        dt = time.perf_counter() - t0
        self.times.append(dt)
        return dt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(runner: Runner, table: Path | None = None) -> tuple[int, float] | None:
    """(CUDA kernels launched, their summed GPU time in ms) for one training step; None if unavailable.
    With `table`, the kernels by total GPU time are appended to that file."""
    try:
        from torch.profiler import ProfilerActivity, profile

        sync(runner.device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            runner.step()
            sync(runner.device)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        total_us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in kernels)
        if table is not None:
            with table.open("a") as f:
                f.write(f"==== {runner.name}: {len(kernels)} kernels, {total_us / 1e3:.1f} ms GPU\n")
                f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40,
                                                  max_name_column_width=70))
                f.write("\n")
        return len(kernels), total_us / 1e3
    except Exception as exc:  # noqa: BLE001 - profiling is optional
        print(f"profile of {runner.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("tiny", "gpu"), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default: cpu 5, cuda 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model first (cpu 1, cuda 3)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: the train preset's)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the train preset's)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    parser.add_argument("--moe-backend", choices=dispatch_module.GROUPED_BACKENDS, default="auto",
                        help="expert matmuls: grouped_mm where it checks out (auto), or forced")
    parser.add_argument("--fuse", choices=("auto", "off", "on"), default="auto",
                        help="quantizers torch.compile'd (auto: on CUDA) or eager (off); nativelm.model.compiled.FUSE")
    parser.add_argument("--compile", action="store_true", help="torch.compile each whole model (train.compile)")
    parser.add_argument("--only", default="", help="comma-separated subset of the configurations")
    parser.add_argument("--profile", action="store_true", help="count CUDA kernels and GPU time of one step each")
    parser.add_argument("--profile-table", type=Path, default=None, help="with --profile: write kernel tables here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dispatch_module.backend = args.moe_backend
    compiled.FUSE = args.fuse
    train = TRAIN_PRESETS[args.preset]
    batch = args.batch or int(train["batch_size"])
    seq = args.seq or int(train["seq_len"])
    steps = args.steps or (20 if device.type == "cuda" else 5)
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, args.vocab, (batch, seq + 1), generator=gen)
        batches.append((ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)))

    configs = configurations(args.preset)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    runners = [Runner(name, args.preset, over, args.vocab, device, batches, args.compile)
               for name, over in configs.items()]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, torch {torch.__version__}, preset {args.preset}, batch {batch} x seq {seq} = "
          f"{batch * seq} tokens/step, {warmup} warm-up + {steps} timed steps per model (interleaved), "
          f"quantizers fuse={args.fuse}, expert matmuls {args.moe_backend}"
          + (", whole models torch.compile'd" if args.compile else ""))

    for r in runners:
        t0 = time.perf_counter()
        for _ in range(warmup):
            r.step()
        sync(device)
        print(f"  warm-up {r.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(steps):
        for r in runners:
            r.timed_step()

    peak = device_peak_flops(device)
    tokens = batch * seq
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        fpt = flops_per_token(r.model, seq)
        row = {"config": r.name, "ms_per_step": med * 1e3, "tokens_per_s": tokens / med,
               "min_ms": min(r.times) * 1e3, "max_ms": max(r.times) * 1e3,
               "active_params": r.model.active_params(), "total_params": r.model.num_params(),
               "gflop_per_token": fpt / 1e9, "mfu": mfu(tokens / med, fpt, peak)}
        if r.params.ffn == "moe":
            p = r.params
            row["moe_backend"] = dispatch_module.grouped_backend(device, torch.bfloat16 if device.type == "cuda"
                                                            else torch.float32, p.d_model, 2 * p.expert_ffn)
        rows.append(row)
    if args.profile and device.type == "cuda":
        for r, row in zip(runners, rows):
            prof = profile_step(r, args.profile_table)
            if prof is not None:
                row["cuda_kernels"], row["gpu_kernel_ms"] = prof

    head = f"{'config':<12} {'ms/step':>9} {'(min-max)':>17} {'tokens/s':>11} {'active':>8} {'MFU':>6}"
    if any("cuda_kernels" in row for row in rows):
        head += f" {'kernels':>8} {'GPU ms':>8}"
    print()
    print(head)
    for row in rows:
        util = "-" if row["mfu"] is None else f"{row['mfu'] * 100:.1f}%"
        line = (f"{row['config']:<12} {row['ms_per_step']:>9.1f} {row['min_ms']:>8.1f}-{row['max_ms']:<8.1f} "
                f"{row['tokens_per_s']:>11,.0f} {row['active_params'] / 1e6:>7.1f}M {util:>6}")
        if "cuda_kernels" in row:
            line += f" {row['cuda_kernels']:>8} {row['gpu_kernel_ms']:>8.1f}"
        print(line)
    by = {row["config"]: row["ms_per_step"] for row in rows}
    ratios = {}
    for a, b in (("ternary MoE", "fp dense"), ("fp MoE", "fp dense"), ("ternary MoE", "fp MoE")):
        if a in by and b in by:
            ratios[f"{a} / {b}"] = by[a] / by[b]
            print(f"step time {a} / {b}: {by[a] / by[b]:.2f}x")
    backends = {row["config"]: row["moe_backend"] for row in rows if "moe_backend" in row}
    if backends:
        print("expert matmuls:", ", ".join(f"{k}: {v}" for k, v in backends.items()))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "preset": args.preset,
                                         "batch": batch, "seq": seq, "steps": steps, "rows": rows,
                                         "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
