"""The browser harness proven against real servers: the local stack's Prefect UI and MLflow UI.

A tiny typed flow (int, float, str, Literal, bool, dict parameters) is served against the stack's
Prefect server; the browser triggers it through Run -> Custom run with every parameter changed,
and the flow itself records what it received. Two MLflow runs logged through the project's own
tracking code are then photographed in MLflow's compare view (test-artifacts/mlflow-compare.png).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest
from prefect import flow

from nativelm.fsutil import atomic_write_text
from nativelm.stack.process import BackgroundProcess, format_tail
from tests.e2e.browser import (
    BrowserHarnessError,
    artifact_path,
    deployment_id,
    screenshot_mlflow_compare,
    trigger_deployment_run,
    wait_flow_run,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FLOW_NAME, DEPLOYMENT_NAME = "browser-harness", "harness"
OUT_ENV = "NATIVELM_HARNESS_OUT"


@flow(name=FLOW_NAME)
def harness_flow(steps: int = 3, lr: float = 0.5, label: str = "base", mode: Literal["fast", "slow"] = "fast",
                 verbose: bool = False, overrides: dict[str, float] | None = None) -> None:
    """Write the parameters exactly as the flow received them (types included) for the test to read."""
    from prefect.runtime import flow_run

    received = {"steps": steps, "lr": lr, "label": label, "mode": mode, "verbose": verbose, "overrides": overrides}
    atomic_write_text(Path(os.environ[OUT_ENV]) / f"{flow_run.id}.json", json.dumps(received))


SERVE = ("from prefect import serve; from tests.e2e.test_browser_harness import harness_flow; "
         f"serve(harness_flow.to_deployment(name={DEPLOYMENT_NAME!r}))")


@pytest.fixture(scope="module")
def served_flow(local_stack: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`harness_flow` served (prefect.serve in a background process) against the local stack;
    yields the folder where each of its runs writes what it received."""
    state = tmp_path_factory.mktemp("served-flow")
    out = state / "received"
    out.mkdir()
    env = {**local_stack["env"], OUT_ENV: str(out), "PREFECT_HOME": str(state / "prefect-home"),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    proc = BackgroundProcess("harness-serve", state)
    proc.start([sys.executable, "-c", SERVE], env=env, cwd=REPO)
    try:
        _wait_deployment(proc, local_stack["env"]["PREFECT_API_URL"])
        yield out
    finally:
        proc.stop()


def _wait_deployment(proc: BackgroundProcess, api_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            deployment_id(api_url, FLOW_NAME, DEPLOYMENT_NAME)
            return
        except BrowserHarnessError:
            if not proc.is_running() or time.monotonic() > deadline:
                pytest.fail(f"the served flow never registered its deployment; log {proc.log_path}:\n"
                            + format_tail(proc.log_tail()))
            time.sleep(0.5)


def test_custom_run_from_the_prefect_ui_reaches_the_flow_with_the_changed_parameters(
        browser_page: Page, local_stack: dict, served_flow: Path) -> None:
    from playwright.sync_api import expect

    from nativelm.stack import prefect_ui_url

    ui = prefect_ui_url(local_stack["params"])
    changed = {"steps": 7, "lr": 0.25, "label": "changed in the browser", "mode": "slow", "verbose": True,
               "overrides": {"train.lr": 0.001}}
    run_id = trigger_deployment_run(browser_page, ui, FLOW_NAME, DEPLOYMENT_NAME, changed)

    state = wait_flow_run(ui + "/api", run_id, timeout=90)
    assert state.completed, f"flow run {run_id} ended {state.state_type} ({state.state_name})"
    assert state.parameters == changed
    assert json.loads((served_flow / f"{run_id}.json").read_text()) == changed  # types survived the form

    browser_page.reload()
    expect(browser_page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
    browser_page.get_by_text("Parameters", exact=True).first.click()
    expect(browser_page.get_by_text("changed in the browser").first).to_be_visible()
    browser_page.screenshot(path=artifact_path("prefect-flow-run"), full_page=True)


def test_unknown_parameter_is_named_with_the_ones_the_form_shows(
        browser_page: Page, local_stack: dict, served_flow: Path) -> None:
    from nativelm.stack import prefect_ui_url

    with pytest.raises(BrowserHarnessError, match=r"no parameter 'epochs' \(it shows: steps \(Optional\), lr"):
        trigger_deployment_run(browser_page, prefect_ui_url(local_stack["params"]), FLOW_NAME, DEPLOYMENT_NAME,
                               {"epochs": 2})


def test_mlflow_compare_view_shows_both_runs(browser_page: Page, local_stack: dict) -> None:
    from playwright.sync_api import expect

    from nativelm.params.root import Params
    from nativelm.params.tracking import TrackingParams
    from nativelm.tracking.runs import tracked_run

    params = Params(stack=local_stack["params"].stack,
                    tracking=TrackingParams(uri=local_stack["env"]["MLFLOW_TRACKING_URI"], experiment="browser-harness"))
    run_ids = []
    for name, lr, loss in (("baseline-run", 0.01, 2.5), ("changed-lr-run", 0.003, 2.1)):
        with tracked_run(params, name, "pipeline") as run:
            run.log_params({"train": {"lr": lr}})
            run.log_metrics({"val_loss": loss})
            run_ids.append(run.run_id)

    shot = screenshot_mlflow_compare(browser_page, local_stack["env"]["MLFLOW_TRACKING_URI"], run_ids,
                                     artifact_path("mlflow-compare"))

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("baseline-run", "changed-lr-run", "val_loss", "train.lr"):
        expect(browser_page.get_by_text(text, exact=True).first).to_be_visible()
