"""Each board as its own Prefect task run (its state, logs and duration in the UI), tried again only
when its SSH connection failed: the pattern the `rollout` and `fleet-health` flows share.

A board task that fails raises `BoardFailed` carrying what the board produced all the same (a
result row), so the flow still reports every board; `transient` (the connection failed: refused,
no answer, dropped, see fleet/ssh_trust.py) is what `connection_failed` retries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from prefect.futures import PrefectFuture, wait

from nativelm.fleet.inventory import Board
from nativelm.fleet.stopping import WAKE_S

RETRY_DELAY_S = 10.0
T = TypeVar("T")


class BoardFailed(Exception):
    """A board's task failed (red in the UI); `outcome` is its result row all the same."""

    def __init__(self, board: str, why: str, outcome: Any, transient: bool = False) -> None:
        super().__init__(f"{board}: {why}")
        self.outcome = outcome
        self.transient = transient


def connection_failed(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: only a board whose connection failed is tried again."""
    failure = state.data
    return isinstance(failure, BoardFailed) and failure.transient


def outcome_of(future: PrefectFuture, board: Board, crashed: Callable[[Board, str], T]) -> Any:
    """What a board's task produced, failed or not; a crash is that board's failure (`crashed` makes its
    row from the error line), not the flow's."""
    outcome = future.result(raise_on_failure=False)
    if isinstance(outcome, BoardFailed):
        return outcome.outcome
    if isinstance(outcome, BaseException):
        return crashed(board, f"{type(outcome).__name__}: {outcome}")
    return outcome


def run_board_tasks(boards: Sequence[Board], max_parallel: int, submit: Callable[[Board], PrefectFuture],
                    done: Callable[[Board, PrefectFuture], T], deadline_s: float | None = None,
                    expire: Callable[[Board], T] | None = None) -> list[T]:
    """Submit one task per board, at most `max_parallel` running at once; `done` turns each finished
    task into its row as it finishes. A task still running `deadline_s` after its submission (retries
    included) gets `expire`'s row and is no longer waited for (fleet.board_deadline_s: a silent board
    fails; whatever it reports later is the caller's to drop). The rows in board order."""
    waiting, running, rows = list(boards), {}, {}
    started: dict[str, float] = {}
    while waiting or running:
        while waiting and len(running) < max(1, max_parallel):
            board = waiting.pop(0)
            running[submit(board)] = board
            started[board.name] = time.monotonic()
        ready = wait(list(running), timeout=WAKE_S).done  # wakes up so a SIGTERM is handled (fleet/stopping.py)
        for future in ready:
            board = running.pop(future)
            rows[board.name] = done(board, future)
        if deadline_s is None or expire is None:
            continue
        for future, board in list(running.items()):
            if time.monotonic() - started[board.name] > deadline_s:
                running.pop(future)
                rows[board.name] = expire(board)
    return [rows[b.name] for b in boards]
