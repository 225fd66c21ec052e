"""Faults during a rollout, on real sshd boards (a fleet of this module's own: these tests break boards).

Each test starts from every board serving the old release, rolls out the new one while something goes
wrong, and then checks that every board serves a release whose files verify (old or new, never a
partial one) and that the result log says why a board failed:

    sshd killed mid-upload     old stays; after a restart the upload resumes (fewer bytes than the file)
    board unreachable          that board fails "connect", the others update; a dead canary aborts
    disk full on the board     "no space left on device", old stays, the unfinished release is discarded
    file altered after upload  "hash mismatch: model.onnx", old stays, the bad file is removed
    failing health check       the release is discarded, old stays (canary: the rollout aborts);
                               breaking after the check: switched, then rolled back
    changed host key           refused with both fingerprints, the board untouched, nothing pinned
    two concurrent rollouts    one updates, the other fails "locked by <the first>"
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nativelm.fleet.board_job import DeployHooks
from nativelm.fleet.release import LocalRelease
from nativelm.fleet.rollout import render_rollout, rollout
from nativelm.fleet.rollout_log import RolloutResult, new_rollout_id
from nativelm.fleet.sim import (
    rotate_host_key,
    sim_status,
    sim_up,
    start_board,
    stop_board,
)
from nativelm.fleet.ssh import BoardSession
from nativelm.params.fleet import FleetParams
from tests.integration.conftest import SimFleet, running_sim_fleet, small_disk
from tests.integration.test_fleet_deploy import (
    BENCH,
    Releases,
    build_releases,
    by_board,
    fleet_release,
    logged,
    serving,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    """Three provisioned boards (board-1 the canary) that only these tests use."""
    with running_sim_fleet(tmp_path_factory.mktemp("faults"), boards=3, canary=1, connect_timeout_s=5,
                           **BENCH) as sim:
        yield sim


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return build_releases(tmp_path_factory.mktemp("releases"))


@pytest.fixture
def on_old(fleet: SimFleet, releases: Releases) -> FleetParams:
    """Every board running and serving the old release; the fleet parameters to roll out with."""
    for board in fleet.inventory.boards:
        start_board(fleet.params, board.name)  # no-op when it runs
    params = fleet.params.fleet
    result = deploy(fleet, releases.old, params)
    assert result.ok, "\n".join(render_rollout(result))
    assert serving(fleet.inventory, params) == dict.fromkeys(names(fleet), releases.old.name)
    return params


_SEEDS = itertools.count(10)


@pytest.fixture
def fresh(tmp_path: Path) -> LocalRelease:
    """A release no board has seen yet: its model has to be uploaded."""
    seed = next(_SEEDS)
    return fleet_release(tmp_path, seed, f"fresh-{seed}")


def names(fleet: SimFleet) -> list[str]:
    return [b.name for b in fleet.inventory.boards]


def deploy(fleet: SimFleet, release, params: FleetParams, boards: list[str] | None = None,
           **kwargs: object) -> RolloutResult:
    chosen = [b for b in fleet.inventory.boards if boards is None or b.name in boards]
    return rollout(fleet.inventory, chosen, release, params, Path(fleet.params.stack.state_dir), **kwargs)


def board_root(fleet: SimFleet, name: str) -> Path:
    """The board's remote root, seen from this machine (a simulated board's home is a local folder)."""
    home = next(b.home for b in sim_status(fleet.params) if b.name == name)
    return Path(home) / fleet.params.fleet.remote_root


def board_state(fleet: SimFleet, name: str) -> dict[str, tuple]:
    """Everything a rollout could change on a board: links, releases and files, sizes, modification times."""
    root = board_root(fleet, name)
    state: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if relative.parts[0] in ("venv", "wheels"):
            continue
        stat = path.lstat()
        state[str(relative)] = (os.readlink(path) if path.is_symlink() else None, stat.st_size, stat.st_mtime_ns)
    return state


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_sshd_killed_mid_upload_keeps_the_old_release_and_the_upload_resumes(
        fleet: SimFleet, releases: Releases, fresh: LocalRelease, on_old: FleetParams) -> None:
    part = board_root(fleet, "board-2") / "releases" / fresh.name / "model.onnx.part"
    killed: list[int] = []

    def kill_half_way(board: str, file: str, sent: int, total: int) -> None:
        if board == "board-2" and file == "model.onnx" and sent >= total // 2 and not killed:
            wait_for(lambda: part.is_file() and part.stat().st_size > 0, "the first bytes on the board")
            killed.append(sent)
            stop_board(fleet.params, "board-2")  # sshd and its sessions, SIGKILL: a power cut

    first = deploy(fleet, fresh, on_old, hooks=DeployHooks(on_progress=kill_half_way))
    failed = by_board(first)["board-2"]
    assert killed and (failed.outcome, failed.phase) == ("failed", "upload")
    assert logged(first)["board-2"]["reason"] == failed.reason and failed.reason
    assert by_board(first)["board-3"].outcome == "updated"  # same wave: it finished

    start_board(fleet.params, "board-2")
    assert serving(fleet.inventory, on_old)["board-2"] == releases.old.name
    partial = part.stat().st_size
    model = fresh.files["model.onnx"].size
    assert 0 < partial < model

    second = deploy(fleet, fresh, on_old, boards=["board-2"])
    resumed = by_board(second)["board-2"]
    assert resumed.outcome == "updated", resumed
    assert resumed.extra["lock_taken_over"]  # the killed rollout could not unlock; it has finished
    # what was sent: the rest of model.onnx, release.json and its signature, nothing already on the board
    signature = (board_root(fleet, "board-2") / "releases" / fresh.name / "release.json.sig").stat().st_size
    assert resumed.bytes_sent == model - partial + fresh.files["release.json"].size + signature
    assert serving(fleet.inventory, on_old) == dict.fromkeys(names(fleet), fresh.name)


def test_unreachable_board_fails_to_connect_while_the_others_update(
        fleet: SimFleet, releases: Releases, on_old: FleetParams) -> None:
    stop_board(fleet.params, "board-2")
    tolerant = on_old.model_copy(update={"max_failed_boards": 1, "max_parallel": 1})
    result = deploy(fleet, releases.new, tolerant)
    outcomes = {r.board: (r.outcome, r.phase) for r in result.boards}
    assert outcomes == {"board-1": ("updated", "prune"), "board-2": ("failed", "connect"),
                        "board-3": ("updated", "prune")}
    assert result.aborted is None  # one failure is allowed here
    assert "connection refused" in logged(result)["board-2"]["reason"]
    start_board(fleet.params, "board-2")
    assert serving(fleet.inventory, on_old) == {"board-1": releases.new.name, "board-2": releases.old.name,
                                               "board-3": releases.new.name}

    stop_board(fleet.params, "board-1")  # the canary: nothing else may be touched
    result = deploy(fleet, releases.old, on_old.model_copy(update={"max_failed_boards": 5}))
    assert result.aborted == "canary failed on board-1"
    assert [r.outcome for r in result.boards] == ["failed", "skipped", "skipped"]
    assert "rollout aborted: canary failed on board-1" in logged(result)["board-3"]["reason"]
    start_board(fleet.params, "board-1")
    assert serving(fleet.inventory, on_old)["board-3"] == releases.new.name  # skipped: still new


def fill(folder: Path, leave: int) -> None:
    """Fill the file system of `folder`, then free `leave` bytes (room for small files, not the model)."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_full_disk_fails_the_upload_and_keeps_the_old_release(
        fleet: SimFleet, releases: Releases, fresh: LocalRelease, on_old: FleetParams) -> None:
    releases_dir = board_root(fleet, "board-3") / "releases"
    with small_disk(releases_dir, "32m") as disk:
        filled: list[bool] = []

        def fill_on_upload(board: str, phase: str, detail: str) -> None:
            if board == "board-3" and phase == "upload" and not filled:
                fill(disk, leave=32 * 1024)  # after the free-disk check, before the first byte
                filled.append(True)

        result = deploy(fleet, fresh, on_old, hooks=DeployHooks(on_phase=fill_on_upload))
        failed = by_board(result)["board-3"]
        assert (failed.outcome, failed.phase) == ("failed", "upload")
        assert "no space left on device" in failed.reason
        assert logged(result)["board-3"]["reason"] == failed.reason
        assert not (disk / fresh.name).exists()  # the unfinished release is gone: room for the live one
        assert serving(fleet.inventory, on_old)["board-3"] == releases.old.name


