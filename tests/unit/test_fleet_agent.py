"""The board-side agent, run as a board runs it: its zipapp in a subprocess on a board-like root, standard
library only."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nativelm.fleet.agent import AGENT_NAME, SIGNATURE
from nativelm.fleet.agent_pack import agent_bytes, archive_files, inline_source
from nativelm.fleet.signing import allowed_signers_text, create_signing_key, sign_manifest


class Board:
    """A board's remote root in a temp folder, with the agent installed at bin/nativelm-agent.pyz."""

    def __init__(self, root: Path, key: Path) -> None:
        self.root, self.key = root, key
        (root / "bin").mkdir(parents=True)
        self.agent = root / "bin" / AGENT_NAME
        self.agent.write_bytes(agent_bytes())
        (root / "keys").mkdir()
        (root / "keys" / "allowed_signers").write_text(allowed_signers_text([f"{key}.pub"]))

    def call(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
        # -I -S: no site-packages, no environment: only the standard library is importable
        return subprocess.run([sys.executable, "-I", "-S", str(self.agent), *args], input=stdin or b"",
                              capture_output=True, check=False)

    def ok(self, *args: str, stdin: bytes | None = None) -> dict:
        done = self.call(*args, stdin=stdin)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b""
        return json.loads(done.stdout)

    def error(self, *args: str, stdin: bytes | None = None) -> str:
        done = self.call(*args, stdin=stdin)
        assert done.returncode == 1
        assert done.stdout == b""
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0][len("error: "):]

    def release(self, name: str, files: dict[str, bytes] | None = None) -> Path:
        """A complete release folder with release.json listing the sha256 of every other file."""
        files = files if files is not None else {"model.onnx": name.encode() * 100, "tokenizer.json": b"{}"}
        folder = self.root / "releases" / name
        folder.mkdir(parents=True)
        for file, data in files.items():
            (folder / file).write_bytes(data)
        manifest = {"name": name, "sha256": {f: hashlib.sha256(d).hexdigest() for f, d in files.items()}}
        (folder / "release.json").write_text(json.dumps(manifest))
        sign_manifest(folder / "release.json", self.key, folder / SIGNATURE)
        return folder

    def link(self, name: str) -> str | None:
        path = self.root / name
        return os.readlink(path) if path.is_symlink() else None


@pytest.fixture(scope="module")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("signing") / "release-key"
    create_signing_key(key)
    return key


@pytest.fixture
def board(tmp_path: Path, release_key: Path) -> Board:
    return Board(tmp_path / "home" / "nativelm", release_key)


def age(folder: Path, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    os.utime(folder, (then, then))


@pytest.mark.parametrize("name", [*sorted(n for n in archive_files() if n.endswith(".py")), "inline"])
def test_agent_is_stdlib_only_for_python_3_9(name: str) -> None:
    source = inline_source() if name == "inline" else archive_files()[name]
    tree = ast.parse(source, feature_version=(3, 9))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "nativelm_agent"}, \
        imported - set(sys.stdlib_module_names)


def test_the_agent_zipapp_is_reproducible() -> None:
    assert agent_bytes() == agent_bytes.__wrapped__()


def test_facts_of_a_fresh_board(board: Board) -> None:
    facts = board.ok("facts")
    assert facts["arch"] and facts["python"].startswith("3.")
    assert facts["free_disk_mb"] > 0
    assert (facts["current"], facts["previous"], facts["releases"]) == (None, None, [])
    assert (facts["runtime_python"], facts["lock"], facts["last_bench"]) == (False, None, None)


def test_facts_from_stdin_with_an_explicit_root(board: Board) -> None:
    board.release("v1")
    board.ok("activate", "v1")
    done = subprocess.run([sys.executable, "-I", "-S", "-", "--root", str(board.root), "facts"],
                          input=inline_source(), capture_output=True, check=True)
    assert json.loads(done.stdout)["current"] == "v1"
    missing = subprocess.run([sys.executable, "-I", "-S", "-", "facts"], input=inline_source(),
                             capture_output=True, check=False)
    assert missing.returncode == 1 and b"--root DIR is needed" in missing.stderr


