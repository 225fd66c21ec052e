"""The gate between pull waves: `fleet publish` does not widen a release's wave while too many of the
boards that took it failed (fleet.max_failed_boards, fleet.max_failed_percent: the push rollout's
tolerance, read from the boards' reports in the store; docs/fleet-at-scale.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nativelm.fleet.publish import read_channel
from nativelm.fleet.pull_status import read_reports

if TYPE_CHECKING:
    from nativelm.params.fleet import FleetParams

FAILED = ("failed", "skipped")  # skipped: failed under this channel before, not tried again


def widening_refusal(client: Any, fleet: FleetParams, release: str, percent: float) -> str | None:
    """Why widening `release` to `percent` is refused (None: it may go on); a new release or a narrower wave
    is never refused (rolling back must always be possible)."""
    channel = read_channel(client, fleet.pull)
    if channel is None or channel["release"] != release or percent <= channel["percent"]:
        return None
    took = {name: r for name, r in read_reports(client, fleet.pull).items()
            if r.get("wanted") == release and r.get("channel") == fleet.pull.channel}
    failed = sorted(name for name, r in took.items() if r.get("outcome") in FAILED)
    share = 100 * len(failed) / len(took) if took else 0.0
    if len(failed) <= fleet.max_failed_boards and share <= fleet.max_failed_percent:
        return None
    return (f"not widening {release} to {percent:g}%: {len(failed)} of the {len(took)} boards that reported on it "
            f"failed ({', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}; fleet.max_failed_boards = "
            f"{fleet.max_failed_boards}, fleet.max_failed_percent = {fleet.max_failed_percent:g}); "
            f"`nativelm fleet status` says why; publish the previous release to roll back, or --force")
