"""`nativelm run`: press "retrain" the way the dashboard does, then follow the loop to the boards.

It triggers the served ``retrain`` deployment (exactly what the Run button in the Prefect UI
does), prints the run's logs as they arrive, and, when the gate promoted the new version, waits
for the ``rollout`` run that the promotion event triggered on its own. The figures of the summary
come from MLflow: the pipeline's parent run (found by its Prefect flow-run tag) and the rollout's.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO

from mlflow import MlflowClient
from mlflow.entities import Run
from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, Log
from prefect.client.schemas.sorting import LogSort
from prefect.deployments import run_deployment
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
from prefect.flow_runs import wait_for_flow_run
from prefect.logging.clients import get_logs_subscriber

from nativelm.errors import NativelmError
from nativelm.tracking.runs import STAGE_WALL_METRIC

_TASK_NOISE = ("Finished in state", "Created task run", "Executing")  # per-task state lines
_BAR = re.compile(r"\d+%\|")  # a tqdm progress line (a stage's bar, forwarded line by line)


@dataclass
class FollowedRun:
    """A flow run followed to its end."""

    flow_run: FlowRun
    seconds: float
    logs: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.flow_run.state and self.flow_run.state.is_completed())


def trigger(deployment: str, parameters: dict[str, Any]) -> FlowRun:
    """Create a run of `deployment` (`flow/deployment`) now; the runner of `nativelm serve` executes it."""
    return run_deployment(name=deployment, parameters=parameters, timeout=0)


class _Echo:
    """The log lines of one flow run, each shown once (the live stream and a read can overlap).

    On a terminal a progress bar's successive lines redraw one line (a live bar); elsewhere (CI
    logs, a pipe) each is a line of its own.
    """

    def __init__(self, echo: TextIO | None, prefix: str) -> None:
        self.echo, self.prefix = echo, prefix
        self.live = bool(echo is not None and echo.isatty())
        self.bar_open = False
        self.seen: set[Any] = set()
        self.lines: list[str] = []

    def show(self, log: Log) -> None:
        if log.id in self.seen:
            return
        self.seen.add(log.id)
        if log.task_run_id is not None and log.message.startswith(_TASK_NOISE):
            return
        line = f"{self.prefix}{log.message}"
        self.lines.append(line)
        if self.echo is None:
            return
        if self.live and _BAR.search(line):
            self.echo.write(f"\r{line}\x1b[K")
            self.echo.flush()
            self.bar_open = True
            return
        if self.bar_open:
            self.echo.write("\n")
            self.bar_open = False
        print(line, file=self.echo, flush=True)


async def _follow(flow_run_id: Any, out: _Echo) -> FlowRun:
    """Stream the run's logs (Prefect's live log feed) until Prefect's own wait says the run ended."""
    logs_of_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))

    async def read_all(client: Any) -> None:  # what was logged before the stream was open, or after it closed
        for log in await client.read_logs(log_filter=logs_of_run, sort=LogSort.TIMESTAMP_ASC):
            out.show(log)

    async with get_logs_subscriber(filter=logs_of_run) as stream, get_client() as client:
        await read_all(client)
        ended = asyncio.ensure_future(wait_for_flow_run(flow_run_id, timeout=None, client=client))
        while not ended.done():
            nxt = asyncio.ensure_future(anext(stream))
            await asyncio.wait({ended, nxt}, return_when=asyncio.FIRST_COMPLETED)
            if nxt.done() and nxt.exception() is None:
                out.show(nxt.result())
            else:
                nxt.cancel()
        await asyncio.sleep(1.0)  # the runner ships its last lines in batches
        await read_all(client)
        return ended.result()


def follow(flow_run_id: Any, timeout_s: float, echo: TextIO | None = sys.stdout,
           prefix: str = "") -> FollowedRun:
    """Wait for a flow run to end, echoing its log lines as they arrive; NativelmError on timeout."""
    started = time.monotonic()
    out = _Echo(echo, prefix)
    try:
        run = asyncio.run(asyncio.wait_for(_follow(flow_run_id, out), timeout_s))
    except TimeoutError:
        raise NativelmError(f"flow run {flow_run_id} still not finished after {timeout_s:.0f} s; it goes on "
                            "in the background (see the Prefect UI)") from None
    return FollowedRun(run, time.monotonic() - started, out.lines)


async def _first_run(deployment: str, since: datetime, match: Callable[[FlowRun], bool]) -> FlowRun:
    """The first matching run of `deployment` created after `since`: one that exists, else the next one made."""
    name = deployment.split("/", 1)[1]
    async with get_client() as client:
        found = await client.read_deployment_by_name(deployment)
        created = EventFilter(event=EventNameFilter(prefix=["prefect.flow-run."]),
                              related=EventRelatedFilter(id=[f"prefect.deployment.{found.id}"]))
        async with get_events_subscriber(filter=created) as events:  # open before looking: nothing slips between
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])),
                flow_run_filter=FlowRunFilter(expected_start_time=FlowRunFilterExpectedStartTime(after_=since)))
            for run in sorted(runs, key=lambda r: r.created or since):
                if match(run):
                    return run
            async for event in events:
                run = await client.read_flow_run(event.resource.id.removeprefix("prefect.flow-run."))
                if match(run):
                    return run
    raise NativelmError(f"the event stream of {deployment} closed before a matching run appeared")


def wait_triggered(deployment: str, since: datetime, match: Callable[[FlowRun], bool], timeout_s: float) -> FlowRun:
    """The first run of `deployment` created after `since` that `match`es (one an automation started)."""
    try:
        return asyncio.run(asyncio.wait_for(_first_run(deployment, since, match), timeout_s))
    except TimeoutError:
        raise NativelmError(f"no {deployment} run was triggered within {timeout_s:.0f} s of the promotion "
                            "(is `nativelm serve` running? its automation starts the rollout)") from None


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
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=50)
    walls: dict[str, float] = {}
    for child in children:
        stage = child.data.tags.get("nativelm.stage")
        if stage and STAGE_WALL_METRIC in child.data.metrics:
            walls[stage] = float(child.data.metrics[STAGE_WALL_METRIC])
    return walls
