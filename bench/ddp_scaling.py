"""DDP scaling: the same training at 1 and N processes with the same global batch, through `nativelm train --nproc N`.

    python bench/ddp_scaling.py --preset tiny --steps 20 --device cpu --nproc 1,2 --json /tmp/ddp.json
    python bench/ddp_scaling.py --preset gpu --steps 200 --device cuda --nproc 1,2,4,8 --json $OUT/ddp.json
    python bench/ddp_scaling.py --preset gpu --steps 200 --device cuda --nproc 1 --ddp-one   # one GPU: DDP's cost

Reports, in one JSON summary (printed, and written to --json):

- with --ddp-one, also one process under DDP (NATIVELM_DDP=1: a process group of one, NCCL on one GPU)
  against the plain one (`ddp_overhead`: its tokens/s over the plain run's);
- tokens/s of the job and per process at each N (median of the logged intervals after the first, which holds
  the warm-up), and the scaling efficiency tokens/s at N / (N x tokens/s at 1);
- the validation-loss curves side by side and their largest absolute difference from the 1-process curve
  (the same windows at every N: docs/training.md);
- the checkpoint of the largest N at half the run resumed on N (bit-identical final weights expected) and
  on 1 (finishes; its final weights' and validation loss's distance from the uninterrupted run);
- a SIGKILL of rank 1 of the largest N after its first checkpoint: the job's exit code, its error lines and
  tracebacks, and whether the same command then resumes and finishes.

Run from the repository root with prepared data (`nativelm prepare`, or --data DIR). On CPU each process gets
cores / N threads; gloo on a 2-core machine says nothing about speed, only that the pieces work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from nativelm.params.train import TRAIN_PRESETS
from nativelm.train.distributed import FORCE_DDP_ENV
from nativelm.train.launch import rank_pids

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "gpu"])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every run (even)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--nproc", default="1,2", help="process counts, 1 first (default 1,2)")
    parser.add_argument("--global-batch", type=int, default=None,
                        help="sequences per step at every N (default: the preset's batch_size x the largest N)")
    parser.add_argument("--data", default=None, help="prepared folder (default: data.out_dir of params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="more params.yaml values of every run (e.g. train.compile=true)")
    parser.add_argument("--work", default="/tmp/ddp_scaling", help="folder of the runs (replaced)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--ddp-one", action="store_true", help="also train one process under DDP (NATIVELM_DDP=1)")
    parser.add_argument("--scaling-only", action="store_true", help="skip the resume and SIGKILL checks")
    args = parser.parse_args()
    args.nproc = [int(n) for n in args.nproc.split(",")]
    if args.nproc[0] != 1 or args.steps < 2 or args.steps % 2:
        parser.error("--nproc must start with 1 and --steps be even and at least 2")
    return args


def project(folder: Path, args: argparse.Namespace, nproc: int) -> Path:
    """A run folder with its params.yaml: the repository's, the run's size, tracking off, outputs inside."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    data = Path(args.data or raw["data"]["out_dir"])
    raw["data"]["out_dir"] = str(data if data.is_absolute() else ROOT / data)
    raw["tracking"]["uri"] = "off"
    batch = args.global_batch or int(TRAIN_PRESETS[args.preset]["batch_size"]) * max(args.nproc)
    threads = max(1, (os.cpu_count() or 1) // nproc) if args.device == "cpu" else 0
    raw["train"].update({"preset": args.preset, "max_steps": args.steps, "warmup_steps": max(1, args.steps // 10),
                         "batch_size": None, "global_batch": batch, "device": args.device, "threads": threads,
                         "log_interval": max(1, args.steps // 10), "eval_interval": max(1, args.steps // 4),
                         "checkpoint_interval": args.steps // 2, "keep_checkpoints": 4, "progress": False,
                         "checkpoint_dir": "checkpoints", "model_file": "model.pt", "metrics_file": "train.json",
                         "plots_dir": "plots"})
    for item in args.set:
        dotted, value = item.split("=", 1)
        *sections, key = dotted.split(".")
        target = raw
        for section in sections:
            target = target[section]
        target[key] = yaml.safe_load(value)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder


def command(nproc: int) -> list[str]:
    return [sys.executable, "-m", "nativelm.cli", "train", "--nproc", str(nproc)]


def environment(ddp_one: bool = False) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE")
    if ddp_one:
        env[FORCE_DDP_ENV] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


def train(folder: Path, nproc: int, ddp_one: bool = False) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    proc = subprocess.run(command(nproc), cwd=folder, env=environment(ddp_one), capture_output=True, text=True)
    print(f"  {folder.name}: {nproc} process(es), exit {proc.returncode}, {time.perf_counter() - started:.0f} s",
          file=sys.stderr, flush=True)
    return proc


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("nativelm: error:")]


def history(folder: Path) -> list[dict[str, float]]:
    """The logged intervals of a finished run (kept in its last checkpoint)."""
    last = sorted((folder / "checkpoints").glob("step_*.pt"))[-1]
    return list(torch.load(last, weights_only=True)["history"])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "model.pt", weights_only=True)["state_dict"]


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)


