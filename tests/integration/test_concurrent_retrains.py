"""Two retrains started at once from the dashboard's deployment, with different overrides.

Real Prefect server and runner (`nativelm serve --background`), real DVC in a real git repository,
real MLflow: each run must become its own DVC experiment and its own registered model version with
its own parameters, both must run at the same time, and params.yaml in the workspace must hold what
the user wrote throughout (DVC stashes each run's overrides in an instant under its lock, then runs
them in a temporary copy: docs/architecture.md, "Runs from the dashboard").
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import dvc.api
import pytest

from tests.conftest import BIN, git, make_project, run_checked
from tests.e2e.browser import FINAL_STATES, deployment_id, flow_run_state

pytestmark = [pytest.mark.integration, pytest.mark.slow]
OVERRIDES = ({"train_steps": 5, "seed": 11}, {"train_steps": 7, "seed": 12})


def _create_run(api: str, parameters: dict) -> str:
    """What the dashboard's Run button does: a flow run of the retrain deployment with these fields."""
    dep = deployment_id(api, "retrain", "retrain")
    request = urllib.request.Request(f"{api}/deployments/{dep}/create_flow_run",
                                     data=json.dumps({"parameters": parameters}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())["id"]


def test_two_retrains_at_once_each_get_their_experiment_and_version(tmp_path: Path, local_stack: dict) -> None:
    from mlflow import MlflowClient

    project = make_project(tmp_path / "proj", {f"stack.{k}": v for k, v in local_stack["section"].items()} | {
        "tracking.experiment": "concurrent", "evaluate.registered_model": "concurrent",
        "serve.retrain_concurrency": 2, "serve.fleet_health_every_min": 0.0, "gate.max_ppl_regression": 100.0})
    params_file = project / "params.yaml"
    before = params_file.read_bytes()
    api = local_stack["env"]["PREFECT_API_URL"]
    run_checked([str(BIN / "nativelm"), "serve", "--background"], project, env=local_stack["env"])
    try:
        ids = [_create_run(api, overrides) for overrides in OVERRIDES]
        both_running, deadline = False, time.monotonic() + 1200
        while True:
            states = [flow_run_state(api, run_id) for run_id in ids]
            if all(s.state_type == "RUNNING" for s in states):
                both_running = True
                time.sleep(5.0)  # past DVC's stash of the overrides: both runs are in their own copies now
                assert params_file.read_bytes() == before
            if all(s.state_type in FINAL_STATES for s in states) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        run_checked([str(BIN / "nativelm"), "serve", "--stop"], project, env=local_stack["env"])
    assert [s.state_type for s in states] == ["COMPLETED", "COMPLETED"], states
    assert both_running, "the two retrains never ran at the same time"
    assert params_file.read_bytes() == before and git(project, "status", "--porcelain", "params.yaml") == ""

    client = MlflowClient(tracking_uri=local_stack["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("concurrent")
    runs = client.search_runs([experiment.experiment_id])
    versions = {v.run_id: int(v.version) for v in client.search_model_versions("name='concurrent'")}
    assert sorted(versions.values()) == [1, 2]
    names = set()
    for run_id, overrides in zip(ids, OVERRIDES, strict=True):
        parent = next(r for r in runs if r.data.tags.get("prefect.flow_run_id") == run_id)
        assert json.loads(parent.data.tags["overrides"]) == {"train.max_steps": overrides["train_steps"],
                                                              "seed": overrides["seed"]}
        # the DVC experiment holds the params this run's stages read
        name, rev = parent.data.tags["dvc_experiment"], parent.data.tags["dvc_experiment_rev"]
        names.add(name)
        ran_with = dvc.api.params_show(repo=str(project), rev=rev)
        assert (ran_with["train"]["max_steps"], ran_with["seed"]) == (overrides["train_steps"], overrides["seed"])
        # ... and so do its nested stage runs and the model version its evaluate run registered
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        train = next(r for r in children if r.data.tags["nativelm.stage"] == "train")
        assert int(train.data.params["train.max_steps"]) == overrides["train_steps"]
        assert parent.data.metrics["train/steps"] == overrides["train_steps"]  # its own metrics, not the workspace's
        evaluate = next(r for r in children if r.data.tags["nativelm.stage"] == "evaluate")
        assert versions[evaluate.info.run_id] == int(parent.data.tags["model_version"])
    assert len(names) == 2
