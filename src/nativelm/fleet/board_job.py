"""What every job on one board shares: its context, the result, failures as steps, the lock, health.

A job (deploy, rollback) runs on one connected `BoardSession`; anything the board or the
connection raises becomes a `StepFailed` named after the step that was running, and ends up as
(phase, one-line reason) in the `BoardResult` instead of an exception. A failure of the
connection itself (refused, no answer, dropped) is marked `transient`: trying the board again
is safe, since every step is idempotent and a lock held by the same owner is taken again.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import paramiko

from nativelm.fleet.holder import holder_state, this_holder
from nativelm.fleet.provision import ensure_agent
from nativelm.fleet.ssh import BoardSession, last_line
from nativelm.fleet.ssh_trust import BoardError, HostKeyError, connection_dropped
from nativelm.formats.release import RUNTIME_FILE

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.params.fleet import FleetParams

PhaseHook = Callable[[str, str, str], None]  # board, phase, detail
ProgressHook = Callable[[str, str, int, int], None]  # board, file, bytes sent so far, file size
SessionHook = Callable[[BoardSession], None]
LeftoverCheck = Callable[[str], bool]  # lock owner -> True when that owner is known to be finished

TRANSPORT_ERRORS = (paramiko.SSHException, EOFError, OSError, socket.timeout)


@dataclass(frozen=True)
class DeployHooks:
    """Callbacks at exact moments of a board's deploy: progress display, and fault injection in tests."""

    on_phase: PhaseHook | None = None
    on_progress: ProgressHook | None = None
    after_upload: SessionHook | None = None  # every file is on the board, nothing verified yet
    before_activate: SessionHook | None = None  # the new release passed its health check


@dataclass(frozen=True)
class BoardContext:
    """What every board job of one rollout shares: where boards are, the fleet settings, the lock owner, hooks.

    `is_leftover` says whether a lock owner is a finished rollout of this controller (its lock may be
    taken over); `stop` is set when the rollout is interrupted (each job stops at its next step).
    """

    inventory: Inventory
    fleet: FleetParams
    owner: str
    hooks: DeployHooks = field(default_factory=DeployHooks)
    is_leftover: LeftoverCheck | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def phase(self, board: str, phase: str, detail: str = "") -> None:
        if self.hooks.on_phase:
            self.hooks.on_phase(board, phase, detail)


@dataclass
class BoardResult:
    """What happened on one board; `live` is the release it serves afterwards (None: unknown).

    `transient` (not part of the result log): the board failed because the connection did, so a
    retry may succeed.
    """

    board: str
    outcome: str  # updated | unchanged | rolled-back | failed | skipped | interrupted
    phase: str = ""  # the step that failed (or the last one reached)
    reason: str = ""  # one line, empty when it went well
    release: str = ""
    previous: str | None = None  # the release that was live before
    live: str | None = None
    bytes_sent: int = 0
    files_sent: int = 0
    files_linked: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # removed releases, lock take-over ...
    transient: bool = False

    @property
    def failed(self) -> bool:
        return self.outcome in ("failed", "interrupted")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["transient"]
        return data


class StepFailed(Exception):
    """A step of a board job failed: (phase, reason) go to the BoardResult."""

    outcome = "failed"

    def __init__(self, phase: str, reason: str, transient: bool = False) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase, self.reason, self.transient = phase, reason, transient


class JobStopped(StepFailed):
    """The rollout was interrupted: the job stopped before this step (its board keeps a verified release)."""

    outcome = "interrupted"


def stopped_before(phase: str) -> JobStopped:
    return JobStopped(phase, f"interrupted before {phase}: the rollout was stopped")


def connection_reason(exc: BaseException) -> str:
    """One line for a dropped or refused SSH connection (paramiko's messages can be empty)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"connection lost: {text}"


@contextlib.contextmanager
def failures_as_steps(current_phase: Callable[[], str]) -> Iterator[None]:
    """Turn what a board or the connection raises into StepFailed, named after the step that was running."""
    try:
        yield
    except StepFailed:
        raise
    except BoardError as exc:
        raise StepFailed(current_phase(), exc.reason, exc.transient) from None
    except TRANSPORT_ERRORS as exc:
        raise StepFailed(current_phase(), connection_reason(exc), connection_dropped(exc)) from None


def failure_line(text: str) -> str:
    """The last line a failed board command printed, without the runtime's `error: ` prefix."""
    line = last_line(text) or "no output"
    return line.removeprefix("error: ")


