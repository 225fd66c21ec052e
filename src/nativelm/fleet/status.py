"""`nativelm fleet status`: each board's reachability, platform, free disk, live release and last benchmark,
and whether the live release is intact and healthy, and which graph its health check ran (OPS:
nativelm:<kernel> on the operator library `nativelm fleet provision` installs, fallback or contrib).

The controller's copy of the agent is piped to the board's Python (`agent(inline=True)`), so boards
that were never provisioned answer too. The live release is checked every time: each file's size
and mtime against the board's verification stamp (cheap), every file hashed when asked
(`verify="full"`) or when the last full check is older than fleet.verify_full_every_s; then its
health check runs (the golden continuation). Damage shows as "damaged", a failing check as
"unhealthy". The only thing written on a board is the stamp's time of its last full check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nativelm.errors import NativelmError
from nativelm.fleet.board_job import health_report
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
    verified: str | None = None  # how the live release was checked: "quick" (size, mtime) or "full" (hashes)
    damage: str | None = None  # what does not match, one line (None: intact, or nothing live)
    unhealthy: str | None = None  # the live release's failing health check, one line
    ops: str | None = None  # the graph the live release's health check ran: nativelm:<kernel>, fallback, contrib

    @property
    def state(self) -> str:
        if not self.reachable:
            return "unreachable"
        return "damaged" if self.damage else "unhealthy" if self.unhealthy else "ok"


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



def check_live(session: BoardSession, release: str, verify: str, runtime: bool) -> dict[str, Any]:
    """The live release checked against its stamp (`verify`), then its health check when it is intact."""
    args = [release, f"{session.fleet.verify_full_every_s:g}", *(["full"] if verify == "full" else [])]
    reply = session.agent("check", *args, inline=True)
    found = {"verified": reply.get("mode"), "damage": None, "unhealthy": None, "ops": None}
    if not reply.get("ok"):
        found["damage"] = "; ".join(reply.get("problems") or ["does not verify"])
    elif runtime:
        found["unhealthy"], report = health_report(session, session.path("current"))
        found["ops"] = report.get("ops")
    return found


def board_status(session: BoardSession, verify: str = "auto") -> BoardStatus:
    """The status of one connected board (BoardError if its Python or the agent fails)."""
    board = session.board
    facts = session.agent("facts", inline=True, timeout=session.fleet.connect_timeout_s * 3)
    lock = facts.get("lock")
    live = check_live(session, facts["current"], verify, bool(facts.get("runtime_python"))) \
        if facts.get("current") else {}
    return BoardStatus(
        board=board.name, address=f"{board.host}:{board.port}", groups=tuple(board.groups), reachable=True,
        arch=facts.get("arch"), python=facts.get("python"), free_disk_mb=facts.get("free_disk_mb"),
        current=facts.get("current"), previous=facts.get("previous"), releases=tuple(facts.get("releases") or ()),
        runtime=_runtime_state(facts, check_packages(session.fleet.runtime_packages)),
        locked_by=lock.get("owner") if isinstance(lock, dict) else None,
        decode_tokens_per_s=bench_figure(facts.get("last_bench")), **live)


def check_board(inv: Inventory, board: Board, fleet: FleetParams, verify: str = "auto") -> BoardStatus:
    """One board's status; BoardError (or NativelmError) when it cannot be asked."""
    with BoardSession(board, inv, fleet) as session:
        return board_status(session, verify)


def unreachable(board: Board, exc: NativelmError) -> BoardStatus:
    """The status of a board that could not be asked: only why (one line)."""
    if isinstance(exc, BoardError):
        reason = exc.reason if exc.phase in ("connect", "host key") else f"{exc.phase}: {exc.reason}"
    else:
        reason = str(exc)
    return BoardStatus(board.name, f"{board.host}:{board.port}", tuple(board.groups), False, reason)


def fleet_status(inv: Inventory, boards: Sequence[Board], fleet: FleetParams,
                 verify: str = "auto") -> list[BoardStatus]:
    """Status of every board, asked in parallel (fleet.max_parallel at once), in inventory order."""

    def one(board: Board) -> BoardStatus:
        try:
            return check_board(inv, board, fleet, verify)
        except NativelmError as exc:
            return unreachable(board, exc)

    return for_each_board(boards, fleet.max_parallel, one)


def _cell(value: object, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render_status(rows: Sequence[BoardStatus]) -> list[str]:
    """A table: one line per board, then a count of reachable boards."""
    header = ("BOARD", "ADDRESS", "STATE", "ARCH", "PYTHON", "FREE_MB", "RELEASE", "PREVIOUS", "RUNTIME",
              "OPS", "DECODE_TOK/S", "NOTE")
    table = [header]
    for r in rows:
        if not r.reachable:
            table.append((r.board, r.address, "unreachable", "-", "-", "-", "-", "-", "-", "-", r.reason or ""))
            continue
        notes = [r.damage, r.unhealthy and f"health check failed: {r.unhealthy}",
                 r.locked_by and f"locked by {r.locked_by}"]
        note = "; ".join(n for n in notes if n)
        table.append((r.board, r.address, r.state, _cell(r.arch), _cell(r.python), _cell(r.free_disk_mb),
                      _cell(r.current), _cell(r.previous), _cell(r.runtime), _cell(r.ops),
                      _cell(r.decode_tokens_per_s, "{:.1f}"), note))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]
    lines = [line.rstrip() for line in lines]
    reachable = sum(r.reachable for r in rows)
    bad = sum(r.state in ("damaged", "unhealthy") for r in rows)
    lines.append(f"{reachable} of {len(rows)} boards reachable" + (f", {bad} damaged or unhealthy" if bad else ""))
    return lines
