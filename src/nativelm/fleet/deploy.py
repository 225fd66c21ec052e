"""One board's part of a rollout: a state machine that never leaves a board without a verified release.

    connect -> agent -> facts -> (live already and verifies: "unchanged", done)
    -> lock -> facts -> hashes -> link / upload (resumed) -> disk check -> verify
    -> health of the new release -> activate -> health of `current` (failure: roll back) -> prune -> unlock

Every step runs on the board through the agent (`fleet/agent.py`) or the release's own runtime;
`current` only moves in `activate`, after the new release's files verified and its golden
continuation matched, so any failure before that leaves the previous release live untouched, and a
failure after it rolls back. Each failure is recorded as (phase, one-line reason) in the
`BoardResult`. A lock left behind by a finished rollout of this controller (its connection dropped
before it could unlock) is taken over; any other lock stops the board with "locked by ...".

Boards must be provisioned (`nativelm fleet provision`): a board without the runtime virtualenv
fails in phase "facts" with the command that fixes it, instead of a slow install mid-rollout.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import paramiko

from nativelm.fleet.ssh import BoardError, BoardSession, HostKeyError, last_line
from nativelm.formats.release import MANIFEST as RELEASE_MANIFEST
from nativelm.formats.release import RUNTIME_FILE
from nativelm.params.fleet import FleetParams

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.fleet.release import LocalRelease

# room left on a board's disk beyond the bytes a rollout still has to send
DISK_MARGIN_MB = 16

PhaseHook = Callable[[str, str, str], None]  # board, phase, detail
ProgressHook = Callable[[str, str, int, int], None]  # board, file, bytes sent so far, file size
SessionHook = Callable[[BoardSession], None]
LeftoverCheck = Callable[[str], bool]  # lock owner -> True when that owner is known to be finished


@dataclass
class DeployHooks:
    """Callbacks at exact moments of a board's deploy: progress display, and fault injection in tests."""

    on_phase: PhaseHook | None = None
    on_progress: ProgressHook | None = None
    after_upload: SessionHook | None = None  # every file is on the board, nothing verified yet
    before_activate: SessionHook | None = None  # the new release passed its health check


@dataclass
class BoardResult:
    """What happened on one board; `live` is the release it serves afterwards (None: unknown)."""

    board: str
    outcome: str  # updated | unchanged | rolled-back | failed | skipped
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

    @property
    def failed(self) -> bool:
        return self.outcome == "failed"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class StepFailed(Exception):
    """A step of the state machine failed: (phase, reason) go to the BoardResult."""

    def __init__(self, phase: str, reason: str) -> None:
        super().__init__(f"{phase}: {reason}")
        self.phase, self.reason = phase, reason


def connection_reason(exc: BaseException) -> str:
    """One line for a dropped or refused SSH connection (paramiko's messages can be empty)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"connection lost: {text}"


_TRANSPORT_ERRORS = (paramiko.SSHException, EOFError, OSError, socket.timeout)


@contextlib.contextmanager
def failures_as_steps(current_phase: Callable[[], str]) -> Iterator[None]:
    """Turn what a board or the connection raises into StepFailed, named after the step that was running."""
    try:
        yield
    except StepFailed:
        raise
    except BoardError as exc:
        raise StepFailed(current_phase(), exc.reason) from None
    except _TRANSPORT_ERRORS as exc:
        raise StepFailed(current_phase(), connection_reason(exc)) from None


def failure_line(text: str) -> str:
    """The last line a failed board command printed, without the runtime's `error: ` prefix."""
    line = last_line(text) or "no output"
    return line.removeprefix("error: ")


