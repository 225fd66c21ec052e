"""The gate after a rollout wave: each updated board's on-board benchmark against the previous release's.

A board's deploy notes the decode speed the board saved for the release it replaced
(``bench/<release>.json``, `extra["previous_decode_tokens_per_s"]`). After the wave the updated boards
are benchmarked on the new release (`onboard_bench.bench_fleet`, saved on the board like `nativelm
bench`); a board slower than the previous figure by more than ``fleet.gate_max_slowdown``, or whose
benchmark fails, becomes a failed board (phase "gate") and counts against the failure tolerance. It
keeps serving the new release: `nativelm rollback` restores the previous one (docs/fleet.md).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    from nativelm.fleet.board_job import BoardResult
    from nativelm.fleet.inventory import Inventory
    from nativelm.fleet.onboard_bench import BenchRow
    from nativelm.fleet.waves import Wave
    from nativelm.params.fleet import FleetParams

PREVIOUS_DECODE = "previous_decode_tokens_per_s"


def slowdown_failure(before: float | None, after: float | None, max_slowdown: float) -> str | None:
    """Why a decode speed of `after` tokens/s fails the gate against `before` (None: it passes or is unknown)."""
    if before is None or before <= 0 or after is None:
        return None
    slower = 1 - after / before
    if slower > max_slowdown:
        return (f"decode {after:.1f} tok/s is {slower:.0%} slower than the previous release's {before:.1f} "
                f"(fleet.gate_max_slowdown = {max_slowdown:g})")
    return None


def gate_result(result: BoardResult, row: BenchRow, max_slowdown: float) -> BoardResult:
    """`result` after its board's gate benchmark `row`: unchanged when it passes, else failed in phase "gate"."""
    after = row.value("decode_tokens_per_s")
    reason = (f"benchmark failed: {row.error}" if row.error else
              slowdown_failure(result.extra.get(PREVIOUS_DECODE), after, max_slowdown))
    extra = {**result.extra, "gate_decode_tokens_per_s": after}
    if reason is None:
        return dataclasses.replace(result, extra=extra)
    return dataclasses.replace(result, outcome="failed", phase="gate", reason=reason, extra=extra)


def bench_gate(inventory: Inventory, fleet: FleetParams) -> Callable[[Wave, list[BoardResult]], list[BoardResult]]:
    """The gate of `waves.StopRules`: benchmark a wave's updated boards and fail those too slow."""
    max_slowdown = fleet.gate_max_slowdown or 0.0

    def gate(wave: Wave, results: list[BoardResult]) -> list[BoardResult]:
        updated = [b for b, r in zip(wave.boards, results) if r.outcome == "updated"]
        from nativelm.fleet.onboard_bench import bench_fleet  # MLflow: only once a gate runs

        rows = {row.board: row for row in bench_fleet(inventory, updated, fleet)} if updated else {}
        return [gate_result(r, rows[r.board], max_slowdown) if r.board in rows else r for r in results]

    return gate
