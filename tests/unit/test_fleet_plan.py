"""The rollout plan (waves, one board's step), bench waves, transient vs permanent board failures,
and the format constants the board agent keeps its own copy of."""

from __future__ import annotations

import errno
import json
import re
import socket
import threading
from pathlib import Path

import paramiko
import pytest

from nativelm.fleet import agent
from nativelm.fleet.board_job import BoardResult, StepFailed, connect_failure, failures_as_steps
from nativelm.fleet.inventory import Board
from nativelm.fleet.onboard_bench import bench_waves
from nativelm.fleet.onboard_bench import BenchRow
from nativelm.fleet.rollout import RolloutPlan, plan_rollout
from nativelm.fleet.waves import StopRules, Wave, drive_waves, plan_waves, run_waves, wave_ends
from nativelm.fleet.wave_gate import PREVIOUS_DECODE, gate_result
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
    results, abort = drive_waves(waves, lambda w: [BoardResult(b.name, "failed") for b in w.boards], StopRules(5))
    assert abort == "canary failed on c1" and [r.outcome for r in results] == ["failed", "skipped"]


@pytest.mark.parametrize(("count", "percents", "ends"), [
    (10, [10, 50, 100], [1, 5, 10]),
    (3, [10, 50, 100], [1, 2, 3]),      # rounded up, at least one board a wave
    (1, [10, 50, 100], [1]),            # no empty waves
    (7, [100], [7]),
    (20, [5, 6, 100], [1, 2, 20]),
])
def test_percent_waves_are_cumulative_rounded_up_and_never_empty(count: int, percents: list[int],
                                                                 ends: list[int]) -> None:
    assert wave_ends(count, percents) == ends


def test_plan_waves_by_percent_after_the_canary_and_by_max_parallel_without_percents() -> None:
    boards = [board("c1", "canary"), *[board(f"b{i}") for i in range(1, 5)]]
    by_percent = plan_waves(boards, 2, percents=[10, 50, 100])
    assert [[b.name for b in w.boards] for w in by_percent] == [["c1"], ["b1"], ["b2"], ["b3", "b4"]]
    assert [w.name for w in by_percent] == ["canary", "wave 2", "wave 3", "wave 4"]
    assert [[b.name for b in w.boards] for w in plan_waves(boards, 3)] == [["c1"], ["b1", "b2", "b3"], ["b4"]]


@pytest.mark.parametrize("waves", [[50, 10, 100], [10, 50], [0, 100], [10, 10, 100], [10, 101]])
def test_waves_must_be_rising_percents_ending_at_100(waves: list[int]) -> None:
    with pytest.raises(ValueError, match="rising cumulative percents"):
        FleetParams(waves=waves)


def test_the_failure_percent_aborts_before_the_count_does() -> None:
    waves = [Wave(f"w{i}", (board(f"b{i}"),)) for i in range(4)]
    outcomes = iter(["updated", "failed", "updated", "updated"])
    results, abort = drive_waves(waves, lambda w: [BoardResult(b.name, next(outcomes)) for b in w.boards],
                                 StopRules(max_failed=3, max_failed_percent=20))
    assert abort == "1 of 4 boards failed (more than fleet.max_failed_percent = 20%)"
    assert [r.outcome for r in results] == ["updated", "failed", "skipped", "skipped"]
    _, tolerated = drive_waves(waves, lambda w: [BoardResult(b.name, "updated") for b in w.boards],
                               StopRules(max_failed=0, max_failed_percent=0))
    assert tolerated is None


def test_a_gate_failing_a_slow_board_stops_the_next_waves() -> None:
    waves = [Wave("wave 1", (board("b1"), board("b2"))), Wave("wave 2", (board("b3"),))]
    gated: list[str] = []

    def gate(wave: Wave, done: list[BoardResult]) -> list[BoardResult]:
        gated.append(wave.name)
        return [BoardResult(r.board, "failed", phase="gate", reason="slow") if r.board == "b2" else r for r in done]

    results, abort = drive_waves(waves, lambda w: [BoardResult(b.name, "updated") for b in w.boards],
                                 StopRules(0, gate=gate))
    assert gated == ["wave 1"] and abort == "1 boards failed (more than fleet.max_failed_boards = 0)"
    assert [(r.board, r.outcome, r.phase) for r in results] == [
        ("b1", "updated", ""), ("b2", "failed", "gate"), ("b3", "skipped", "not started")]


def test_a_board_silent_past_its_deadline_fails_and_is_not_waited_for() -> None:
    release = threading.Event()
    waves = [Wave("wave 1", (board("b1"), board("stuck"))), Wave("wave 2", (board("b2"),))]

    def run_one(b: Board) -> BoardResult:
        if b.name == "stuck":
            release.wait(30)
        return BoardResult(b.name, "updated")

    try:
        results, abort = run_waves(waves, run_one, max_parallel=2, rules=StopRules(0, deadline_s=0.3))
        assert not release.is_set()  # returned while the stuck board's job still runs
    finally:
        release.set()
    assert [(r.board, r.outcome, r.phase) for r in results] == [
        ("b1", "updated", ""), ("stuck", "failed", "deadline"), ("b2", "skipped", "not started")]
    assert results[1].reason.startswith("deadline: no result within fleet.board_deadline_s = 0.3 s")
    assert abort == "1 boards failed (more than fleet.max_failed_boards = 0)"


@pytest.mark.parametrize(("before", "after", "failed"), [
    (100.0, 85.0, False), (100.0, 79.0, True), (None, 10.0, False), (100.0, None, True)])
def test_the_gate_compares_decode_speed_with_the_previous_release_where_known(
        before: float | None, after: float | None, failed: bool) -> None:
    result = BoardResult("b1", "updated", release="v2", live="v2", extra={PREVIOUS_DECODE: before})
    row = BenchRow("b1", "v2", results={} if after is None else {"decode_tokens_per_s": after},
                   error=None if after is not None else "bench: runtime crashed")
    gated = gate_result(result, row, 0.2)
    assert gated.failed is failed and (gated.phase == "gate") is failed
    assert gated.extra["gate_decode_tokens_per_s"] == after and result.outcome == "updated"


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