class BoardJob:
    """What every job on a board shares: its session, the lock, phases, health checks, the result.

    Subclasses implement `body` (taking the lock with `locked()` around what changes the board);
    `run` installs the agent first and records any failure in the result instead of raising it.
    """

    def __init__(self, session: BoardSession, fleet: FleetParams, owner: str, release: str = "",
                 hooks: DeployHooks | None = None, is_leftover: LeftoverCheck | None = None) -> None:
        self.session, self.fleet, self.owner = session, fleet, owner
        self.hooks = hooks or DeployHooks()
        self.is_leftover = is_leftover
        self.board = session.board.name
        self.result = BoardResult(self.board, "failed", release=release)

    def note(self, phase: str, detail: str = "") -> None:
        self.result.phase = phase
        if self.hooks.on_phase:
            self.hooks.on_phase(self.board, phase, detail)

    def health(self, folder: str) -> str | None:
        """Run the runtime's health check on a release folder of the board; None when it passed."""
        argv = [self.session.runtime_python, f"{folder}/{RUNTIME_FILE}", "health", "--model", folder]
        done = self.session.run(argv, check=False)
        return None if done.rc == 0 else failure_line(done.stderr or done.stdout)

    def run(self) -> BoardResult:
        """Run the job; any failure is recorded in the result, never raised."""
        started = time.perf_counter()
        try:
            with failures_as_steps(lambda: self.result.phase):
                self.note("agent")
                ensure_agent(self.session)
                self.body()
        except StepFailed as exc:
            self.result.outcome, self.result.phase, self.result.reason = "failed", exc.phase, exc.reason
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
            reply = self.session.agent("lock", self.owner, str(self.fleet.lock_stale_s))
        except BoardError as exc:
            reply = self.take_over_leftover(exc)
        self.result.extra["lock_taken_over"] = bool(reply.get("took_over"))

    def take_over_leftover(self, refused: BoardError) -> dict[str, Any]:
        """Take over a lock whose owner is a finished rollout (it could not unlock); re-raise otherwise.

        The stale limit passed is half the lock's age, so a lock taken by someone else meanwhile
        (younger than that) is still refused by the agent.
        """
        lock = self.session.agent("facts").get("lock") or {}
        owner, age = lock.get("owner"), lock_age_s(lock)
        if not (self.is_leftover and isinstance(owner, str) and owner != self.owner and self.is_leftover(owner)
                and age is not None and age > 0):
            raise refused
        self.note("lock", f"taking over the lock left by finished rollout {owner}")
        return self.session.agent("lock", self.owner, f"{age / 2:.3f}")

    def unlock(self) -> None:
        with contextlib.suppress(BoardError, *_TRANSPORT_ERRORS):
            self.session.agent("unlock", self.owner)

    def facts(self) -> dict[str, Any]:
        """The board's facts; a board without the runtime virtualenv stops here."""
        self.note("facts")
        facts = self.session.agent("facts")
        self.result.previous = self.result.live = facts.get("current")
        if not facts.get("runtime_python"):
            raise StepFailed("facts", f"not provisioned (no runtime virtualenv): run "
                                      f"`nativelm fleet provision --boards {self.board}`")
        return facts


