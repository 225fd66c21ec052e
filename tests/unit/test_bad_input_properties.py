"""Property-based bad input: whatever params, inventory, known_hosts or manifest text is handed in, the result
is either a value or the project's one-line error (NativelmError / the runtime's RuntimeFailure), never another
exception, a traceback or a hang."""

from __future__ import annotations

import json
import string
from pathlib import Path

import paramiko
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nativelm.errors import NativelmError
from nativelm.fleet.inventory import InventoryError, parse_inventory
from nativelm.fleet.known_hosts import KnownHostsError, known_host_keys
from nativelm.formats.envelope import checked, read_json
from nativelm.params.root import parse_params
from nativelm.runtime.errors import RuntimeFailure
from nativelm.jsonfile import JsonFileError, read_json_file
from nativelm.runtime.session import verify_folder

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"


def assert_one_line(exc: BaseException, source: str) -> None:
    message = str(exc)
    assert message and "\n" not in message, message
    assert source in message, message


# YAML made of the pieces that broke the loader: flow brackets, complex keys, anchors, aliases, long numbers
YAML_PIECES = st.sampled_from([
    "[", "]", "{", "}", ", ", ": ", "? ", "- ", "\n", "  ", "&a ", "*a", "&b ", "*b", "<<: *a", "!!int ", "!!str ",
    "seed", "train", "resume", "off", "yes", "true", "null", "~", "1e999", ".nan", "0x1F", "1_000", "0o17",
    "9" * 30, "9" * 5000, "'q'", '"\\u0000"', "\t", "#c", "fleet", "remote_root", "../../etc", "model", "d_model",
])
yaml_texts = st.lists(YAML_PIECES, max_size=40).map("".join)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                    st.text(string.printable, max_size=10))
trees = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(st.text(string.ascii_lowercase, max_size=8), kids,
                                                                      max_size=4)), max_leaves=30)
SECTIONS = ["seed", "data", "model", "train", "export", "evaluate", "gate", "tracking", "stack", "serve", "fleet", "study"]


def parse_or_one_line(text: str) -> None:
    try:
        parse_params(text, "h.yaml")
    except NativelmError as exc:
        assert exc.exit_code == 2
        assert_one_line(exc, "h.yaml")


@SETTINGS
@given(text=yaml_texts)
def test_any_yaml_text_is_params_or_one_line(text: str) -> None:
    parse_or_one_line(text)


@SETTINGS
@given(section=st.sampled_from(SECTIONS), tree=trees)
def test_any_tree_in_any_section_is_params_or_one_line(section: str, tree: object) -> None:
    parse_or_one_line(yaml.safe_dump({section: tree}))


# ---------------------------------------------------------------- inventories

BOARD_KEYS = ["name", "host", "port", "user", "key", "groups", "labels", "python", "extra"]
board_values = st.one_of(scalars, st.sampled_from(["board-1", "127.0.0.1", "::1", "nativelm", "id_ed25519", "python3",
                                                   "../x", "a b", "h" * 300, "-oProxyCommand=x", "$(id)"]),
                         st.lists(st.text(string.ascii_lowercase + "-", max_size=6), max_size=3),
                         st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2))
boards = st.dictionaries(st.sampled_from(BOARD_KEYS), board_values, max_size=9)
inventories = st.one_of(
    trees,
    st.fixed_dictionaries({"boards": st.lists(boards, max_size=4)},
                          optional={"known_hosts": st.sampled_from(["known_hosts", "", "missing", 3])}),
)


@SETTINGS
@given(raw=inventories)
def test_any_inventory_is_boards_or_one_line(raw: object, tmp_path: Path) -> None:
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:2220 {ED25519}\n")
    path = tmp_path / "fleet.yaml"
    try:
        inventory = parse_inventory(yaml.safe_dump(raw), path)
    except InventoryError as exc:
        assert_one_line(exc, str(path.parent))
    else:
        assert inventory.boards and len({b.name for b in inventory.boards}) == len(inventory.boards)