def test_file_altered_after_upload_is_a_hash_mismatch_and_is_removed(
        fleet: SimFleet, releases: Releases, fresh: LocalRelease, on_old: FleetParams) -> None:
    def corrupt(session: BoardSession) -> None:
        if session.board.name == "board-2":
            with session.sftp.open(session.path("releases", fresh.name, "model.onnx"), "ab") as handle:
                handle.write(b"bit rot")

    result = deploy(fleet, fresh, on_old, hooks=DeployHooks(after_upload=corrupt))
    failed = by_board(result)["board-2"]
    assert (failed.outcome, failed.phase, failed.reason) == ("failed", "verify", "hash mismatch: model.onnx")
    assert failed.extra["removed_files"] == ["model.onnx"]
    assert logged(result)["board-2"]["reason"] == "hash mismatch: model.onnx"
    assert not (board_root(fleet, "board-2") / "releases" / fresh.name / "model.onnx").exists()
    assert serving(fleet.inventory, on_old) == {"board-1": fresh.name, "board-2": releases.old.name,
                                               "board-3": fresh.name}


def test_failing_health_check_discards_the_release_and_aborts_at_the_canary(
        fleet: SimFleet, releases: Releases, on_old: FleetParams) -> None:
    result = deploy(fleet, releases.bad, on_old)
    failed = by_board(result)["board-1"]
    assert (failed.outcome, failed.phase) == ("failed", "health")
    assert failed.reason.startswith("health check failed: golden prompt 1 of 3")
    assert "health check failed" in logged(result)["board-1"]["reason"]
    assert result.aborted == "canary failed on board-1"
    assert [r.outcome for r in result.boards[1:]] == ["skipped", "skipped"]
    assert not (board_root(fleet, "board-1") / "releases" / releases.bad.name).exists()
    assert serving(fleet.inventory, on_old) == dict.fromkeys(names(fleet), releases.old.name)


