"""The fleet transport against real OpenSSH sshd boards: host key pinning, quoting, uploads, provisioning, status.

Read-only and additive tests share the provisioned `sim_fleet`; tests that break boards (stop them,
rotate host keys) start a small unprovisioned fleet of their own with `make_sim_fleet`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import paramiko
import pytest
import yaml

from nativelm import cli
from nativelm.errors import NativelmError
from nativelm.fleet import sim
from nativelm.fleet.inventory import Inventory, load_inventory
from nativelm.fleet.provision import (
    ensure_agent,
    ensure_layout,
    provision,
    upload_wheels,
)
from nativelm.fleet.sim_sshd import new_ed25519_key
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.ssh_trust import BoardError, HostKeyError, fingerprint
from nativelm.fleet.status import fleet_status, render_status
from tests.integration.conftest import SimFleet, make_sim_fleet, sim_params, small_disk

pytestmark = [pytest.mark.integration]


@pytest.fixture
def own_fleet(tmp_path: Path) -> Iterator[SimFleet]:
    """Two unprovisioned boards of this test's own, free to break."""
    fleet = make_sim_fleet(tmp_path, boards=2, canary=1, provisioned=False)
    try:
        yield fleet
    finally:
        sim.sim_down(fleet.params)


def session(fleet: SimFleet, name: str = "board-1", inventory: Inventory | None = None) -> BoardSession:
    inv = inventory or fleet.inventory
    return BoardSession(inv.board(name), inv, fleet.params.fleet)


def pinned_fingerprint(fleet: SimFleet, name: str) -> str:
    host_key = sim.sim_dir(fleet.params) / "keys" / f"{name}_host_ed25519"
    return fingerprint(paramiko.PKey.from_path(host_key))


# ---------------------------------------------------------------------------------------------
# connecting


def test_each_board_has_its_own_home_and_root(sim_fleet: SimFleet) -> None:
    homes = set()
    for board in sim_fleet.inventory.boards:
        with session(sim_fleet, board.name) as s:
            expected = sim.sim_dir(sim_fleet.params) / "boards" / board.name / "home"
            assert s.home == str(expected)
            assert s.root == f"{expected}/nativelm"
            assert s.run(["printenv", "NATIVELM_SIM_BOARD"]).stdout.strip() == board.name
            homes.add(s.home)
    assert len(homes) == 3


