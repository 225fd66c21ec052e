"""Who holds a board lock: the controller process (host, pid, start time) recorded in lock/owner.json.

A pid alone cannot tell a dead controller from a live one (pids are reused, and the agent that
wrote the lock exits at once), so the lock records the controller's host, pid and the start time
of that process. A controller on the same host can then see that the holder is gone (no such pid,
or a pid of another, later process) and take the lock over at once; a holder on another host
cannot be checked from here and is only taken over after fleet.lock_stale_s (see docs/fleet.md).
"""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from typing import Any

import psutil

START_TOLERANCE_S = 0.02  # the record keeps 0.01 s; /proc gives create times in clock ticks


@functools.cache
def this_host() -> str:
    """This controller's host name, as a lock holder records it (the agent's HOLDER alphabet)."""
    name = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())
    return name.lstrip("._-")[:253] or "localhost"


def process_start(pid: int) -> float | None:
    """When process `pid` started (epoch seconds), None when there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ValueError):
        return None


def this_holder() -> str:
    """HOST:PID:START_TIME of this process, the HOLDER argument of the agent's `lock`."""
    started = process_start(os.getpid()) or 0.0
    return f"{this_host()}:{os.getpid()}:{started:.2f}"


def parse_holder(text: Any) -> dict[str, Any] | None:
    """{"host", "pid", "started"} of a HOST:PID:START_TIME string (`this_holder`'s form), None if it is not one."""
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    try:
        return {"host": parts[0], "pid": int(parts[1]), "started": float(parts[2])}
    except ValueError:
        return None


@dataclass(frozen=True)
class HolderState:
    """What is known of a lock's holder: `dead` only when this host can prove it; `why` is one line."""

    dead: bool
    local: bool
    why: str


def holder_state(lock: dict[str, Any]) -> HolderState:
    """Whether the controller that holds `lock` (facts' "lock") is gone, seen from this host."""
    host, pid, started = lock.get("host"), lock.get("pid"), lock.get("started")
    if not isinstance(host, str) or not isinstance(pid, int) or not isinstance(started, (int, float)):
        return HolderState(False, False, "the lock does not say which controller holds it")
    if host != this_host():
        return HolderState(False, False, f"its controller runs on host {host} (pid {pid}), not checkable from here")
    now_started = process_start(pid)
    if now_started is None:
        return HolderState(True, True, f"its controller (pid {pid} on {host}) is gone")
    if abs(now_started - float(started)) > START_TOLERANCE_S:
        return HolderState(True, True, f"its controller (pid {pid} on {host}) is gone (the pid is another process now)")
    return HolderState(False, True, f"its controller (pid {pid} on {host}) is running")
