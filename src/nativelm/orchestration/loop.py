"""`nativelm run`: press "retrain" the way the dashboard does, then follow the loop to the boards.

It triggers the served ``retrain`` deployment (exactly what the Run button in the Prefect UI
does), prints the run's logs as they arrive, and, when the gate promoted the new version, waits
for the ``rollout`` run that the promotion event triggered on its own. The figures of the summary
come from MLflow: the pipeline's parent run (found by its Prefect flow-run tag) and the rollout's.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from nativelm.errors import NativelmError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from prefect.client.schemas.objects import FlowRun

POLL_S = 2.0
_TASK_NOISE = ("Finished in state", "Created task run", "Executing")  # per-task state lines


@dataclass
class FollowedRun:
    """A flow run followed to its end."""

    flow_run: FlowRun
    seconds: float
    logs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.flow_run.state and self.flow_run.state.is_completed())


def _client():  # -> SyncPrefectClient
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def trigger(deployment: str, parameters: dict[str, Any]) -> FlowRun:
    """Create a run of `deployment` (`flow/deployment`) now; the runner of `nativelm serve` executes it."""
    from prefect.deployments import run_deployment

    return run_deployment(name=deployment, parameters=parameters, timeout=0)


def follow(flow_run_id: Any, timeout_s: float, echo: TextIO | None = sys.stdout,
           prefix: str = "") -> FollowedRun:
    """Wait for a flow run to end, echoing its log lines as they arrive; NativelmError on timeout."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    started = time.monotonic()
    seen = 0
    lines: list[str] = []
    with _client() as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    sort=LogSort.TIMESTAMP_ASC, offset=seen, limit=200)
            for log in logs:
                if log.task_run_id is not None and log.message.startswith(_TASK_NOISE):
                    continue
                line = f"{prefix}{log.message}"
                lines.append(line)
                if echo is not None:
                    print(line, file=echo, flush=True)
            seen += len(logs)
            if run.state is not None and run.state.is_final() and not logs:
                return FollowedRun(run, time.monotonic() - started, lines)
            if time.monotonic() - started > timeout_s:
                raise NativelmError(f"flow run {run.name} ({flow_run_id}) still {run.state_name} after "
                                    f"{timeout_s:.0f} s; it goes on in the background (see the Prefect UI)")
            if not logs:
                time.sleep(POLL_S)


def wait_triggered(deployment: str, since: Any, match: Callable[[FlowRun], bool], timeout_s: float) -> FlowRun:
    """The first run of `deployment` created after `since` that `match`es (one an automation started)."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterExpectedStartTime,
    )

    name = deployment.split("/", 1)[1]
    started = time.monotonic()
    with _client() as client:
        while time.monotonic() - started < timeout_s:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
                flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=since)))
            for run in sorted(runs, key=lambda r: r.created or since):
                if match(run):
                    return run
            time.sleep(POLL_S)
    raise NativelmError(f"no {deployment} run was triggered within {timeout_s:.0f} s of the promotion "
                        "(is `nativelm serve` running? its automation starts the rollout)")


def mlflow_run_of(client: MlflowClient, flow_run_id: Any, experiment: str) -> Run | None:
    """The MLflow run tagged with this Prefect flow run (the pipeline's parent run, or the rollout's)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{flow_run_id}'",
                              max_results=5)
    return runs[0] if runs else None


def stage_walls(client: MlflowClient, parent: Run) -> dict[str, float]:
    """Each nested stage run's own wall time (`stage_wall_s`), by stage name."""
    from nativelm.tracking.runs import STAGE_WALL_METRIC

    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=50)
    walls: dict[str, float] = {}
    for child in children:
        stage = child.data.tags.get("nativelm.stage")
        if stage and STAGE_WALL_METRIC in child.data.metrics:
            walls[stage] = float(child.data.metrics[STAGE_WALL_METRIC])
    return walls
