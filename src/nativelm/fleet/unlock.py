"""`nativelm fleet unlock`: clear board locks a rollout left behind, never a live rollout's by accident.

A lock whose holder is known to be gone (its controller ran on this host and that process is no
more, see fleet/holder.py), or that is older than fleet.lock_stale_s, is removed. A lock whose
holder may still be running (alive on this host, or on another host and younger than
fleet.lock_stale_s) is refused with one line, unless `force`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nativelm.errors import NativelmError
from nativelm.fleet.board_job import lock_age_s
from nativelm.fleet.holder import holder_state
from nativelm.fleet.provision import for_each_board
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.ssh_trust import BoardError

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.params.fleet import FleetParams


@dataclass(frozen=True)
class UnlockResult:
    """One board: `outcome` unlocked | not locked | refused | failed, and one line saying why."""

    board: str
    outcome: str
    line: str

    @property
    def ok(self) -> bool:
        return self.outcome in ("unlocked", "not locked")


def unlock_on(session: BoardSession, fleet: FleetParams, force: bool) -> UnlockResult:
    """Remove the lock of one connected board if its holder is gone or stale (or `force`)."""
    name = session.board.name
    lock = session.agent("facts", inline=True).get("lock")
    if not isinstance(lock, dict):
        return UnlockResult(name, "not locked", f"{name}: not locked")
    owner, since = str(lock.get("owner")), lock.get("since")
    state, age = holder_state(lock), lock_age_s(lock)
    stale = age is not None and age > fleet.lock_stale_s
    if not (state.dead or stale or force):
        return UnlockResult(name, "refused", f"{name}: locked by {owner} since {since}: {state.why}; not unlocked "
                                             f"(--force unlocks it anyway)")
    session.agent("unlock", owner, inline=True)
    why = state.why if state.dead else f"older than fleet.lock_stale_s ({fleet.lock_stale_s:g} s)" if stale \
        else f"forced ({state.why})"
    return UnlockResult(name, "unlocked", f"{name}: unlocked the lock of {owner}: {why}")


def unlock(inv: Inventory, boards: Sequence[Board], fleet: FleetParams, force: bool = False) -> list[UnlockResult]:
    """Unlock each board (fleet.max_parallel at once); an unreachable board is a failed result."""

    def one(board: Board) -> UnlockResult:
        try:
            with BoardSession(board, inv, fleet) as session:
                return unlock_on(session, fleet, force)
        except BoardError as exc:
            return UnlockResult(board.name, "failed", f"{board.name}: {exc.phase}: {exc.reason}")
        except NativelmError as exc:
            return UnlockResult(board.name, "failed", f"{board.name}: {exc}")

    return for_each_board(boards, fleet.max_parallel, one)
