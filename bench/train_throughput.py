"""Training-step throughput: the ternary MoE against full-precision models of the same active size.

    python bench/train_throughput.py [--preset tiny|gpu] [--shapes 1x,4x] [--modes eager,compile]
                                     [--device cpu|cuda] [--steps N] [--batch B] [--seq T] [--warmup W]
                                     [--threads N] [--moe-backend auto|grouped_mm|bmm] [--fuse auto|off|on]
                                     [--only CONFIGS] [--bit-switch] [--profile] [--profile-table PATH] [--json PATH]

For each shape and mode, three models of that shape are built side by side and timed in
interleaved rounds (one training step of each per round, after warm-up steps), median over the rounds:

- ``ternary MoE``: the preset as trained (BitLinear attention, ternary ``qmoe`` experts);
- ``fp MoE``: the same MoE with ``quantize: false`` (cost of routing without quantization);
- ``fp dense``: ``ffn: dense`` with ``dense_ffn = top_k × expert_ffn``, ``quantize: false``: the
  full-precision model with the same active parameters.

Shapes: ``1x`` is the preset; ``4x`` doubles d_model, the expert and dense FFN widths (same layers,
heads and experts: head_dim doubles), about 4x the parameters. Modes: ``eager``, and ``compile``
(each whole model ``torch.compile``d, as ``train.compile`` does).

A step is what the training loop does: forward under autocast (bf16 on CUDA, fp32 on CPU),
backward, global-norm clipping, AdamW (fused on CUDA), zero_grad; timed with
``torch.cuda.synchronize`` on CUDA. Prints ms/step, tokens/s, and on CUDA: MFU (6 · active params ·
tokens + attention FLOPs, ``nativelm.train.metrics``) against the bf16 matmul rate MEASURED on this
card in the same run (an 8192^3 bf16 matmul, mean of 10 after 3 warm-ups), and the peak memory of
each model's step (``torch.cuda.max_memory_allocated``, as if it were alone on the card). Then the
step-time ratios ternary MoE / fp dense, fp MoE / fp dense, ternary MoE / fp MoE per shape and mode
(the ratio of the medians, and in brackets the range over the rounds of the ratio within a round).
``--bit-switch`` times the first step of each quantized model after each switch of its weight width
(8, 4, 3, 1.58 bits: the progressive schedule), against its median step. ``--profile`` also counts
the CUDA kernels of one step of each model and their summed GPU time
(``--profile-table``: the kernels by GPU time, appended to that file). The first (warm-up) step of the
ternary model includes compiling its quantizers on CUDA (``--fuse``).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from nativelm.model import build_model, compiled, preset_params, set_weight_bits
from nativelm.model import dispatch as dispatch_module
from nativelm.params.train import TRAIN_PRESETS
from nativelm.train.metrics import device_peak_flops, flops_per_token, mfu
from nativelm.train.optim import param_groups

SHAPES = ("1x", "4x")
MODES = ("eager", "compile")
RATIOS = (("ternary MoE", "fp dense"), ("fp MoE", "fp dense"), ("ternary MoE", "fp MoE"))


def shape_overrides(preset: str, shape: str) -> dict:
    """Model keys of a shape: ``1x`` the preset; ``4x`` twice d_model and FFN widths (about 4x the parameters)."""
    if shape == "1x":
        return {}
    base = preset_params(preset)
    return {"d_model": 2 * base.d_model, "expert_ffn": 2 * base.expert_ffn, "dense_ffn": 2 * base.dense_ffn}


def configurations(preset: str, shape: str = "1x") -> dict[str, dict]:
    over = shape_overrides(preset, shape)
    base = preset_params(preset, **over)
    return {
        "ternary MoE": dict(over),
        "fp MoE": {**over, "quantize": False},
        "fp dense": {**over, "ffn": "dense", "dense_ffn": base.top_k * base.expert_ffn, "quantize": False},
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
        self.peak_bytes = 0
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

    def resident_bytes(self) -> int:
        """Parameters and optimizer state: what this model holds on the card between steps."""
        tensors = list(self.model.parameters())
        tensors += [t for state in self.opt.state.values() for t in state.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type == self.device.type)

    def timed_step(self) -> float:
        sync(self.device)
        cuda = self.device.type == "cuda"
        if cuda:  # the other models' memory is resident too: count this step's rise over it, plus our own
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        self.step()
        sync(self.device)
        dt = time.perf_counter() - t0
        if cuda:
            own = torch.cuda.max_memory_allocated(self.device) - before + self.resident_bytes()
            self.peak_bytes = max(self.peak_bytes, own)
        self.times.append(dt)
        return dt


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_flops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """bf16 FLOP/s of an n^3 matmul on random data on this card (mean of `reps` after 3 warm-ups): the
    MFU denominator, measured rather than the datasheet's."""
    if device.type != "cuda":
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=gen)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    sync(device)
    seconds = start.elapsed_time(end) / 1e3 / reps
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds


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


