"""Prefect flow `fleet-health`: every board's reachability, live release and last benchmark (scheduled).

The live release of each board is verified (size and mtime of its files against the stamp written
when it verified, every file hashed once fleet.verify_full_every_s has passed) and health-checked;
a damaged or unhealthy release fails that board's task and the run, as an unreachable board does.

Each board is its own task run (its state, logs and duration in the UI), as in the `rollout` flow:
a board whose SSH connection failed (refused, no answer, dropped) is asked again, up to
`board_retries` times; a board that is unreachable for good or serves nothing fails its task.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NONE

from nativelm.errors import NativelmError
from nativelm.fleet import service, status
from nativelm.fleet.inventory import Board, Inventory
from nativelm.fleet.ssh_trust import BoardError
from nativelm.fleet.status import BoardStatus, render_status
from nativelm.orchestration.board_tasks import (
    RETRY_DELAY_S,
    BoardFailed,
    connection_failed,
    outcome_of,
    run_board_tasks,
)
from nativelm.params.fleet import FleetParams
from nativelm.params.root import load_params

PROJECT_DIR = Path(__file__).resolve().parents[1]


@task(name="check-board", task_run_name="health {board.name}", cache_policy=NONE, retry_condition_fn=connection_failed)
def check_board(inventory: Inventory, board: Board, fleet: FleetParams) -> BoardStatus:
    """One board's status; an unhealthy board fails the task (retried when its connection failed)."""
    try:
        row = status.check_board(inventory, board, fleet)
    except NativelmError as exc:
        row = status.unreachable(board, exc)
        transient = isinstance(exc, BoardError) and exc.transient
        raise BoardFailed(board.name, row.reason or "unreachable", row, transient=transient) from None
    problem = service.board_problem(row)
    if problem is not None:
        raise BoardFailed(board.name, problem, row)
    return row


def crashed_check(board: Board, why: str) -> BoardStatus:
    """A check task that crashed: that board's row says why."""
    return status.unreachable(board, NativelmError(f"internal: {why}"))


def check_boards(choice: service.FleetChoice, fleet: FleetParams, retries: int = 2,
                 retry_delay_s: float = RETRY_DELAY_S) -> list[BoardStatus]:
    """Every chosen board's status, each board a task run, fleet.max_parallel at once; in board order."""
    check = check_board.with_options(retries=retries, retry_delay_seconds=retry_delay_s)
    return run_board_tasks(choice.boards, fleet.max_parallel, lambda board: check.submit(choice.inventory, board, fleet),
                           lambda board, done: outcome_of(done, board, crashed_check))


@flow(name="fleet-health", log_prints=True)
def fleet_health(params_file: str = "params.yaml", board_retries: int = 2) -> dict:
    """Check every board; the run fails (red in the UI) when a board is unreachable, serves nothing, or its
    live release is damaged or fails its health check.

    Args:
        params_file: parameters file of the project
        board_retries: tries more for a board whose SSH connection failed
    """
    params = load_params(PROJECT_DIR / params_file)
    rows = check_boards(service.choose_boards(params), params.fleet, board_retries)
    for line in render_status(rows):
        print(line)
    problems = service.unhealthy(rows)
    if problems:
        raise NativelmError(f"{len(problems)} board(s) unhealthy: " + "; ".join(problems))
    return {r.board: {"current": r.current, "verified": r.verified, "decode_tokens_per_s": r.decode_tokens_per_s}
            for r in rows}


if __name__ == "__main__":
    fleet_health()
