"""Pull mode end to end: a board's agent pulls signed releases from a real S3 server and switches.

The store is moto's S3 server (it stands in for the team stack's MinIO: Docker is not available
here); the board is a local agent root (its runtime virtualenv is this test's own Python), and the
agent runs as it does on a board: the zipapp, `python3 nativelm-agent.pyz pull now`. Covered: a
first release and an update (the status object in the store, `fleet status`'s pulled table), an
unchanged poll costing one conditional request, a rollback by publishing the older release again,
a staged percent, pause, a wrongly signed release, a tampered file, a release failing its health
check, a wrongly signed and a replayed channel, damage in the live release (fetched again), and the
store going down: each refused with one
line while the board keeps serving what it had.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from nativelm.fleet.agent.channel import in_wave
from nativelm.fleet.provision import provision
from nativelm.fleet.publish import publish, read_channel, set_paused, store_client, write_channel
from nativelm.fleet.pull_gate import widening_refusal
from nativelm.fleet.pull_status import pulled_status, render_pulled
from nativelm.fleet.signing import create_signing_key
from nativelm.fleet.sim_store import create_fleet_bucket, make_pull_board, moto_store, use_test_credentials
from nativelm.fleet.ssh import BoardSession
from nativelm.params.fleet import FleetParams, PullParams
from nativelm.params.root import Params
from tests.integration.conftest import SimFleet
from tests.integration.test_fleet_deploy import BENCH, Releases, build_releases

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BOARD = "board-1"


class Store(NamedTuple):
    fleet: FleetParams
    client: Any


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> Releases:
    return build_releases(tmp_path_factory.mktemp("pull-releases"), seeds=(40, 41, 42))  # this module's own


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    use_test_credentials()
    keys = tmp_path_factory.mktemp("pull-keys")
    create_signing_key(keys / "release-key")
    with moto_store() as (endpoint, _):
        fleet = FleetParams(signing_key=str(keys / "release-key"), allowed_signers=[str(keys / "release-key.pub")],
                            mode="pull", pull=PullParams(endpoint=endpoint, jitter_s=0))
        client = store_client(fleet.pull)
        create_fleet_bucket(client, fleet.pull.bucket)
        yield Store(fleet, client)


def pull(root: Path) -> tuple[int, dict[str, Any] | None, str]:
    """Run one poll as the board's timer does: (exit status, the JSON report, stderr)."""
    done = subprocess.run(["python3", str(root / "bin" / "nativelm-agent.pyz"), "pull", "now"],
                          capture_output=True, text=True, timeout=600, check=False)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None, done.stderr


def live(root: Path) -> tuple[str | None, str | None]:
    def name(link: Path) -> str | None:
        return os.path.basename(os.readlink(link)) if link.is_symlink() else None

    return name(root / "current"), name(root / "previous")


def refused(root: Path, what: str) -> str:
    """One poll that fails with exactly one `error:` line containing `what`; return the line."""
    rc, report, err = pull(root)
    assert rc == 1 and report is None, (rc, report, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], err
    return lines[0]


def test_pull_update_unchanged_status_and_rollback(store: Store, releases: Releases, tmp_path: Path) -> None:
    root = make_pull_board(tmp_path / "board", store.fleet)
    publish(releases.old, store.fleet, 100, store.client)
    rc, report, err = pull(root)
    assert rc == 0 and report["outcome"] == "updated" and report["reported"], (report, err)
    assert live(root) == (releases.old.name, None)

    rc, report, _ = pull(root)  # nothing new: one conditional GET (304), nothing reported again
    assert (rc, report["outcome"], report["requests"], report["bytes"], report["reported"]) == (0, "unchanged", 1, 0, False)

    model = root / "releases" / releases.old.name / "model.onnx"  # damage in the live release ...
    model.chmod(0o644)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    rc, report, _ = pull(root)  # ... is found by the next poll (size + mtime) and fetched again
    assert (rc, report["outcome"], report["fetched_files"]) == (0, "repaired", 3), report  # the model, release.json, its .sig
    assert "changed since verified: model.onnx" in report["damage"]
    assert live(root) == (releases.old.name, None) and model.read_bytes() == (releases.old.folder / "model.onnx").read_bytes()

    done = publish(releases.new, store.fleet, 100, store.client)
    assert done.channel["previous"] == releases.old.name
    rc, report, _ = pull(root)
    assert rc == 0 and report["outcome"] == "updated" and report["copied_files"] == 3  # shared files copied, not fetched
    assert live(root) == (releases.new.name, releases.old.name)
    status = json.loads(store.client.get_object(Bucket="fleet", Key=f"status/{BOARD}.json")["Body"].read())
    assert (status["outcome"], status["current"], status["previous"]) == ("updated", releases.new.name, releases.old.name)
    channel, rows = pulled_status(store.fleet.pull, [BOARD, "board-never"], store.client)
    by_name = {row.board: row for row in rows}
    assert by_name[BOARD].current == releases.new.name and by_name["board-never"].state == "silent"
    assert any(line.startswith(BOARD) and "updated" in line for line in render_pulled(channel, rows))

    publish(releases.old, store.fleet, 100, store.client)  # rollback: the older release published again
    rc, report, _ = pull(root)
    assert rc == 0 and report["outcome"] == "updated" and report["fetched_bytes"] == 0  # it was still on the board
    assert live(root) == (releases.old.name, releases.new.name)


