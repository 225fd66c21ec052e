"""The closed loop as a user drives it: the dashboard in a real browser, the fleet of real sshd boards.

`nativelm run` makes a first champion and the automation rolls it out; then headless Chromium
opens the Prefect UI, runs `retrain` with a changed parameter, and the test checks that the run
completed, that a new version was registered and promoted, that the promotion's automation rolled
it out, and that every simulated board serves it. MLflow's compare view of the two pipeline runs
is kept as a screenshot under test-artifacts/.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from nativelm.tracking.runs import FIRST_COLUMNS
from tests.conftest import BIN, free_port, make_project, run_checked
from tests.e2e.browser import (
    artifact_path,
    screenshot_mlflow_compare,
    runs_table_columns,
    screenshot_mlflow_experiment,
    trigger_deployment_run,
    wait_flow_run,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BOARDS = ("board-1", "board-2", "board-3")


def _project(tmp_path: Path, local_stack: dict) -> Path:
    section = local_stack["section"]
    return make_project(tmp_path / "proj", {f"stack.{k}": v for k, v in section.items()} | {
        "tracking.experiment": "closed-loop", "evaluate.registered_model": "closed-loop",
        "fleet.sim.base_port": free_port(),  # the boards take this port and the next two
        "fleet.bench_prompt_len": 8, "fleet.bench_new_tokens": 4, "fleet.bench_repeats": 1,
        "gate.max_ppl_regression": 100.0,  # a 6-step model: the loop, not the learning, is under test
        "serve.fleet_health_every_min": 0.0,
        "train.progress": True,  # the bar `nativelm run` forwards to its terminal
    })


def _serving(project: Path) -> dict[str, str | None]:
    from nativelm.fleet.service import choose_boards, health
    from nativelm.params.root import load_params

    params = load_params(project / "params.yaml")
    params = params.model_copy(update={"fleet": params.fleet.model_copy(
        update={"inventory": str(project / params.fleet.inventory)})})
    return {row.board: row.current for row in health(params, choose_boards(params))}


def _triggered_rollout(api: str, version: int, timeout: float) -> dict:
    """The rollout run the promotion of `version` started (found through the API), once it ended."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = httpx.post(f"{api}/flow_runs/filter", json={"deployments": {"name": {"any_": ["rollout"]}}},
                          trust_env=False, timeout=30).json()
        mine = [r for r in runs if str(r["parameters"].get("model")) == str(version)]
        if mine and all(r["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"} for r in mine):
            return mine[0]
        time.sleep(1.0)
    raise AssertionError(f"no finished rollout of version {version} after {timeout:.0f} s")


def test_retrain_from_the_dashboard_reaches_every_board(tmp_path: Path, local_stack: dict, browser_page) -> None:
    from mlflow import MlflowClient

    env = local_stack["env"]
    project = _project(tmp_path, local_stack)
    try:
        run_checked([str(BIN / "nativelm"), "fleet", "sim", "up"], project)
        run_checked([str(BIN / "nativelm"), "fleet", "provision"], project)
        first = run_checked([str(BIN / "nativelm"), "run"], project)  # starts `serve --background` itself
        assert "model version 1: champion" in first.stdout
        # the terminal that started the loop saw the stages as they ran, training progress included
        assert "Running stage 'train'" in first.stdout and re.search(r"train:\s+100%\|", first.stdout), first.stdout
        assert re.search(r"rollout: .*board-1", first.stdout)
        assert all(f"{board}: decode tok/s" in first.stdout for board in BOARDS), first.stdout
        assert _serving(project) == {board: "v1" for board in BOARDS}

        # the user: Prefect UI -> retrain -> Run -> Custom run, 8 training steps instead of 6, Submit
        run_id = trigger_deployment_run(browser_page, env["PREFECT_API_URL"].removesuffix("/api"),
                                        "retrain", "retrain", {"train_steps": 8})
        state = wait_flow_run(env["PREFECT_API_URL"], run_id, timeout=600)
        assert state.completed, state
        assert state.parameters["train_steps"] == 8

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        assert int(client.get_model_version_by_alias("closed-loop", "champion").version) == 2
        rollout = _triggered_rollout(env["PREFECT_API_URL"], 2, timeout=300)
        assert rollout["state_type"] == "COMPLETED", rollout
        assert _serving(project) == {board: "v2" for board in BOARDS}

        experiment = client.get_experiment_by_name("closed-loop")
        parents = client.search_runs([experiment.experiment_id], "tags.`nativelm.kind` = 'pipeline'",
                                     order_by=["attributes.start_time ASC"])
        assert len(parents) == 2
        dashboard_run = parents[-1]
        assert dashboard_run.data.tags["prefect.flow_run_id"] == run_id
        assert dashboard_run.data.params["train.max_steps"] == "8"  # the override is recorded in MLflow
        assert '"train.max_steps": 8' in dashboard_run.data.tags["overrides"]
        assert dashboard_run.data.tags["dvc_experiment"] in run_checked(["git", "for-each-ref", "refs/exps"],
                                                                        project).stdout
        for parent in parents:  # per-board figures sit on the pipeline runs, side by side
            assert all(parent.data.metrics[f"board.{b}.decode_tokens_per_s"] > 0 for b in BOARDS)

        shown = ["train.max_steps"]  # rows equal in both runs are hidden, long tables are virtualised
        shot = screenshot_mlflow_compare(browser_page, env["MLFLOW_TRACKING_URI"], [p.info.run_id for p in parents],
                                         artifact_path("mlflow-compare-two-retrains"), expect=shown)
        assert shot.stat().st_size > 10_000
        # the experiment as a user first opens it: its runs, named by what they are (not the GenAI overview)
        names = [p.info.run_name for p in parents]
        assert all(name.startswith("retrain retrain-") for name in names)
        link = re.search(r"MLflow experiment: (\S+)", first.stdout)[1]  # what the terminal hands the user
        first_view = screenshot_mlflow_experiment(browser_page, link, names, artifact_path("mlflow-experiment-first-view"))
        assert "/overview" not in browser_page.url and first_view.stat().st_size > 10_000
        columns = runs_table_columns(browser_page)  # nativelm's view: these metrics and no others
        metric_columns = [c for c in columns if "/" in c]
        assert sorted(metric_columns) == sorted(FIRST_COLUMNS), columns
    finally:
        run_checked([str(BIN / "nativelm"), "serve", "--stop"], project)
        run_checked([str(BIN / "nativelm"), "fleet", "sim", "down"], project)