def test_hashes_lists_complete_files_and_partial_uploads(board: Board) -> None:
    assert board.ok("hashes", "v1") == {"files": {}, "partial": {}}
    folder = board.root / "releases" / "v1"
    assert folder.is_dir()  # created for the upload that follows
    (folder / "model.onnx").write_bytes(b"abc")
    (folder / "tokenizer.json.part").write_bytes(b"12345")
    (folder / ".hidden").write_bytes(b"x")
    assert board.ok("hashes", "v1") == {"files": {"model.onnx": hashlib.sha256(b"abc").hexdigest()},
                                        "partial": {"tokenizer.json": 5}}


def test_verify_names_each_bad_file(board: Board) -> None:
    folder = board.release("v1")
    assert board.ok("verify", "v1") == {"ok": True, "files": 3}
    (folder / "model.onnx").write_bytes(b"tampered")
    (folder / "tokenizer.json").unlink()
    assert board.error("verify", "v1") == "hash mismatch: model.onnx; missing file: tokenizer.json"
    (folder / "release.json").unlink()
    assert board.error("verify", "v1") == "missing file: release.json"
    assert board.error("verify", "v9") == "no release v9 on this board"
    hostile = board.release("v2", {"model.onnx": b"m"})
    (hostile / "release.json").write_text(json.dumps({"sha256": {"../../bin/nativelm-agent.py": "0" * 64}}))
    assert board.error("verify", "v2") == "bad file name in release.json: '../../bin/nativelm-agent.py'"


def test_link_reuses_an_identical_file_from_another_release(board: Board) -> None:
    old = board.release("v1", {"model.onnx": b"same weights", "tokenizer.json": b"tok"})
    sha = hashlib.sha256(b"same weights").hexdigest()
    reply = board.ok("link", "v2", "model.onnx", sha)
    assert (reply["linked"], reply["from"]) == (True, "v1") and reply["how"] in ("reflink", "copy")
    new = board.root / "releases" / "v2" / "model.onnx"
    assert new.read_bytes() == b"same weights"
    assert new.stat().st_ino != (old / "model.onnx").stat().st_ino  # never a hard link
    assert new.stat().st_nlink == 1
    with open(new, "r+b") as handle:  # damage to one release ...
        handle.write(b"X")
    assert (old / "model.onnx").read_bytes() == b"same weights"  # ... never reaches another
    tok_sha = hashlib.sha256(b"tok").hexdigest()
    assert board.ok("link", "v2", "renamed.json", tok_sha)["linked"]  # found under another name
    assert board.ok("link", "v2", "other.bin", "f" * 64) == {"linked": False}


