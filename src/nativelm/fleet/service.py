"""The fleet's operations that record nothing in MLflow (and never load it), one implementation for
the `nativelm` commands and the Prefect flows: choose boards, health, rollback. Deploy and bench,
which record, are nativelm.fleet.deploy_service.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nativelm.fleet.inventory import Board, Inventory, load_inventory, select_boards
from nativelm.fleet.progress import Progress
from nativelm.fleet.rollout import RolloutPlan, plan_rollback, render_rollout
from nativelm.fleet.rollout_log import RolloutResult
from nativelm.fleet.waves import RunWave
from nativelm.fleet.status import BoardStatus, fleet_status
from nativelm.params.root import Params


@dataclass(frozen=True)
class Console:
    """Where an operation shows what it did: result tables, and notes (the CLI's stderr)."""

    table: Callable[[str], None] = print
    note: Callable[[str], None] = print

    def lines(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.table(line)


PRINT_CONSOLE = Console()  # the default: tables and notes both printed


@dataclass(frozen=True)
class FleetChoice:
    """The inventory and the boards an operation works on."""

    inventory: Inventory
    boards: tuple[Board, ...]


def choose_boards(params: Params, boards: Sequence[str] = (), groups: Sequence[str] = (),
                  inventory: str | None = None) -> FleetChoice:
    """Load the inventory (`inventory`, default fleet.inventory) and select boards by name and group (none: all)."""
    inv = load_inventory(Path(inventory or params.fleet.inventory))
    return FleetChoice(inv, tuple(select_boards(inv, list(boards), list(groups))))


def chosen(args: argparse.Namespace, params: Params) -> FleetChoice:
    """The inventory (--inventory or fleet.inventory) and the boards --boards / --groups select (default all):
    what every fleet command's board options mean."""
    return choose_boards(params, args.boards or (), args.groups or (), args.inventory)


def run_plan(plan: RolloutPlan, console: Console, run_wave: RunWave | None = None) -> RolloutResult:
    """Run a rollout plan and print its summary, also when a signal or an error stopped it (then re-raised)."""
    try:
        result = plan.run(run_wave)
    except BaseException as exc:
        stopped = getattr(exc, "result", None)
        if isinstance(stopped, RolloutResult):
            console.lines(render_rollout(stopped))
        raise
    console.lines(render_rollout(result))
    return result


def rollback(params: Params, choice: FleetChoice, to: str | None = None, progress: Progress | None = None,
             console: Console = PRINT_CONSOLE) -> RolloutResult:
    """Restore the previous release (or `to`) on the chosen boards, up to fleet.max_parallel at once."""
    return run_plan(plan_rollback(choice.inventory, choice.boards, params.fleet, Path(params.stack.state_dir), to=to,
                                  progress=progress), console)


def health(params: Params, choice: FleetChoice, verify: str = "auto") -> list[BoardStatus]:
    """Every chosen board's status (reachability, live release checked and health-checked, last benchmark)."""
    return fleet_status(choice.inventory, choice.boards, params.fleet, verify)


def live_problem(row: BoardStatus) -> str | None:
    """What is wrong with a reachable board's live release (damaged, failing its health check); None: nothing."""
    if row.damage:
        return f"live release {row.current} damaged: {row.damage}"
    return f"live release {row.current} fails its health check: {row.unhealthy}" if row.unhealthy else None


def board_problem(row: BoardStatus) -> str | None:
    """Why a board is unhealthy (unreachable, serving nothing, damaged, failing health), in one line; None: healthy."""
    if not row.reachable:
        return row.reason
    return live_problem(row) or (None if row.current else "no live release")


def unhealthy(rows: Sequence[BoardStatus]) -> list[str]:
    """One line per board that is unreachable or serves nothing."""
    return [f"{row.board}: {problem}" for row in rows if (problem := board_problem(row)) is not None]


def stderr_console() -> Console:
    """The CLI's console: tables on stdout, notes on stderr."""
    return Console(table=print, note=lambda line: print(line, file=sys.stderr))
