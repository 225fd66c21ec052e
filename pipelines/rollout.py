"""Prefect flow `rollout`: a registered version -> every board (canary first) -> on-board benchmark -> MLflow.

The `rollout` deployment is triggered by the gate's promotion event (see nativelm serve), with the
new champion's version as `model`; it can also be run by hand from the UI. Thin on purpose: the
logic is in nativelm.orchestration.fleet_runs and nativelm.fleet.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from nativelm.errors import NativelmError
from nativelm.fleet.onboard_bench import render_bench
from nativelm.fleet.rollout import render_rollout, serving_boards
from nativelm.orchestration import fleet_runs
from nativelm.params.root import load_params

PROJECT_DIR = Path(__file__).resolve().parents[1]


@task(name="resolve-release", cache_policy=NONE)
def resolve_release(params, model: str):
    """Download (once) and verify the release of `model`."""
    return fleet_runs.resolve(params, model)


@task(name="deploy", cache_policy=NONE)
def deploy(params, choice, release):
    """Canary first, then waves; the previous release stays live on any board that fails."""
    result = fleet_runs.deploy(params, choice, release)
    for line in render_rollout(result):
        print(line)
    return result


@task(name="onboard-bench", cache_policy=NONE)
def bench(params, choice, boards):
    """The runtime benchmark on each board that serves the release."""
    rows = fleet_runs.bench(params, choice, boards)
    for line in render_bench(rows):
        print(line)
    return rows


@flow(name="rollout", log_prints=True)
def rollout(model: str = "champion", boards: list[str] | None = None, groups: list[str] | None = None,
            run_bench: bool = True, params_file: str = "params.yaml") -> dict:
    """Roll `model` (a version number, an alias such as champion, or a release folder) out to the fleet.

    Args:
        model: registered version number, alias (champion) or release folder
        boards: board names (empty: every board of the inventory)
        groups: board groups, e.g. canary
        run_bench: benchmark the boards that serve the release afterwards
        params_file: parameters file of the project
    """
    params = load_params(PROJECT_DIR / params_file)
    choice = fleet_runs.choose_boards(params, boards or [], groups or [])
    release = resolve_release(params, model)
    result = deploy(params, choice, release)
    rows = bench(params, choice, serving_boards(choice.boards, result, release.name)) if run_bench else []
    run_id = fleet_runs.record(params, result, rows, release, str(flow_run.id) if flow_run.id else None)
    print(f"MLflow run of this rollout: {run_id}")
    if not result.ok:
        raise NativelmError(f"rollout {result.rollout_id} of {release.name}: {len(result.failed)} board(s) failed"
                            + (f"; aborted: {result.aborted}" if result.aborted else ""))
    return fleet_runs.summary(result, rows)


if __name__ == "__main__":
    rollout()
