"""A pull channel: which release each part of the fleet runs (docs/fleet-at-scale.md).

``channels/<name>.json`` in the store, signed by the release key in its own namespace
(``channels/<name>.json.sig``, `ssh-keygen -Y sign -n nativelm-channel`)::

    {"format": "nativelm-channel/1", "channel": "stable", "serial": 17, "paused": false,
     "release": "v4", "percent": 10, "previous": "v3"}

A board whose wave position (a stable hash of its name: 0 <= position < 100) is below `percent`
runs `release`, every other board runs `previous` (null: keeps what it has). Raising `percent`
(10 -> 50 -> 100) widens the wave without reshuffling it: a board that took the release stays in.
`paused` stops every board where it is. `serial` only grows: a board refuses a channel older than
one it already followed, so an old signed channel cannot be replayed to downgrade it.

Shared by the board agent and the controller (`nativelm fleet publish`): standard library only.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from . import RELEASE_PATTERN, AgentError

CHANNEL_FORMAT = "nativelm-channel/1"
_KEYS = {"format", "channel", "serial", "paused", "release", "percent", "previous"}


def wave_position(board: str) -> float:
    """Where `board` stands in every ramp, in [0, 100): the same on the board and the controller, every time."""
    digest = hashlib.sha256(("nativelm-wave:" + board).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def in_wave(board: str, percent: float) -> bool:
    """True when `board` belongs to the first `percent` percent of any fleet."""
    return wave_position(board) < percent


def wanted_release(channel: dict[str, Any], board: str) -> str | None:
    """The release `board` should run under `channel` (None: keep what it has)."""
    return channel["release"] if in_wave(board, channel["percent"]) else channel["previous"]


def _release_or_none(value: Any, key: str, name: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not RELEASE_PATTERN.fullmatch(value):
        raise AgentError(f"channel {name} refused: {key} {value!r} is not a release name")
    return value


def parse_channel(data: Any, name: str) -> dict[str, Any]:
    """A channel document checked field by field; one `channel NAME refused: ...` line otherwise."""
    if not isinstance(data, dict) or data.get("format") != CHANNEL_FORMAT:
        raise AgentError(f"channel {name} refused: format is not {CHANNEL_FORMAT!r}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise AgentError(f"channel {name} refused: unknown keys {unknown}")
    if data.get("channel") != name:
        raise AgentError(f"channel {name} refused: it names channel {data.get('channel')!r}")
    serial, percent, paused = data.get("serial"), data.get("percent"), data.get("paused")
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 < serial < 2**63:
        raise AgentError(f"channel {name} refused: serial {serial!r} is not a positive integer")
    if not isinstance(percent, (int, float)) or isinstance(percent, bool) or not math.isfinite(percent) \
            or not 0 <= percent <= 100:
        raise AgentError(f"channel {name} refused: percent {percent!r} is not a number in 0..100")
    if not isinstance(paused, bool):
        raise AgentError(f"channel {name} refused: paused {paused!r} is not true or false")
    release = _release_or_none(data.get("release"), "release", name)
    if release is None:
        raise AgentError(f"channel {name} refused: it names no release")
    return {"format": CHANNEL_FORMAT, "channel": name, "serial": serial, "paused": paused, "release": release,
            "percent": float(percent), "previous": _release_or_none(data.get("previous"), "previous", name)}
