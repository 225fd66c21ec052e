"""One board's part of a rollout: a state machine that never leaves a board without a verified release.

    connect -> agent -> facts -> (live already and verifies: "unchanged", done)
    -> lock -> facts -> sign -> hashes -> link / upload (resumed) -> disk check -> verify
    -> health of the new release -> activate -> health of `current` (failure: restore) -> prune -> unlock

Every step runs on the board through the agent (`fleet/agent/`) or the release's own runtime;
`current` only moves in `activate`, after the new release's files verified and its golden
continuation matched, so any failure before that leaves the previous release live untouched, and a
failure after it restores both links as they were (`previous` is always the last release that
passed its health check, never the one that just failed). The board's verify also checks
release.json's signature (fleet/signing.py): an unsigned or wrongly signed release is never live. A release that verifies is sealed
read-only on the board; files shared with another release are copies (copy-on-write where the
filesystem can), never hard links, so damage to one release cannot reach another. Each failure is
recorded as (phase, one-line reason) in the `BoardResult`. A lock left behind by a finished rollout
of this controller (its connection dropped before it could unlock), or held by a controller of
this host that is gone, is taken over at once; any other lock stops the board with "locked by ..."
(see docs/fleet.md). An interrupted rollout stops each board at its next step (fleet/stopping.py).

Boards must be provisioned (`nativelm fleet provision`): a board without the runtime virtualenv
fails in phase "facts" with the command that fixes it, instead of a slow install mid-rollout.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nativelm.fleet.board_job import BoardContext, BoardJob, BoardResult, StepFailed, on_board
from nativelm.fleet.signing import SigningError, signed
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.ssh_trust import BoardError
from nativelm.fleet.status import bench_figure
from nativelm.fleet.wave_gate import PREVIOUS_DECODE
from nativelm.formats.release import MANIFEST as RELEASE_MANIFEST

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board
    from nativelm.fleet.release import LocalRelease

# room left on a board's disk beyond the bytes a rollout still has to send
DISK_MARGIN_MB = 16


class BoardDeploy(BoardJob):
    """The steps of one board's deploy (see the module docstring)."""

    def __init__(self, session: BoardSession, ctx: BoardContext, release: LocalRelease) -> None:
        super().__init__(session, ctx, release.name)
        self.release = release

    def sign(self) -> None:
        """Sign the manifest (fleet.signing_key) before anything is sent: boards refuse unsigned releases."""
        self.note("sign")
        try:
            self.release = signed(self.release, Path(self.ctx.fleet.signing_key))
        except SigningError as exc:
            raise StepFailed("sign", str(exc)) from None

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
        self.clear_left_behind(facts)
        return True

    def missing_files(self) -> dict[str, int]:
        """{file: bytes still to send} after skipping matching files and linking known ones."""
        self.sign()
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
                self.check_stop()  # an interrupted rollout stops mid-file (the upload resumes next time)
                if self.ctx.hooks.on_progress:
                    self.ctx.hooks.on_progress(self.board, name, before + sent, size)

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
        self.switched = True
        reply = self.session.agent("activate", self.release.name)
        self.result.previous = reply.get("previous")
        self.result.live = reply.get("current", self.release.name)
        return True

    def check_current(self, before: dict[str, Any]) -> None:
        """Health of the release as served through `current`; on failure restore what was live before
        (`before`: the facts read under the lock), `previous` included, so the failed release is neither."""
        self.note("health-current")
        failure = self.health(self.session.path("current"))
        if failure is None:
            return
        self.restore(before.get("current"), before.get("previous"), f"health after switch failed: {failure}")

    def prune(self) -> None:
        """Delete old releases; the new one is live already, so a failure here is only noted."""
        self.note("prune")
        try:
            removed = self.session.agent("prune", str(self.ctx.fleet.keep_releases)).get("removed", [])
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
        self.result.extra[PREVIOUS_DECODE] = bench_figure(facts.get("last_bench"))  # for the wave gate
        missing = self.missing_files()
        self.check_disk(facts, missing)
        self.upload(missing)
        if self.ctx.hooks.after_upload:
            self.ctx.hooks.after_upload(self.session)
        self.verify()
        self.check_new()
        if self.ctx.hooks.before_activate:
            self.ctx.hooks.before_activate(self.session)
        if self.activate(facts):
            self.check_current(facts)
        self.result.outcome = "updated"
        self.prune()


class BoardRollback(BoardJob):
    """Point `current` back at the previous release (or a named one), checked like a deploy."""

    def __init__(self, session: BoardSession, ctx: BoardContext, to: str | None = None) -> None:
        super().__init__(session, ctx, to or "")
        self.to = to

    def body(self) -> None:
        with self.locked():
            self.roll_back(self.facts())

    def roll_back(self, facts: dict[str, Any]) -> None:
        """Verify the target's files and run its health check BEFORE switching; a target failing
        either is never made live (the board keeps what it had)."""
        target = self.to or facts.get("previous")
        if not target:
            raise StepFailed("rollback", "nothing to roll back to (the board has no previous release)")
        if target == facts.get("current"):
            raise StepFailed("rollback", f"{target} is live already")
        self.result.release = target
        self.note("verify", target)
        try:
            self.session.agent("verify", target)
        except BoardError as exc:
            raise StepFailed("verify", f"{target} does not verify ({exc.reason}); "
                                       f"{facts.get('current') or 'nothing'} stays live") from None
        self.note("health", target)
        failure = self.health(self.session.path("releases", target))
        if failure is not None:
            raise StepFailed("health", f"{target} fails its health check ({failure}); "
                                       f"{facts.get('current') or 'nothing'} stays live")
        self.note("rollback", target)
        self.switched = True
        reply = self.session.agent("rollback", target)  # verified again by the agent, under our lock
        self.result.previous = reply.get("previous") or facts.get("current")
        self.result.live = reply.get("current", target)
        self.note("health-current", target)
        failure = self.health(self.session.path("current"))
        if failure is not None:
            self.restore(facts.get("current"), facts.get("previous"), f"health after rollback failed: {failure}")
        self.result.outcome = "rolled-back"


def deploy_to(board: Board, ctx: BoardContext, release: LocalRelease) -> BoardResult:
    """Connect to `board` and deploy `release` there; see the module docstring. Never raises for board failures."""
    return on_board(board, ctx, lambda session: BoardDeploy(session, ctx, release).run(), release.name)


def rollback_on(board: Board, ctx: BoardContext, to: str | None = None) -> BoardResult:
    """Connect to `board` and restore its previous release (or `to`), under its lock; never raises."""
    return on_board(board, ctx, lambda session: BoardRollback(session, ctx, to).run(), to or "")
