"""Trying a release on boards without serving it: upload, verify, health check, benchmark, remove.

    connect -> agent -> lock -> facts -> sign -> hashes -> link / upload -> disk check -> verify
    -> health of the release -> the runtime's bench on its folder -> discard -> unlock

`nativelm study` measures each row's decode speed on the boards this way. The steps up to the health
check are the deploy's own (`fleet/deploy.py`); `current` and `previous` never move, and the release
folder is removed afterwards unless the board already had it as `current` or `previous` (then it is
benchmarked where it is and left alone). Boards of one host are measured one after the other
(`onboard_bench.bench_fleet`), as `nativelm bench` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nativelm.fleet.board_job import BoardResult, on_board
from nativelm.fleet.deploy import BoardDeploy
from nativelm.fleet.onboard_bench import BenchRow, bench_fleet, run_bench
from nativelm.fleet.rollout import board_context
from nativelm.fleet.rollout_log import new_rollout_id

if TYPE_CHECKING:
    from nativelm.fleet.board_job import BoardContext
    from nativelm.fleet.inventory import Board
    from nativelm.fleet.release import LocalRelease
    from nativelm.fleet.service import FleetChoice
    from nativelm.params.root import Params


class BoardTrial(BoardDeploy):
    """One board's trial of a release (see the module docstring); the figures go to `result.extra["bench"]`."""

    def body(self) -> None:
        with self.locked():
            facts = self.facts()
            self.result.extra["arch"] = facts.get("arch")
            kept = self.release.name in (facts.get("current"), facts.get("previous"))
            try:
                if not kept:
                    missing = self.missing_files()
                    self.check_disk(facts, missing)
                    self.upload(missing)
                    self.verify()
                    self.check_new()
                self.bench()
            finally:
                if not kept:
                    self.discard()
        self.result.outcome = "tried"

    def bench(self) -> None:
        self.note("bench")
        self.result.extra["bench"] = run_bench(self.session, self.release.name, self.ctx.fleet)


def trial_on(board: Board, ctx: BoardContext, release: LocalRelease) -> BoardResult:
    """Connect to `board` and try `release` there; never raises for board failures."""
    return on_board(board, ctx, lambda session: BoardTrial(session, ctx, release).run(), release.name)


def as_bench_row(result: BoardResult) -> BenchRow:
    """A trial's result as the on-board benchmark's row (figures, or "phase: reason")."""
    extra: dict[str, Any] = result.extra
    return BenchRow(result.board, result.release, extra.get("arch"), dict(extra.get("bench") or {}),
                    None if result.outcome == "tried" else f"{result.phase}: {result.reason}")


def try_release(params: Params, choice: FleetChoice, release: LocalRelease,
                boards: Sequence[Board] | None = None) -> list[BenchRow]:
    """Benchmark `release` on the chosen boards (all of `choice` by default) without making it live."""
    chosen = list(choice.boards if boards is None else boards)
    ctx = board_context(choice.inventory, params.fleet, Path(params.stack.state_dir), new_rollout_id("trial"),
                        None, None)
    return bench_fleet(choice.inventory, chosen, params.fleet,
                       bench_one=lambda b: as_bench_row(trial_on(b, ctx, release)))
