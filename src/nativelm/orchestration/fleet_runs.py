"""What the `rollout` and `fleet-health` flows do, as plain functions (the flows only call these).

A rollout run: resolve the registered version to a verified local release, roll it out (canary
first, waves, abort on failures), benchmark the boards that serve it, and record it in MLflow as
one run per rollout, nested under the pipeline run that produced the version, whose own row also
gets the per-board figures so two pipeline runs compare side by side, boards included.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nativelm.params.root import Params

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.fleet.onboard_bench import BenchRow
    from nativelm.fleet.release import LocalRelease
    from nativelm.fleet.rollout import RolloutResult
    from nativelm.fleet.status import BoardStatus


@dataclass
class FleetChoice:
    """The inventory and the boards a run works on."""

    inventory: Inventory
    boards: list[Board] = field(default_factory=list)


def choose_boards(params: Params, boards: Sequence[str] = (), groups: Sequence[str] = ()) -> FleetChoice:
    """Load fleet.inventory and select boards by name and group (none given: every board)."""
    from nativelm.fleet.inventory import load_inventory, select_boards

    inventory = load_inventory(Path(params.fleet.inventory))
    return FleetChoice(inventory, select_boards(inventory, list(boards), list(groups)))


def resolve(params: Params, model: str) -> LocalRelease:
    """The verified local copy of the release `model` names (version, alias, models:/ URI or folder)."""
    from nativelm.fleet.release import resolve_release

    return resolve_release(model, params)


def deploy(params: Params, choice: FleetChoice, release: LocalRelease) -> RolloutResult:
    """Roll `release` out to the chosen boards, with per-board progress lines on stdout."""
    from nativelm.fleet.progress import Progress
    from nativelm.fleet.rollout import rollout

    progress = Progress([b.name for b in choice.boards], sys.stdout, live=False)
    return rollout(choice.inventory, choice.boards, release, params.fleet, Path(params.stack.state_dir),
                   progress=progress)


def pipeline_run_of_version(client: MlflowClient, model: str, version: int | None) -> str | None:
    """The pipeline (parent) run whose evaluate stage registered `version` of `model`, if there is one."""
    if version is None:
        return None
    found = client.get_model_version(model, str(version))
    return client.get_run(found.run_id).data.tags.get("mlflow.parentRunId") if found.run_id else None


def record(params: Params, result: RolloutResult, rows: Sequence[BenchRow], release: LocalRelease,
           flow_run_id: str | None) -> str | None:
    """One MLflow run for this rollout (outcome + on-board bench); per-board figures also on the pipeline run."""
    from mlflow import MlflowClient

    from nativelm.fleet.onboard_bench import bench_metrics, log_bench_run
    from nativelm.tracking.runs import RunLogger, resolve_tracking_uri

    uri = resolve_tracking_uri(params)
    if uri is None:
        return None
    client = MlflowClient(tracking_uri=uri)
    parent = pipeline_run_of_version(client, params.evaluate.registered_model, release.version)
    tags = {"rollout.outcome": "ok" if result.ok else "failed", "rollout.aborted": result.aborted or "",
            **{f"rollout.{k}": str(v) for k, v in result.counts().items()}}
    if flow_run_id:
        tags["prefect.flow_run_id"] = flow_run_id
    run_id = log_bench_run(params, rows, rollout_id=result.rollout_id, release=release.name,
                           version=release.version, tags=tags, parent_run_id=parent)
    if run_id is None:
        return None
    rollout_metrics = {"rollout.seconds": result.seconds, "rollout.boards_failed": float(len(result.failed))}
    rollout_run = RunLogger(client, run_id, uri)
    rollout_run.log_metrics(rollout_metrics)
    if result.log_path is not None and Path(result.log_path).exists():
        rollout_run.log_artifact(Path(result.log_path), "rollout")
    if parent is not None:
        RunLogger(client, parent, uri).log_metrics({**bench_metrics(rows), **rollout_metrics})
    return run_id


def bench(params: Params, choice: FleetChoice, boards: Sequence[Board]) -> list[BenchRow]:
    """The runtime benchmark on `boards`, one at a time (simulated boards share this machine's CPUs)."""
    from nativelm.fleet.onboard_bench import bench_fleet

    return bench_fleet(choice.inventory, list(boards), params.fleet, parallel=1) if boards else []


def health(params: Params, choice: FleetChoice) -> list[BoardStatus]:
    """Every chosen board's status (reachability, live release, last benchmark)."""
    from nativelm.fleet.status import fleet_status

    return fleet_status(choice.inventory, choice.boards, params.fleet)


def unhealthy(rows: Sequence[BoardStatus]) -> list[str]:
    """One line per board that is unreachable or serves nothing."""
    return [f"{r.board}: {r.reason}" if not r.reachable else f"{r.board}: no live release"
            for r in rows if not r.reachable or not r.current]


def summary(result: RolloutResult, rows: Sequence[BenchRow]) -> dict[str, Any]:
    """What the rollout flow returns (and shows in the Prefect UI)."""
    return {"rollout_id": result.rollout_id, "release": result.release, "ok": result.ok,
            "aborted": result.aborted, "counts": result.counts(),
            "boards": {r.board: {"outcome": r.outcome, "live": r.live, "reason": r.reason} for r in result.boards},
            "decode_tokens_per_s": {row.board: row.value("decode_tokens_per_s") for row in rows}}
