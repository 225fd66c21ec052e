"""The board inventory (infra/fleet.yaml or the simulated fleet's): who the boards are and how to reach them.

```yaml
known_hosts: known_hosts        # pinned host keys (relative: against this file's folder)
boards:
  - name: rk3588-1              # [a-z0-9][a-z0-9_-]*
    host: 192.168.1.31          # hostname or IP address
    port: 22
    user: nativelm
    key: ~/.ssh/nativelm_fleet  # private key (relative: against this file's folder)
    groups: [canary, arm64]
    labels: {soc: rk3588}
    python: python3             # board interpreter (a command name or absolute path)
```

Every value that later reaches a remote shell (names, user, python path) is held to a strict
pattern here, so a bad inventory stops before any board is contacted, with one line naming the
file, the key path (``boards[1].port``) and the problem.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError, field_validator

from nativelm.errors import NativelmError
from nativelm.params.base import StrictModel
from nativelm.params.fleet import NAME_PATTERN
from nativelm.yamlio import load_yaml, read_yaml_text, validation_line

USER_PATTERN = r"^[a-z_][a-z0-9_-]{0,31}$"
PYTHON_PATTERN = r"^[A-Za-z0-9_./-]+$"
LABEL_KEY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


class InventoryError(NativelmError):
    """The inventory file is missing, malformed, or names boards that do not exist."""

    exit_code = 2


class Board(StrictModel):
    """One board as the inventory describes it."""

    name: str = Field(pattern=NAME_PATTERN)
    host: str
    port: int = Field(22, ge=1, le=65535)
    user: str = Field(pattern=USER_PATTERN)
    key: str = Field(min_length=1, max_length=4096)
    groups: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    python: str = Field("python3", pattern=PYTHON_PATTERN, max_length=255)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            pass
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"not a hostname or IP address: {value!r}")
        return value

    @field_validator("groups")
    @classmethod
    def _groups(cls, value: list[str]) -> list[str]:
        for group in value:
            if not re.fullmatch(NAME_PATTERN, group):
                raise ValueError(f"group {group!r} does not match {NAME_PATTERN}")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            if not re.fullmatch(LABEL_KEY_PATTERN, key):
                raise ValueError(f"label key {key!r} does not match {LABEL_KEY_PATTERN}")
            if len(text) > 200 or not text.isprintable():
                raise ValueError(f"label {key!r}: value must be printable text of at most 200 characters")
        return value

    @field_validator("python")
    @classmethod
    def _python(cls, value: str) -> str:
        if ".." in value.split("/"):
            raise ValueError(f"'..' is not allowed in the python path {value!r}")
        return value

    @property
    def address(self) -> str:
        """host:port as known_hosts writes it for a non-default port (`[host]:port`)."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


class _InventoryFile(StrictModel):
    known_hosts: str = Field("known_hosts", min_length=1)
    boards: list[Board] = Field(min_length=1)


@dataclass(frozen=True)
class Inventory:
    """A loaded, validated inventory; paths are absolute."""

    path: Path
    known_hosts: Path
    boards: list[Board]

    def key_path(self, board: Board) -> Path:
        """The board's private key file (`~` expanded; relative paths are against the inventory's folder)."""
        return _resolve(self.path.parent, board.key)

    def board(self, name: str) -> Board:
        """The board called `name` (InventoryError listing the known names otherwise)."""
        return select_boards(self, names=[name])[0]

    @property
    def groups(self) -> list[str]:
        """Every group some board is in, sorted."""
        return sorted({group for board in self.boards for group in board.groups})


def _resolve(folder: Path, path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (folder / candidate).resolve()


def _duplicates(boards: Sequence[Board]) -> str | None:
    """'boards[2].name: ...' for the first repeated name or host:port, else None."""
    names: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    for i, board in enumerate(boards):
        if board.name in names:
            return f"boards[{i}].name: board name {board.name!r} is already used by boards[{names[board.name]}]"
        names[board.name] = i
        where = (board.host.lower(), board.port)
        if where in addresses:
            return (f"boards[{i}]: {board.host}:{board.port} is already the address of "
                    f"boards[{addresses[where]}] ({boards[addresses[where]].name})")
        addresses[where] = i
    return None


def parse_inventory(text: str, path: Path) -> Inventory:
    """Validate an inventory's YAML text; `path` locates relative paths and names the file in errors."""
    path = Path(path).absolute()
    raw = load_yaml(text, str(path), InventoryError)
    if not isinstance(raw, dict):
        raise InventoryError(f"{path}: expected a mapping with `known_hosts` and `boards`, "
                             f"got {type(raw).__name__}")
    try:
        parsed = _InventoryFile.model_validate(raw)
    except ValidationError as exc:
        raise InventoryError(validation_line(str(path), exc)) from None
    problem = _duplicates(parsed.boards)
    if problem:
        raise InventoryError(f"{path}: {problem}")
    known_hosts = _resolve(path.parent, parsed.known_hosts)
    if not known_hosts.is_file():
        raise InventoryError(f"{path}: known_hosts: file not found: {known_hosts} (pin the boards' host keys "
                             f"there: see infra/known_hosts)")
    from nativelm.fleet.known_hosts import KnownHostsError, known_host_keys  # paramiko: only once it is needed

    try:
        known_host_keys(known_hosts)  # a malformed line stops here, before any board is contacted
    except KnownHostsError as exc:
        raise InventoryError(str(exc)) from None
    return Inventory(path=path, known_hosts=known_hosts, boards=list(parsed.boards))


def load_inventory(path: Path | str) -> Inventory:
    """Read and validate an inventory file; one InventoryError line for any problem."""
    path = Path(path)
    text = read_yaml_text(path, InventoryError, "inventory file not found (set fleet.inventory in params.yaml, pass "
                                                "--inventory PATH, or run `nativelm fleet sim up`)")
    return parse_inventory(text, path)


def select_boards(inv: Inventory, names: Sequence[str] = (), groups: Sequence[str] = ()) -> list[Board]:
    """The boards named or in one of the groups (both empty: all), in inventory order.

    An unknown name or group is an InventoryError listing the known ones.
    """
    known = {board.name for board in inv.boards}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InventoryError(f"{inv.path}: no board named {', '.join(map(repr, unknown))} "
                             f"(boards: {', '.join(b.name for b in inv.boards)})")
    missing = [group for group in groups if group not in inv.groups]
    if missing:
        raise InventoryError(f"{inv.path}: no board is in group {', '.join(map(repr, missing))} "
                             f"(groups: {', '.join(inv.groups) or 'none'})")
    if not names and not groups:
        return list(inv.boards)
    wanted_groups = set(groups)
    return [board for board in inv.boards if board.name in names or wanted_groups.intersection(board.groups)]