def bit_switch_steps(runner: Runner, widths: tuple[float, ...] = (8.0, 4.0, 3.0, 1.58)) -> dict[str, float]:
    """ms of the first step after each switch of the weight width (the progressive schedule's), then back
    at ternary: a switch that recompiles shows as a step far above the normal one."""
    out = {}
    for bits in widths:
        set_weight_bits(runner.model, bits)
        out[f"{bits:g}"] = runner.timed_step() * 1e3
    set_weight_bits(runner.model, 1.58)
    return out


def csv_choice(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    """Comma-separated values of `allowed` (argparse type): one clear error for anything else."""
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what}: {','.join(bad) or 'nothing'} is not one of {', '.join(allowed)}")
    return items


def run_group(args: argparse.Namespace, device: torch.device, shape: str, mode: str, batches: list,
              peak: float | None, seq: int) -> list[dict]:
    """Build, warm up and time the configurations of one shape and mode side by side; their result rows."""
    configs = configurations(args.preset, shape)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    runners = [Runner(name, args.preset, over, args.vocab, device, batches, mode == "compile")
               for name, over in configs.items()]
    for r in runners:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            r.step()
        sync(device)
        print(f"  {shape} {mode} warm-up {r.name}: {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.steps):
        for r in runners:
            r.timed_step()
    tokens = batches[0][0].numel()
    rows = []
    for r in runners:
        med = statistics.median(r.times)
        fpt = flops_per_token(r.model, seq)
        row = {"shape": shape, "mode": mode, "config": r.name, "ms_per_step": med * 1e3,
               "tokens_per_s": tokens / med, "min_ms": min(r.times) * 1e3, "max_ms": max(r.times) * 1e3,
               "round_ms": [t * 1e3 for t in r.times],
               "active_params": r.model.active_params(), "total_params": r.model.num_params(),
               "gflop_per_token": fpt / 1e9, "mfu": mfu(tokens / med, fpt, peak),
               "peak_mem_gib": r.peak_bytes / 2**30 if device.type == "cuda" else None}
        if r.params.ffn == "moe":
            p = r.params
            row["moe_backend"] = dispatch_module.grouped_backend(device, torch.bfloat16 if device.type == "cuda"
                                                            else torch.float32, p.d_model, 2 * p.expert_ffn)
        if args.bit_switch and r.params.quantize:
            row["bit_switch_ms"] = bit_switch_steps(r)
            print(f"  {shape} {mode} {r.name}: first step after switching to each width (ms): "
                  + ", ".join(f"{k} bits {v:.1f}" for k, v in row["bit_switch_ms"].items())
                  + f" (median step {row['ms_per_step']:.1f})", flush=True)
        if args.profile and device.type == "cuda":
            prof = profile_step(r, args.profile_table)
            if prof is not None:
                row["cuda_kernels"], row["gpu_kernel_ms"] = prof
        rows.append(row)
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_tables(rows: list[dict]) -> dict[str, float]:
    """The result table and the ratio table (per shape and mode: the ratio of the medians, and in
    brackets the range of the ratios of the steps of one round); returns the ratios by name."""
    head = (f"{'shape':<5} {'mode':<7} {'config':<12} {'ms/step':>8} {'(min-max)':>15} {'tokens/s':>10} "
            f"{'total':>7} {'active':>7} {'MFU':>6} {'peak mem':>9}")
    profiled = any("cuda_kernels" in row for row in rows)
    if profiled:
        head += f" {'kernels':>8} {'GPU ms':>7}"
    print()
    print(head)
    for row in rows:
        util = "-" if row["mfu"] is None else f"{row['mfu'] * 100:.1f}%"
        mem = "-" if row["peak_mem_gib"] is None else f"{row['peak_mem_gib']:.1f} GiB"
        line = (f"{row['shape']:<5} {row['mode']:<7} {row['config']:<12} {row['ms_per_step']:>8.1f} "
                f"{row['min_ms']:>7.1f}-{row['max_ms']:<7.1f} {row['tokens_per_s']:>10,.0f} "
                f"{row['total_params'] / 1e6:>6.0f}M {row['active_params'] / 1e6:>6.1f}M {util:>6} {mem:>9}")
        if "cuda_kernels" in row:
            line += f" {row['cuda_kernels']:>8} {row['gpu_kernel_ms']:>7.1f}"
        print(line)
    ratios = {}
    print()
    groups = list(dict.fromkeys((row["shape"], row["mode"]) for row in rows))
    print(f"{'step-time ratio':<26} " + " ".join(f"{s + ' ' + m:>22}" for s, m in groups))
    by = {(row["shape"], row["mode"], row["config"]): row for row in rows}
    for a, b in RATIOS:
        cells = []
        for shape, mode in groups:
            if (shape, mode, a) in by and (shape, mode, b) in by:
                ra, rb = by[shape, mode, a], by[shape, mode, b]
                value = ra["ms_per_step"] / rb["ms_per_step"]
                per_round = [x / y for x, y in zip(ra["round_ms"], rb["round_ms"])]
                ratios[f"{shape} {mode}: {a} / {b}"] = value
                cells.append(f"{value:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})".rjust(22))
            else:
                cells.append(f"{'-':>22}")
        print(f"{a + ' / ' + b:<26} " + " ".join(cells))
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("tiny", "gpu"), default="tiny")
    parser.add_argument("--shapes", type=lambda t: csv_choice(t, SHAPES, "--shapes"), default=["1x"],
                        help="comma-separated: 1x (the preset), 4x (twice d_model and FFN widths)")
    parser.add_argument("--modes", type=lambda t: csv_choice(t, MODES, "--modes"), default=["eager"],
                        help="comma-separated: eager, compile (whole model torch.compile'd, as train.compile)")
    parser.add_argument("--compile", action="store_true", help="same as --modes compile")
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
    parser.add_argument("--only", default="", help="comma-separated subset of the configurations")
    parser.add_argument("--bit-switch", action="store_true",
                        help="after timing, time the first step after each switch of the weight width (8, 4, 3, 1.58)")
    parser.add_argument("--profile", action="store_true", help="count CUDA kernels and GPU time of one step each")
    parser.add_argument("--profile-table", type=Path, default=None, help="with --profile: write kernel tables here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.compile:
        args.modes = ["compile"]

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
    args.steps = args.steps or (20 if device.type == "cuda" else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, args.vocab, (batch, seq + 1), generator=gen)
        batches.append((ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    peak = measured_matmul_flops(device)
    sheet = device_peak_flops(device)
    print(f"device {name}, torch {torch.__version__}, preset {args.preset}, batch {batch} x seq {seq} = "
          f"{batch * seq} tokens/step, {args.warmup} warm-up + {args.steps} timed steps per model (interleaved), "
          f"quantizers fuse={args.fuse}, expert matmuls {args.moe_backend}")
    if peak is not None:
        print(f"measured bf16 matmul peak (8192^3, random data): {peak / 1e12:.0f} TFLOP/s"
              + (f" ({peak / sheet:.0%} of the datasheet's {sheet / 1e12:.0f})" if sheet else ""), flush=True)
    rows = []
    for shape in args.shapes:
        for mode in args.modes:
            rows += run_group(args, device, shape, mode, batches, peak, seq)
    ratios = print_tables(rows)
    backends = {row["config"]: row["moe_backend"] for row in rows if "moe_backend" in row}
    if backends:
        print("expert matmuls:", ", ".join(f"{k}: {v}" for k, v in backends.items()))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "preset": args.preset,
                                         "batch": batch, "seq": seq, "steps": args.steps,
                                         "measured_peak_flops": peak, "datasheet_peak_flops": sheet,
                                         "rows": rows, "ratios": ratios}, indent=2) + "\n")


if __name__ == "__main__":
    main()
