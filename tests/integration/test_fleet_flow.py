"""The `rollout` flow under a throwaway Prefect server: one task run per board, retries only for
connection failures, the same result log as `nativelm deploy`, and the real flow on the simulated fleet."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import FlowRunSort
from prefect.runtime import flow_run

from nativelm.fleet.board_job import BoardContext, BoardResult
from nativelm.fleet.inventory import Board
from nativelm.fleet.release import LocalRelease
from nativelm.fleet.rollout import plan_rollout
from nativelm.params.fleet import FleetParams
from tests.integration.conftest import SimFleet, served_flow
from tests.integration.test_fleet_deploy import BENCH, Releases, releases  # noqa: F401 - the fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def flows() -> Iterator[ModuleType]:
    """pipelines/rollout.py, loaded as the served deployment loads it, against a throwaway Prefect server."""
    with served_flow("pipelines/rollout.py") as module:
        yield module


def task_runs(flow_run_id: str) -> dict[str, tuple[str, int]]:
    """{task run name: (final state, run count)} of one flow run."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: (run.state_type.value, run.run_count) for run in runs}


def board(name: str, *groups: str) -> Board:
    return Board(name=name, host="127.0.0.1", port=2200, user="nativelm", key="key", groups=list(groups))


def test_each_board_is_a_task_and_only_connection_failures_are_retried(flows: ModuleType, tmp_path: Path) -> None:
    boards = [board("c1", "canary"), board("b1"), board("b2"), board("b3")]
    release = type("Release", (), {"name": "v3", "version": 3})()
    tries: dict[str, int] = {}

    def deploy(b: Board, ctx: BoardContext, rel: LocalRelease) -> BoardResult:
        tries[b.name] = tries.get(b.name, 0) + 1
        if b.name == "b1" and tries[b.name] == 1:
            return BoardResult(b.name, "failed", phase="upload", reason="connection lost: EOFError", transient=True)
        if b.name == "b2":
            return BoardResult(b.name, "failed", phase="verify", reason="hash mismatch: model.onnx", live="v2")
        return BoardResult(b.name, "updated", release="v3", live="v3")

    plan = plan_rollout(None, boards, release, FleetParams(max_parallel=2, max_failed_boards=1), tmp_path,
                        deploy=deploy)

    @flow(name="rollout-waves")
    def waves() -> tuple[str, object]:
        executor = flows.PrefectExecutor(retries=2, retry_delay_s=0)
        return str(flow_run.id), plan.run(lambda wave: executor.deploy_wave(plan, wave))

    flow_run_id, result = waves()
    assert tries == {"c1": 1, "b1": 2, "b2": 1, "b3": 1}  # b1 retried once; the hash mismatch never
    assert task_runs(flow_run_id) == {"deploy c1": ("COMPLETED", 1), "deploy b1": ("COMPLETED", 2),
                                      "deploy b2": ("FAILED", 1), "deploy b3": ("COMPLETED", 1)}
    log = json.loads(result.log_path.read_text())
    assert [(b["board"], b["outcome"]) for b in log["boards"]] == [
        ("c1", "updated"), ("b1", "updated"), ("b2", "failed"), ("b3", "updated")]
    assert log["finished"] and log["aborted"] is None and log["settings"] == {
        "max_parallel": 2, "max_failed_boards": 1, "keep_releases": 3, "max_failed_percent": 100.0, "waves": None,
        "wave_pause_s": 0.0, "gate_max_slowdown": None, "board_deadline_s": None}


def test_the_flow_fails_a_board_silent_past_its_deadline(flows: ModuleType, tmp_path: Path) -> None:
    """fleet.board_deadline_s holds in the Prefect flow too: a board task that gives no result in time
    is failed (phase deadline) and the wave goes on without it; its late result is not logged."""
    import threading

    boards = [board("c1", "canary"), board("b1"), board("b2")]
    release = type("Release", (), {"name": "v3", "version": 3})()
    release_b1 = threading.Event()

    def deploy(b: Board, ctx: BoardContext, rel: LocalRelease) -> BoardResult:
        if b.name == "b1":  # silent: answers only when the test lets it, long after the deadline
            release_b1.wait(30)
        return BoardResult(b.name, "updated", release="v3", live="v3")

    plan = plan_rollout(None, boards, release, FleetParams(max_parallel=2, max_failed_boards=1,
                                                           board_deadline_s=5.0), tmp_path, deploy=deploy)

    @flow(name="rollout-deadline")
    def waves() -> object:
        executor = flows.PrefectExecutor(retries=0, retry_delay_s=0)
        return plan.run(lambda wave: executor.deploy_wave(plan, wave))

    try:
        result = waves()
    finally:
        release_b1.set()
    log = json.loads(result.log_path.read_text())
    outcomes = {b["board"]: (b["outcome"], b.get("phase")) for b in log["boards"]}
    assert outcomes["b1"] == ("failed", "deadline") and outcomes["b2"][0] == "updated", outcomes
    assert "board_deadline_s = 5 s" in next(b["reason"] for b in log["boards"] if b["board"] == "b1")
    assert log["finished"]


