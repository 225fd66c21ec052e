"""The `prepare` stage under real DVC in a real git repo, and the Prefect flow on a real local stack."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml

from nativelm.tracking.runs import FIRST_COLUMNS, VIEW_TAG
from tests.conftest import BIN, git, make_project, run_checked

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STAGES = ("prepare", "train", "export", "evaluate")
REGISTRY_TAGS = ("git_commit", "data_hash", "params_hash")


def _set_param(project: Path, dotted: str, value: object) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_prepare_skips_unchanged_and_reruns_on_param_change(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj", {"tracking.uri": "off"})
    first = run_checked([str(BIN / "dvc"), "repro", "prepare"], project)
    assert "Running stage 'prepare'" in first.stdout
    manifest = json.loads((project / "data/prepared/manifest.json").read_text())
    assert (project / "data/prepared/tokenizer.json").exists()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["prepare"]["outs"][0]["path"] == "data/prepared"
    metrics = json.loads((project / "metrics/prepare.json").read_text())
    assert metrics and all(not isinstance(v, str) for v in metrics.values())

    again = run_checked([str(BIN / "dvc"), "repro", "prepare"], project)
    assert "Running stage" not in again.stdout and "didn't change" in again.stdout

    _set_param(project, "data.split.salt", "another")
    third = run_checked([str(BIN / "dvc"), "repro", "prepare"], project)
    assert "Running stage 'prepare'" in third.stdout
    assert json.loads((project / "data/prepared/manifest.json").read_text()) != manifest

    # the whole stage is reproducible from git + the DVC cache: remove outputs, check them out again
    git(project, "add", "-A")
    git(project, "commit", "-qm", "another split")
    digest = (project / "data/prepared/manifest.json").read_bytes()
    subprocess.run(["rm", "-rf", str(project / "data/prepared")], check=True)
    run_checked([str(BIN / "dvc"), "checkout", "prepare"], project)
    assert (project / "data/prepared/manifest.json").read_bytes() == digest


def _flow_runs(api: str) -> list[dict]:
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def test_flow_runs_stages_through_dvc_and_logs_nested_mlflow_runs(tmp_path: Path, local_stack: dict) -> None:
    from mlflow import MlflowClient

    section = local_stack["section"]
    project = make_project(tmp_path / "proj", {f"stack.{k}": v for k, v in section.items()}
                           | {"tracking.experiment": "flow-test", "evaluate.registered_model": "flow-test",
                              "tracking.system_metrics_every_s": 0.2})
    first = run_checked([str(BIN / "nativelm"), "run", "--local"], project)
    assert all(re.search(rf"{s}\s+ran\s", first.stdout) for s in STAGES)
    assert (project / "models/model.pt").exists() and (project / "plots/train/loss.png").exists()
    assert (project / "models/onnx/model.onnx").exists()
    assert (project / "models/release/release.json").exists()
    assert (project / "models/release/nativelm-runtime.pyz").exists()
    second = run_checked([str(BIN / "nativelm"), "run", "--local"], project)
    assert all(re.search(rf"{s}\s+skipped\s", second.stdout) for s in STAGES)
    _set_param(project, "data.split.salt", "other")
    third = run_checked([str(BIN / "nativelm"), "run", "--local"], project)
    assert re.search(r"prepare\s+ran\s", third.stdout) and re.search(r"train\s+ran\s", third.stdout)
    assert "evaluate/decode_tokens_per_s" in third.stdout and "model version 2:" in third.stdout
    assert "orchestration overhead" in third.stdout

    client = MlflowClient(tracking_uri=local_stack["env"]["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("flow-test")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if r.data.tags.get("nativelm.kind") == "pipeline"]
    stages = [r for r in runs if r.data.tags.get("nativelm.kind") == "stage"]
    # MLflow's UI opens the experiment on these runs; each run's name says what it is
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # ... on the runs table with these columns first (the shared view `ui_url` names), each a metric the runs have
    view = json.loads(experiment.tags[VIEW_TAG])
    assert view["selectedColumns"] == [f"metrics.`{name}`" for name in FIRST_COLUMNS]
    assert all(name in parents[0].data.metrics for name in FIRST_COLUMNS), sorted(parents[0].data.metrics)
    assert all(p.info.run_name == f"retrain {p.data.tags['dvc_experiment']}" for p in parents)
    trains = [s for s in stages if s.data.tags["nativelm.stage"] == "train"]
    assert all(re.fullmatch(r"train ternary moe \d+x\d+ \d+ steps", t.info.run_name) for t in trains)
    assert all(any(k.startswith("system/") for k in t.data.metrics) for t in trains)  # CPU / memory samples
    assert len(parents) == 3 and len(stages) == 8  # the skipped run has no stage runs of its own
    for stage_name in STAGES:
        assert [p.data.tags[f"stage.{stage_name}"] for p in parents] == ["ran", "skipped", "ran"]
    by_name = {name: [s for s in stages if s.data.tags["nativelm.stage"] == name] for name in ("prepare", "train")}
    for stage in stages:
        assert stage.data.tags["mlflow.parentRunId"] in {p.info.run_id for p in parents}
    for stage in by_name["prepare"]:
        assert stage.data.metrics["tokens_train"] > 0
        assert stage.data.params["data.split.salt"] in {"nativelm", "other"}
    for stage in by_name["train"]:
        assert stage.data.metrics["val/loss"] > 0 and "layer0/expert_load_cv" in stage.data.metrics
        artifacts = {a.path for a in client.list_artifacts(stage.info.run_id, "plots")}
        assert {"plots/loss.png", "plots/expert_load.png"} <= artifacts
    for parent in parents:  # same metric names on every pipeline run, skipped or not
        assert parent.data.metrics["prepare/tokens_train"] > 0 and parent.data.metrics["train/val_loss"] > 0
        assert parent.data.metrics["export/model_bytes"] > 0
        assert parent.data.metrics["evaluate/ppl_onnx"] > 0 and parent.data.metrics["evaluate/decode_tokens_per_s"] > 0
        assert parent.data.tags["data_hash"] and parent.data.tags["prefect.flow_run_id"]
        assert parent.data.tags["gate.status"] in {"champion", "candidate"} and parent.data.tags["gate.reason"]
        assert parent.info.status == "FINISHED"
    # every pipeline run is a DVC experiment holding the params it ran with
    experiments = [p.data.tags["dvc_experiment"] for p in parents]
    assert len(set(experiments)) == 3
    salt = yaml.safe_load(git(project, "show", f"{parents[-1].data.tags['dvc_experiment_rev']}:params.yaml"))
    assert salt["data"]["split"]["salt"] == "other"
    assert parents[0].data.tags["gate.status"] == "champion" and parents[0].data.tags["gate.changed"] == "true"

    # each evaluate run registered a new version of the release, traceable to code, data and params
    evaluations = [s for s in stages if s.data.tags["nativelm.stage"] == "evaluate"]
    assert len(evaluations) == 2
    versions = sorted(client.search_model_versions("name='flow-test'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2]
    for version, run in zip(versions, evaluations):
        assert version.run_id == run.info.run_id and version.source.endswith("/release")
        assert set(REGISTRY_TAGS) <= set(version.tags) and all(version.tags[t] for t in REGISTRY_TAGS)
        assert version.tags["params_hash"] == run.data.tags["params_hash"]
        assert version.tags["data_hash"] == run.data.tags["data_hash"] != "unknown"
        assert run.data.metrics["model_version"] == int(version.version)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "release")}
        assert {"release/release.json", "release/nativelm-runtime.pyz", "release/model.onnx"} <= artifacts
    release = json.loads((project / "models/release/release.json").read_text())
    assert versions[-1].tags["data_hash"] == release["data_hash"]
    assert json.loads((project / "metrics/evaluate.json").read_text())["model_version"] == 2

    flow_runs = {r["id"]: r for r in _flow_runs(local_stack["env"]["PREFECT_API_URL"])}
    for parent in parents:
        run = flow_runs[parent.data.tags["prefect.flow_run_id"]]
        assert run["state_type"] == "COMPLETED"
