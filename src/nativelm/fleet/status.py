"""`nativelm fleet status`: each board's reachability, platform, free disk, live release and last benchmark.

Read-only: the controller's copy of the agent is piped to the board's Python (`agent(inline=True)`),
so boards that were never provisioned answer too and nothing is written on any board.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nativelm.errors import NativelmError
from nativelm.fleet.provision import check_packages, for_each_board
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.ssh_trust import BoardError

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.params.fleet import FleetParams

BENCH_METRIC = "decode_tokens_per_s"  # read from bench/<release>.json (top level, or under "metrics")


@dataclass(frozen=True)
class BoardStatus:
    """One board as seen now; `reachable` False means only `reason` (one line) is known."""

    board: str
    address: str
    groups: tuple[str, ...]
    reachable: bool
    reason: str | None = None
    arch: str | None = None
    python: str | None = None
    free_disk_mb: int | None = None
    current: str | None = None
    previous: str | None = None
    releases: tuple[str, ...] = ()
    runtime: str | None = None  # "ok", "missing", "other pins"
    locked_by: str | None = None
    decode_tokens_per_s: float | None = None


def bench_figure(bench: Any, key: str = BENCH_METRIC) -> float | None:
    """A number from a saved benchmark (top level or under "metrics"), or None."""
    if not isinstance(bench, dict):
        return None
    for holder in (bench, bench.get("metrics")):
        if isinstance(holder, dict) and isinstance(holder.get(key), (int, float)):
            return float(holder[key])
    return None


def _runtime_state(facts: dict, pins: list[str]) -> str:
    if not facts.get("runtime_python"):
        return "missing"
    return "ok" if facts.get("runtime_packages") == pins else "other pins"


def board_status(session: BoardSession) -> BoardStatus:
    """The status of one connected board (BoardError if its Python or the agent fails)."""
    board = session.board
    facts = session.agent("facts", inline=True, timeout=session.fleet.connect_timeout_s * 3)
    lock = facts.get("lock")
    return BoardStatus(
        board=board.name, address=f"{board.host}:{board.port}", groups=tuple(board.groups), reachable=True,
        arch=facts.get("arch"), python=facts.get("python"), free_disk_mb=facts.get("free_disk_mb"),
        current=facts.get("current"), previous=facts.get("previous"), releases=tuple(facts.get("releases") or ()),
        runtime=_runtime_state(facts, check_packages(session.fleet.runtime_packages)),
        locked_by=lock.get("owner") if isinstance(lock, dict) else None,
        decode_tokens_per_s=bench_figure(facts.get("last_bench")))


def check_board(inv: Inventory, board: Board, fleet: FleetParams) -> BoardStatus:
    """One board's status; BoardError (or NativelmError) when it cannot be asked."""
    with BoardSession(board, inv, fleet) as session:
        return board_status(session)


def unreachable(board: Board, exc: NativelmError) -> BoardStatus:
    """The status of a board that could not be asked: only why (one line)."""
    if isinstance(exc, BoardError):
        reason = exc.reason if exc.phase in ("connect", "host key") else f"{exc.phase}: {exc.reason}"
    else:
        reason = str(exc)
    return BoardStatus(board.name, f"{board.host}:{board.port}", tuple(board.groups), False, reason)


def fleet_status(inv: Inventory, boards: Sequence[Board], fleet: FleetParams) -> list[BoardStatus]:
    """Status of every board, asked in parallel (fleet.max_parallel at once), in inventory order."""

    def one(board: Board) -> BoardStatus:
        try:
            return check_board(inv, board, fleet)
        except NativelmError as exc:
            return unreachable(board, exc)

    return for_each_board(boards, fleet.max_parallel, one)


def _cell(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render_status(rows: Sequence[BoardStatus]) -> list[str]:
    """A table: one line per board, then a count of reachable boards."""
    header = ("BOARD", "ADDRESS", "STATE", "ARCH", "PYTHON", "FREE_MB", "RELEASE", "PREVIOUS", "RUNTIME",
              "DECODE_TOK/S", "NOTE")
    table = [header]
    for r in rows:
        if not r.reachable:
            table.append((r.board, r.address, "unreachable", "-", "-", "-", "-", "-", "-", "-", r.reason or ""))
            continue
        note = f"locked by {r.locked_by}" if r.locked_by else ""
        table.append((r.board, r.address, "ok", _cell(r.arch), _cell(r.python), _cell(r.free_disk_mb),
                      _cell(r.current), _cell(r.previous), _cell(r.runtime),
                      _cell(r.decode_tokens_per_s, "{:.1f}"), note))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]
    lines = [line.rstrip() for line in lines]
    reachable = sum(r.reachable for r in rows)
    lines.append(f"{reachable} of {len(rows)} boards reachable")
    return lines