def _run_health(session: BoardSession, folder: str, *flags: str) -> Any:
    argv = [session.runtime_python, f"{folder}/{RUNTIME_FILE}", "health", "--model", folder, *flags]
    return session.run(argv, check=False)


def health_check(session: BoardSession, folder: str) -> str | None:
    """Run the release's own runtime health check (its golden continuation) on a board folder; None: passed.

    No `--json`: the folder may hold an older release whose runtime predates it."""
    done = _run_health(session, folder)
    return None if done.rc == 0 else failure_line(done.stderr or done.stdout)


def health_report(session: BoardSession, folder: str) -> tuple[str | None, dict[str, Any]]:
    """The health check of a release this controller built: the failure line (None: passed) and the
    runtime's JSON report (which graph ran: `ops`)."""
    done = _run_health(session, folder, "--json")
    if done.rc == 2 and "--json" in done.stderr:  # a release whose runtime predates health --json
        done = _run_health(session, folder)
    if done.rc != 0:
        return failure_line(done.stderr or done.stdout), {}
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {}
    return None, report if isinstance(report, dict) else {}


def lock_age_s(lock: dict[str, Any]) -> float | None:
    """Seconds since a board lock was taken (owner.json's `since`: ISO time or epoch seconds)."""
    since = lock.get("since")
    try:
        if isinstance(since, (int, float)) and not isinstance(since, bool):
            taken = float(since)
        elif isinstance(since, str):
            moment = datetime.fromisoformat(since)  # Python 3.11 reads a trailing Z too
            taken = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
        else:
            return None
    except ValueError:
        return None
    return time.time() - taken


class BoardJob:
    """What every job on a board shares: its session, the lock, phases, health checks, the result.

    Subclasses implement `body` (taking the lock with `locked()` around what changes the board);
    `run` installs the agent first and records any failure in the result instead of raising it.
    """

    def __init__(self, session: BoardSession, ctx: BoardContext, release: str = "") -> None:
        self.session, self.ctx = session, ctx
        self.board = session.board.name
        self.result = BoardResult(self.board, "failed", release=release)
        self.switched = False  # `current` moved: from here on an interrupt lets the job finish

    def note(self, phase: str, detail: str = "") -> None:
        """Enter step `phase`; an interrupted rollout stops here (what the step would change stays as it is)."""
        self.result.phase = phase
        self.ctx.phase(self.board, phase, detail)
        self.check_stop()

    def check_stop(self) -> None:
        """Stop an interrupted job, unless `current` has moved: then the job's checks and restore must finish."""
        if self.ctx.stop.is_set() and not self.switched:
            raise stopped_before(self.result.phase)

    def health(self, folder: str) -> str | None:
        """Run the runtime's health check on a release folder of the board; None when it passed."""
        failure, report = health_report(self.session, folder)
        # which graph the board ran: nativelm:<kernel>, fallback (library missing) or contrib
        self.result.extra["ops"] = report.get("ops")
        return failure

    def restore(self, release: str | None, previous: str | None, failure: str) -> None:
        """Put `current`/`previous` back to `release`/`previous` after `failure` (raised as health-current).

        The agent verifies `release` first: a release that does not verify is never made live.
        """
        if not release:
            raise StepFailed("health-current", f"{failure}; no previous release to restore")
        self.note("restore", release)
        try:
            reply = self.session.agent("restore", release, *([previous] if previous else []))
        except BoardError as exc:
            raise StepFailed("health-current", f"{failure}; could not restore {release}: {exc.reason}") from None
        self.result.live = reply.get("current", release)
        raise StepFailed("health-current", f"{failure}; restored {release}")

    def run(self) -> BoardResult:
        """Run the job; any failure is recorded in the result, never raised."""
        started = time.perf_counter()
        try:
            with failures_as_steps(lambda: self.result.phase):
                self.note("agent")
                ensure_agent(self.session)
                self.body()
        except StepFailed as exc:
            self.result.outcome, self.result.phase, self.result.reason = exc.outcome, exc.phase, exc.reason
            self.result.transient = exc.transient
        finally:
            self.result.seconds = time.perf_counter() - started
        return self.result

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the board's lock for the block; it is released however the block ends (if the board answers)."""
        self.lock()
        try:
            yield
        finally:
            self.unlock()

    def body(self) -> None:
        raise NotImplementedError

    def lock(self) -> None:
        self.note("lock")
        try:
            reply = self.session.agent("lock", self.ctx.owner, str(self.ctx.fleet.lock_stale_s), this_holder())
        except BoardError as exc:
            reply = self.take_over_leftover(exc)
        self.result.extra["lock_taken_over"] = bool(reply.get("took_over"))

    def take_over_leftover(self, refused: BoardError) -> dict[str, Any]:
        """Take over a lock left behind (see `left_behind`); re-raise `refused` otherwise, saying how to clear it.

        The stale limit passed is half the lock's age, so a lock taken by someone else meanwhile
        (younger than that) is still refused by the agent.
        """
        lock = self.session.agent("facts").get("lock") or {}
        why, age = left_behind(lock, self.ctx), lock_age_s(lock)
        if why is None or age is None or age <= 0:
            raise StepFailed("lock", self.refusal(refused.reason, lock))
        line = f"took over the lock of {lock.get('owner')}: {why}"
        self.note("lock", line)
        self.result.extra["lock_took_over_from"] = line
        return self.session.agent("lock", self.ctx.owner, f"{age / 2:.3f}", this_holder())

    def refusal(self, reason: str, lock: dict[str, Any]) -> str:
        """The "locked by ..." line, with who holds the lock and, when it may be left over, how to clear it."""
        if not lock or lock.get("owner") == self.ctx.owner:
            return reason
        state = holder_state(lock)
        if state.local:  # alive: a rollout is running there, nothing to clear
            return f"{reason} ({state.why})"
        return (f"{reason} ({state.why}; once that rollout is gone, `nativelm fleet unlock --boards {self.board}` "
                f"clears it, as does fleet.lock_stale_s = {self.ctx.fleet.lock_stale_s:g} s)")

    def clear_left_behind(self, facts: dict[str, Any]) -> None:
        """Remove a lock left behind on a board this job does not need to lock (the fast path)."""
        lock = facts.get("lock")
        why = left_behind(lock, self.ctx) if isinstance(lock, dict) else None
        if why is None:
            return
        with contextlib.suppress(BoardError):
            if self.session.agent("unlock", str(lock.get("owner"))).get("unlocked"):
                self.result.extra["lock_cleared"] = f"cleared the lock of {lock.get('owner')}: {why}"
                self.note("lock", self.result.extra["lock_cleared"])

    def unlock(self) -> None:
        with contextlib.suppress(BoardError, *TRANSPORT_ERRORS):
            self.session.agent("unlock", self.ctx.owner)

    def facts(self) -> dict[str, Any]:
        """The board's facts; a board without the runtime virtualenv stops here."""
        self.note("facts")
        facts = self.session.agent("facts")
        self.result.previous = self.result.live = facts.get("current")
        if not facts.get("runtime_python"):
            raise StepFailed("facts", f"not provisioned (no runtime virtualenv): run "
                                      f"`nativelm fleet provision --boards {self.board}`")
        return facts


