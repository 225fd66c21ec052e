"""The rollout plan (waves, one board's step), bench waves, transient vs permanent board failures,
and the format constants the board agent keeps its own copy of."""

from __future__ import annotations

import errno
import json
import re
import socket
from pathlib import Path

import paramiko
import pytest

from nativelm.fleet import agent
from nativelm.fleet.board_job import BoardResult, StepFailed, connect_failure, failures_as_steps
from nativelm.fleet.inventory import Board
from nativelm.fleet.onboard_bench import bench_waves
from nativelm.fleet.rollout import RolloutPlan, Wave, drive_waves, plan_rollout
from nativelm.fleet.ssh import AGENT_REMOTE
from nativelm.fleet.ssh_trust import BoardError, HostKeyError, connection_dropped
from nativelm.formats import release as release_format
from nativelm.params.fleet import RELEASE_PATTERN, FleetParams


def board(name: str, *groups: str, host: str = "127.0.0.1") -> Board:
    return Board(name=name, host=host, port=22, user="nativelm", key="key", groups=list(groups))


def test_the_agent_copies_of_format_constants_match_the_formats() -> None:
    assert agent.RELEASE_MANIFEST == release_format.MANIFEST
    assert agent.RELEASE_PATTERN.pattern == RELEASE_PATTERN.removeprefix("^").removesuffix("$")
    assert AGENT_REMOTE[-1] == agent.AGENT_NAME == "nativelm-agent.pyz"


def test_the_plan_exposes_canary_then_waves_and_one_step_per_board(tmp_path: Path) -> None:
    boards = [board("b1"), board("c1", "canary"), board("b2"), board("b3")]
    release = type("Release", (), {"name": "v3", "version": 3})()
    tried: list[str] = []

    def deploy(b: Board, ctx: object, rel: object) -> BoardResult:
        tried.append(b.name)
        return BoardResult(b.name, "updated", release="v3", live="v3")

    plan = plan_rollout(None, boards, release, FleetParams(max_parallel=2, max_failed_boards=0), tmp_path,
                        deploy=deploy)
    assert isinstance(plan, RolloutPlan) and plan.max_parallel == 2
    assert [(w.name, [b.name for b in w.boards], w.gate) for w in plan.waves] == [
        ("canary", ["c1"], True), ("wave 2", ["b1", "b2"], False), ("wave 3", ["b3"], False)]
    first = plan.attempt(boards[1])  # an attempt is not recorded: a retried board is logged once
    assert first.outcome == "updated" and json.loads(plan.log.path.read_text())["boards"] == []
    ran: list[str] = []

    def run_wave(wave: Wave) -> list[BoardResult]:
        ran.append(wave.name)
        return [plan.step(b) for b in wave.boards]

    result = plan.run(run_wave)
    assert ran == ["canary", "wave 2", "wave 3"] and result.ok and result.finished
    assert [b["board"] for b in json.loads(result.log_path.read_text())["boards"]] == ["c1", "b1", "b2", "b3"]


def test_drive_waves_keeps_the_abort_rules_for_any_executor() -> None:
    waves = [Wave("canary", (board("c1", "canary"),), gate=True), Wave("wave 2", (board("b1"),))]
    results, abort = drive_waves(waves, lambda w: [BoardResult(b.name, "failed") for b in w.boards], 5)
    assert abort == "canary failed on c1" and [r.outcome for r in results] == ["failed", "skipped"]


def test_bench_waves_never_run_two_boards_of_one_host_at_once() -> None:
    sim = [board(f"s{i}") for i in range(3)]
    assert [[b.name for b in w] for w in bench_waves(sim, 4)] == [["s0"], ["s1"], ["s2"]]
    real = [board("a1", host="10.0.0.1"), board("a2", host="10.0.0.1"), board("b1", host="10.0.0.2"),
            board("c1", host="10.0.0.3")]
    assert [[b.name for b in w] for w in bench_waves(real, 2)] == [["a1", "b1"], ["a2", "c1"]]


@pytest.mark.parametrize(("exc", "transient"), [
    (paramiko.ssh_exception.NoValidConnectionsError({("127.0.0.1", 22): ConnectionRefusedError()}), True),
    (socket.timeout("timed out"), True),
    (TimeoutError(), True),
    (EOFError(), True),
    (paramiko.SSHException("Error reading SSH protocol banner"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (OSError("Socket is closed"), True),
    (paramiko.AuthenticationException("denied"), False),
    (socket.gaierror(socket.EAI_NONAME, "unknown"), False),
    (PermissionError(errno.EACCES, "Permission denied"), False),
    (OSError(errno.ENOSPC, "No space left on device"), False),
])
def test_only_connection_failures_are_transient(exc: BaseException, transient: bool) -> None:
    assert connection_dropped(exc) is transient


def test_transient_follows_a_failure_into_the_board_result_but_not_into_the_log() -> None:
    with pytest.raises(StepFailed) as dropped, failures_as_steps(lambda: "upload"):
        raise EOFError()
    assert (dropped.value.phase, dropped.value.transient) == ("upload", True)
    with pytest.raises(StepFailed) as answered, failures_as_steps(lambda: "verify"):
        raise BoardError("b1", "verify", "hash mismatch: model.onnx")
    assert answered.value.transient is False
    refused = connect_failure("b1", BoardError("b1", "connect", "connection refused by 127.0.0.1:22", transient=True))
    assert refused.transient and refused.reason == "connection refused by 127.0.0.1:22"
    host_key = connect_failure("b1", HostKeyError("b1", "host key", "key changed; refused"))
    assert not host_key.transient
    assert not connect_failure("b1", BoardError("b1", "connect", "private key not found: /k")).transient
    assert "transient" not in refused.to_json() and set(refused.to_json()) >= {"board", "outcome", "phase"}
    assert re.fullmatch(RELEASE_PATTERN, "v3")