class BoardDeploy(BoardJob):
    """The steps of one board's deploy (see the module docstring)."""

    def __init__(self, session: BoardSession, release: LocalRelease, fleet: FleetParams, owner: str,
                 hooks: DeployHooks | None = None, is_leftover: LeftoverCheck | None = None) -> None:
        super().__init__(session, fleet, owner, release.name, hooks, is_leftover)
        self.release = release

    def release_path(self, *parts: str) -> str:
        return self.session.path("releases", self.release.name, *parts)

    def unchanged(self, facts: dict[str, Any]) -> bool:
        """Fast path: the release is live already and its files still verify (outcome "unchanged")."""
        if facts.get("current") != self.release.name:
            return False
        self.note("verify", "already live")
        try:
            self.session.agent("verify", self.release.name)
        except BoardError:
            return False  # damaged on the board: repaired through the normal path
        self.result.outcome, self.result.live = "unchanged", self.release.name
        return True

    def missing_files(self) -> dict[str, int]:
        """{file: bytes still to send} after skipping matching files and linking known ones."""
        self.note("hashes")
        reply = self.session.agent("hashes", self.release.name)
        remote, partial = reply.get("files", {}), reply.get("partial", {})
        missing: dict[str, int] = {}
        for name, local in self.release.files.items():
            if remote.get(name) == local.sha256:
                continue
            if self.link(name, local.sha256):
                continue
            done = partial.get(name, 0)
            missing[name] = local.size - done if 0 <= done <= local.size else local.size
        return missing

    def link(self, name: str, sha256: str) -> bool:
        self.note("link", name)
        linked = bool(self.session.agent("link", self.release.name, name, sha256).get("linked"))
        self.result.files_linked += linked
        return linked

    def check_disk(self, facts: dict[str, Any], missing: dict[str, int]) -> None:
        self.note("disk")
        need_mb = sum(missing.values()) / (1 << 20) + DISK_MARGIN_MB
        have_mb = float(facts.get("free_disk_mb") or 0)
        if missing and have_mb < need_mb:
            raise StepFailed("disk", f"not enough disk: need {need_mb:.0f} MB, have {have_mb:.0f} MB")

    def upload(self, missing: dict[str, int]) -> None:
        """Send what is missing (resuming partial files); a full disk discards the unfinished release."""
        # release.json last: a release folder without it never verifies, whatever else arrived
        for name in sorted(missing, key=lambda n: (n == RELEASE_MANIFEST, n)):
            local = self.release.files[name]
            self.note("upload", name)
            before = local.size - missing[name]

            def progress(sent: int, name: str = name, size: int = local.size, before: int = before) -> None:
                if self.hooks.on_progress:
                    self.hooks.on_progress(self.board, name, before + sent, size)

            try:
                sent = self.session.put_file(local.path, self.release_path(name), progress=progress)
            except BoardError as exc:
                if "no space left" in exc.reason:
                    self.discard()  # give the live release its room back
                raise
            self.result.bytes_sent += sent
            self.result.files_sent += 1

    def discard(self) -> None:
        """Delete the new release's folder (the agent refuses when it is current or previous: then it stays)."""
        with contextlib.suppress(BoardError):
            self.session.agent("discard", self.release.name)

    def verify(self) -> None:
        self.note("verify")
        try:
            self.session.agent("verify", self.release.name)
        except BoardError as exc:
            self.remove_damaged()
            raise StepFailed("verify", exc.reason) from None

    def remove_damaged(self) -> None:
        """Delete every file of the new release whose board copy does not match (it is sent again next time)."""
        remote = self.session.agent("hashes", self.release.name).get("files", {})
        for name, local in self.release.files.items():
            if name in remote and remote[name] != local.sha256:
                self.session.agent("remove", self.release.name, name)
                self.result.extra.setdefault("removed_files", []).append(name)

    def check_new(self) -> None:
        self.note("health", self.release.name)
        failure = self.health(self.release_path())
        if failure is not None:
            self.discard()
            raise StepFailed("health", f"health check failed: {failure}")

    def activate(self, facts: dict[str, Any]) -> bool:
        """Point `current` at the new release; False when it already did (a damaged live release, repaired)."""
        if facts.get("current") == self.release.name:
            self.note("activate", "already current")
            self.result.previous = facts.get("previous")
            return False
        self.note("activate")
        reply = self.session.agent("activate", self.release.name)
        self.result.previous = reply.get("previous")
        self.result.live = reply.get("current", self.release.name)
        return True

    def check_current(self) -> None:
        """Health of the release as served through `current`; restore the previous one on failure."""
        self.note("health-current")
        failure = self.health(self.session.path("current"))
        if failure is None:
            return
        previous = self.result.previous
        if not previous:
            raise StepFailed("health-current", f"health after switch failed: {failure}; "
                                               "no previous release to restore")
        self.note("rollback", previous)
        try:
            reply = self.session.agent("rollback", previous)
        except BoardError as exc:
            raise StepFailed("health-current", f"health after switch failed ({failure}); could not restore "
                                               f"{previous}: {exc.reason}") from None
        self.result.live = reply.get("current", previous)
        raise StepFailed("health-current", f"health after switch failed; restored {previous} ({failure})")

    def prune(self) -> None:
        """Delete old releases; the new one is live already, so a failure here is only noted."""
        self.note("prune")
        try:
            removed = self.session.agent("prune", str(self.fleet.keep_releases)).get("removed", [])
        except BoardError as exc:
            self.result.extra["prune_failed"] = exc.reason
            return
        self.result.extra["pruned"] = list(removed)

    def body(self) -> None:
        # reading needs no lock: a release that is live and verifies is left alone (one connection, 4 round trips)
        if self.unchanged(self.facts()):
            return
        with self.locked():
            facts = self.facts()  # again: another rollout may have changed the board before we held the lock
            if not self.unchanged(facts):
                self.update(facts)

    def update(self, facts: dict[str, Any]) -> None:
        missing = self.missing_files()
        self.check_disk(facts, missing)
        self.upload(missing)
        if self.hooks.after_upload:
            self.hooks.after_upload(self.session)
        self.verify()
        self.check_new()
        if self.hooks.before_activate:
            self.hooks.before_activate(self.session)
        if self.activate(facts):
            self.check_current()
        self.result.outcome = "updated"
        self.prune()