def test_verify_seals_the_release_read_only_and_stamps_it(board: Board) -> None:
    folder = board.release("v1")
    assert board.ok("verify", "v1") == {"ok": True, "files": 3}
    assert {oct(p.stat().st_mode & 0o777) for p in folder.iterdir()} == {"0o444"}
    assert oct(folder.stat().st_mode & 0o777) == "0o555"
    stamp = json.loads((board.root / "verified" / "v1.json").read_text())
    model = folder / "model.onnx"
    assert stamp["files"]["model.onnx"] == {"size": model.stat().st_size, "mtime_ns": model.stat().st_mtime_ns,
                                            "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    old = board.release("v0", {"model.onnx": b"w", "tokenizer.json": b"t"})
    shared = board.release("v2", {"tokenizer.json": b"t"})
    os.unlink(shared / "tokenizer.json")
    os.link(old / "tokenizer.json", shared / "tokenizer.json")  # as an older agent linked shared files
    board.ok("verify", "v2")
    assert (shared / "tokenizer.json").stat().st_nlink == 1 and (old / "tokenizer.json").stat().st_nlink == 1
    assert (shared / "tokenizer.json").read_bytes() == b"t"
    board.ok("hashes", "v1")  # an update of the release opens it again
    assert oct(folder.stat().st_mode & 0o777) == "0o755"
    board.ok("verify", "v1")
    assert board.ok("discard", "v1") == {"discarded": True}  # sealed, and removed all the same
    assert not folder.exists() and not (board.root / "verified" / "v1.json").exists()


def test_check_finds_damage_by_size_and_mtime_or_by_hash(board: Board) -> None:
    folder = board.release("v1")
    board.ok("verify", "v1")
    assert board.ok("check", "v1", "86400") == {"ok": True, "mode": "quick", "problems": [],
                                                "full_at": json.loads((board.root / "verified" / "v1.json")
                                                                      .read_text())["full_at"]}
    model = folder / "model.onnx"
    info = model.stat()
    os.chmod(model, 0o644)
    model.write_bytes(b"x" * info.st_size)  # same size, new contents: the mtime tells
    quick = board.ok("check", "v1", "86400")
    assert (quick["ok"], quick["mode"]) == (False, "quick")
    assert quick["problems"][0].startswith("changed since verified: model.onnx")
    os.utime(model, ns=(info.st_atime_ns, info.st_mtime_ns))  # mtime put back: only a hash tells
    assert board.ok("check", "v1", "86400")["ok"] is True
    assert board.ok("check", "v1", "86400", "full") == {"ok": False, "mode": "full",
                                                        "problems": ["hash mismatch: model.onnx"]}
    assert board.ok("check", "v1", "0")["mode"] == "full"  # the full check is due at once
    with open(model, "r+b") as handle:
        handle.truncate(100)
    assert board.ok("check", "v1", "86400")["ok"] is False
    assert board.error("check", "v1", "1", "fast") == "bad check mode: 'fast' (allowed: quick|full)"


def test_restore_puts_back_both_links_and_never_a_release_that_does_not_verify(board: Board) -> None:
    for name in ("v1", "v2", "v3"):
        board.release(name)
    board.ok("activate", "v1")
    board.ok("activate", "v2")
    board.ok("activate", "v3")  # v3 failed its health check after the switch: back to v2, previous v1
    assert board.ok("restore", "v2", "v1") == {"current": "v2", "previous": "v1", "replaced": "v3"}
    assert (board.link("current"), board.link("previous")) == ("releases/v2", "releases/v1")
    board.ok("activate", "v3")
    assert board.ok("restore", "v2") == {"current": "v2", "previous": None, "replaced": "v3"}
    assert board.link("previous") is None
    (board.root / "releases" / "v1" / "model.onnx").write_bytes(b"corrupt")
    assert board.error("restore", "v1") == "cannot restore v1: hash mismatch: model.onnx"
    assert board.error("restore", "v2", "v9") == "cannot restore v2: previous release v9 is not on this board"
    assert board.link("current") == "releases/v2"


def test_remove_and_discard(board: Board) -> None:
    folder = board.release("v1")
    (folder / "model.onnx.part").write_bytes(b"half")
    assert board.ok("remove", "v1", "model.onnx") == {"removed": True}
    assert not (folder / "model.onnx").exists() and not (folder / "model.onnx.part").exists()
    assert board.ok("remove", "v1", "model.onnx") == {"removed": False}
    board.release("v2")
    board.ok("activate", "v1")
    board.ok("activate", "v2")
    assert board.error("discard", "v2") == "release v2 is current: not discarded"
    assert board.error("discard", "v1") == "release v1 is previous: not discarded"
    board.release("v3")
    assert board.ok("discard", "v3") == {"discarded": True}
    assert not (board.root / "releases" / "v3").exists()
    assert board.ok("discard", "v3") == {"discarded": False}


def test_lock_is_held_by_one_owner_until_unlocked_or_stale(board: Board) -> None:
    assert board.ok("lock", "rollout-a", "3600") == {"locked": True, "took_over": False}
    assert board.ok("lock", "rollout-a", "3600") == {"locked": True, "took_over": False}  # re-entrant
    message = board.error("lock", "rollout-b", "3600")
    assert message.startswith("locked by rollout-a since ")
    assert board.ok("facts")["lock"]["owner"] == "rollout-a"
    assert board.ok("unlock", "rollout-b") == {"unlocked": False}
    assert board.ok("unlock", "rollout-a") == {"unlocked": True}
    assert board.ok("lock", "rollout-b", "3600") == {"locked": True, "took_over": False}


def test_the_lock_records_the_controller_that_holds_it(board: Board) -> None:
    board.ok("lock", "rollout-a", "3600", "ctl-host.example:4242:1700000000.25")
    lock = board.ok("facts")["lock"]
    assert (lock["owner"], lock["host"], lock["pid"], lock["started"]) == ("rollout-a", "ctl-host.example", 4242,
                                                                          1700000000.25)
    assert board.error("lock", "rollout-b", "1", "4242").startswith("bad lock holder (HOST:PID:START_TIME)")


def test_a_stale_lock_is_taken_over(board: Board) -> None:
    board.ok("lock", "crashed", "3600")
    owner = board.root / "lock" / "owner.json"
    record = json.loads(owner.read_text())
    record["since"] = "2020-01-01T00:00:00+00:00"
    owner.write_text(json.dumps(record))
    assert board.error("lock", "next", "1e12").startswith("locked by crashed since 2020-01-01")
    assert board.ok("lock", "next", "3600") == {"locked": True, "took_over": True}
    assert board.ok("unlock", "crashed") == {"unlocked": False}
    assert board.ok("unlock", "next") == {"unlocked": True}
    assert not (board.root / "lock").exists()
    assert board.ok("facts")["lock"] is None


@pytest.mark.parametrize("stale_lock", [False, True])
def test_only_one_of_many_concurrent_lockers_wins(board: Board, stale_lock: bool) -> None:
    if stale_lock:  # all of them try to take over the same dead rollout's lock at once
        board.ok("lock", "crashed", "1")
        owner = board.root / "lock" / "owner.json"
        owner.write_text(json.dumps({"owner": "crashed", "since": "2020-01-01T00:00:00+00:00"}))
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: board.call("lock", f"owner-{i}", "3600"), range(8)))
    winners = [json.loads(r.stdout) for r in results if r.returncode == 0]
    assert winners == [{"locked": True, "took_over": stale_lock}]
    assert all(r.stderr.startswith(b"error: locked by owner-") for r in results if r.returncode != 0)
    holder = board.ok("facts")["lock"]["owner"]
    assert board.ok("unlock", holder) == {"unlocked": True}