@SETTINGS
@given(text=yaml_texts)
def test_any_inventory_text_is_boards_or_one_line(text: str, tmp_path: Path) -> None:
    try:
        parse_inventory(text, tmp_path / "fleet.yaml")
    except InventoryError as exc:
        assert_one_line(exc, str(tmp_path))


# ---------------------------------------------------------------- known_hosts

KH_PIECES = st.sampled_from(["[127.0.0.1]:2220", "host", "|1|abc|def", "@revoked", "@cert-authority", "*", ",", " ",
                             "\t", "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ssh-dss", "AAAA", "AAAAB3NzaC1yc2E",
                             ED25519.split()[1], ED25519.split()[1][:-4], "====", "!!", "#", "comment", "\u00e9", "\n"])
known_hosts_texts = st.one_of(st.lists(KH_PIECES, max_size=20).map("".join), st.text(max_size=200))


@SETTINGS
@given(text=known_hosts_texts, raw=st.binary(max_size=100))
def test_any_known_hosts_is_keys_or_one_line(text: str, raw: bytes, tmp_path: Path) -> None:
    for content in (text.encode("utf-8", "surrogatepass"), raw):
        path = tmp_path / "known_hosts"
        path.write_bytes(content)
        try:
            keys = known_host_keys(path)
        except KnownHostsError as exc:
            assert exc.exit_code == 2
            assert_one_line(exc, str(path))
        else:
            assert isinstance(keys, paramiko.HostKeys)
        assert path.read_bytes() == content  # never written


# ---------------------------------------------------------------- manifests

JSON_PIECES = st.sampled_from(['[', ']', '{', '}', ',', ':', '"sha256"', '"files"', '"model.onnx"', '"path"', '"a"',
                               '"' + "0" * 64 + '"', '"../x"', '1', '-0', '1e999', "9" * 5000, 'null', 'true', 'NaN',
                               '"\\ud800"', '"\\', ' ', '\n'])
json_texts = st.one_of(st.lists(JSON_PIECES, max_size=40).map("".join), st.integers(0, 3000).map(lambda n: "[" * n))
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4),
    st.dictionaries(st.sampled_from(["sha256", "files", "path", "name", "model.onnx", "tokenizer.json", "x"]), kids,
                    max_size=4)), max_leaves=25)


@SETTINGS
@given(text=json_texts)
def test_any_json_text_is_a_value_or_one_line(text: str, tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        read_json_file(path, limit_bytes=1 << 16, max_depth=16)
    except JsonFileError as exc:
        assert_one_line(exc, str(path))
    with pytest.raises(NativelmError) as info:  # the pieces never spell a `format` key: always refused
        checked(read_json(path, "hint"), path, "fmt", 1, "test manifest")
    assert_one_line(info.value, str(path))


@SETTINGS
@given(manifest=json_values)
def test_any_export_manifest_verifies_or_is_one_line(manifest: object, tmp_path: Path) -> None:
    folder = tmp_path / "export"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "model.onnx").write_bytes(b"model")
    try:
        verify_folder(folder)
    except RuntimeFailure as exc:
        assert exc.exit_code in (1, 2)
        assert_one_line(exc, str(folder))


# ---------------------------------------------------------------- board runtime arguments

RUNTIME_ARGS = st.lists(st.sampled_from([
    "--seed", "--threads", "--temperature", "--top-k", "--top-p", "--max-new-tokens", "--prompt", "-5", "0", "1", "3",
    "100000", "nan", "inf", "-1e9", "0.5", "x", "", "The king", "--stream", "--json", "--no-verify",
]), max_size=8)  # a prompt that is not UTF-8 needs a real process's stderr: test_bad_input.py runs one


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(args=RUNTIME_ARGS)
def test_any_runtime_arguments_run_or_fail_with_one_line(args: list[str], export, capsys) -> None:  # noqa: ANN001
    from nativelm.runtime.__main__ import main

    argv = ["generate", "--model", str(export.folder), "--prompt", "x", "--max-new-tokens", "2", *args]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: usage and one `error:` line
        code = exc.code
        assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code != 0:
        assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