def test_percent_and_pause(store: Store, releases: Releases, tmp_path: Path) -> None:
    inside = next(f"board-{i}" for i in range(100) if in_wave(f"board-{i}", 30))
    outside = next(f"board-{i}" for i in range(100) if not in_wave(f"board-{i}", 30))
    boards = {name: make_pull_board(tmp_path / name, store.fleet, name) for name in (inside, outside)}
    publish(releases.old, store.fleet, 100, store.client)
    for root in boards.values():
        assert pull(root)[1]["outcome"] in ("updated", "unchanged")
    publish(releases.new, store.fleet, 30, store.client)
    set_paused(store.fleet, True, store.client)
    assert {name: pull(root)[1]["outcome"] for name, root in boards.items()} == {inside: "paused", outside: "paused"}
    assert live(boards[inside])[0] == releases.old.name
    set_paused(store.fleet, False, store.client)
    assert pull(boards[inside])[1]["outcome"] == "updated" and pull(boards[outside])[1]["outcome"] == "unchanged"
    assert (live(boards[inside])[0], live(boards[outside])[0]) == (releases.new.name, releases.old.name)


def signed_by(fleet: FleetParams, key: Path) -> FleetParams:
    return fleet.model_copy(update={"signing_key": str(key)})


def test_refusals_keep_the_live_release(store: Store, releases: Releases, tmp_path: Path) -> None:
    root = make_pull_board(tmp_path / "board", store.fleet)
    publish(releases.old, store.fleet, 100, store.client)
    assert pull(root)[1]["outcome"] == "updated"
    stranger = tmp_path / "stranger-key"
    create_signing_key(stranger)

    # a release signed by a key the board does not list (its channel signed by the right one)
    publish(releases.new, signed_by(store.fleet, stranger), 100, store.client)
    write_channel(store.client, store.fleet, {**read_channel(store.client, store.fleet.pull), "serial": 1000})
    refused(root, f"release {releases.new.name} refused: release.json signature does not verify")
    assert live(root)[0] == releases.old.name and not (root / "releases" / releases.new.name).exists()
    assert pull(root)[1]["outcome"] == "skipped"  # not fetched again under the same channel

    # the right signature, one file changed in the store after publishing
    store.client.delete_object(Bucket="fleet", Key=f"releases/{releases.new.name}/release.json.sig")
    store.client.delete_object(Bucket="fleet", Key=f"releases/{releases.new.name}/release.json")
    publish(releases.new, store.fleet, 100, store.client)
    store.client.put_object(Bucket="fleet", Key=f"releases/{releases.new.name}/model.onnx", Body=b"tampered")
    refused(root, "hash mismatch: model.onnx")
    assert live(root)[0] == releases.old.name

    # a release whose health check fails (consistent hashes, wrong golden continuation)
    publish(releases.bad, store.fleet, 100, store.client)
    refused(root, f"release {releases.bad.name} refused: health check failed")
    assert live(root)[0] == releases.old.name

    # a channel signed by a stranger, and an older channel replayed
    write_channel(store.client, signed_by(store.fleet, stranger), {**read_channel(store.client, store.fleet.pull),
                                                                   "serial": 2000, "release": releases.old.name})
    refused(root, "channel stable refused: channel.json signature does not verify")
    write_channel(store.client, store.fleet, {**read_channel(store.client, store.fleet.pull), "serial": 5})
    refused(root, "channel stable refused: serial 5 is older than serial")
    (root / "pull" / "state.json").unlink()  # the board's memory lost: its saved channel still has the serial
    refused(root, "channel stable refused: serial 5 is older than serial")
    assert live(root)[0] == releases.old.name


def test_the_store_down_keeps_the_board_running(store: Store, releases: Releases, tmp_path: Path) -> None:
    with moto_store() as (endpoint, process):
        fleet = store.fleet.model_copy(update={"pull": store.fleet.pull.model_copy(update={"endpoint": endpoint})})
        client = store_client(fleet.pull)
        create_fleet_bucket(client, fleet.pull.bucket)
        root = make_pull_board(tmp_path / "board", fleet)
        publish(releases.old, fleet, 100, client)
        assert pull(root)[1]["outcome"] == "updated"
        publish(releases.new, fleet, 100, client)
        process.terminate()
        process.wait(10)
        rc, report, _ = pull(root)
        assert (rc, report["outcome"]) == (0, "offline") and "unreachable" in report["reason"]
        assert live(root)[0] == releases.old.name
        assert report["reported"] is False


