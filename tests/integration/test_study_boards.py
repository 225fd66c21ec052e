"""A study measured on real sshd boards (study.boards): every row's release is uploaded, health-checked
and benchmarked there, then removed, and no board's live release moves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nativelm.fleet.ssh import BoardSession
from tests.conftest import TINY_TEST_MODEL, make_project, run_checked
from tests.integration.conftest import SimFleet
from tests.integration.test_fleet_deploy import BENCH

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = ["ternary_moe", "fp_moe", "fp_moe_int4_ptq"]


def _facts(fleet: SimFleet) -> dict[str, dict[str, Any]]:
    facts = {}
    for board in fleet.inventory.boards:
        with BoardSession(board, fleet.inventory, fleet.params.fleet) as session:
            found = session.agent("facts")
            facts[board.name] = {k: found[k] for k in ("current", "previous", "releases")}
    return facts


def _study(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nativelm.cli", "study", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)


def test_every_row_is_benchmarked_on_every_board_without_going_live(tmp_path: Path, sim_fleet: SimFleet) -> None:
    root = make_project(tmp_path / "project", {
        "tracking.uri": "off", "study.rows": ROWS, "study.model": TINY_TEST_MODEL, "study.steps": 8, "train.threads": 1,
        "fleet.inventory": sim_fleet.params.fleet.inventory, "stack.state_dir": str(tmp_path / "state"),
        "fleet.signing_key": sim_fleet.params.fleet.signing_key,  # the key the boards were provisioned with
        **{f"fleet.{k}": v for k, v in BENCH.items()}})
    run_checked([sys.executable, "-m", "nativelm.cli", "prepare"], root)
    before = _facts(sim_fleet)

    done = _study(root, "--boards", "all")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _facts(sim_fleet) == before  # nothing went live, no release folder was left behind
    names = [b.name for b in sim_fleet.inventory.boards]
    speeds = {}
    for row in ROWS:
        result = json.loads(next((root / "studies" / "default").glob(f"*/*/{row}/result.json")).read_text())
        assert sorted(result["boards"]) == names, result.get("boards")
        for board in names:
            assert result["boards"][board]["decode_tokens_per_s"] > 0, (row, board, result["boards"][board])
        speeds[row] = result["evaluate"]["board_decode_tokens_per_s"]
    table = (root / "studies" / "default" / "table.md").read_text()
    assert "board decode tok/s" in table.splitlines()[0]
    assert all(f"{speeds[row]:.0f}" in line for row in ROWS for line in table.splitlines() if f"| {row} |" in line)

    again = _study(root, "--boards", "all")  # everything kept: no training, no board touched again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "board(s), not made live" not in again.stderr and "training" not in again.stderr, again.stderr[-2000:]

    unknown = _study(root, "--boards", "no-such-board")
    assert unknown.returncode == 2, unknown.stderr[-2000:]
    assert len(unknown.stderr.strip().splitlines()) == 1 and "no-such-board" in unknown.stderr, unknown.stderr