def test_activate_swaps_current_and_previous(board: Board) -> None:
    board.release("v1")
    board.release("v2")
    assert board.ok("activate", "v1") == {"current": "v1", "previous": None, "changed": True}
    assert board.ok("activate", "v2") == {"current": "v2", "previous": "v1", "changed": True}
    assert (board.link("current"), board.link("previous")) == ("releases/v2", "releases/v1")
    assert board.ok("activate", "v2")["changed"] is False
    assert board.link("previous") == "releases/v1"
    assert board.error("activate", "v7") == "no complete release v7 on this board (missing release.json)"
    assert sorted(p.name for p in board.root.iterdir()) == ["bin", "current", "keys", "previous", "releases"]


def test_current_never_disappears_while_activations_run(board: Board) -> None:
    board.release("v1")
    board.release("v2")
    board.ok("activate", "v1")
    seen: set[str | None] = set()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                seen.add(os.readlink(board.root / "current"))
            except FileNotFoundError:
                seen.add(None)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for i in range(12):
            board.ok("activate", "v2" if i % 2 == 0 else "v1")
    finally:
        stop.set()
        watcher.join()
    assert seen == {"releases/v1", "releases/v2"}


def test_rollback_goes_back_to_a_verified_release(board: Board) -> None:
    assert board.error("rollback") == "nothing to roll back to: no previous release"
    board.release("v1")
    board.release("v2")
    board.ok("activate", "v1")
    board.ok("activate", "v2")
    assert board.ok("rollback") == {"current": "v1", "previous": "v2", "changed": True}
    board.release("v3")
    (board.root / "releases" / "v3" / "model.onnx").write_bytes(b"corrupt")
    assert board.error("rollback", "v3") == "cannot roll back to v3: hash mismatch: model.onnx"
    assert board.link("current") == "releases/v1"  # untouched
    assert board.ok("rollback", "v2")["current"] == "v2"


