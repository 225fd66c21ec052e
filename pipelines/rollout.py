"""Prefect flow `rollout`: a registered version -> every board (canary first) -> on-board benchmark -> MLflow.

The `rollout` deployment is triggered by the gate's promotion event (see nativelm serve), with the
new champion's version as `model`; it can also be run by hand from the UI. The operation is
nativelm.fleet.deploy_service's `deploy`, the same as `nativelm deploy`; what this file adds is where the
boards run: each board is its own task run (its state, logs and duration in the UI), the waves and
abort rules being the service's. A board whose SSH connection failed (refused, no answer, dropped)
is retried: every step of a board's deploy is idempotent, and the lock is the rollout's own. A
board that answered with a failure (hash mismatch, failing health check ...) is not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from nativelm.errors import NativelmError
from nativelm.fleet import deploy_service, service
from nativelm.fleet.board_job import BoardResult
from nativelm.fleet.inventory import Board
from nativelm.fleet.onboard_bench import BenchOne, BenchRow
from nativelm.fleet.progress import Progress
from nativelm.fleet.release import LocalRelease
from nativelm.fleet.rollout import RolloutPlan
from nativelm.fleet.waves import Wave
from nativelm.fleet.stopping import stopping
from nativelm.orchestration.board_tasks import (
    RETRY_DELAY_S,
    BoardFailed,
    connection_failed,
    outcome_of,
    run_board_tasks,
)
from nativelm.params.root import Params, load_params

PROJECT_DIR = Path(__file__).resolve().parents[1]


@task(name="resolve-release", cache_policy=NONE)
def resolve_release(params: Params, model: str) -> LocalRelease:
    """Download (once) and verify the release of `model`."""
    return deploy_service.resolve(params, model)


@task(name="deploy-board", task_run_name="deploy {board.name}", cache_policy=NONE, retry_condition_fn=connection_failed)
def deploy_board(plan: RolloutPlan, board: Board) -> BoardResult:
    """One board's deploy; a failed board fails the task (retried when its connection failed)."""
    result = plan.attempt(board)
    if result.failed:
        raise BoardFailed(board.name, f"{result.phase}: {result.reason}", result, transient=result.transient)
    return result


def crashed_deploy(board: Board, why: str) -> BoardResult:
    """A deploy task that crashed: that board failed, the rollout goes on."""
    return BoardResult(board.name, "failed", phase="internal", reason=why)


@task(name="bench-board", task_run_name="bench {board.name}", cache_policy=NONE)
def bench_board(bench_one: BenchOne, board: Board) -> BenchRow:
    """The runtime benchmark on one board that serves the release."""
    row = bench_one(board)
    if row.error:
        raise BoardFailed(board.name, row.error, row)
    return row


def crashed_bench(board: Board, why: str) -> BenchRow:
    """A bench task that crashed: that board's row says why."""
    return BenchRow(board.name, error=f"internal: {why}")


class PrefectExecutor:
    """Runs each board of a wave as its own task run, at most the plan's max_parallel at once."""

    def __init__(self, retries: int = 2, retry_delay_s: float = RETRY_DELAY_S) -> None:
        self.deploy_task = deploy_board.with_options(retries=retries, retry_delay_seconds=retry_delay_s)

    def deploy_wave(self, plan: RolloutPlan, wave: Wave) -> list[BoardResult]:
        deadline_s = plan.rules.deadline_s  # fleet.board_deadline_s: a silent board fails, its task is left
        return run_board_tasks(wave.boards, plan.max_parallel, lambda board: self.deploy_task.submit(plan, board),
                               lambda board, done: plan.record(outcome_of(done, board, crashed_deploy)),
                               deadline_s, lambda board: plan.expire(board, deadline_s))

    def bench_wave(self, bench_one: BenchOne, boards: Sequence[Board]) -> list[BenchRow]:
        return run_board_tasks(boards, len(boards), lambda board: bench_board.submit(bench_one, board),
                               lambda board, done: outcome_of(done, board, crashed_bench))


@flow(name="rollout", log_prints=True)
def rollout(model: str = "champion", boards: list[str] | None = None, groups: list[str] | None = None,
            run_bench: bool = True, params_file: str = "params.yaml", board_retries: int = 2) -> dict:
    """Roll `model` (a version number, an alias such as champion, or a release folder) out to the fleet.

    Args:
        model: registered version number, alias (champion) or release folder
        boards: board names (empty: every board of the inventory)
        groups: board groups, e.g. canary
        run_bench: benchmark the boards that serve the release afterwards
        params_file: parameters file of the project
        board_retries: tries more for a board whose SSH connection failed
    """
    params = load_params(PROJECT_DIR / params_file)
    choice = service.choose_boards(params, boards or [], groups or [])
    release = resolve_release(params, model)
    progress = Progress([b.name for b in choice.boards], sys.stdout, live=False)
    with stopping():  # a cancelled run's SIGTERM unlocks the boards and finishes the log (fleet/stopping.py)
        report = deploy_service.deploy(params, choice, release, bench=run_bench, progress=progress,
                                       executor=PrefectExecutor(board_retries),
                                       flow_run_id=str(flow_run.id) if flow_run.id else None)
    if not report.ok:
        raise NativelmError(report.failure())
    return report.summary()


if __name__ == "__main__":
    rollout()
