"""The rollout lock of a board: lock/ with owner.json inside, taken over when stale.

owner.json records the rollout (`owner`), when it locked (`since`) and, given as HOLDER, the
controller process that holds it: its `host`, `pid` and process start time `started` (a pid alone
can be reused). The controller, not this agent, tells a dead holder from a live one: only it knows
its own host's processes (see fleet/holder.py).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import AgentError, command
from .files import Layout, read_json, remove_tree, write_atomic


def lock_owner(lay: Layout) -> dict[str, Any] | None:
    """owner.json of the lock, {"owner": "unknown", ...} for a lock without one, None when unlocked."""
    if not lay.lock.is_dir():
        return None
    with contextlib.suppress(AgentError):
        owner = read_json(lay.lock / "owner.json")
        if isinstance(owner, dict) and isinstance(owner.get("owner"), str) and isinstance(owner.get("since"), str):
            return owner
    try:
        since = lay.lock.stat().st_mtime
    except FileNotFoundError:
        return None
    return {"owner": "unknown", "since": _iso(since)}


def _iso(epoch: float) -> str:
    utc = datetime.timezone.utc  # noqa: UP017 - datetime.UTC is Python 3.11+
    return datetime.datetime.fromtimestamp(epoch, utc).isoformat(timespec="seconds")


def _age_s(since: str) -> float:
    try:
        then = datetime.datetime.fromisoformat(since).timestamp()
    except ValueError:
        return float("inf")  # unreadable: treat as stale
    return time.time() - then


@contextlib.contextmanager
def _lock_mutex(lay: Layout) -> Iterator[None]:
    """Serialise lock/unlock on this board (flock: released by the kernel even if the agent dies)."""
    lay.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(lay.root / ".lock.mutex"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_lock(lay: Layout, owner: str, holder: str | None) -> None:
    """Create lock/ with owner.json already inside (built aside, then renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=".lock.", dir=str(lay.root)))
    try:
        payload: dict[str, Any] = {"owner": owner, "since": _iso(time.time())}
        if holder is not None:
            host, pid, started = holder.split(":")
            payload.update(host=host, pid=int(pid), started=float(started))
        write_atomic(tmp / "owner.json", json.dumps(payload).encode())
        os.rename(str(tmp), str(lay.lock))
    finally:
        shutil.rmtree(str(tmp), ignore_errors=True)


@command("lock OWNER STALE_S [HOLDER]")
def cmd_lock(lay: Layout, owner: str, stale_s: float, holder: str | None = None) -> dict[str, Any]:
    with _lock_mutex(lay):
        held = lock_owner(lay)
        if held is not None and held["owner"] == owner:
            return {"locked": True, "took_over": False}
        if held is not None and _age_s(held["since"]) < stale_s:
            raise AgentError("locked by {} since {}".format(held["owner"], held["since"]))
        if held is not None:
            remove_tree(lay.lock)  # stale: its rollout died
        _write_lock(lay, owner, holder)
        return {"locked": True, "took_over": held is not None}


@command("unlock OWNER")
def cmd_unlock(lay: Layout, owner: str) -> dict[str, Any]:
    with _lock_mutex(lay):
        held = lock_owner(lay)
        if held is None or held["owner"] != owner:
            return {"unlocked": False}
        remove_tree(lay.lock)
        return {"unlocked": True}