def test_the_rollout_flow_on_the_simulated_fleet(flows: ModuleType, sim_fleet: SimFleet, releases: Releases,
                                                 tmp_path: Path) -> None:
    data = sim_fleet.params.model_dump(mode="json")
    data["fleet"].update(BENCH)
    data["tracking"]["uri"] = "off"
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(data))
    # the flow's return value (a failed flow raises); State.result() is a coroutine when an event loop runs
    summary = flows.rollout(model=str(releases.old.folder), params_file=str(params_file))
    with get_client(sync_client=True) as client:
        (latest,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
    boards = [b.name for b in sim_fleet.inventory.boards]
    assert summary["ok"] and set(summary["boards"]) == set(boards)
    assert all(summary["decode_tokens_per_s"][name] > 0 for name in boards)
    runs = task_runs(str(latest.id))
    assert {name for name in runs if name.startswith("deploy ")} == {f"deploy {name}" for name in boards}
    assert {name for name in runs if name.startswith("bench ")} == {f"bench {name}" for name in boards}
    assert all(state == "COMPLETED" for state, _ in runs.values())


_SIGTERM_SCRIPT = r'''
import sys
from pathlib import Path

from prefect import flow

from nativelm.fleet.board_job import BoardResult
from nativelm.fleet.inventory import Board
from nativelm.fleet.rollout import plan_rollout
from nativelm.fleet.stopping import Interrupted, stopping
from nativelm.orchestration.clients import load_flow_module
from nativelm.params.fleet import FleetParams

project, state = Path(sys.argv[1]), Path(sys.argv[2])
flows = load_flow_module(project, "pipelines/rollout.py")
boards = [Board(name=n, host="127.0.0.1", port=2200, user="nativelm", key="key", groups=g)
          for n, g in (("c1", ["canary"]), ("b1", []), ("b2", []))]
release = type("Release", (), {"name": "v3", "version": 3})()


def deploy(b, ctx, rel):
    if b.name == "b1":  # a long upload: it ends when the rollout's stop event is set
        (state / "b1-started").touch()
        stopped = ctx.stop.wait(60)
        (state / "b1-stopped").write_text(str(stopped))
        return BoardResult(b.name, "failed", phase="upload", reason="stopped")
    return BoardResult(b.name, "updated", release="v3", live="v3")


plan = plan_rollout(None, boards, release, FleetParams(max_parallel=2), state, deploy=deploy)


@flow(name="rollout-sigterm")
def waves():
    executor = flows.PrefectExecutor(retries=0, retry_delay_s=0)
    with stopping():  # as pipelines/rollout.py's flow does
        return plan.run(lambda wave: executor.deploy_wave(plan, wave))


try:
    waves()
except Interrupted as exc:
    print(f"stopped: {exc}", flush=True)
    sys.exit(exc.exit_code)
'''


def test_a_sigterm_stops_the_flow_cleanly(flows: ModuleType, tmp_path: Path) -> None:
    """A cancelled or killed flow run gets SIGTERM: its board jobs are told to stop, the log is finished
    ("interrupted"), and the process exits 143, as `nativelm deploy` does (fleet/stopping.py)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.settings import PREFECT_API_URL

    project = Path(__file__).resolve().parents[2]
    script = tmp_path / "flow_sigterm.py"
    script.write_text(_SIGTERM_SCRIPT)
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PYTHONPATH": os.pathsep.join([str(project / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(project), str(tmp_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "b1-started").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "stopped: interrupted by SIGTERM" in out
    assert (tmp_path / "b1-stopped").read_text() == "True"  # the board job was told to stop, not left running
    (log_file,) = (tmp_path / "rollouts").glob("*.json")
    log = json.loads(log_file.read_text())
    assert log["finished"] and log["outcome"] == "interrupted" and log["aborted"] == "interrupted by SIGTERM"