def test_release_broken_after_its_health_check_is_rolled_back_after_the_switch(
        fleet: SimFleet, releases: Releases, on_old: FleetParams) -> None:
    def break_it(session: BoardSession) -> None:
        if session.board.name == "board-2":  # verified, sealed read-only: only root (the tests' user) writes it
            with session.sftp.open(session.path("releases", releases.new.name, "model.onnx"), "ab") as handle:
                handle.write(b" ")

    result = deploy(fleet, releases.new, on_old, hooks=DeployHooks(before_activate=break_it))
    failed = by_board(result)["board-2"]
    assert (failed.outcome, failed.phase) == ("failed", "health-current")
    assert failed.reason.startswith("health after switch failed: ")
    assert failed.reason.endswith(f"; restored {releases.old.name}")
    assert failed.live == releases.old.name
    with BoardSession(fleet.inventory.board("board-2"), fleet.inventory, on_old) as session:
        assert session.agent("facts")["previous"] != releases.new.name  # never the release that just failed
    assert logged(result)["board-2"]["reason"] == failed.reason
    assert serving(fleet.inventory, on_old) == {"board-1": releases.new.name, "board-2": releases.old.name,
                                               "board-3": releases.new.name}


def test_changed_host_key_is_refused_and_the_board_untouched(
        fleet: SimFleet, releases: Releases, on_old: FleetParams) -> None:
    known_hosts = fleet.inventory.known_hosts.read_text()
    before = board_state(fleet, "board-3")
    rotate_host_key(fleet.params, "board-3")
    try:
        result = deploy(fleet, releases.new, on_old.model_copy(update={"max_failed_boards": 1}))
        failed = by_board(result)["board-3"]
        assert (failed.outcome, failed.phase) == ("failed", "connect")
        assert "changed" in failed.reason and "refused" in failed.reason
        assert failed.reason.count("SHA256:") == 2  # pinned and offered fingerprints
        assert logged(result)["board-3"]["reason"] == failed.reason
        assert fleet.inventory.known_hosts.read_text() == known_hosts  # nothing added or replaced
        assert board_state(fleet, "board-3") == before
    finally:
        sim_up(fleet.params)  # pins the board's new key, as an operator would after checking it
    assert serving(fleet.inventory, on_old) == {"board-1": releases.new.name, "board-2": releases.new.name,
                                               "board-3": releases.old.name}


def test_two_concurrent_rollouts_on_one_board(fleet: SimFleet, releases: Releases, on_old: FleetParams) -> None:
    first_id = new_rollout_id()
    holding, second_done = threading.Event(), threading.Event()
    results: dict[str, RolloutResult] = {}

    def hold_the_lock(session: BoardSession) -> None:
        holding.set()
        second_done.wait(120)

    def first() -> None:
        results["first"] = deploy(fleet, releases.new, on_old, boards=["board-3"], rollout_id=first_id,
                                  hooks=DeployHooks(after_upload=hold_the_lock))

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert holding.wait(120), "the first rollout never reached its upload"
        results["second"] = deploy(fleet, releases.new, on_old, boards=["board-3"])
    finally:
        second_done.set()
        thread.join(120)
    one, other = results["first"].boards[0], results["second"].boards[0]
    assert one.outcome == "updated"
    assert (other.outcome, other.phase) == ("failed", "lock")
    assert other.reason.startswith(f"locked by {first_id} since ")
    assert logged(results["second"])["board-3"]["reason"] == other.reason
    assert serving(fleet.inventory, on_old)["board-3"] == releases.new.name
