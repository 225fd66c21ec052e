"""`nativelm fleet status` in pull mode: what each board last reported to the store (status/<board>.json).

Nothing connects to a board: a pulled fleet may be thousands of boards behind NAT. A board of the
inventory that never reported, or whose last report is older than a heartbeat, a poll period and
its jitter (fleet.pull), is "silent"; a report whose outcome is failed shows its one-line reason (docs/fleet-at-scale.md).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nativelm.fleet.publish import read_channel, store_call, store_client

if TYPE_CHECKING:
    from nativelm.params.fleet import PullParams

BAD = ("failed", "silent", "offline", "busy")


@dataclass(frozen=True)
class PulledBoard:
    board: str
    state: str  # the report's outcome, or "silent"
    current: str | None = None
    previous: str | None = None
    wanted: str | None = None
    serial: int | None = None
    age_s: float | None = None
    reason: str = ""


def read_reports(client: Any, pull: PullParams) -> dict[str, dict[str, Any]]:
    """{board: its last report} for every status/*.json in the bucket (unreadable ones skipped with a reason)."""
    reports: dict[str, dict[str, Any]] = {}
    pages = store_call(pull, "status/", lambda: list(client.get_paginator("list_objects_v2").paginate(
        Bucket=pull.bucket, Prefix="status/")))
    for page in pages:
        for item in page.get("Contents", []):
            key = item["Key"]
            body = store_call(pull, key, lambda key=key: client.get_object(Bucket=pull.bucket, Key=key)["Body"].read(1 << 16))
            name = key.removeprefix("status/").removesuffix(".json")
            try:
                report = json.loads(body)
            except ValueError:
                report = {"outcome": "failed", "reason": f"{key} is not JSON"}
            reports[name] = report if isinstance(report, dict) else {"outcome": "failed", "reason": f"{key}: not an object"}
    return reports


def _age_s(at: Any) -> float | None:
    try:
        moment = datetime.datetime.fromisoformat(str(at))
    except ValueError:
        return None
    return (datetime.datetime.now(datetime.UTC) - moment).total_seconds()


def pulled_status(pull: PullParams, boards: Sequence[str], client: Any = None,
                  others: bool = True) -> tuple[dict | None, list[PulledBoard]]:
    """The channel and one row per board: each of `boards`, then (`others`) any other board that reported."""
    client = client or store_client(pull)
    reports = read_reports(client, pull)
    rows = []
    for name in [*boards, *(sorted(set(reports) - set(boards)) if others else [])]:
        report = reports.get(name)
        if report is None:
            rows.append(PulledBoard(name, "silent", reason="never reported"))
            continue
        age = _age_s(report.get("at"))
        state = str(report.get("outcome", "failed"))
        reason = str(report.get("reason") or "")
        if age is None or age > pull.silent_after_s:
            state, reason = "silent", f"last report {'unknown' if age is None else f'{age / 3600:.1f} h'} ago" + (
                f" ({reason})" if reason else "")
        rows.append(PulledBoard(name, state, report.get("current"), report.get("previous"), report.get("wanted"),
                                report.get("serial"), age, reason))
    return read_channel(client, pull), rows


def channel_line(channel: dict[str, Any]) -> str:
    """One line: the channel's serial, its release on which percent, the others' release, paused."""
    return (f"channel {channel['channel']} serial {channel['serial']}: {channel['release']} on "
            f"{channel['percent']:g}% of boards, others {channel['previous'] or 'keep theirs'}"
            + (" (PAUSED)" if channel["paused"] else ""))


def render_pulled(channel: dict | None, rows: Sequence[PulledBoard]) -> list[str]:
    """The channel line, a table of boards, and counts."""
    head = channel_line(channel) if channel else "channel: never published"
    table = [("BOARD", "STATE", "RELEASE", "PREVIOUS", "WANTS", "SERIAL", "SEEN", "NOTE")]
    for r in rows:
        seen = "-" if r.age_s is None else f"{r.age_s:.0f}s ago"
        table.append((r.board, r.state, r.current or "-", r.previous or "-", r.wanted or "-",
                      "-" if r.serial is None else str(r.serial), seen, r.reason))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = [head] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() + "  " + row[-1] for row in table]
    bad = sum(r.state in BAD for r in rows)
    on = sum(bool(channel) and r.current == r.wanted for r in rows)
    lines.append(f"{len(rows)} boards: {on} on the release the channel wants them on" + (f", {bad} failed or silent" if bad else ""))
    return [line.rstrip() for line in lines]