def test_unknown_host_key_is_refused_and_never_added(sim_fleet: SimFleet, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("# nothing pinned\n")
    inv = replace(sim_fleet.inventory, known_hosts=empty)
    with pytest.raises(HostKeyError) as info:
        session(sim_fleet, "board-2", inv).connect()
    message = str(info.value)
    assert message.startswith("board board-2: host key: ")
    assert pinned_fingerprint(sim_fleet, "board-2") in message
    assert "not pinned" in message and "refused" in message
    assert empty.read_text() == "# nothing pinned\n"


def test_hashed_known_hosts_lines_are_accepted(sim_fleet: SimFleet, tmp_path: Path) -> None:
    hashed = tmp_path / "known_hosts"
    lines = []
    for line in sim_fleet.inventory.known_hosts.read_text().splitlines():
        if line and not line.startswith("#"):
            host, rest = line.split(" ", 1)
            lines.append(f"{paramiko.HostKeys.hash_host(host)} {rest}")
    hashed.write_text("\n".join(lines) + "\n")
    assert "127.0.0.1" not in hashed.read_text()
    with session(sim_fleet, "board-3", replace(sim_fleet.inventory, known_hosts=hashed)) as s:
        assert s.run(["true"]).rc == 0


def test_changed_host_key_is_refused_with_both_fingerprints(own_fleet: SimFleet) -> None:
    before = own_fleet.inventory.known_hosts.read_text()
    old = pinned_fingerprint(own_fleet, "board-2")
    sim.rotate_host_key(own_fleet.params, "board-2")
    new = pinned_fingerprint(own_fleet, "board-2")
    assert new != old
    with pytest.raises(HostKeyError) as info:
        session(own_fleet, "board-2").connect()
    message = str(info.value)
    assert f"pinned ssh-ed25519 {old}, offered ssh-ed25519 {new}; refused" in message
    assert own_fleet.inventory.known_hosts.read_text() == before
    with session(own_fleet, "board-1") as s:  # the other boards are unaffected
        assert s.run(["true"]).rc == 0


def test_wrong_client_key_fails_authentication(sim_fleet: SimFleet, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger_ed25519"
    new_ed25519_key(stranger, "stranger")
    board = sim_fleet.inventory.board("board-1").model_copy(update={"key": str(stranger)})
    with pytest.raises(BoardError, match=r"board board-1: connect: key authentication failed for user \w+ at "):
        BoardSession(board, sim_fleet.inventory, sim_fleet.params.fleet).connect()
    missing = board.model_copy(update={"key": str(tmp_path / "nope")})
    with pytest.raises(BoardError, match=r"connect: private key not found: .*nope"):
        BoardSession(missing, sim_fleet.inventory, sim_fleet.params.fleet).connect()


def test_stopped_board_refuses_connections_and_kills_open_sessions(own_fleet: SimFleet) -> None:
    with session(own_fleet, "board-2") as s:
        sim.stop_board(own_fleet.params, "board-2")
        with pytest.raises(BoardError, match="board board-2: command: "):
            s.run(["true"])
    with pytest.raises(BoardError, match=r"board board-2: connect: connection refused by 127\.0\.0\.1:\d+"):
        session(own_fleet, "board-2").connect()
    sim.start_board(own_fleet.params, "board-2")
    with session(own_fleet, "board-2") as s:
        assert s.run(["echo", "back"]).stdout == "back\n"


# ---------------------------------------------------------------------------------------------
# commands and paths


def test_hostile_arguments_reach_the_board_as_plain_text(sim_fleet: SimFleet, tmp_path: Path) -> None:
    pwned = tmp_path / "pwned"
    hostile = [f"; touch {pwned}", f"$(touch {pwned})", f"`touch {pwned}`", f"' ; touch {pwned} '",
               f"\"; touch {pwned}\"", f"| touch {pwned}", "\n", "*", "~", "$HOME"]
    with session(sim_fleet) as s:
        out = s.run(["printf", "%s\\0", *hostile]).stdout
    assert out.split("\0")[:-1] == hostile
    assert not pwned.exists()


def test_run_reports_failures_and_timeouts(sim_fleet: SimFleet) -> None:
    with session(sim_fleet) as s:
        with pytest.raises(BoardError) as info:
            s.run(["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 3"])
        assert (info.value.phase, info.value.reason) == ("sh", "the reason")
        assert s.run(["sh", "-c", "exit 4"], check=False).rc == 4
        assert s.run(["cat"], stdin=b"fed through stdin").stdout == "fed through stdin"
        with pytest.raises(BoardError, match=r"board board-1: command: timed out after 0\.5 s"):
            s.run(["sleep", "30"], timeout=0.5)
        assert s.run(["echo", "still usable"]).stdout == "still usable\n"


def test_paths_are_built_from_plain_parts_only(sim_fleet: SimFleet) -> None:
    with session(sim_fleet) as s:
        assert s.path("releases", "v3", "model.onnx") == f"{s.root}/releases/v3/model.onnx"
        assert s.runtime_python == f"{s.root}/venv/bin/python"
        for bad in ("..", "a/b", "", ".bashrc", "x;rm", "$(id)"):
            with pytest.raises(BoardError, match="path: refused remote path component"):
                s.path("releases", bad)


def test_agent_errors_become_board_errors(sim_fleet: SimFleet) -> None:
    with session(sim_fleet) as s:
        assert s.agent("facts")["runtime_python"] is True
        with pytest.raises(BoardError) as info:
            s.agent("verify", "no-such-release")
        assert (info.value.phase, info.value.reason) == ("verify", "no release no-such-release on this board")
        with pytest.raises(BoardError, match=r"verify: bad release name: '\.\./x'"):
            s.agent("verify", "../x")


# ---------------------------------------------------------------------------------------------
# uploads


def test_put_file_resumes_an_interrupted_upload(sim_fleet: SimFleet, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    local = tmp_path / "model.onnx"
    local.write_bytes(data)
    with session(sim_fleet, "board-3") as s:
        remote = s.path("upload-test.bin")
        s.run(["mkdir", "-p", s.root])
        with s.sftp.open(remote + ".part", "wb") as part:
            part.write(data[:1_000_000])
        seen: list[int] = []
        sent = s.put_file(local, remote, progress=seen.append)
        assert sent == len(data) - 1_000_000
        assert seen and seen[-1] == sent and seen == sorted(seen)
        assert s.run(["sha256sum", remote]).stdout.split()[0] == hashlib.sha256(data).hexdigest()
        assert s.remote_size(remote + ".part") is None
        with s.sftp.open(remote + ".part", "wb") as part:  # longer than the file: not a prefix, start over
            part.write(os.urandom(len(data) + 10))
        assert s.put_file(local, remote) == len(data)
        assert s.put_file(local, remote, resume=False) == len(data)
        assert s.run(["sha256sum", remote]).stdout.split()[0] == hashlib.sha256(data).hexdigest()
        s.run(["rm", "-f", remote])


def test_full_disk_is_reported_as_such(sim_fleet: SimFleet, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024))
    with small_disk(tmp_path / "disk", "1m") as disk, session(sim_fleet) as s:
        with pytest.raises(BoardError) as info:
            s.put_file(local, f"{disk}/big.bin")
        assert info.value.phase == "upload"
        assert info.value.reason.startswith(f"{disk}/big.bin: no space left on device")


# ---------------------------------------------------------------------------------------------
# provisioning and status


def test_provision_is_idempotent(sim_fleet: SimFleet) -> None:
    inv, params = sim_fleet.inventory, sim_fleet.params
    results = provision(inv, inv.boards, params.fleet, Path(params.stack.state_dir))
    assert [(r.board, r.ok, r.installed, r.uploaded_bytes, r.actions) for r in results] == [
        (b.name, True, False, 0, ("up to date",)) for b in inv.boards]
    with session(sim_fleet, "board-2") as s:
        facts = s.agent("facts")
        assert facts["runtime_packages"] == sorted(params.fleet.runtime_packages)
        probe = "import numpy, onnxruntime, tokenizers as t; print(numpy.__version__, onnxruntime.__version__, t.__version__)"
        versions = s.run([s.runtime_python, "-c", probe]).stdout
    pins = dict(p.split("==") for p in params.fleet.runtime_packages)
    assert versions.split() == [pins["numpy"], pins["onnxruntime"], pins["tokenizers"]]


def test_agent_and_wheels_are_sent_only_when_they_differ(own_fleet: SimFleet, tmp_path: Path) -> None:
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "tiny-1.0-py3-none-any.whl").write_bytes(b"wheel one")
    with session(own_fleet, "board-1") as s:
        ensure_layout(s)
        assert ensure_agent(s) is True
        assert ensure_agent(s) is False
        s.write_bytes(s.path("wheels", "old-0.1-py3-none-any.whl"), b"no pin needs this")
        assert upload_wheels(s, wheelhouse) == len(b"wheel one")
        assert upload_wheels(s, wheelhouse) == 0
        assert s.agent("wheel-hashes")["files"] == {
            "tiny-1.0-py3-none-any.whl": hashlib.sha256(b"wheel one").hexdigest()}
        s.write_bytes(s.agent_path, b"print('tampered')")
        assert ensure_agent(s) is True
        assert s.agent("facts")["runtime_python"] is False


def test_provision_reports_a_missing_python(own_fleet: SimFleet) -> None:
    inv = own_fleet.inventory
    board = inv.board("board-1").model_copy(update={"python": "/opt/no/python3"})
    [result] = provision(inv, [board], own_fleet.params.fleet, Path(own_fleet.params.stack.state_dir))
    assert not result.ok
    assert result.error == ("python: /opt/no/python3 not found on the board (set `python:` for this board in the "
                            "inventory)")


def test_status_table_shows_releases_benchmarks_and_unreachable_boards(sim_fleet: SimFleet, own_fleet: SimFleet,
                                                                       tmp_path: Path) -> None:
    with session(sim_fleet, "board-1") as s:
        folder = s.path("releases", "status-test")
        s.run(["mkdir", "-p", folder])
        s.write_bytes(f"{folder}/release.json", json.dumps({"sha256": {}}).encode())
        before = s.agent("facts")["current"]
        s.agent("activate", "status-test")
        s.agent("save-bench", "status-test", stdin=json.dumps({"decode_tokens_per_s": 123.45}).encode())
    try:
        rows = fleet_status(sim_fleet.inventory, sim_fleet.inventory.boards, sim_fleet.params.fleet)
        assert [(r.board, r.reachable, r.runtime) for r in rows] == [
            ("board-1", True, "ok"), ("board-2", True, "ok"), ("board-3", True, "ok")]
        assert (rows[0].current, rows[0].decode_tokens_per_s) == ("status-test", 123.45)
        lines = render_status(rows)
        assert lines[0].split() == ["BOARD", "ADDRESS", "STATE", "ARCH", "PYTHON", "FREE_MB", "RELEASE", "PREVIOUS",
                                    "RUNTIME", "OPS", "DECODE_TOK/S", "NOTE"]
        # a live release listing no files does not verify: status says so rather than "ok"
        assert lines[1].split()[:3] == ["board-1", f"127.0.0.1:{rows[0].address.split(':')[1]}", "damaged"]
        assert "status-test" in lines[1] and "123.5" in lines[1]
        assert lines[1].endswith('release.json has no "sha256" map of the release\'s files')
        assert lines[-1] == "3 of 3 boards reachable, 1 damaged or unhealthy"
    finally:
        with session(sim_fleet, "board-1") as s:
            if before:
                s.agent("activate", before)
            else:
                s.run(["rm", "-f", s.path("current"), s.path("previous")])
            s.run(["rm", "-rf", s.path("releases", "status-test"), s.path("bench", "status-test.json")])

    # an unprovisioned board answers too; a stopped one is unreachable with its reason (via the CLI)
    sim.stop_board(own_fleet.params, "board-2")
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(own_fleet.params.model_dump(mode="json")))
    lines = cli_lines(["fleet", "status", "--params", str(params_file)], expect=1)
    assert lines[1].split()[2:4] == ["ok", os.uname().machine]
    assert "missing" in lines[1]  # no runtime virtualenv yet
    assert lines[2].split()[2] == "unreachable" and "connection refused by 127.0.0.1:" in lines[2]
    assert lines[-1] == "1 of 2 boards reachable"


