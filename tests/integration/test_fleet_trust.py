"""A fleet you can trust unattended, on real sshd boards (a fleet of this module's own: these tests break it).

One deterministic trial per fault kind of the fault matrix (bench/fleet_faults.py, the same code,
one fixed seed): controller SIGKILL / SIGTERM / SIGINT, sshd killed mid-upload, a tampered live
file, a full disk, a changed host key, two concurrent rollouts, a failing health check. After each,
every board must hold the invariants of nativelm.fleet.audit (current complete, verified, healthy;
previous healthy; no lock; every log finished). Then what an operator does by hand: `fleet unlock`,
the unchanged fast path clearing a dead holder's lock, rollback refusing a target that fails
verification or health, and `fleet status` exiting 1 on damage.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.fleet_faults import KINDS, World, facts_of, run_trial, world_in
from nativelm.fleet.agent import SIGNATURE
from nativelm.fleet.holder import this_holder, this_host
from nativelm.fleet.rollout import rollback
from nativelm.fleet.rollout_log import new_rollout_id
from nativelm.fleet.signing import sign_manifest
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.unlock import unlock

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Two provisioned boards (board-1 the canary) serving a good release, with another one as previous."""
    with world_in(tmp_path_factory.mktemp("trust"), boards=2) as found:
        yield found


@pytest.mark.parametrize("kind", KINDS)
def test_every_board_holds_the_invariants_after_the_fault(world: World, kind: str) -> None:
    problems = run_trial(world, kind, random.Random(f"trust-{kind}"))
    assert problems == [], "\n".join(problems + world.notes)


def dead_holder() -> str:
    """HOST:PID:START_TIME of a controller process of this host that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    started = psutil.Process(child.pid).create_time()
    child.communicate(b"")
    return f"{this_host()}:{child.pid}:{started:.2f}"


def lock_board(world: World, name: str, owner: str, holder: str) -> None:
    with BoardSession(world.inventory.board(name), world.inventory, world.params.fleet) as session:
        session.agent("lock", owner, "3600", holder)


def test_fleet_unlock_refuses_a_live_holder_and_clears_a_dead_one(world: World) -> None:
    from nativelm.cli import main

    live, dead = new_rollout_id(), new_rollout_id()
    lock_board(world, "board-1", live, this_holder())
    lock_board(world, "board-2", dead, dead_holder())
    refused, cleared = unlock(world.inventory, world.inventory.boards, world.params.fleet)
    assert refused.outcome == "refused"
    assert refused.line.startswith(f"board-1: locked by {live} since ")
    assert refused.line.endswith("is running; not unlocked (--force unlocks it anyway)")
    assert (cleared.outcome, cleared.line) == ("unlocked", f"board-2: unlocked the lock of {dead}: its controller "
                                                           f"(pid {cleared.line.split('pid ')[1].split()[0]} on "
                                                           f"{this_host()}) is gone")
    assert main(["fleet", "unlock", "--params", str(world.params_file), "--boards", "board-1"]) == 1
    assert main(["fleet", "unlock", "--params", str(world.params_file), "--boards", "board-1", "--force"]) == 0
    assert [facts_of(world, n)["lock"] for n in world.names()] == [None, None]


def test_the_unchanged_fast_path_clears_a_dead_holders_lock(world: World) -> None:
    dead = new_rollout_id()
    lock_board(world, "board-2", dead, dead_holder())
    result = world.deploy(world.serving)
    row = next(r for r in result.boards if r.board == "board-2")
    assert row.outcome == "unchanged"
    assert row.extra["lock_cleared"].startswith(f"cleared the lock of {dead}: its controller (pid ")
    assert facts_of(world, "board-2")["lock"] is None


def test_rollback_never_activates_a_release_that_fails_verification_or_health(world: World) -> None:
    board = world.inventory.board("board-2")
    facts = facts_of(world, "board-2")
    previous = world.board_root("board-2") / "releases" / facts["previous"]
    model = previous / "model.onnx"
    saved = model.read_bytes()
    model.chmod(0o644)
    model.write_bytes(saved[:100])  # truncated: a hash mismatch
    try:
        failed = rollback(world.inventory, [board], world.params.fleet, world.state_dir).boards[0]
        assert (failed.outcome, failed.phase) == ("failed", "verify")
        assert failed.reason == (f"{facts['previous']} does not verify (hash mismatch: model.onnx); "
                                 f"{facts['current']} stays live")
        assert facts_of(world, "board-2")["current"] == facts["current"]
    finally:
        model.write_bytes(saved)
    manifest, listing, signature = previous / "manifest.json", previous / "release.json", previous / SIGNATURE
    saved_manifest, saved_listing, saved_signature = manifest.read_bytes(), listing.read_bytes(), signature.read_bytes()
    data = json.loads(saved_manifest)  # hashes that verify, a golden continuation that fails the health check
    for entry in data["golden"]:
        entry["tokens"] = [token + 1 for token in entry["tokens"]]
    for path in (manifest, listing, signature):
        path.chmod(0o644)
    manifest.write_text(json.dumps(data))
    listed = json.loads(saved_listing)
    listed["sha256"]["manifest.json"] = hashlib.sha256(manifest.read_bytes()).hexdigest()
    listing.write_text(json.dumps(listed))
    with tempfile.TemporaryDirectory() as tmp:  # signed again by the fleet's key: only the health check can tell
        signature.write_bytes(sign_manifest(listing, Path(world.params.fleet.signing_key),
                                            Path(tmp) / SIGNATURE).read_bytes())
    try:
        failed = rollback(world.inventory, [board], world.params.fleet, world.state_dir).boards[0]
        assert (failed.outcome, failed.phase) == ("failed", "health"), failed
        assert failed.reason.startswith(f"{facts['previous']} fails its health check (")
        assert failed.reason.endswith(f"); {facts['current']} stays live")
        assert facts_of(world, "board-2")["current"] == facts["current"]
    finally:
        manifest.write_bytes(saved_manifest)
        listing.write_bytes(saved_listing)
        signature.write_bytes(saved_signature)
    ok = rollback(world.inventory, [board], world.params.fleet, world.state_dir).boards[0]
    assert ok.outcome == "rolled-back" and facts_of(world, "board-2")["current"] == facts["previous"]
    back = rollback(world.inventory, [board], world.params.fleet, world.state_dir).boards[0]
    assert back.outcome == "rolled-back" and facts_of(world, "board-2")["current"] == facts["current"]


def test_status_says_damaged_and_exits_1(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    from nativelm.cli import main

    live = world.board_root("board-1") / "current" / "model.onnx"
    live.chmod(0o644)
    with open(live, "r+b") as handle:
        handle.truncate(100)
    assert main(["fleet", "status", "--params", str(world.params_file)]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("board-1"))
    assert "damaged" in row and "changed since verified: model.onnx (size 100," in row
    assert "1 damaged or unhealthy" in out
    repaired = world.deploy(world.serving)
    assert repaired.ok and repaired.boards[0].outcome == "updated"  # the damaged live release, sent again
    assert main(["fleet", "status", "--params", str(world.params_file), "--verify", "full"]) == 0
