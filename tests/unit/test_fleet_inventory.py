"""The board inventory: the example file loads, every bad value is one line naming file and key path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nativelm.fleet.inventory import (
    InventoryError,
    load_inventory,
    parse_inventory,
    select_boards,
)
from nativelm.params.fleet import NAME_PATTERN

REPO = Path(__file__).resolve().parents[2]


def board(**overrides: object) -> dict:
    return {"name": "board-1", "host": "192.168.1.10", "user": "nativelm", "key": "id_ed25519", **overrides}


def write(folder: Path, boards: list[dict], known_hosts: str | None = "known_hosts") -> Path:
    """An inventory file (and an empty known_hosts) in `folder`."""
    (folder / "known_hosts").write_text("")
    doc: dict = {"boards": boards}
    if known_hosts is not None:
        doc["known_hosts"] = known_hosts
    path = folder / "fleet.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(InventoryError) as info:
        load_inventory(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_example_inventory_of_real_boards_loads() -> None:
    inv = load_inventory(REPO / "infra" / "fleet.yaml")
    assert [b.name for b in inv.boards] == ["rk3588-1", "rpi5-1", "jetson-orin-1", "nuc-1"]
    assert inv.known_hosts == REPO / "infra" / "known_hosts"
    assert "canary" in inv.groups
    nuc = inv.board("nuc-1")
    assert (nuc.port, nuc.address) == (2222, "[10.0.8.14]:2222")
    assert inv.key_path(nuc) == Path("~/.ssh/nativelm_fleet_ed25519").expanduser()
    assert inv.board("jetson-orin-1").python == "/usr/bin/python3.10"
    assert inv.board("rpi5-1").python == "python3"  # the default


def test_defaults_and_relative_paths_resolve_against_the_inventory_folder(tmp_path: Path) -> None:
    (tmp_path / "pins").mkdir()
    (tmp_path / "pins" / "hosts").write_text("")
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"known_hosts": "pins/hosts", "boards": [board(key="keys/fleet")]}))
    inv = load_inventory(path)
    b = inv.boards[0]
    assert (b.port, b.groups, b.labels, b.python) == (22, [], {}, "python3")
    assert inv.known_hosts == tmp_path / "pins" / "hosts"
    assert inv.key_path(b) == tmp_path / "keys" / "fleet"


@pytest.mark.parametrize(("entry", "where", "what"), [
    (board(port="22"), "boards[0].port", "valid integer"),
    (board(port=70000), "boards[0].port", "less than or equal to 65535"),
    (board(name="Board 1"), "boards[0].name", "pattern"),
    (board(host="10.0.0.1; rm -rf /"), "boards[0].host", "not a hostname or IP address"),
    (board(host="-oProxyCommand=x"), "boards[0].host", "not a hostname or IP address"),
    (board(user="root;id"), "boards[0].user", "pattern"),
    (board(python="python3 -c 'import os'"), "boards[0].python", "pattern"),
    (board(python="../../bin/sh"), "boards[0].python", "'..' is not allowed"),
    (board(groups=["canary", "Bad Group"]), "boards[0].groups", "group 'Bad Group'"),
    (board(labels={"ram": 8}), "boards[0].labels.ram", "valid string"),
    (board(labels={"bad key": "x"}), "boards[0].labels", "label key 'bad key'"),
    (board(colour="red"), "boards[0].colour", "unknown key"),
    ({k: v for k, v in board().items() if k != "user"}, "boards[0].user", "Field required"),
])
def test_bad_board_values_name_the_key_path(tmp_path: Path, entry: dict, where: str, what: str) -> None:
    path = write(tmp_path, [board(name="ok-0", host="10.9.9.9"), entry])
    message = error_of(path)
    assert message.startswith(f"{path}: {where.replace('[0]', '[1]')}: ")
    assert what in message


def test_names_and_addresses_must_be_unique(tmp_path: Path) -> None:
    same_name = write(tmp_path, [board(), board(host="192.168.1.11")])
    assert "boards[1].name: board name 'board-1' is already used by boards[0]" in error_of(same_name)
    same_address = write(tmp_path, [board(), board(name="board-2", port=22)])
    assert "boards[1]: 192.168.1.10:22 is already the address of boards[0] (board-1)" in error_of(same_address)
    other_port = write(tmp_path, [board(), board(name="board-2", port=2222)])
    assert len(load_inventory(other_port).boards) == 2


def test_file_level_problems(tmp_path: Path) -> None:
    assert "inventory file not found" in error_of(tmp_path / "nope.yaml")
    missing_pins = write(tmp_path, [board()], known_hosts="elsewhere/known_hosts")
    message = error_of(missing_pins)
    assert f"known_hosts: file not found: {tmp_path / 'elsewhere' / 'known_hosts'}" in message
    empty = write(tmp_path, [])
    assert "boards: List should have at least 1 item" in error_of(empty)
    (tmp_path / "fleet.yaml").write_text("boards:\n  - name: a\n    name: b\n")
    assert re.search(r"fleet\.yaml:3:\d+: invalid YAML: .*key 'name' given twice", error_of(tmp_path / "fleet.yaml"))
    (tmp_path / "fleet.yaml").write_text("- just\n- a list\n")
    assert "expected a mapping with `known_hosts` and `boards`, got list" in error_of(tmp_path / "fleet.yaml")


def test_select_boards_by_name_and_group(tmp_path: Path) -> None:
    path = write(tmp_path, [board(name="a", host="10.0.0.1", groups=["canary"]),
                            board(name="b", host="10.0.0.2", groups=["x86"]),
                            board(name="c", host="10.0.0.3", groups=["x86", "canary"])])
    inv = load_inventory(path)
    names = lambda boards: [b.name for b in boards]
    assert names(select_boards(inv)) == ["a", "b", "c"]
    assert names(select_boards(inv, names=["c", "a"])) == ["a", "c"]  # inventory order
    assert names(select_boards(inv, groups=["canary"])) == ["a", "c"]
    assert names(select_boards(inv, names=["b"], groups=["canary"])) == ["a", "b", "c"]
    with pytest.raises(InventoryError, match=r"no board named 'zz' \(boards: a, b, c\)"):
        select_boards(inv, names=["zz"])
    with pytest.raises(InventoryError, match=r"no board is in group 'arm' \(groups: canary, x86\)"):
        select_boards(inv, groups=["arm"])


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=20))
def test_any_name_outside_the_pattern_is_refused(tmp_path_factory: pytest.TempPathFactory, name: str) -> None:
    folder = tmp_path_factory.mktemp("inv")
    path = folder / "fleet.yaml"
    (folder / "known_hosts").write_text("")
    path.write_text(yaml.safe_dump({"boards": [board(name=name)]}))
    if re.fullmatch(NAME_PATTERN, name):
        assert load_inventory(path).boards[0].name == name
    else:
        with pytest.raises(InventoryError, match=r"boards\[0\]\.name: "):
            load_inventory(path)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from("a1.-:;$`'\" /|&<>()"), min_size=1, max_size=30))
def test_hosts_with_shell_characters_never_load(tmp_path_factory: pytest.TempPathFactory, host: str) -> None:
    folder = tmp_path_factory.getbasetemp()
    (folder / "known_hosts").touch()
    text = yaml.safe_dump({"boards": [board(host=host)]})
    try:
        inv = parse_inventory(text, folder / "fleet.yaml")
    except InventoryError as exc:
        assert "boards[0].host" in str(exc)
    else:
        assert re.fullmatch(r"[A-Za-z0-9.:-]+", inv.boards[0].host)