def scaling_run(work: Path, args: argparse.Namespace, nproc: int, ddp_one: bool = False) -> dict[str, Any]:
    """One uninterrupted run at `nproc` processes: its throughput and validation curve."""
    folder = project(work / (f"run_{nproc}" + ("_ddp" if ddp_one else "")), args, nproc)
    proc = train(folder, nproc, ddp_one)
    if proc.returncode != 0:
        return {"nproc": nproc, "ddp": ddp_one or nproc > 1, "ok": False, "error": (error_lines(proc.stderr) or proc.stderr.splitlines()[-1:])}
    rows = history(folder)
    speeds = [row["tokens_per_s"] for row in rows if "tokens_per_s" in row]
    steady = speeds[1:] or speeds
    metrics = json.loads((folder / "train.json").read_text())
    return {"nproc": nproc, "ddp": ddp_one or nproc > 1, "ok": True, "tokens_per_s": statistics.median(steady),
            "tokens_per_s_range": [min(steady), max(steady)], "tokens_per_s_per_process": statistics.median(steady) / nproc,
            "val_curve": {int(row["step"]): row["val/loss"] for row in rows if "val/loss" in row},
            "val_loss": metrics["val_loss"], "tokens": metrics["tokens"], "folder": str(folder)}


def resume_check(work: Path, args: argparse.Namespace, source: dict[str, Any], nproc: int) -> dict[str, Any]:
    """`source`'s checkpoint at half the run, resumed on `nproc` processes to the end."""
    folder = project(work / f"resume_{source['nproc']}_on_{nproc}", args, nproc)
    half = args.steps // 2
    (folder / "checkpoints").mkdir()
    shutil.copy(Path(source["folder"]) / "checkpoints" / f"step_{half:07d}.pt", folder / "checkpoints")
    proc = train(folder, nproc)
    out: dict[str, Any] = {"written_by": source["nproc"], "resumed_on": nproc, "ok": proc.returncode == 0,
                           "resumed": f"(step {half})" in proc.stderr,
                           "note": next((line for line in proc.stderr.splitlines() if "resumed on" in line), None)}
    if out["ok"]:
        straight, resumed = weights(Path(source["folder"])), weights(folder)
        out["bit_identical"] = all(torch.equal(straight[k], resumed[k]) for k in straight)
        out["max_weight_diff"] = max_weight_diff(straight, resumed)
        out["val_loss_diff"] = abs(json.loads((folder / "train.json").read_text())["val_loss"] - source["val_loss"])
    else:
        out["error"] = error_lines(proc.stderr) or proc.stderr.splitlines()[-1:]
    return out


def sigkill_check(work: Path, args: argparse.Namespace, nproc: int) -> dict[str, Any]:
    """Kill rank 1 right after the first checkpoint; the job must end with one line and the same command resume."""
    folder = project(work / f"sigkill_{nproc}", args, nproc)
    proc = subprocess.Popen(command(nproc), cwd=folder, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = folder / "checkpoints" / f"step_{args.steps // 2:07d}.pt"
    while not first.exists() and proc.poll() is None:
        time.sleep(0.01)
    ranks = rank_pids(proc.pid)
    killed = 1 in ranks and proc.poll() is None
    if killed:
        os.kill(ranks[1], signal.SIGKILL)
    _, stderr = proc.communicate()
    again = train(folder, nproc)
    return {"nproc": nproc, "killed_rank": 1 if killed else None, "exit_code": proc.returncode,
            "error_lines": error_lines(stderr), "tracebacks": stderr.count("Traceback"),
            "resumed": "resumed from" in again.stderr, "resume_exit_code": again.returncode,
            "finished_steps": json.loads((folder / "train.json").read_text())["steps"] if again.returncode == 0 else None}


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    runs = [scaling_run(work, args, n) for n in args.nproc]
    base = runs[0]
    if args.ddp_one:
        runs.insert(1, scaling_run(work, args, 1, ddp_one=True))
        if runs[1]["ok"] and base["ok"]:
            runs[1]["ddp_overhead"] = runs[1]["tokens_per_s"] / base["tokens_per_s"]
    for run in runs:
        if run["ok"] and base["ok"]:
            run["scaling_efficiency"] = run["tokens_per_s"] / (run["nproc"] * base["tokens_per_s"])
            run["val_max_abs_diff_vs_1"] = max(abs(run["val_curve"][s] - base["val_curve"][s]) for s in base["val_curve"])
    biggest = next((run for run in reversed(runs) if run["ok"] and run["nproc"] > 1), None)
    summary: dict[str, Any] = {"preset": args.preset, "steps": args.steps, "device": args.device,
                               "cpus": os.cpu_count(), "gpus": torch.cuda.device_count(), "runs": runs}
    if biggest is not None and not args.scaling_only:
        n = biggest["nproc"]
        summary["resume"] = [resume_check(work, args, biggest, n), resume_check(work, args, biggest, 1)]
        summary["sigkill"] = sigkill_check(work, args, n)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
