"""Bad input of every kind the adversarial review found: one clear line, exit 2, never a traceback or a hang.

Each case runs the real command (`nativelm ...` or the board runtime, in a subprocess where the
exit status and stderr matter) on real files: YAML and JSON bombs, FIFOs, malformed known_hosts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nativelm.errors import NativelmError, ParamsError
from nativelm.fsutil import BoundedReadError, read_bounded
from nativelm.params.root import load_params, parse_params
from nativelm.runtime.errors import BadArgument
from nativelm.jsonfile import JsonFileError, read_json_file
from nativelm.yamlio import MAX_DEPTH, MAX_NODES
from tests.unit.runtime_model import Export

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def run_cli(*args: str, module: str = "nativelm.cli", cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env, cwd=cwd)


def one_error_line(proc: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single error line of a failed command (argparse's usage lines before it are allowed)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def params_error(text: str) -> str:
    with pytest.raises(ParamsError) as info:
        parse_params(text, "p.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("p.yaml")
    return message


# ---------------------------------------------------------------- YAML bounds


def test_a_mapping_key_that_is_a_list_or_a_mapping_is_one_line() -> None:
    assert "p.yaml:1:3: invalid YAML: a mapping key must be a plain value, found a list" in params_error("? [a]\n: 1\n")
    assert "found a mapping" in params_error("train: {? {a: 1}: 2}\n")


def test_deep_nesting_fails_fast_naming_the_place() -> None:
    message = params_error("seed: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert f"nested deeper than {MAX_DEPTH} levels" in message
    assert params_error("a: " + "{b: " * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1))


def test_a_billion_laughs_file_fails_before_anything_is_built() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]  # 10**10 values
    message = params_error("\n".join(lines) + "\n")
    assert f"more than {MAX_NODES} values once aliases are expanded" in message
    assert "p.yaml:6:" in message  # the first level past the bound: a5 holds 1 111 111 values


def test_aliases_nesting_past_the_depth_and_a_cycle() -> None:
    chain = ["l0: &l0 [1]"] + [f"l{i}: &l{i} [*l{i - 1}]" for i in range(1, MAX_DEPTH + 2)]
    assert "deeper than 64 levels once aliases are expanded" in params_error("\n".join(chain) + "\n")
    assert "an alias refers to a value that contains it" in params_error("a: &a [*a]\n")


def test_integers_are_bounded() -> None:
    assert "integer literal of 5000 characters" in params_error("seed: " + "9" * 5000 + "\n")
    assert "p.yaml: train.max_steps: integer 9223372036854775808 does not fit in 64 bits" in params_error(
        "train: {max_steps: 9223372036854775808}\n")
    assert "model.bit_schedule[0][1]: integer" in params_error("model: {bit_schedule: [[0, 99999999999999999999]]}\n")


def test_floats_must_be_finite() -> None:
    assert "fleet.lock_stale_s: Input should be a finite number" in params_error("fleet: {lock_stale_s: .inf}\n")


def test_resume_off_works_as_documented_and_booleans_are_yaml_1_2() -> None:
    for word in ("off", "auto", "require"):
        assert parse_params(f"train: {{resume: {word}}}\n").train.resume == word
    assert parse_params("train: {compile: true}\n").train.compile is True
    # `no` is a word in YAML 1.2 (as DVC reads params.yaml), so a boolean knob refuses it by name
    assert "train.compile" in params_error("train: {compile: no}\n")


def test_an_empty_params_file_is_an_error(tmp_path: Path) -> None:
    for text in ("", "\n\n", "# only comments\n"):
        (tmp_path / "params.yaml").write_text(text)
        with pytest.raises(ParamsError, match=r"params.yaml is empty"):
            load_params(tmp_path / "params.yaml")
    proc = run_cli("train", cwd=tmp_path)
    assert "params.yaml is empty" in one_error_line(proc)


def test_a_params_file_that_is_a_fifo_or_too_large_is_one_line(tmp_path: Path) -> None:
    fifo = tmp_path / "params.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ParamsError, match="is a FIFO, expected a regular file"):
        load_params(fifo)  # no writer: a blocking open would wait forever
    big = tmp_path / "big.yaml"
    with open(big, "wb") as handle:
        handle.truncate((16 << 20) + 1)
    with pytest.raises(ParamsError, match=r"big.yaml: 16 MiB, more than the 16 MiB allowed"):
        load_params(big)


def test_read_bounded(tmp_path: Path) -> None:
    small = tmp_path / "f"
    small.write_bytes(b"x" * 10)
    assert read_bounded(small, 10) == b"x" * 10
    with pytest.raises(BoundedReadError, match="more than the 9 bytes allowed"):
        read_bounded(small, 9)
    with pytest.raises(BoundedReadError, match="is a folder"):
        read_bounded(tmp_path, 10)
    with pytest.raises(FileNotFoundError):
        read_bounded(tmp_path / "missing", 10)


# ---------------------------------------------------------------- params values


@pytest.mark.parametrize("root", ["../../etc", "a/../b", "./x", "a//b", "x/", "/", "~/", "~", "$HOME/x", "a;rm -rf ~",
                                  "`id`", "a b", "~user/x", "x" * 129])
def test_a_bad_remote_root_is_a_params_error(root: str) -> None:
    message = params_error(f"fleet: {{remote_root: {json.dumps(root)}}}\n")
    assert "fleet.remote_root" in message


@pytest.mark.parametrize(("root", "absolute"), [("nativelm", "/home/u/nativelm"), ("~/a/b", "/home/u/a/b"),
                                                 ("/opt/nativelm", "/opt/nativelm"), (".nl", "/home/u/.nl")])
def test_good_remote_roots(root: str, absolute: str) -> None:
    assert parse_params(f"fleet: {{remote_root: {json.dumps(root)}}}\n").fleet.remote_root_under("/home/u") == absolute


def test_remote_root_is_exit_2_before_any_board(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text('fleet: {remote_root: "../../etc"}\n')
    line = one_error_line(run_cli("fleet", "status", cwd=tmp_path))
    assert "fleet.remote_root" in line and "'..'" in line


# ---------------------------------------------------------------- command-line arguments


@pytest.mark.parametrize("model", ["", "   "])
def test_deploy_with_an_empty_model_never_deploys_the_default(model: str, tmp_path: Path) -> None:
    proc = run_cli("deploy", "--model", model, cwd=tmp_path)
    line = one_error_line(proc)
    assert "argument --model: the model is empty" in line
    assert proc.stderr.startswith("usage: nativelm deploy")


@pytest.mark.parametrize(("args", "fragment"), [
    (("--seed", "-5"), "argument --seed: must be at least 0, got -5"),
    (("--threads", "100000"), "threads must be between 1 and"),
    (("--model", ""), "argument --model: the export folder is empty"),
])
def test_generate_bad_arguments(export: Export, args: tuple[str, ...], fragment: str) -> None:
    base = {"--model": str(export.folder), "--prompt": "The king"}
    base.update(dict(zip(args[::2], args[1::2])))
    proc = run_cli("generate", *[part for pair in base.items() for part in pair])
    assert fragment in one_error_line(proc)


def test_a_prompt_that_is_not_utf8_is_one_line(export: Export) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for module, prefix in (("nativelm.cli", "nativelm: error:"), ("nativelm.runtime", "error:")):
        argv = [sys.executable.encode(), b"-m", module.encode(), b"generate", b"--model", bytes(export.folder),
                b"--prompt", b"The \xff king", b"--max-new-tokens", b"2"]
        proc = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, env=env)
        stderr = proc.stderr.decode()
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr
        assert stderr.strip().startswith(prefix) and len(stderr.strip().splitlines()) == 1, stderr
        assert "the prompt is not valid UTF-8 text" in stderr


@pytest.mark.parametrize(("args", "fragment"), [
    (("--seed", "-5"), "argument --seed: must be at least 0"),
    (("--threads", "100000"), "error: threads must be between 1 and"),
    (("--temperature", "nan"), "error: temperature must be >= 0"),
])
def test_board_runtime_bad_arguments_exit_2(export: Export, args: tuple[str, ...], fragment: str) -> None:
    proc = run_cli("generate", "--model", str(export.folder), "--prompt", "x", *args, module="nativelm.runtime")
    assert fragment in one_error_line(proc)


def test_threads_and_seed_in_the_library(export: Export) -> None:
    from nativelm.runtime import Sampling, load_model

    with pytest.raises(BadArgument, match="threads must be between 1 and"):
        load_model(export.folder, threads=100_000)
    with pytest.raises(BadArgument, match="seed must be >= 0, got -5"):
        Sampling(temperature=1.0, seed=-5)
    assert BadArgument.exit_code == 2


# ---------------------------------------------------------------- JSON manifests


def test_json_manifests_are_bounded(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(JsonFileError, match="deep.json: nested deeper than 32 levels"):
        read_json_file(deep)
    just = tmp_path / "just.json"
    just.write_text("[" * 33 + "]" * 33)
    with pytest.raises(JsonFileError, match="nested deeper than 32 levels"):
        read_json_file(just)
    assert read_json_file(just, max_depth=33) == json.loads(just.read_text())
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"a": "x" * 2000}))
    with pytest.raises(JsonFileError, match="more than the 1000 a JSON manifest may hold"):
        read_json_file(big, limit_bytes=1000)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(JsonFileError, match="not a regular file"):
        read_json_file(fifo)
    huge_number = tmp_path / "n.json"
    huge_number.write_text("1" * 5000)
    with pytest.raises(JsonFileError, match="not readable JSON"):
        read_json_file(huge_number)


def test_a_deep_export_manifest_is_one_line(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"sha256": ' + "[" * 50_000 + "]" * 50_000 + "}")
    proc = run_cli("generate", "--model", str(folder), "--prompt", "x")
    assert "manifest.json: nested deeper than 32 levels" in one_error_line(proc, code=1)


def test_a_deep_prepared_manifest_is_one_line(tmp_path: Path) -> None:
    from nativelm.formats.prepared import read_manifest

    (tmp_path / "manifest.json").write_text("[" * 50_000 + "]" * 50_000)
    with pytest.raises(NativelmError, match="manifest.json: nested deeper than 32 levels"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- known_hosts

PINNED = "[127.0.0.1]:2220 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def write_inventory(folder: Path, known_hosts: str) -> Path:
    (folder / "known_hosts").write_text(known_hosts)
    board = {"name": "board-1", "host": "127.0.0.1", "port": 2220, "user": "nativelm", "key": "id_ed25519"}
    (folder / "fleet.yaml").write_text(json.dumps({"known_hosts": "known_hosts", "boards": [board]}))
    return folder / "fleet.yaml"


@pytest.mark.parametrize(("line", "fragment"), [
    ("garbage", "expected `hosts keytype base64-key [comment]`"),
    ("[127.0.0.1]:2220 ssh-ed25519 !!!notbase64", "the ssh-ed25519 key is not base64"),
    ("[127.0.0.1]:2220 ssh-ed25519 AAAA", "not a valid ssh-ed25519 key"),
    ("[127.0.0.1]:2220 ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ==", "not a valid ssh-rsa key"),  # paramiko: ValueError
    ("[127.0.0.1]:2220 ssh-rsa " + PINNED.split()[2], "not a valid ssh-rsa key"),  # an ed25519 key typed rsa
    ("@revoked " + PINNED, "marker @revoked is not supported"),
    ("a,,b " + PINNED.split(" ", 1)[1], "empty host name"),
])
def test_a_malformed_known_hosts_line_names_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    from nativelm.fleet.inventory import InventoryError, load_inventory

    inventory = write_inventory(tmp_path, f"# pinned\n{PINNED}\n{line}\n")
    with pytest.raises(InventoryError) as info:
        load_inventory(inventory)
    assert str(info.value).startswith(f"{tmp_path / 'known_hosts'}:3: malformed known_hosts line: ")
    assert fragment in str(info.value)
    assert (tmp_path / "known_hosts").read_text() == f"# pinned\n{PINNED}\n{line}\n"  # never rewritten


def test_good_known_hosts_load_every_pinned_host(tmp_path: Path) -> None:
    import paramiko

    from nativelm.fleet.inventory import load_inventory
    from nativelm.fleet.known_hosts import known_host_keys

    hashed = paramiko.HostKeys.hash_host("[127.0.0.1]:2221")
    inventory = load_inventory(write_inventory(tmp_path, f"\n# c\n{PINNED} a comment\n{hashed} {PINNED.split(' ', 1)[1]}\n"))
    keys = known_host_keys(inventory.known_hosts)
    assert keys.lookup("[127.0.0.1]:2220") and keys.lookup("[127.0.0.1]:2221")
    assert keys.lookup("[127.0.0.1]:2222") is None


def test_a_malformed_known_hosts_is_exit_2_on_the_command_line(tmp_path: Path) -> None:
    inventory = write_inventory(tmp_path, f"{PINNED}\n[127.0.0.1]:2220 ssh-ed25519\n")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    line = one_error_line(run_cli("fleet", "status", "--inventory", str(inventory), cwd=tmp_path))
    assert "known_hosts:2: malformed known_hosts line" in line


# ---------------------------------------------------------------- corpus folders


def local_source(*paths: Path, members: str = "*"):  # noqa: ANN201 - SourceParams
    from nativelm.params.data import SourceParams

    return SourceParams(kind="local", paths=[str(p) for p in paths], members=members)


def test_a_corpus_folder_reads_only_regular_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from nativelm.data.sources import read_local

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first document")
    (corpus / "real.txt").write_text("the target of a link")
    os.symlink(corpus / "real.txt", corpus / "link.txt")
    os.symlink(tmp_path / "nowhere", corpus / "broken.txt")
    os.mkfifo(corpus / "pipe.txt")  # reading it would wait forever for a writer
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(corpus / "sock.txt"))
        docs = read_local(local_source(corpus))
    assert sorted(Path(d.doc_id).name for d in docs) == ["a.txt", "link.txt", "real.txt"]
    assert dict((Path(d.doc_id).name, d.data) for d in docs)["link.txt"] == b"the target of a link"
    warning = [line for line in capsys.readouterr().err.splitlines() if "not regular files" in line]
    assert len(warning) == 1 and "skipped 3 entries" in warning[0] and "(a FIFO)" in warning[0]


def test_a_listed_special_file_is_refused(tmp_path: Path) -> None:
    from nativelm.data.sources import read_local

    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(NativelmError, match=r"pipe.txt: is a FIFO, expected a regular file or a folder"):
        read_local(local_source(tmp_path / "pipe.txt"))
    with pytest.raises(NativelmError, match="no such file or folder"):
        read_local(local_source(tmp_path / "missing.txt"))


def test_corpus_bytes_are_bounded_per_file_and_in_all(tmp_path: Path) -> None:
    from nativelm.data.documents import ByteBudget
    from nativelm.data.sources import read_local

    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_bytes(b"x" * 100)
    with pytest.raises(NativelmError, match=r"a.txt: 100 bytes, more than the 99 bytes a corpus file may hold"):
        read_local(local_source(tmp_path), ByteBudget("corpus", per_file=99, total=1000))
    with pytest.raises(NativelmError, match=r"corpus: more than 250 bytes of text in all \(at .*c.txt\)"):
        read_local(local_source(tmp_path), ByteBudget("corpus", per_file=100, total=250))
    assert len(read_local(local_source(tmp_path), ByteBudget("corpus", per_file=100, total=300))) == 3


def test_an_archive_bomb_stops_before_it_is_inflated(tmp_path: Path) -> None:
    import io
    import tarfile
    import zipfile

    from nativelm.data.archives import read_archive
    from nativelm.data.documents import ByteBudget

    tar_path, zip_path = tmp_path / "bomb.tar.gz", tmp_path / "bomb.zip"
    with tarfile.open(tar_path, "w:gz") as tar:
        info = tarfile.TarInfo("big.txt")
        info.size = 1 << 20
        tar.addfile(info, io.BytesIO(b"x" * info.size))
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("big.txt", b"x" * (1 << 20))
    for path in (tar_path, zip_path):
        assert path.stat().st_size < 1 << 16  # a few kilobytes that would inflate to a megabyte
        with pytest.raises(NativelmError, match=r"big.txt: 1048576 bytes, more than the 512 KiB a corpus file"):
            read_archive(path, "*", path.name, ByteBudget(path.name, per_file=1 << 19))
        assert read_archive(path, "*", path.name, ByteBudget(path.name, per_file=1 << 20))[0].data == b"x" * (1 << 20)


# ---------------------------------------------------------------- model sizes


@pytest.mark.parametrize("knob", ["d_model", "n_layers", "n_heads", "n_experts", "expert_ffn", "dense_ffn", "max_seq_len"])
def test_model_dimensions_are_bounded(knob: str) -> None:
    assert f"model.{knob}: Input should be less than or equal to" in params_error(f"model: {{{knob}: 100000000000}}\n")


def test_a_model_too_large_for_memory_is_one_line_before_allocation() -> None:
    from nativelm.model.transformer import build_model, check_fits
    from nativelm.params.model import ModelParams

    tiny = ModelParams()
    assert check_fits(tiny, 4096, available=1 << 30) == 4 * 8_018_176
    with pytest.raises(ParamsError, match=r"30.6 MiB of fp32 parameters, more than the 1 MiB of memory available"):
        check_fits(tiny, 4096, available=1 << 20)
    huge = ModelParams(d_model=65536, n_heads=64, n_kv_heads=64, n_layers=1024, n_experts=4096, top_k=2)
    with pytest.raises(ParamsError, match=r"model \(d_model 65536, n_layers 1024, vocabulary 4096\): .* GiB of fp32"):
        build_model(huge, 4096)  # petabytes: refused from the counts, nothing allocated


@pytest.mark.parametrize("text", ["!!int \n", "a: !!int x\n", "a: !!timestamp 2020-99-99\n", "a: [!!float y]\n"])
def test_a_tagged_value_pyyaml_cannot_read_is_one_line(text: str) -> None:
    assert "cannot be read" in params_error(text)


def test_merge_keys_work_and_their_keys_are_checked_too() -> None:
    from nativelm.yamlio import load_yaml

    assert load_yaml("a: &a {x: 1}\nb: {<<: *a, y: 2}\n", "m.yaml", ParamsError)["b"] == {"x": 1, "y": 2}
    with pytest.raises(ParamsError, match="m.yaml:1:"):
        load_yaml("b: {<<: {? [1]: 2}}\n", "m.yaml", ParamsError)


def test_a_file_url_that_is_a_fifo_or_too_large_is_one_line(tmp_path: Path) -> None:
    from nativelm.data.downloads import download_url

    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(NativelmError, match=r"pipe.txt: is a FIFO, expected a regular file"):
        download_url((tmp_path / "pipe.txt").as_uri(), timeout_s=5)
    (tmp_path / "big.txt").write_bytes(b"x" * 2000)
    with pytest.raises(NativelmError, match=r"big.txt: 1.95 KiB, more than the 1000 bytes allowed"):
        download_url((tmp_path / "big.txt").as_uri(), timeout_s=5, limit=1000)
    assert download_url((tmp_path / "big.txt").as_uri(), timeout_s=5) == b"x" * 2000


def test_an_http_body_past_the_corpus_bound_is_one_line(tmp_path: Path) -> None:
    import functools
    import http.server
    import threading

    from nativelm.data.downloads import download_url

    (tmp_path / "big.txt").write_bytes(b"x" * 2000)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/big.txt"
        with pytest.raises(NativelmError, match=r"big.txt: more than the 1000 bytes a corpus may hold"):
            download_url(url, timeout_s=10, limit=1000)
        assert download_url(url, timeout_s=10, limit=2000) == b"x" * 2000
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_deep_release_manifest_is_one_release_error(tmp_path: Path) -> None:
    from nativelm.fleet.release import ReleaseError, load_release

    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "release.json").write_text("[" * 100000 + "]" * 100000, encoding="utf-8")
    with pytest.raises(ReleaseError, match="release.json: nested deeper than"):
        load_release(folder)


def test_the_board_agent_reads_a_deep_or_huge_json_file_as_one_agent_error(tmp_path: Path) -> None:
    from nativelm.fleet.agent.files import JSON_LIMIT, AgentError, read_json

    deep = tmp_path / "owner.json"
    deep.write_text("[" * 100000 + "]" * 100000, encoding="utf-8")
    with pytest.raises(AgentError, match="owner.json: nested too deeply"):
        read_json(deep)
    huge = tmp_path / "release.json"
    huge.write_text(" " * (JSON_LIMIT + 1), encoding="utf-8")
    with pytest.raises(AgentError, match="larger than"):
        read_json(huge)
    assert read_json(tmp_path / "absent.json") is None
