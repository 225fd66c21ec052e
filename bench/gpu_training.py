"""Short training run of a preset on one device through nativelm.train.stage.run_train (tracking off): prints
tokens/s and MFU per interval and writes $OUT/train_gpu[_compiled].json.
Usage: python bench/gpu_training.py STEPS [PRESET] [DEVICE] [compile]
(on the GPU machine: PYTHONPATH=src, data/prepared carried along)."""
import json
import os
import sys
import time
from pathlib import Path

import yaml

from nativelm.params.root import parse_params
from nativelm.train.stage import run_train

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 100
preset = sys.argv[2] if len(sys.argv) > 2 else "gpu"
device = sys.argv[3] if len(sys.argv) > 3 else "cuda"
compiled = len(sys.argv) > 4 and sys.argv[4] == "compile"
out = Path(os.environ.get("OUT", "/tmp/out"))
out.mkdir(parents=True, exist_ok=True)
raw = yaml.safe_load(Path("params.yaml").read_text())
raw["train"].update({"preset": preset, "max_steps": steps, "warmup_steps": 10, "log_interval": 10,
                     "eval_interval": steps, "checkpoint_interval": steps, "progress": False, "resume": "off",
                     "device": device, "compile": compiled, "checkpoint_dir": "/tmp/gpu_run/checkpoints", "model_file": "/tmp/gpu_run/model.pt",
                     "metrics_file": "/tmp/gpu_run/train.json", "plots_dir": "/tmp/gpu_run/plots"})
raw["tracking"]["uri"] = "off"
params = parse_params(yaml.safe_dump(raw))


class Recorder:
    def __init__(self):
        self.rows = []

    def log_params(self, *a, **k):
        pass

    def set_tags(self, *a, **k):
        pass

    def log_artifact(self, *a, **k):
        pass

    def log_metrics(self, metrics, step=None):
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        self.rows.append(row)
        keys = ("train/loss", "tokens_per_s", "step_time_s", "mfu", "val/loss")
        print("step", step, " ".join(f"{k}={row[k]:.4g}" for k in keys if k in row), flush=True)


rec = Recorder()
t0 = time.time()
result = run_train(params, rec)
wall = time.time() - t0
steady = [r for r in rec.rows if "tokens_per_s" in r and r["step"] > 10]
summary = {
    "steps": result.steps, "wall_s": wall,
    "final": {k: v for k, v in result.metrics.items() if k != "per_layer"},
    "steady_tokens_per_s_median": sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2] if steady else None,
    "steady_step_time_s_median": sorted(r["step_time_s"] for r in steady)[len(steady) // 2] if steady else None,
    "steady_mfu_median": sorted(r.get("mfu", 0) for r in steady)[len(steady) // 2] if steady else None,
    "intervals": rec.rows,
}
(out / ("train_gpu_compiled.json" if compiled else "train_gpu.json")).write_text(json.dumps(summary, indent=2, default=str) + "\n")
print("SUMMARY", json.dumps({k: v for k, v in summary.items() if k != "intervals"}, default=str))
