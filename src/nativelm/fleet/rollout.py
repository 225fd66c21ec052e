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

Every board's result goes to ``<stack.state_dir>/rollouts/<rollout id>.json`` (rewritten atomically
as boards finish, ``"finished": true`` at the end), which is also how a later rollout recognises a
board lock left behind by this one (see `board_job.BoardJob.take_over_leftover`).

`plan_rollout` gives the rollout as a `RolloutPlan`: its waves and the step of one board. `run`
drives the waves in this process (a thread pool per wave); a caller with its own executor (the
Prefect flow: one task per board) passes `run_wave`, and the abort rules, gate and pause stay the ones
here (the deadline is the in-process executor's; the flow's task runs have their own timeouts).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nativelm.errors import NativelmError
from nativelm.fleet.board_job import BoardContext, BoardResult, DeployHooks
from nativelm.fleet.deploy import deploy_to, rollback_on
from nativelm.fleet.holder import holder_state, this_holder
from nativelm.fleet.progress import Progress
from nativelm.fleet.wave_gate import bench_gate
from nativelm.fleet.stopping import WAKE_S, block_signals_here, interrupted_by
from nativelm.fsutil import atomic_write_text
from nativelm.params.fleet import RELEASE_PATTERN, FleetParams

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.fleet.release import LocalRelease

CANARY_GROUP = "canary"
_ID = re.compile(r"^(rollout|rollback)-\d{8}-\d{6}-[0-9a-f]{6}$")

RunOne = Callable[["Board"], BoardResult]
Deploy = Callable[["Board", BoardContext, "LocalRelease"], BoardResult]


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
    deadline_s: float | None = None  # in-process executor only (run_waves)

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


# --------------------------------------------------------------------------------------------
# the result log


def new_rollout_id(kind: str = "rollout") -> str:
    """rollout-YYYYmmdd-HHMMSS-<6 hex>: sortable, unique, and safe as a board lock owner."""
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def rollouts_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "rollouts"


def log_finished(state_dir: Path, rollout_id: str) -> bool:
    """Whether `rollout_id` (e.g. a board lock's owner) is a rollout of this controller that has ended."""
    if not _ID.match(rollout_id):
        return False
    try:
        return bool(json.loads((rollouts_dir(state_dir) / f"{rollout_id}.json").read_text()).get("finished"))
    except (OSError, ValueError, AttributeError):
        return False


def finish_abandoned_logs(state_dir: Path, newest: int = 200) -> list[str]:
    """Finish the logs of rollouts whose controller died (SIGKILL, power cut) on this host: outcome "died".

    Run as a rollout starts; only the `newest` logs are read. Returns the ids finished.
    """
    done = []
    for path in sorted(rollouts_dir(state_dir).glob("*.json"))[-newest:]:
        try:
            log = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        holder = log.get("controller") if isinstance(log, dict) and not log.get("finished") else None
        parts = holder.split(":") if isinstance(holder, str) else []
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            state = holder_state({"host": parts[0], "pid": int(parts[1]), "started": float(parts[2])})
        except ValueError:
            continue
        if state.dead:
            log.update(finished=True, outcome="died", aborted=f"the rollout died: {state.why}")
            atomic_write_text(path, json.dumps(log, indent=2) + "\n")
            done.append(str(log.get("id")))
    return done


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class RolloutResult:
    """A whole rollout (or rollback): every board's result, and why it stopped early if it did."""

    rollout_id: str
    kind: str  # "deploy" | "rollback"
    release: str
    version: int | None
    started_at: str
    boards: list[BoardResult] = field(default_factory=list)
    aborted: str | None = None
    seconds: float = 0.0
    finished: bool = False
    log_path: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    outcome: str = "running"  # running | ok | failed | interrupted (| died: see finish_abandoned_logs)
    controller: str = field(default_factory=this_holder)  # HOST:PID:START_TIME of the process running it

    @property
    def failed(self) -> list[BoardResult]:
        return [r for r in self.boards if r.failed]

    @property
    def ok(self) -> bool:
        return not self.failed and self.aborted is None

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.boards:
            counts[r.outcome] = counts.get(r.outcome, 0) + 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {"id": self.rollout_id, "kind": self.kind, "release": self.release, "version": self.version,
                "started_at": self.started_at, "finished": self.finished, "outcome": self.outcome,
                "seconds": round(self.seconds, 3),
                "aborted": self.aborted, "counts": self.counts(), "settings": self.settings,
                "controller": self.controller,
                "boards": [r.to_json() for r in self.boards]}


class RolloutLog:
    """Keeps `<state_dir>/rollouts/<id>.json` current as boards finish (thread-safe, atomic writes)."""

    def __init__(self, state_dir: Path, result: RolloutResult) -> None:
        self.result = result
        self.path = rollouts_dir(state_dir) / f"{result.rollout_id}.json"
        result.log_path = self.path
        self._lock = threading.Lock()
        self.write()

    def write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.result.to_json(), indent=2) + "\n")

    def record(self, board: BoardResult) -> None:
        with self._lock:
            self.result.boards.append(board)
            self.write()

    def finish(self, ordered: list[BoardResult], aborted: str | None, seconds: float,
               outcome: str | None = None) -> RolloutResult:
        with self._lock:
            self.result.boards, self.result.aborted = ordered, aborted
            self.result.seconds, self.result.finished = seconds, True
            self.result.outcome = outcome or ("ok" if self.result.ok else "failed")
            self.write()
        return self.result

    def finish_interrupted(self, waves: Sequence[Wave], why: str, seconds: float) -> RolloutResult:
        """Finish the log of a rollout stopped by `why` (a signal): the boards that ended as they ended,
        the others skipped."""
        with self._lock:
            done = {r.board: r for r in self.result.boards}
        aborted = f"interrupted by {why}"
        ordered = [done.get(b.name) or skipped(b, aborted) for wave in waves for b in wave.boards]
        return self.finish(ordered, aborted, seconds, "interrupted")


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
    log = RolloutLog(state_dir, RolloutResult(rid, "deploy", release.name, release.version, _now(),
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
    log = RolloutLog(state_dir, RolloutResult(rid, "rollback", to or "previous", None, _now(),
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