def test_the_commands(store: Store, releases: Releases, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fleet publish`, `fleet channel` and `fleet status` (pull mode) as a user runs them."""
    from nativelm.cli import main

    inventory = tmp_path / "fleet.yaml"  # the boards `fleet status` expects to hear from (never connected to)
    (tmp_path / "known_hosts").write_text("")
    (tmp_path / "no-key").write_text("")
    inventory.write_text(yaml.safe_dump({"boards": [{"name": "board-cli", "host": "127.0.0.1", "port": 22,
                                                     "user": "nobody", "key": str(tmp_path / "no-key")}]}))
    data = Params(fleet=store.fleet.model_copy(update={"inventory": str(inventory)})).model_dump(mode="json")
    data["tracking"]["uri"] = "off"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    root = make_pull_board(tmp_path / "board", store.fleet, "board-cli")

    assert main(["fleet", "publish", "--params", str(params), "--model", str(releases.old.folder)]) == 0
    out = capsys.readouterr().out
    assert f"published {releases.old.name}" in out and f"{releases.old.name} on 100% of boards" in out
    assert main(["fleet", "status", "--params", str(params)]) == 1  # board-cli never reported: silent
    assert "board-cli  silent" in capsys.readouterr().out
    assert pull(root)[1]["outcome"] in ("updated", "unchanged")
    assert main(["fleet", "status", "--params", str(params), "--boards", "board-cli"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("board-cli"))
    assert row.split()[2] == releases.old.name
    assert main(["fleet", "channel", "pause", "--params", str(params)]) == 0
    assert "(PAUSED)" in capsys.readouterr().out
    assert main(["fleet", "channel", "resume", "--params", str(params)]) == 0
    assert "(PAUSED)" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:
        main(["fleet", "publish", "--params", str(params), "--percent", "120"])
    assert bad.value.code == 2
    assert "must be in 0..100" in capsys.readouterr().err


def test_a_real_sshd_board_provisioned_for_pull_mode_pulls(sim_fleet: SimFleet, store: Store, releases: Releases) -> None:
    """`fleet provision` with fleet.mode: pull writes the board's pull/config.json; its agent then pulls over its own
    network access (here run through SSH once, as its timer would run it) and switches."""
    inv = sim_fleet.inventory
    board = inv.board("board-3")
    fleet = sim_fleet.params.fleet.model_copy(update={"mode": "pull", "pull": store.fleet.pull, **BENCH})
    assert [r.ok for r in provision(inv, [board], fleet, Path(sim_fleet.params.stack.state_dir))] == [True]
    publish(releases.new, fleet, 100, store.client)
    with BoardSession(board, inv, fleet) as session:
        try:
            config = json.loads(session.read_bytes(session.path("pull", "config.json")))
            assert (config["board"], config["endpoint"], config["channel"]) == ("board-3", store.fleet.pull.endpoint, "stable")
            report = session.agent("pull", "now")
            assert report["outcome"] in ("updated", "unchanged") and report["current"] == releases.new.name, report
            assert session.agent("verify", releases.new.name)["ok"]
        finally:  # the shared fleet goes back to push mode
            session.run(["rm", "-rf", session.path("pull")])


def test_a_wave_with_failures_is_not_widened(store: Store, releases: Releases) -> None:
    pull = store.fleet.pull.model_copy(update={"channel": "gate"})
    fleet = store.fleet.model_copy(update={"pull": pull, "max_failed_boards": 1})
    publish(releases.new, fleet, 10, store.client)
    serial = read_channel(store.client, pull)["serial"]

    def reported(board: str, outcome: str) -> None:  # what the boards of the wave said
        report = {"board": board, "channel": "gate", "outcome": outcome, "wanted": releases.new.name, "serial": serial}
        store.client.put_object(Bucket=pull.bucket, Key=f"status/{board}.json", Body=json.dumps(report).encode())

    reported("gate-1", "updated")
    reported("gate-2", "failed")
    assert widening_refusal(store.client, fleet, releases.new.name, 50) is None  # one failure: within the tolerance
    reported("gate-3", "skipped")
    refusal = widening_refusal(store.client, fleet, releases.new.name, 50)
    assert refusal.startswith(f"not widening {releases.new.name} to 50%: 2 of the 3 boards that reported on it failed "
                              "(gate-2, gate-3; fleet.max_failed_boards = 1")
    assert widening_refusal(store.client, fleet.model_copy(update={"max_failed_boards": 2}), releases.new.name, 50) is None
    assert widening_refusal(store.client, fleet, releases.new.name, 10) is None  # not wider
    assert widening_refusal(store.client, fleet, releases.old.name, 100) is None  # rolling back is never refused