def cli_lines(argv: list[str], expect: int) -> list[str]:
    """Run `nativelm ARGV` in-process; return its stdout lines after checking the exit code."""
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(argv)
    assert code == expect, out.getvalue()
    return out.getvalue().splitlines()


def test_sim_up_is_idempotent_and_down_stops_everything(own_fleet: SimFleet, tmp_path: Path) -> None:
    params = own_fleet.params
    first = {b.name: b.pid for b in sim.sim_status(params)}
    again = sim.sim_up(params, boards=2, canary=1)
    assert [(b.name, b.action, b.pid) for b in again] == [(n, "already running", p) for n, p in first.items()]
    inv = load_inventory(params.fleet.inventory)
    assert [(b.name, b.groups) for b in inv.boards] == [("board-1", ["fleet", "canary"]), ("board-2", ["fleet"])]
    key = sim.sim_dir(params) / "keys" / "client_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (key.parent.stat().st_mode & 0o077) == 0
    grown = sim.sim_up(params, boards=3, canary=0)
    assert [b.action for b in grown] == ["already running", "already running", "started"]
    assert all("canary" not in b.groups for b in load_inventory(params.fleet.inventory).boards)
    shrunk = sim.sim_up(params, boards=1, canary=1)
    assert [(b.name, b.action) for b in shrunk] == [("board-1", "already running"), ("board-2", "removed"),
                                                     ("board-3", "removed")]
    with session(own_fleet, "board-1") as s:
        down = sim.sim_down(params)
        assert [(b.name, b.action) for b in down] == [("board-1", "stopped")]
        with pytest.raises(BoardError):
            s.run(["true"])
    assert [b.state for b in sim.sim_status(params)] == ["stopped"]
    sim.sim_down(params, purge=True)
    assert sorted(p.name for p in sim.sim_dir(params).iterdir()) == [".lock"]


def test_sim_up_refuses_a_taken_port_and_an_unusable_folder(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        params = sim_params(tmp_path / "a", boards=1, canary=0)
        params = params.model_copy(update={"fleet": params.fleet.model_copy(update={
            "sim": params.fleet.sim.model_copy(update={"base_port": port})})})
        with pytest.raises(NativelmError, match=rf"board-1: port {port} on 127\.0\.0\.1 is already in use by pid "):
            sim.sim_up(params)
    spaced = sim_params(tmp_path / "with space", boards=1, canary=0)
    with pytest.raises(NativelmError, match="fleet.sim.dir: .*with space/sim holds characters"):
        sim.sim_up(spaced)
