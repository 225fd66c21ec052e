"""A real micro study with study.devices [cpu, cpu]: its two trainings run at the same time and the table is
the one a study of the cells one after another writes (training is deterministic per cell)."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_TEST_MODEL, make_project, run_checked

pytestmark = pytest.mark.slow

ROWS = ["fp_moe", "ternary_moe"]
QUALITY = ("row", "lr", "nll_onnx_mean", "val_loss_mean", "file_bytes")


def _table(root: Path, name: str) -> list[dict[str, str]]:
    with (root / "studies" / name / "table.csv").open() as handle:
        return [{k: row[k] for k in QUALITY} for row in csv.DictReader(handle)]


def _span(root: Path, name: str, training: str) -> tuple[float, float]:
    """When a cell's training ran: its metrics file's time, less the training's wall time."""
    metrics = root / "studies" / name / training / "lrpreset_s1234" / "train.json"
    end = metrics.stat().st_mtime
    return end - json.loads(metrics.read_text())["wall_time_s"], end


def test_two_cpu_devices_train_two_cells_at_once_to_the_same_table(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project", {"study.model": TINY_TEST_MODEL, "study.rows": ROWS, "study.steps": 30,
                                               "train.threads": 1})
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    run_checked([sys.executable, "-m", "nativelm.cli", "prepare"], root, env=env)
    both = run_checked([sys.executable, "-m", "nativelm.cli", "study", "--name", "both", "--devices", "cpu,cpu"],
                       root, env=env)
    assert "[1/2] on cpu: training fp_moe" in both.stderr and "[2/2] on cpu: training ternary_moe" in both.stderr
    (a0, a1), (b0, b1) = (_span(root, "both", t) for t in ROWS)
    assert a0 < b1 and b0 < a1, "the two trainings did not overlap"
    run_checked([sys.executable, "-m", "nativelm.cli", "study", "--name", "serial"], root, env=env)
    assert _table(root, "both") == _table(root, "serial")
