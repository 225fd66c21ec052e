"""The waves of a rollout and when they stop: canary first, then percent or fixed-size waves, a gate
and a pause between waves, per-board deadlines, and the abort rules (the rules themselves are listed
in `nativelm.fleet.rollout`'s docstring).

`run_waves` drives the waves in this process (a thread pool per wave); a caller with its own executor
(the Prefect flow: one task per board) gives `drive_waves` its own `run_wave`, with the same rules.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nativelm.fleet.board_job import BoardResult
from nativelm.fleet.stopping import WAKE_S, block_signals_here

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board

CANARY_GROUP = "canary"

RunOne = Callable[["Board"], BoardResult]


@dataclass(frozen=True)
class Wave:
    """Boards updated at the same time; in a gating wave every board must pass."""

    name: str
    boards: tuple[Board, ...]
    gate: bool = False


def plan_waves(boards: Sequence[Board], max_parallel: int, canary_group: str = CANARY_GROUP,
               percents: Sequence[int] | None = None) -> list[Wave]:
    """The canary wave (if any board is in `canary_group`), then the others: in waves up to each cumulative
    percent of `percents` (rounded up, at least one board a wave), or without percents in chunks of `max_parallel`."""
    canary = tuple(b for b in boards if canary_group in b.groups)
    rest = [b for b in boards if canary_group not in b.groups]
    waves = [Wave("canary", canary, gate=True)] if canary else []
    ends = wave_ends(len(rest), percents) if percents else range(max_parallel, len(rest) + max_parallel, max_parallel)
    start = 0
    for end in ends:
        waves.append(Wave(f"wave {len(waves) + 1}", tuple(rest[start:end])))
        start = end
    return [w for w in waves if w.boards]


def wave_ends(count: int, percents: Sequence[int]) -> list[int]:
    """Where each percent wave of `count` boards ends: ceil(count * percent / 100), at least one more than
    the wave before, never past `count`."""
    ends: list[int] = []
    for percent in percents:
        end = min(count, max(math.ceil(count * percent / 100), (ends[-1] if ends else 0) + 1))
        if not ends or end > ends[-1]:
            ends.append(end)
    return ends


RunWave = Callable[[Wave], list[BoardResult]]  # every board of the wave, results in the wave's order
Gate = Callable[[Wave, list[BoardResult]], list[BoardResult]]  # a wave's results, those failing the gate as failed
Expire = Callable[["Board", float], BoardResult]  # the result of a board silent past its deadline (seconds)


@dataclass(frozen=True)
class StopRules:
    """When a rollout stops early, and what happens between waves (see the module docstring)."""

    max_failed: int
    max_failed_percent: float = 100.0
    pause_s: float = 0.0
    gate: Gate | None = None
    deadline_s: float | None = None  # fleet.board_deadline_s (run_waves, and the Prefect flow through run_board_tasks)

    def abort_reason(self, wave: Wave, done: Sequence[BoardResult], results: Sequence[BoardResult],
                     total: int) -> str | None:
        """Why the rollout stops after `wave` (None: it goes on); `results` are all so far, of `total` boards."""
        failed_here = [r.board for r in done if r.failed]
        failed_total = sum(r.failed for r in results)
        if wave.gate and failed_here:
            return f"canary failed on {', '.join(failed_here)}"
        if failed_total > self.max_failed:
            return f"{failed_total} boards failed (more than fleet.max_failed_boards = {self.max_failed})"
        if total and failed_total * 100 / total > self.max_failed_percent:
            return (f"{failed_total} of {total} boards failed (more than fleet.max_failed_percent = "
                    f"{self.max_failed_percent:g}%)")
        return None


def safe_run(run_one: RunOne, board: Board) -> BoardResult:
    """`run_one(board)`, with an unexpected exception recorded as that board's failure."""
    try:
        return run_one(board)
    except Exception as exc:  # noqa: BLE001 - one board's bug must not stop the others' bookkeeping
        return BoardResult(board.name, "failed", phase="internal", reason=f"{type(exc).__name__}: {exc}")


