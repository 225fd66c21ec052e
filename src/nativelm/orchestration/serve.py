"""`nativelm serve`: register the deployments of pipelines/ and execute their runs (the dashboard).

Four deployments against the Prefect server of the local stack:
- ``retrain/retrain``: the form a user fills in the Prefect UI (``serve.retrain_concurrency`` runs at
  once, each a DVC experiment of its own; their gates take turns);
- ``rollout/rollout``: started by a trigger on the gate's promotion event (an automation), with the
  promoted version as its ``model`` parameter: the new champion reaches the fleet with no human step;
- ``fleet-health/fleet-health``: every ``serve.fleet_health_every_min`` minutes;
- ``study/study``: the study's form (`nativelm study` from the dashboard), one at a time.

They are served by one Prefect runner (a process worker: each flow run is a subprocess in the
project folder). In the foreground it stops with Ctrl-C; ``--background`` keeps it running as
the ``runner`` process of the stack's state folder, like the servers.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect import get_client, serve
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.deployments.runner import RunnerDeployment
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from nativelm.errors import NativelmError
from nativelm.orchestration.clients import load_flow_module, use_local_stack
from nativelm.orchestration.pipeline import GATE_LIMIT
from nativelm.params.root import Params
from nativelm.stack import stack_dir
from nativelm.stack.process import BackgroundProcess

# deployment name -> (flow file under the project, flow function)
FLOWS: dict[str, tuple[str, str]] = {
    "retrain": ("pipelines/retrain.py", "retrain"),
    "rollout": ("pipelines/rollout.py", "rollout"),
    "fleet-health": ("pipelines/fleet_health.py", "fleet_health"),
    "study": ("pipelines/study.py", "study"),
}
RUNNER = "runner"
TAGS = ["nativelm"]


def deployment_ref(name: str) -> str:
    """`flow-name/deployment-name` of one of our deployments (flow and deployment share the name)."""
    return f"{name}/{name}"


def _flow(project_dir: Path, name: str) -> Any:
    relpath, function = FLOWS[name]
    return getattr(load_flow_module(project_dir, relpath), function)


def build_deployments(params: Params, project_dir: Path) -> list[RunnerDeployment]:
    """The deployments: retrain, rollout (its trigger), fleet-health (its schedule) and study."""
    sp = params.serve
    params_file = {"params_file": "params.yaml"}
    retrain = _flow(project_dir, "retrain").to_deployment(
        name="retrain", tags=TAGS, concurrency_limit=sp.retrain_concurrency,
        description="Retrain from the corpus through DVC, register, gate. Empty fields keep params.yaml's values.")
    trigger = DeploymentEventTrigger(
        name="rollout-on-promotion", expect={params.gate.event},
        parameters={"model": "{{ event.payload.version }}"})
    rollout = _flow(project_dir, "rollout").to_deployment(
        name="rollout", tags=TAGS, concurrency_limit=1, parameters=params_file, triggers=[trigger],
        description="Roll a registered version out to the fleet (canary first), then benchmark it on every board.")
    every = timedelta(minutes=sp.fleet_health_every_min) if sp.fleet_health_every_min > 0 else None
    health = _flow(project_dir, "fleet-health").to_deployment(
        name="fleet-health", tags=TAGS, interval=every, parameters=params_file,
        description="Reachability, live release and its verification on every board.")
    study = _flow(project_dir, "study").to_deployment(
        name="study", tags=TAGS, concurrency_limit=1,
        description="Native against compressed: train, export and compare the study's rows on this project's data. "
                    "Empty fields keep params.yaml's `study` values.")
    return [retrain, rollout, health, study]


def serve_foreground(params: Params, project_dir: Path) -> None:
    """Register the deployments and run their flow runs until interrupted."""
    use_local_stack(params)
    with get_client(sync_client=True) as client:  # one gate at a time, whatever runs at once
        client.upsert_global_concurrency_limit_by_name(GATE_LIMIT, 1)
    deployments = build_deployments(params, project_dir)
    serve(*deployments, limit=params.serve.limit, print_starting_message=True)


def _runner_process(params: Params) -> BackgroundProcess:
    return BackgroundProcess(RUNNER, stack_dir(params))


@dataclass(frozen=True)
class ServeStatus:
    """Where the background runner stands."""

    running: bool
    pid: int | None
    log_path: Path
    action: str  # "started" | "already running" | "stopped" | "not running"
    seconds: float = 0.0


def deployments_ready(names: list[str]) -> list[str]:
    """Those of our deployments that exist on the Prefect server with a runner polling them."""
    with get_client(sync_client=True) as client:
        found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=names)))
    return sorted(d.name for d in found if str(getattr(d.status, "value", d.status)).upper() == "READY")


def serve_background(params: Params, params_path: Path, project_dir: Path) -> ServeStatus:
    """Start `nativelm serve` as a background process (idempotent) and wait until every deployment is ready."""
    use_local_stack(params)
    proc = _runner_process(params)
    if proc.is_running():
        return ServeStatus(True, proc.status().pid, proc.log_path, "already running")
    argv = [sys.executable, "-m", "nativelm", "serve", "--params", str(params_path.resolve())]
    started = time.monotonic()
    proc.start(argv, cwd=project_dir)
    deadline = started + params.serve.ready_timeout_s
    while time.monotonic() < deadline:
        if not proc.is_running():
            tail = " | ".join(proc.log_tail(5))
            raise NativelmError(f"nativelm serve exited during start (log {proc.log_path}): {tail}")
        if len(deployments_ready(list(FLOWS))) == len(FLOWS):
            return ServeStatus(True, proc.status().pid, proc.log_path, "started", time.monotonic() - started)
        time.sleep(1.0)
    proc.stop()
    raise NativelmError(f"nativelm serve: deployments not ready after {params.serve.ready_timeout_s:.0f} s "
                        f"(log {proc.log_path}); raise serve.ready_timeout_s if it needs longer")


def serve_stop(params: Params) -> ServeStatus:
    """Stop the background runner (runs in progress are cancelled by Prefect as crashed)."""
    proc = _runner_process(params)
    if not proc.is_running():
        return ServeStatus(False, None, proc.log_path, "not running")
    pid = proc.status().pid
    proc.stop(params.stack.stop_timeout_s)
    return ServeStatus(False, pid, proc.log_path, "stopped")
