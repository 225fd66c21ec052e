"""The `fleet-health` flow under a throwaway Prefect server: one task run per board, retries only for
connection failures, and the real flow on simulated boards (one healthy, one stopped)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.sorting import FlowRunSort
from prefect.runtime import flow_run

from nativelm.fleet import service, sim
from nativelm.fleet.inventory import Board, Inventory
from nativelm.fleet.provision import ensure_agent
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.ssh_trust import BoardError
from nativelm.fleet.status import BoardStatus
from nativelm.params.fleet import FleetParams
from tests.integration.conftest import make_sim_fleet, served_flow
from tests.integration.test_fleet_flow import board, task_runs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def flows() -> Iterator[ModuleType]:
    """pipelines/fleet_health.py, loaded as the served deployment loads it, against a throwaway Prefect server."""
    with served_flow("pipelines/fleet_health.py") as module:
        yield module


def test_each_board_is_a_task_and_only_connection_failures_are_retried(flows: ModuleType,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    boards = [board("c1", "canary"), board("b1"), board("b2"), board("b3")]
    tries: dict[str, int] = {}

    def check(inv: Inventory, b: Board, fleet: FleetParams) -> BoardStatus:
        tries[b.name] = tries.get(b.name, 0) + 1
        if b.name == "b1" and tries[b.name] == 1:
            raise BoardError(b.name, "connect", "connection refused", transient=True)
        if b.name == "b2":
            raise BoardError(b.name, "host key", "the host key changed")
        return BoardStatus(b.name, "127.0.0.1:2200", tuple(b.groups), True, current=None if b.name == "b3" else "v3")

    monkeypatch.setattr(flows.status, "check_board", check)

    @flow(name="health-boards")
    def checks() -> tuple[str, list[BoardStatus]]:
        choice = service.FleetChoice(None, tuple(boards))
        return str(flow_run.id), flows.check_boards(choice, FleetParams(max_parallel=2), retries=2, retry_delay_s=0)

    flow_run_id, rows = checks()
    assert tries == {"c1": 1, "b1": 2, "b2": 1, "b3": 1}  # b1 asked again once; the changed host key never
    assert task_runs(flow_run_id) == {"health c1": ("COMPLETED", 1), "health b1": ("COMPLETED", 2),
                                      "health b2": ("FAILED", 1), "health b3": ("FAILED", 1)}
    assert [(r.board, r.reachable, r.current) for r in rows] == [
        ("c1", True, "v3"), ("b1", True, "v3"), ("b2", False, None), ("b3", True, None)]
    assert service.unhealthy(rows) == ["b2: the host key changed", "b3: no live release"]


def test_the_fleet_health_flow_on_simulated_boards(flows: ModuleType, tmp_path: Path) -> None:
    fleet = make_sim_fleet(tmp_path, boards=2, canary=1, provisioned=False)
    try:
        inv = fleet.inventory
        with BoardSession(inv.board("board-1"), inv, fleet.params.fleet) as s:
            ensure_agent(s)
            folder = s.path("releases", "health-test")
            s.run(["mkdir", "-p", folder])
            s.write_bytes(f"{folder}/release.json", json.dumps({"sha256": {}}).encode())
            s.agent("activate", "health-test")
        sim.stop_board(fleet.params, "board-2")
        params_file = tmp_path / "params.yaml"
        params_file.write_text(yaml.safe_dump(fleet.params.model_dump(mode="json")))
        state = flows.fleet_health(params_file=str(params_file), board_retries=1, return_state=True)
        # board-1's live release lists no files: it does not verify, and damage fails the flow too
        assert state.is_failed() and ("2 board(s) unhealthy: board-1: live release health-test damaged: "
                                      "release.json has no \"sha256\" map of the release's files; board-2: ") \
            in state.message
        with get_client(sync_client=True) as client:
            (latest,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        # a stopped board refuses the connection: transient, so asked once more before its task fails;
        # a damaged release is the board's answer: not asked again
        assert task_runs(str(latest.id)) == {"health board-1": ("FAILED", 1), "health board-2": ("FAILED", 2)}
    finally:
        sim.sim_down(fleet.params)