def test_prune_keeps_the_newest_and_never_current_or_previous(board: Board) -> None:
    for i, name in enumerate(["v1", "v2", "v3", "v4", "v5"]):
        age(board.release(name), 1000 - i * 100)  # v1 oldest
    board.ok("activate", "v1")
    board.ok("activate", "v2")  # current v2, previous v1: both old
    age(board.root / "releases" / "v1", 2000)
    age(board.root / "releases" / "v2", 1900)
    assert board.ok("facts")["releases"] == ["v1", "v2", "v3", "v4", "v5"]
    (board.root / "bench").mkdir()
    (board.root / "bench" / "v3.json").write_text("{}")
    result = board.ok("prune", "3")
    assert result["removed"] == ["v3", "v4"]
    assert sorted(p.name for p in (board.root / "releases").iterdir()) == ["v1", "v2", "v5"]
    assert not (board.root / "bench" / "v3.json").exists()
    assert board.ok("prune", "1")["removed"] == ["v5"]  # current and previous stay even beyond KEEP
    assert board.ok("prune", "1")["removed"] == []


def test_save_bench_is_shown_for_the_current_release(board: Board) -> None:
    board.release("v1")
    board.ok("activate", "v1")
    bench = {"decode_tokens_per_s": 41.5, "machine": "x86_64"}
    assert board.ok("save-bench", "v1", stdin=json.dumps(bench).encode()) == {"saved": True}
    assert board.ok("facts")["last_bench"] == bench
    assert board.error("save-bench", "v1", stdin=b"not json").startswith("save-bench: stdin is not JSON")
    assert board.error("save-bench", "v1", stdin=b"[1, 2]") == "save-bench: stdin must hold one JSON object"


@pytest.mark.parametrize(("args", "problem"), [
    (["hashes", "../../etc"], "bad release name: '../../etc'"),
    (["hashes", "a/b"], "bad release name: 'a/b'"),
    (["hashes", ".."], "bad release name: '..'"),
    (["verify", "v1;rm -rf ~"], "bad release name"),
    (["remove", "v1", ".bashrc"], "bad file name: '.bashrc'"),
    (["remove", "v1", "../x"], "bad file name: '../x'"),
    (["link", "v1", "model.onnx", "NOT-HEX"], "bad sha256: 'NOT-HEX'"),
    (["lock", "owner with space", "10"], "bad lock owner"),
    (["lock", "me", "soon"], "bad STALE_S: 'soon' is not a number"),
    (["lock", "me", "nan"], "bad STALE_S"),
    (["prune", "0"], "bad KEEP"),
    (["facts", "extra"], "usage: facts"),
    (["hashes"], "usage: hashes RELEASE"),
    (["rollback", "v1", "v2"], "usage: rollback [RELEASE]"),
    (["format-disk"], "usage: nativelm-agent.pyz COMMAND ARGS"),
    ([], "usage: nativelm-agent.pyz COMMAND ARGS"),
])
def test_bad_arguments_are_refused_with_one_line(board: Board, args: list[str], problem: str) -> None:
    assert problem in board.error(*args)
    assert not (board.root.parent / "etc").exists()


def test_verify_refuses_an_unsigned_a_wrongly_signed_and_a_tampered_release(board: Board, tmp_path: Path) -> None:
    folder = board.release("v1")
    (folder / SIGNATURE).unlink()
    assert board.error("verify", "v1") == "release v1 refused: not signed (no release.json.sig)"
    other = tmp_path / "other-key"
    create_signing_key(other)
    sign_manifest(folder / "release.json", other, folder / SIGNATURE)
    assert board.error("verify", "v1").startswith("release v1 refused: release.json signature does not verify")
    sign_manifest(folder / "release.json", board.key, folder / SIGNATURE)
    manifest = json.loads((folder / "release.json").read_text())
    (folder / "release.json").write_text(json.dumps({**manifest, "name": "v1-tampered"}))
    assert board.error("verify", "v1").startswith("release v1 refused: release.json signature does not verify")
    assert not (board.root / "verified" / "v1.json").exists()  # never sealed nor stamped
    (board.root / "keys" / "allowed_signers").unlink()
    assert board.error("verify", "v1") == ("release v1 refused: no allowed_signers on this board "
                                           "(run `nativelm fleet provision`)")
