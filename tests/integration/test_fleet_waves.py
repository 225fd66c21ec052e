"""Staged rollouts on four real sshd boards: percent waves after the canary, a wave gated by a board
slower than its previous release stops the rollout, and a board silent past its deadline counts as failed
with its lock left in place."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from nativelm.fleet.board_job import DeployHooks
from nativelm.fleet.rollout import render_rollout, rollout
from nativelm.fleet.rollout_log import RolloutResult
from nativelm.fleet.sim import sim_status
from nativelm.fleet.sim_sshd import process_tree
from nativelm.fleet.ssh import BoardSession
from tests.integration.conftest import SimFleet, running_sim_fleet
from tests.integration.test_fleet_deploy import BENCH, Releases, build_releases

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    """Four provisioned boards (board-1 the canary) that only these tests use."""
    with running_sim_fleet(tmp_path_factory.mktemp("waves"), boards=4, canary=1, **BENCH) as sim:
        yield sim


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return build_releases(tmp_path_factory.mktemp("releases"))


def board_root(fleet: SimFleet, name: str) -> Path:
    home = next(b.home for b in sim_status(fleet.params) if b.name == name)
    return Path(home) / fleet.params.fleet.remote_root


def deploy(fleet: SimFleet, release: object, hooks: DeployHooks | None = None, **knobs: object) -> RolloutResult:
    params = fleet.params.fleet.model_copy(update={"waves": [10, 50, 100], **knobs})
    return rollout(fleet.inventory, fleet.inventory.boards, release, params, Path(fleet.params.stack.state_dir),
                   hooks=hooks)


def outcomes(result: RolloutResult) -> list[tuple[str, str, str]]:
    """(board, outcome, phase of a board that did not finish)"""
    return [(r.board, r.outcome, "" if r.outcome in ("updated", "unchanged") else r.phase) for r in result.boards]


def test_a_board_slower_than_its_previous_release_fails_the_gate_and_stops_the_waves(
        fleet: SimFleet, releases: Releases) -> None:
    first = deploy(fleet, releases.old)
    assert first.ok, "\n".join(render_rollout(first))
    # board-2 saved an old-release figure no real run reaches: on the new release it is "slower" by far
    (board_root(fleet, "board-2") / "bench" / f"{releases.old.name}.json").write_text(
        json.dumps({"decode_tokens_per_s": 1e9}))
    gated = deploy(fleet, releases.new, gate_max_slowdown=0.9)
    assert outcomes(gated) == [("board-1", "updated", ""), ("board-2", "failed", "gate"),
                               ("board-3", "skipped", "not started"), ("board-4", "skipped", "not started")]
    assert "slower than the previous release's" in gated.boards[1].reason
    assert gated.boards[0].extra["gate_decode_tokens_per_s"] > 0  # the canary was benchmarked and passed
    assert gated.aborted == "1 boards failed (more than fleet.max_failed_boards = 0)"
    saved = json.loads((board_root(fleet, "board-1") / "bench" / f"{releases.new.name}.json").read_text())
    assert saved["decode_tokens_per_s"] == gated.boards[0].extra["gate_decode_tokens_per_s"]


def test_a_board_silent_past_its_deadline_is_failed_and_keeps_its_lock(fleet: SimFleet, releases: Releases) -> None:
    stuck_pid = next(b.pid for b in sim_status(fleet.params) if b.name == "board-4")
    frozen = []

    def freeze(session: BoardSession) -> None:
        if session.board.name == "board-4":  # its sshd and the session serving us stop answering
            frozen.extend(process_tree(stuck_pid))
            for proc in frozen:
                proc.send_signal(signal.SIGSTOP)

    try:
        result = deploy(fleet, releases.new, DeployHooks(after_upload=freeze), board_deadline_s=15.0,
                        max_failed_boards=1)
        assert frozen and outcomes(result)[-1] == ("board-4", "failed", "deadline"), "\n".join(render_rollout(result))
        assert [r.outcome for r in result.boards[:3]] == ["unchanged", "unchanged", "updated"]  # board-2 serves it since the gate
        assert result.boards[-1].reason.startswith("deadline: no result within fleet.board_deadline_s = 15 s")
        log = json.loads(result.log_path.read_text())
        assert log["finished"] and [b["phase"] for b in log["boards"] if b["board"] == "board-4"] == ["deadline"]
        lock = json.loads((board_root(fleet, "board-4") / "lock" / "owner.json").read_text())
        assert lock["owner"] == result.rollout_id  # left for a take-over or `nativelm fleet unlock`
    finally:
        for proc in frozen:
            proc.send_signal(signal.SIGCONT)
