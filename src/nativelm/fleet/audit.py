"""What "a fleet you can trust" means, checked: the invariants every board must hold after any fault.

For each board: `current` is a complete release whose every file hashes as release.json says,
and it passes its health check; `previous` (if any) passes its health check too; no lock is left;
and every rollout log of the controller is finished. `nativelm fleet status --verify full` shows
the first of these to an operator; the fault matrix (bench/fleet_faults.py) and
tests/integration/test_fleet_trust.py assert all of them after every trial (docs/fleet.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nativelm.errors import NativelmError
from nativelm.fleet.board_job import health_check
from nativelm.fleet.provision import for_each_board
from nativelm.fleet.rollout_log import log_finished, rollouts_dir
from nativelm.fleet.ssh import BoardSession

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.params.fleet import FleetParams


def board_problems(session: BoardSession) -> list[str]:
    """Every invariant one connected board breaks, one line each (empty: it holds them all)."""
    facts = session.agent("facts")
    problems = []
    current, previous = facts.get("current"), facts.get("previous")
    if not current:
        problems.append("no current release")
    else:
        check = session.agent("check", current, "0", "full")
        if not check.get("ok"):
            problems.append(f"current {current} does not verify: {'; '.join(check.get('problems') or [])}")
        elif (failure := health_check(session, session.path("current"))) is not None:
            problems.append(f"current {current} fails its health check: {failure}")
    if previous and (failure := health_check(session, session.path("previous"))) is not None:
        problems.append(f"previous {previous} fails its health check: {failure}")
    if facts.get("lock"):
        problems.append(f"locked by {facts['lock'].get('owner')}")
    return problems


def unfinished_logs(state_dir: Path) -> list[str]:
    """Rollout logs of this controller that are not finished."""
    return [path.stem for path in sorted(rollouts_dir(state_dir).glob("*.json"))
            if not log_finished(state_dir, path.stem)]


def audit(inv: Inventory, boards: Sequence[Board], fleet: FleetParams, state_dir: Path) -> list[str]:
    """Every broken invariant of the fleet: "board: problem" lines, then "log ID: not finished" lines."""

    def one(board: Board) -> list[str]:
        try:
            with BoardSession(board, inv, fleet) as session:
                return [f"{board.name}: {p}" for p in board_problems(session)]
        except NativelmError as exc:
            return [f"{board.name}: cannot be checked: {exc}"]

    lines = [line for found in for_each_board(boards, fleet.max_parallel, one) for line in found]
    return lines + [f"log {rid}: not finished" for rid in unfinished_logs(state_dir)]