def left_behind(lock: dict[str, Any], ctx: BoardContext) -> str | None:
    """Why a lock may be taken over at once (its rollout finished, or its controller is gone); None if not."""
    owner = lock.get("owner")
    if not isinstance(owner, str) or owner == ctx.owner:
        return None
    state = holder_state(lock)
    if state.dead:
        return state.why
    if ctx.is_leftover is not None and ctx.is_leftover(owner):
        return f"rollout {owner} finished without unlocking"
    return None


def connect_failure(board: str, exc: BaseException, release: str = "") -> BoardResult:
    """The result of a board that could not be reached or refused our connection."""
    if isinstance(exc, HostKeyError):
        return BoardResult(board, "failed", phase="connect", release=release,
                           reason=exc.reason if "refused" in exc.reason else f"refused: {exc.reason}")
    if isinstance(exc, BoardError):
        return BoardResult(board, "failed", phase="connect", reason=exc.reason, release=release,
                           transient=exc.transient)
    return BoardResult(board, "failed", phase="connect", reason=connection_reason(exc), release=release,
                       transient=connection_dropped(exc))


def on_board(board: Board, ctx: BoardContext, job: Callable[[BoardSession], BoardResult],
             release: str = "") -> BoardResult:
    """Connect to `board`, run `job` on the session and close it; an unreachable board is a failed result."""
    started = time.perf_counter()
    ctx.phase(board.name, "connect", f"{board.host}:{board.port}")
    session = BoardSession(board, ctx.inventory, ctx.fleet)
    try:
        session.connect()
    except (BoardError, *TRANSPORT_ERRORS) as exc:
        result = connect_failure(board.name, exc, release)
    else:
        try:
            result = job(session)
        finally:
            with contextlib.suppress(Exception):
                session.close()
    result.seconds = time.perf_counter() - started  # the connection included
    return result