def deadline_result(board: Board, deadline_s: float) -> BoardResult:
    """A board silent past fleet.board_deadline_s: failed; its lock stays for a take-over or `fleet unlock`."""
    return BoardResult(board.name, "failed", phase="deadline",
                       reason=f"deadline: no result within fleet.board_deadline_s = {deadline_s:g} s (its lock, if "
                              f"any, is left for a later rollout's take-over or `nativelm fleet unlock`)")


def pool_wave(pool: ThreadPoolExecutor, wave: Wave, run_one: RunOne, deadline_s: float | None,
              expire: Expire) -> tuple[list[BoardResult], bool]:
    """Every board of `wave` in `pool`; a board running longer than `deadline_s` gets `expire`'s result
    and is not waited for. Returns the results in the wave's order and whether any board was left running."""
    started: dict[str, float] = {}

    def one(board: Board) -> BoardResult:
        started[board.name] = time.monotonic()
        return safe_run(run_one, board)

    futures = {pool.submit(one, b): b for b in wave.boards}
    results: dict[str, BoardResult] = {}
    pending = set(futures)
    while pending:
        done, pending = wait(pending, timeout=WAKE_S)
        results.update((futures[f].name, f.result()) for f in done)
        for future in list(pending) if deadline_s is not None else []:
            board = futures[future]
            if board.name in started and time.monotonic() - started[board.name] > deadline_s:
                results[board.name] = expire(board, deadline_s)
                pending.discard(future)
    return [results[b.name] for b in wave.boards], any(r.phase == "deadline" for r in results.values())


def run_waves(waves: Sequence[Wave], run_one: RunOne, *, max_parallel: int, rules: StopRules,
              stop: threading.Event | None = None, expire: Expire = deadline_result,
              ) -> tuple[list[BoardResult], str | None]:
    """Run the waves in order in this process, each with up to `max_parallel` boards at once (threads).

    Interrupted (a signal, an exception), `stop` is set before the pool is waited for, so the running
    board jobs stop at their next step and unlock instead of finishing the rollout. A board past its
    deadline is not waited for (its thread ends when its SSH command times out).
    """
    pool = ThreadPoolExecutor(max_workers=max(1, max_parallel), thread_name_prefix="board",
                              initializer=block_signals_here)
    left_running = False

    def run_wave(wave: Wave) -> list[BoardResult]:
        nonlocal left_running
        results, left = pool_wave(pool, wave, run_one, rules.deadline_s, expire)
        left_running = left_running or left
        return results

    try:
        outcome = drive_waves(waves, run_wave, rules)
    except BaseException:
        if stop is not None:
            stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=not left_running, cancel_futures=True)
    return outcome


def drive_waves(waves: Sequence[Wave], run_wave: RunWave, rules: StopRules) -> tuple[list[BoardResult], str | None]:
    """Run the waves in order with `run_wave` (then `rules.gate`, then the pause), stopping per `rules`.

    Returns every board's result (skipped ones included, in wave order) and the abort reason (None: none).
    """
    results: list[BoardResult] = []
    abort: str | None = None
    total = sum(len(w.boards) for w in waves)
    for index, wave in enumerate(waves):
        if abort is not None:
            results += [skipped(b, abort) for b in wave.boards]
            continue
        done = run_wave(wave)
        if rules.gate is not None:
            done = rules.gate(wave, done)
        results += done
        abort = rules.abort_reason(wave, done, results, total)
        if abort is None and rules.pause_s and index + 1 < len(waves):
            time.sleep(rules.pause_s)
    return results, abort


def skipped(board: Board, abort: str) -> BoardResult:
    return BoardResult(board.name, "skipped", phase="not started", reason=f"rollout aborted: {abort}")