def ensure_agent(session: BoardSession) -> bool:
    """Install or refresh the board agent (F1's provision module does the sha256 comparison)."""
    from nativelm.fleet.provision import ensure_agent as install

    return install(session)


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


def deploy_board(session: BoardSession, release: LocalRelease, fleet: FleetParams, owner: str,
                 hooks: DeployHooks | None = None, is_leftover: LeftoverCheck | None = None) -> BoardResult:
    """Deploy `release` to one connected board; see the module docstring. Never raises for board failures."""
    return BoardDeploy(session, release, fleet, owner, hooks, is_leftover).run()


class BoardRollback(BoardJob):
    """Point `current` back at the previous release (or a named one), checked like a deploy."""

    def __init__(self, session: BoardSession, fleet: FleetParams, owner: str, to: str | None = None,
                 hooks: DeployHooks | None = None, is_leftover: LeftoverCheck | None = None) -> None:
        super().__init__(session, fleet, owner, to or "", hooks, is_leftover)
        self.to = to

    def body(self) -> None:
        with self.locked():
            self.roll_back(self.facts())

    def roll_back(self, facts: dict[str, Any]) -> None:
        target = self.to or facts.get("previous")
        if not target:
            raise StepFailed("rollback", "nothing to roll back to (the board has no previous release)")
        if target == facts.get("current"):
            raise StepFailed("rollback", f"{target} is live already")
        self.note("rollback", target)
        reply = self.session.agent("rollback", target)  # the agent verifies the target's files first
        replaced = reply.get("previous") or facts.get("current")
        self.result.release, self.result.previous = target, replaced
        self.result.live = reply.get("current", target)
        self.note("health-current", target)
        failure = self.health(self.session.path("current"))
        if failure is not None:
            if replaced:
                self.session.agent("rollback", replaced)
                self.result.live = replaced
            raise StepFailed("health-current", f"health after rollback failed; restored {replaced} ({failure})")
        self.result.outcome = "rolled-back"


def rollback_board(session: BoardSession, fleet: FleetParams, owner: str, to: str | None = None,
                   hooks: DeployHooks | None = None, is_leftover: LeftoverCheck | None = None) -> BoardResult:
    """Restore the previous release (or `to`) on one connected board, under its lock; never raises."""
    return BoardRollback(session, fleet, owner, to, hooks, is_leftover).run()


def connect_failure(board: str, exc: BaseException, release: str = "") -> BoardResult:
    """The result of a board that could not be reached or refused our connection."""
    if isinstance(exc, HostKeyError):
        reason = exc.reason if "refused" in exc.reason else f"refused: {exc.reason}"
    elif isinstance(exc, BoardError):
        reason = exc.reason
    else:
        reason = connection_reason(exc)
    return BoardResult(board, "failed", phase="connect", reason=reason, release=release)


def on_board(board: Board, inventory: Inventory, fleet: FleetParams, job: Callable[[BoardSession], BoardResult],
             hooks: DeployHooks | None = None, release: str = "") -> BoardResult:
    """Connect to `board`, run `job` on the session and close it; an unreachable board is a failed result."""
    started = time.perf_counter()
    if hooks and hooks.on_phase:
        hooks.on_phase(board.name, "connect", f"{board.host}:{board.port}")
    session = BoardSession(board, inventory, fleet)
    try:
        session.connect()
    except (BoardError, *_TRANSPORT_ERRORS) as exc:
        result = connect_failure(board.name, exc, release)
    else:
        try:
            result = job(session)
        finally:
            with contextlib.suppress(Exception):
                session.close()
    result.seconds = time.perf_counter() - started  # the connection included
    return result


def deploy_to(board: Board, inventory: Inventory, release: LocalRelease, fleet: FleetParams, owner: str,
              hooks: DeployHooks | None = None, is_leftover: LeftoverCheck | None = None) -> BoardResult:
    """Connect to `board` and deploy `release` there."""
    return on_board(board, inventory, fleet,
                    lambda session: deploy_board(session, release, fleet, owner, hooks, is_leftover),
                    hooks, release.name)


def rollback_on(board: Board, inventory: Inventory, fleet: FleetParams, owner: str, to: str | None = None,
                hooks: DeployHooks | None = None, is_leftover: LeftoverCheck | None = None) -> BoardResult:
    """Connect to `board` and roll it back."""
    return on_board(board, inventory, fleet,
                    lambda session: rollback_board(session, fleet, owner, to, hooks, is_leftover), hooks, to or "")
