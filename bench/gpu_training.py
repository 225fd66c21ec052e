"""A real training run of a preset on one device through `nativelm.train.stage.run_train` (tracking off).

    python bench/gpu_training.py --steps 400 [--preset gpu] [--device cuda] [--compile]
                                 [--set model.d_model=512 --set train.batch_size=16 --set seed=1 ...] [--name NAME]

Prints tokens/s, step time, MFU and the MoE's expert-load spread per log interval and writes
`$OUT/NAME.json` (every interval, and medians over the first and the last quarter of the run, so a
step time that drifts during training shows as a ratio). On the GPU machine: PYTHONPATH=src and
data/prepared carried along.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from nativelm.params.root import parse_params
from nativelm.train.stage import TrainOutputs, run_train

SHOWN = ("train/loss", "tokens_per_s", "step_time_s", "mfu", "expert_load_cv", "val/loss")


class Recorder:
    """A RunLogger that keeps every logged interval in memory and prints the headline figures."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log_params(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_tags(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_artifact(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        self.rows.append(row)
        print("step", step, " ".join(f"{k}={row[k]:.4g}" for k in SHOWN if k in row), flush=True)


def params_with(updates: dict[str, dict[str, Any]], sets: list[str]) -> Any:
    """params.yaml with `updates` (section -> keys) and the SECTION.KEY=VALUE `sets` applied, tracking off."""
    raw = yaml.safe_load(Path("params.yaml").read_text())
    for section, keys in updates.items():
        raw[section].update(keys)
    for item in sets:
        dotted, value = item.split("=", 1)
        *sections, key = dotted.split(".")
        target = raw
        for section in sections:
            target = target[section]
        target[key] = yaml.safe_load(value)
    raw["tracking"]["uri"] = "off"
    return parse_params(yaml.safe_dump(raw))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--preset", default="gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--name", default="train_gpu")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    run_dir = Path("/tmp/gpu_run") / args.name
    params = params_with({"train": {"preset": args.preset, "max_steps": args.steps, "warmup_steps": 10,
                                    "log_interval": 10, "eval_interval": args.steps,
                                    "checkpoint_interval": args.steps, "progress": False, "resume": "off",
                                    "device": args.device, "compile": args.compile}}, args.set)
    outputs = TrainOutputs(run_dir / "model.pt", run_dir / "checkpoints", run_dir / "train.json", run_dir / "plots")
    rec = Recorder()
    started = time.time()
    result = run_train(params.model, params.train, params.seed, Path(params.data.out_dir), outputs, rec)
    steady = [r for r in rec.rows if "step_time_s" in r and r["step"] > 10]
    quarter = max(1, len(steady) // 4)

    def median(rows: list[dict[str, Any]], key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return statistics.median(values) if values else None

    first, last = median(steady[:quarter], "step_time_s"), median(steady[-quarter:], "step_time_s")
    summary = {
        "name": args.name, "steps": result.steps, "wall_s": time.time() - started, "sets": args.set,
        "compile": args.compile,
        "final": {k: v for k, v in result.metrics.items() if k != "per_layer"},
        "step_time_s_median": median(steady, "step_time_s"), "tokens_per_s_median": median(steady, "tokens_per_s"),
        "mfu_median": median(steady, "mfu"),
        "step_time_first_quarter_s": first, "step_time_last_quarter_s": last,
        "drift_last_over_first": (last / first) if first and last else None,
        "intervals": rec.rows,
    }
    (out / f"{args.name}.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("SUMMARY", json.dumps({k: v for k, v in summary.items() if k != "intervals"}, default=str), flush=True)


if __name__ == "__main__":
    main()
