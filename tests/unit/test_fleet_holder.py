"""Telling a dead lock holder from a live one: the controller's host, pid and process start time."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from nativelm.fleet.holder import holder_state, this_holder, this_host


def holder(host: str, pid: int, started: float) -> dict:
    return {"owner": "rollout-x", "since": "2026-01-01T00:00:00+00:00", "host": host, "pid": pid, "started": started}


def test_this_process_is_a_live_holder() -> None:
    host, pid, started = this_holder().split(":")
    assert (host, int(pid)) == (this_host(), os.getpid())
    state = holder_state(holder(host, int(pid), float(started)))
    assert (state.dead, state.local) == (False, True) and "is running" in state.why


def test_an_exited_process_is_a_dead_holder() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    started = psutil.Process(child.pid).create_time()
    alive = holder_state(holder(this_host(), child.pid, started))
    child.communicate(b"")
    gone = holder_state(holder(this_host(), child.pid, started))
    assert (alive.dead, gone.dead) == (False, True)
    assert gone.why == f"its controller (pid {child.pid} on {this_host()}) is gone"


def test_a_reused_pid_is_a_dead_holder() -> None:
    started = psutil.Process(os.getpid()).create_time()
    state = holder_state(holder(this_host(), os.getpid(), started - 60))  # the pid now belongs to a later process
    assert state.dead and "the pid is another process now" in state.why


def test_a_holder_on_another_host_or_unrecorded_is_never_declared_dead() -> None:
    other = holder_state(holder("elsewhere.example", 1, 1.0))
    assert (other.dead, other.local) == (False, False) and "host elsewhere.example" in other.why
    old_style = holder_state({"owner": "rollout-x", "since": "2026-01-01T00:00:00+00:00", "pid": 123})
    assert not old_style.dead and old_style.why == "the lock does not say which controller holds it"
