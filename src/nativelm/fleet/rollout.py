"""A rollout across the fleet: canary boards first, then the rest in waves, stopping when too many fail.

- Wave 1 is every board of group ``canary``: if any of them fails, the rollout aborts.
- The other boards follow in waves: up to each cumulative percent of ``fleet.waves`` (rounded up, at
  least one board a wave), or without it in waves of ``fleet.max_parallel`` boards; at most
  ``fleet.max_parallel`` boards of a wave are updated at the same time.
- With ``fleet.gate_max_slowdown`` set, each wave's updated boards are benchmarked and those slower than
  the previous release on the same board fail (`wave_gate`); then ``fleet.wave_pause_s`` is waited.
- After a wave, more than ``fleet.max_failed_boards`` failed boards, or more than
  ``fleet.max_failed_percent`` percent of the rollout's boards, abort the rollout.
- A board with no result ``fleet.board_deadline_s`` after it started is failed (phase "deadline") and
  not waited for; its lock stays on the board for a later take-over or `nativelm fleet unlock`.
- Boards not reached because of an abort are recorded as "skipped", with the reason.

Every board's result goes to ``<stack.state_dir>/rollouts/<rollout id>.json`` (`rollout_log`: rewritten
atomically as boards finish, ``"finished": true`` at the end), which is also how a later rollout
recognises a board lock left behind by this one (see `board_job.BoardJob.take_over_leftover`). The
waves and their stop rules are `waves`.

`plan_rollout` gives the rollout as a `RolloutPlan`: its waves and the step of one board. `run`
drives the waves in this process (a thread pool per wave); a caller with its own executor (the
Prefect flow: one task per board) passes `run_wave`, and the abort rules, gate and pause stay the ones
here, and so is the deadline (`orchestration.board_tasks.run_board_tasks` expires a silent board's task).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from nativelm.errors import NativelmError
from nativelm.fleet.board_job import BoardContext, BoardResult, DeployHooks
from nativelm.fleet.deploy import deploy_to, rollback_on
from nativelm.fleet.progress import Progress
from nativelm.fleet.rollout_log import RolloutLog, RolloutResult, finish_abandoned_logs, log_finished, new_rollout_id, now_iso
from nativelm.fleet.stopping import interrupted_by
from nativelm.fleet.wave_gate import bench_gate
from nativelm.fleet.waves import (RunOne, RunWave, StopRules, Wave, deadline_result, drive_waves, plan_waves, run_waves,
                                  safe_run)
from nativelm.params.fleet import RELEASE_PATTERN, FleetParams

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.fleet.release import LocalRelease

Deploy = Callable[["Board", BoardContext, "LocalRelease"], BoardResult]


@dataclass
class RolloutPlan:
    """A rollout ready to run: its waves, one board's job, and the log kept as boards finish.

    `attempt` tries one board (never raises); `record` files a board's final result (log, progress);
    `step` is both, for executors without retries.
    """

    log: RolloutLog
    waves: list[Wave]
    job: RunOne
    max_parallel: int
    rules: StopRules
    progress: Progress | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # the board jobs' (BoardContext.stop)
    expired: set[str] = field(default_factory=set)  # boards past their deadline: a late result is not logged

    @property
    def rollout_id(self) -> str:
        return self.log.result.rollout_id

    def attempt(self, board: Board) -> BoardResult:
        return safe_run(self.job, board)

    def record(self, result: BoardResult) -> BoardResult:
        if result.board in self.expired:
            return result
        self.log.record(result)
        if self.progress is not None:
            self.progress.done(result)
        return result

    def step(self, board: Board) -> BoardResult:
        return self.record(self.attempt(board))

    def expire(self, board: Board, deadline_s: float) -> BoardResult:
        """Record `board` as failed by its deadline; whatever its job reports later is dropped."""
        result = self.record(deadline_result(board, deadline_s))
        self.expired.add(board.name)
        return result

    def run(self, run_wave: RunWave | None = None) -> RolloutResult:
        """Run every wave (this process's threads, or `run_wave`); finish the log; never raises for boards.

        Interrupted (`stopping.Interrupted`, KeyboardInterrupt, any exception), the board jobs are
        stopped and waited for, the log finished with outcome "interrupted", and the exception re-raised
        with the result attached as `.result`.
        """
        started = time.perf_counter()
        try:
            if run_wave is None:
                results, aborted = run_waves(self.waves, self.step, max_parallel=self.max_parallel,
                                             rules=self.rules, stop=self.stop, expire=self.expire)
            else:
                results, aborted = drive_waves(self.waves, run_wave, self.rules)
        except BaseException as exc:
            self.stop.set()
            if self.progress is not None:
                self.progress.close()
            exc.result = self.log.finish_interrupted(self.waves, interrupted_by(exc),  # type: ignore[attr-defined]
                                                     time.perf_counter() - started)
            raise
        try:
            for result in results:
                if result.outcome == "skipped" and self.progress is not None:
                    self.progress.done(result)
        finally:
            if self.progress is not None:
                self.progress.close()
        return self.log.finish(results, aborted, time.perf_counter() - started)


def board_context(inventory: Inventory, fleet: FleetParams, state_dir: Path, owner: str,
                  hooks: DeployHooks | None, progress: Progress | None) -> BoardContext:
    """The context of every board of one rollout: its id owns the locks, finished rollouts' locks are leftovers."""
    shown = progress.hooks(hooks) if progress is not None else (hooks or DeployHooks())
    return BoardContext(inventory, fleet, owner, shown, lambda other: log_finished(state_dir, other),
                        threading.Event())


def plan_rollout(inventory: Inventory, boards: Sequence[Board], release: LocalRelease, fleet: FleetParams,
                 state_dir: Path, *, hooks: DeployHooks | None = None, progress: Progress | None = None,
                 rollout_id: str | None = None, deploy: Deploy = deploy_to) -> RolloutPlan:
    """The deploy of `release` to `boards` (canary first, then waves); its log is started here."""
    rid = rollout_id or new_rollout_id("rollout")
    finish_abandoned_logs(state_dir)
    settings = {"max_parallel": fleet.max_parallel, "max_failed_boards": fleet.max_failed_boards,
                "keep_releases": fleet.keep_releases, "max_failed_percent": fleet.max_failed_percent,
                "waves": fleet.waves, "wave_pause_s": fleet.wave_pause_s, "gate_max_slowdown": fleet.gate_max_slowdown,
                "board_deadline_s": fleet.board_deadline_s}
    log = RolloutLog(state_dir, RolloutResult(rid, "deploy", release.name, release.version, now_iso(),
                                              settings=settings))
    ctx = board_context(inventory, fleet, state_dir, rid, hooks, progress)
    gate = None if fleet.gate_max_slowdown is None else bench_gate(inventory, fleet)
    rules = StopRules(fleet.max_failed_boards, fleet.max_failed_percent, fleet.wave_pause_s, gate,
                      fleet.board_deadline_s)
    return RolloutPlan(log, plan_waves(boards, fleet.max_parallel, percents=fleet.waves),
                       lambda board: deploy(board, ctx, release), fleet.max_parallel, rules, progress, ctx.stop)


def rollout(inventory: Inventory, boards: Sequence[Board], release: LocalRelease, fleet: FleetParams,
            state_dir: Path, *, hooks: DeployHooks | None = None, progress: Progress | None = None,
            rollout_id: str | None = None, deploy: Deploy = deploy_to) -> RolloutResult:
    """Deploy `release` to `boards` in this process: canary first, then waves; see the module docstring."""
    return plan_rollout(inventory, boards, release, fleet, state_dir, hooks=hooks, progress=progress,
                        rollout_id=rollout_id, deploy=deploy).run()


def plan_rollback(inventory: Inventory, boards: Sequence[Board], fleet: FleetParams, state_dir: Path, *,
                  to: str | None = None, progress: Progress | None = None) -> RolloutPlan:
    """Restore the previous release (or `to`) on `boards`, up to fleet.max_parallel at once; never aborts."""
    if to is not None and not re.fullmatch(RELEASE_PATTERN, to):
        raise NativelmError(f"rollback: {to!r} is not a release name (such as v3 or sha-0123456789ab)")
    rid = new_rollout_id("rollback")
    finish_abandoned_logs(state_dir)
    log = RolloutLog(state_dir, RolloutResult(rid, "rollback", to or "previous", None, now_iso(),
                                              settings={"max_parallel": fleet.max_parallel}))
    ctx = board_context(inventory, fleet, state_dir, rid, None, progress)
    return RolloutPlan(log, [Wave("all", tuple(boards))], lambda board: rollback_on(board, ctx, to),
                       fleet.max_parallel, StopRules(len(boards), deadline_s=fleet.board_deadline_s), progress,
                       ctx.stop)


def rollback(inventory: Inventory, boards: Sequence[Board], fleet: FleetParams, state_dir: Path, *,
             to: str | None = None, progress: Progress | None = None) -> RolloutResult:
    """Restore the previous release (or `to`) on `boards` in this process; see `plan_rollback`."""
    return plan_rollback(inventory, boards, fleet, state_dir, to=to, progress=progress).run()


def serving_boards(boards: Sequence[Board], result: RolloutResult, release: str) -> list[Board]:
    """The boards of `boards` that serve `release` after the rollout (updated, or already had it)."""
    live = {r.board for r in result.boards if r.live == release}
    return [b for b in boards if b.name in live]


def render_rollout(result: RolloutResult) -> list[str]:
    """Summary table lines: one row per board, then the totals and where the log is."""
    header = ("board", "outcome", "live", "sent", "files", "linked", "seconds", "reason")
    rows = [(r.board, r.outcome, r.live or "-", _size(r.bytes_sent), str(r.files_sent), str(r.files_linked),
             f"{r.seconds:.2f}", f"{r.phase}: {r.reason}" if r.reason else "") for r in result.boards]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in [header, *rows]]
    lines += [f"{r.board}: {r.extra[key]}" for r in result.boards for key in ("lock_took_over_from", "lock_cleared")
              if r.extra.get(key)]
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sorted(result.counts().items()))
    lines.append(f"{result.kind} {result.rollout_id} of {result.release}: {counts} in {result.seconds:.1f} s"
                 + (f"; ABORTED: {result.aborted}" if result.aborted else ""))
    if result.log_path is not None:
        lines.append(f"result log: {result.log_path}")
    return [line.rstrip() for line in lines]


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MB"
