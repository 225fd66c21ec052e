"""`pull [START]`: one poll of the object store in pull mode (docs/fleet-at-scale.md).

Run by the board's own timer (systemd or cron), never by the controller. Each poll: a conditional
GET of the channel (304 when unchanged: one request, no body); a changed channel is verified (its
signature in the channel namespace, a serial not older than the last one followed). The release the
channel wants for this board is fetched (`pull_fetch`) and goes through the steps a push rollout
drives over SSH, with the same agent code: `verify` (hashes, signature, seal), the release's own
health check, `activate`, health through `current` (failure: `restore`), `prune`, under the
board's rollout lock. Whatever happens the board keeps a verified release live. The outcome is
reported as status/<board>.json in the store, when it changed or once `heartbeat_s` has passed.
START `jittered` (the default, what the timer runs) first sleeps a random part of `jitter_s`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import CHANNEL_NAMESPACE, RUNTIME, AgentError
from .channel import parse_channel, wanted_release
from .files import Layout, read_json, write_atomic
from .lock import cmd_lock, cmd_unlock
from .pull_fetch import PullConfig, discard_quietly, fetch_release, open_store, read_config, read_small_json
from .releases import cmd_activate, cmd_check, cmd_prune, cmd_restore
from .signature import check_signed
from .store import Store, StoreDown

STATE = "state.json"
CHANNEL_FILE = "channel.json"
HEALTH_TIMEOUT_S = 600
LOCK_STALE_S = 3600
FULL_CHECK_EVERY_S = 86400  # the live release's files are all hashed once a day (else size and mtime)
Health = Callable[[Layout, Path], "str | None"]  # a release folder -> None (passed) or the failure line


def runtime_health(lay: Layout, folder: Path) -> str | None:
    """The release's own health check (its golden continuation), as a push rollout runs it."""
    argv = [str(lay.venv / "bin" / "python"), str(folder / RUNTIME), "health", "--model", str(folder)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=HEALTH_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run the health check: {exc}"
    if done.returncode == 0:
        return None
    lines = (done.stderr or done.stdout).strip().splitlines()
    return (lines[-1] if lines else f"exit status {done.returncode}").removeprefix("error: ")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017


@contextlib.contextmanager
def _one_poll_at_a_time(lay: Layout) -> Iterator[bool]:
    """True while this process is the board's only poll (a slow poll and the next timer tick overlap)."""
    lay.pull.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(lay.pull / ".poll.mutex"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def fetch_channel(store: Store, lay: Layout, config: PullConfig, state: dict[str, Any]) -> dict[str, Any]:
    """The channel, verified; the board's saved copy when the store says it did not change (304)."""
    key = f"channels/{config.channel}.json"
    saved = lay.pull / CHANNEL_FILE
    reply = store.get(key, 1 << 16, state.get("etag") if saved.is_file() else None)
    if reply.status == 304:
        return parse_channel(read_json(saved), config.channel)
    signature = store.get(key + ".sig", 1 << 16)
    incoming = lay.pull / "incoming" / CHANNEL_FILE  # verified before it replaces the saved copy
    write_atomic(incoming, reply.body)
    write_atomic(incoming.with_name(CHANNEL_FILE + ".sig"), signature.body)
    what = f"channel {config.channel}"
    check_signed(lay, incoming, incoming.with_name(CHANNEL_FILE + ".sig"), CHANNEL_NAMESPACE, what)
    channel = parse_channel(read_small_json(reply.body, what), config.channel)
    followed = _followed_serial(lay, config, state)
    if channel["serial"] < followed:
        raise AgentError(f"{what} refused: serial {channel['serial']} is older than serial {followed} "
                         "this board already followed (a replayed channel)")
    os.replace(incoming.with_name(CHANNEL_FILE + ".sig"), saved.with_name(CHANNEL_FILE + ".sig"))
    os.replace(incoming, saved)
    state.update(serial=channel["serial"], etag=reply.etag)
    return channel


def _followed_serial(lay: Layout, config: PullConfig, state: dict[str, Any]) -> int:
    """The highest channel serial this board followed: its state's, or its saved channel's if the state was lost."""
    followed = state.get("serial")
    followed = followed if isinstance(followed, int) else 0
    try:
        return max(followed, parse_channel(read_json(lay.pull / CHANNEL_FILE), config.channel)["serial"])
    except AgentError:
        return followed


def switch_to(store: Store, lay: Layout, config: PullConfig, release: str, health: Health) -> dict[str, Any]:
    """verify -> health -> activate -> health of `current` (restore on failure) -> prune; raises one line."""
    before = (lay.link_target(lay.current), lay.link_target(lay.previous))
    fetched = fetch_release(store, lay, release)
    failure = health(lay, lay.release(release))
    if failure is not None:
        discard_quietly(lay, release)
        raise AgentError(f"release {release} refused: health check failed: {failure}")
    cmd_activate(lay, release)
    failure = health(lay, lay.current)
    if failure is not None:
        if before[0] is None:
            raise AgentError(f"release {release} failed its health check after the switch ({failure}); "
                             "nothing to restore")
        cmd_restore(lay, before[0], before[1])
        raise AgentError(f"release {release} failed its health check after the switch ({failure}); "
                         f"restored {before[0]}")
    pruned = cmd_prune(lay, config.keep)["removed"]
    return {**fetched, "pruned": pruned}


def _read_state(lay: Layout) -> dict[str, Any]:
    """What earlier polls remembered (serial, ETag, a failed release, the last report); a damaged file is
    forgotten (the next channel is fetched and verified in full; the saved channel keeps its serial)."""
    try:
        state = read_json(lay.pull / STATE)
    except AgentError:
        state = None
    return state if isinstance(state, dict) else {}


def poll(lay: Layout, config: PullConfig, health: Health = runtime_health) -> dict[str, Any]:
    """One poll; the report (outcome: unchanged, updated, repaired, paused, skipped, offline, busy, failed). Never raises
    for what the store or the release does: that is the report's `reason`."""
    state = _read_state(lay)
    store = open_store(lay, config)
    report: dict[str, Any] = {"board": config.board, "channel": config.channel, "outcome": "unchanged"}
    try:
        channel = fetch_channel(store, lay, config, state)
        report.update(serial=channel["serial"], wanted=wanted_release(channel, config.board))
        wanted, current = report["wanted"], lay.link_target(lay.current)
        failed_before = state.get("failed") == [wanted, channel["serial"]]
        if channel["paused"]:
            report["outcome"] = "paused"
        elif wanted is None:
            pass
        elif wanted == current:
            damage = cmd_check(lay, current, FULL_CHECK_EVERY_S)["problems"]  # size + mtime; every hash daily
            if damage:  # the files that differ are fetched again, then the usual checks
                repair = _update(store, lay, config, wanted, health, state)
                report.update(repair, damage="; ".join(damage))
                if repair["outcome"] == "updated":
                    report["outcome"] = "repaired"
        elif failed_before:  # tried under this very channel: not again until something is published
            report.update(outcome="skipped", reason=f"{wanted} failed here before: {state.get('failed_reason')}")
        else:
            report.update(_update(store, lay, config, wanted, health, state))
    except StoreDown as exc:
        report.update(outcome="offline", reason=str(exc))
    except AgentError as exc:
        report.update(outcome="failed", reason=str(exc))
    report.update(current=lay.link_target(lay.current), previous=lay.link_target(lay.previous), at=_now())
    _report(store, config, state, report)
    report.update(requests=store.requests, bytes=store.bytes_in)
    write_atomic(lay.pull / STATE, json.dumps(state, indent=1).encode())
    return report


def _update(store: Store, lay: Layout, config: PullConfig, wanted: str, health: Health,
            state: dict[str, Any]) -> dict[str, Any]:
    """Switch to `wanted` under the board lock; a failure is remembered for this channel serial."""
    owner = f"pull-{config.board}"
    try:
        cmd_lock(lay, owner, LOCK_STALE_S)
    except AgentError as exc:
        return {"outcome": "busy", "reason": f"lock: {exc}"}
    try:
        done = switch_to(store, lay, config, wanted, health)
    except StoreDown:
        raise
    except AgentError as exc:
        state.update(failed=[wanted, state.get("serial")], failed_reason=str(exc))
        raise
    finally:
        cmd_unlock(lay, owner)
    state.pop("failed", None)
    return {"outcome": "updated", "fetched_bytes": done["bytes"], "fetched_files": done["files"],
            "copied_files": done["copied"]}


def _report(store: Store, config: PullConfig, state: dict[str, Any], report: dict[str, Any]) -> None:
    """PUT status/<board>.json when what it says changed, or once heartbeat_s has passed."""
    said = {k: report.get(k) for k in ("outcome", "reason", "current", "previous", "serial", "wanted")}
    before = state.get("reported")
    if said["outcome"] == "unchanged" and isinstance(before, dict):
        said["outcome"] = before.get("outcome")  # steady state: the last reported event still holds
    due = time.time() - float(state.get("reported_at", 0)) >= config.heartbeat_s
    if said == before and not due:
        report["reported"] = False
        return
    try:
        store.put(f"status/{config.board}.json", json.dumps(report, sort_keys=True).encode("utf-8"))
    except AgentError as exc:  # the store is down or refused us: said next time
        report.update(reported=False, report_error=str(exc))
        return
    state.update(reported=said, reported_at=time.time())
    report["reported"] = True


def pull_once(lay: Layout, start: str = "jittered") -> dict[str, Any]:
    """The agent's `pull [START]` (registered in cli.py): the poll, after the jitter; a failure raised as one line."""
    config = read_config(lay)
    if start == "jittered" and config.jitter_s > 0:
        time.sleep(random.uniform(0, config.jitter_s))  # noqa: S311 - spreading load, not a secret
    with _one_poll_at_a_time(lay) as alone:
        if not alone:
            return {"board": config.board, "outcome": "busy", "reason": "another poll is running"}
        report = poll(lay, config)
    if report["outcome"] == "failed":
        raise AgentError(report["reason"])
    return report


