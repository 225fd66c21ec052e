"""A micro study against a real MLflow server: every row's metrics and artifacts, and a SIGKILL mid-study
resumed to the same table as an uninterrupted study."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import TINY_TEST_MODEL, make_project, run_checked

pytestmark = pytest.mark.slow

ROWS = ["fp_moe", "ternary_moe", "fp_moe_int4_ptq", "fp_moe_ternary_ptq", "equal_bytes_moe_int4_ptq"]
QUALITY = ("row", "lr", "nll_onnx_mean", "val_loss_mean", "file_bytes", "weight_bytes")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, local_stack: dict) -> Path:
    root = make_project(tmp_path_factory.mktemp("study") / "project", {
        "study.model": TINY_TEST_MODEL, "study.rows": ROWS, "study.steps": 40, "study.lrs": [0.003, 0.01],
        "train.checkpoint_interval": 10, "train.eval_interval": 10, "train.threads": 1})
    run_checked([sys.executable, "-m", "nativelm.cli", "prepare"], root, env=_env(local_stack))
    return root


def _env(local_stack: dict) -> dict[str, str]:
    return {**os.environ, **local_stack["env"], "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _study(root: Path, env: dict[str, str], name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nativelm.cli", "study", "--name", name], cwd=root, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _table(root: Path, name: str) -> list[dict[str, str]]:
    with (root / "studies" / name / "table.csv").open() as handle:
        return [{k: row[k] for k in QUALITY} for row in csv.DictReader(handle)]


def test_a_killed_study_resumes_to_the_table_of_an_uninterrupted_one(project: Path, local_stack: dict) -> None:
    env = _env(local_stack)
    whole = _study(project, env, "whole")
    out, _ = whole.communicate(timeout=900)
    assert whole.returncode == 0, out[-3000:]

    killed = _study(project, env, "killed")
    checkpoint = project / "studies" / "killed" / "ternary_moe" / "lr0.003_s1234" / "checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoint.is_dir() and any(checkpoint.glob("step_*"))):
        assert killed.poll() is None and time.monotonic() < deadline, "the study ended before it could be killed"
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (project / "studies" / "killed" / "table.csv").exists()

    resumed = _study(project, env, "killed")
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-3000:]
    assert "fp_moe/lr0.003_s1234: finished before, kept" in out
    assert "resumed from" in out
    assert _table(project, "killed") == _table(project, "whole")
    table = (project / "studies" / "killed" / "table.md").read_text()
    assert all(f"| {row} |" in table for row in ROWS)

    client = MlflowClient(local_stack["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("nativelm-study")
    parents = client.search_runs([experiment.experiment_id], "tags.`nativelm.kind` = 'study' "
                                 "and tags.`study/name` = 'killed'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the resumed start logged into the same run
    parent = parents[0].info.run_id
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"table.md", "table.csv", "curves.png", "pareto_bytes.png", "pareto_decode.png"} <= artifacts
    rows = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted((r.data.tags["study/row"], r.data.tags["study/lr"]) for r in rows) == sorted(
        (row, lr) for row in ROWS for lr in ("0.003", "0.01"))
    for run in rows:
        metrics = run.data.metrics
        assert {"train/val_loss", "evaluate/ppl_onnx", "evaluate/decode_tokens_per_s", "export/model_bytes",
                "study/active_bytes_per_token"} <= set(metrics), run.info.run_name
        assert run.data.tags["study/ptq"] == str(run.data.tags["study/row"].endswith("_ptq")).lower()
        assert len(client.get_metric_history(run.info.run_id, "val/loss")) == 4  # steps 10, 20, 30, 40
