"""The simulated fleet: one real OpenSSH sshd per board on a loopback port, no root needed.

Layout under ``fleet.sim.dir``::

    keys/                      (0700) client_ed25519 (+ .pub): the fleet's client key;
                               <board>_host_ed25519 (+ .pub): each board's own host key
    boards/<board>/sshd_config, authorized_keys, home/, sshd.pid|.json|.log
    fleet.yaml, known_hosts    the inventory and the pinned host keys (written atomically)

Every board runs as the invoking user (sshd cannot switch users without root). Each board gets
its own home through sshd's ``SetEnv HOME=<sim dir>/boards/<board>/home``: sshd applies SetEnv
after setting HOME from the password database, so the session's shell, the agent and the
runtime see the board's home; the SFTP subsystem (``internal-sftp -d <home>``) starts there
too. The controller learns the home with ``printenv HOME`` and uses absolute paths only, so
nothing depends on the session's working folder. Under root sshd needs its privilege
separation folder ``/run/sshd``, created here when missing.

The last ``fleet.sim.arm64`` boards are ARM64 boards: the same sshd, but their ``python`` is Debian's
arm64 Python under qemu-user (``nativelm.fleet.sim_arm64``, docs/fleet.md#an-arm64-board).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from nativelm.errors import NativelmError
from nativelm.fleet.inventory import USER_PATTERN
from nativelm.fleet.signing import create_signing_key
from nativelm.fleet.sim_arm64 import ensure_rootfs
from nativelm.fleet.sim_sshd import (
    SIM_HOST,
    SSHD,
    board_dir,
    host_key,
    kill_board,
    new_ed25519_key,
    prepare_board,
    privsep_dir,
    public_line,
    sshd_process,
    start_sshd,
    wait_ready,
)
from nativelm.fsutil import atomic_write_text
from nativelm.stack.process import ProcState, file_lock

if TYPE_CHECKING:
    from nativelm.params.root import Params

SIM_PYTHON = "/usr/bin/python3"  # the system interpreter, as on a real board (never the project's .venv)
CLIENT_KEY = "client_ed25519"
_SAFE_PATH = re.compile(r"/[A-Za-z0-9._/+@-]*")


@dataclass(frozen=True)
class SimBoard:
    """One simulated board as `sim up`, `sim down` or `sim status` left it."""

    name: str
    port: int
    home: Path
    state: ProcState
    pid: int | None
    log_path: Path
    action: str | None = None  # started, restarted, already running, stopped, not running; None for status
    detail: str = ""
    emulated: bool = False  # an ARM64 board: its python runs under qemu-user


# ----------------------------------------------------------------------------------------------
# paths


def _safe_folder(value: str, key: str) -> Path:
    """`value` as an absolute folder; refused if sshd_config and remote paths cannot hold it."""
    folder = Path(value).expanduser().absolute()
    if not _SAFE_PATH.fullmatch(str(folder)):
        raise NativelmError(f"{key}: {folder} holds characters an sshd config or a remote path "
                            f"cannot take; choose a folder whose path is letters, digits and ._/+@- only")
    return folder


def sim_dir(params: Params) -> Path:
    """The simulated fleet's folder, absolute."""
    return _safe_folder(params.fleet.sim.dir, "fleet.sim.dir")


def arm64_python(params: Params) -> str:
    """The `python` of the ARM64 boards, building their userland first when it is not cached (sim_arm64)."""
    return str(ensure_rootfs(_safe_folder(params.fleet.sim.arm64_rootfs, "fleet.sim.arm64_rootfs")))


def board_name(i: int) -> str:
    """board-1, board-2, ..."""
    return f"board-{i}"


def _known_boards(root: Path) -> list[str]:
    """Boards that have a folder, in number order."""
    folder = root / "boards"
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if re.fullmatch(r"board-[1-9][0-9]*", p.name)]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def _port(params: Params, name: str) -> int:
    return params.fleet.sim.base_port + int(name.split("-")[1]) - 1


def _user() -> str:
    user = pwd.getpwuid(os.getuid()).pw_name
    if not re.fullmatch(USER_PATTERN, user):
        raise NativelmError(f"the simulated boards run as you, but your user name {user!r} does not match "
                            f"{USER_PATTERN} (the inventory's pattern)")
    return user


# ----------------------------------------------------------------------------------------------
# inventory and known_hosts


def _write_inventory(root: Path, params: Params, names: list[str], canary: int, user: str,
                     arm64: dict[str, str]) -> None:
    """fleet.yaml and known_hosts; `arm64` maps the ARM64 boards to their python."""
    boards = []
    for i, name in enumerate(names):
        groups = ["fleet", "canary"] if i < canary else ["fleet"]
        labels = {"kind": "simulated", "arch": "aarch64"} if name in arm64 else {"kind": "simulated"}
        boards.append({"name": name, "host": SIM_HOST, "port": _port(params, name), "user": user,
                       "key": f"keys/{CLIENT_KEY}", "groups": groups, "labels": labels,
                       "python": arm64.get(name, SIM_PYTHON)})
    head = ("# The simulated fleet, written by `nativelm fleet sim up` (real sshd on loopback ports).\n"
            "# Paths are relative to this file's folder. Do not edit: the next `sim up` rewrites it.\n")
    body = yaml.safe_dump({"known_hosts": "known_hosts", "boards": boards}, sort_keys=False)
    atomic_write_text(root / "fleet.yaml", head + body)
    lines = [f"[{SIM_HOST}]:{_port(params, name)} {' '.join(public_line(host_key(root, name), '').split()[:2])}"
             for name in names]
    atomic_write_text(root / "known_hosts", "# pinned host keys of the simulated fleet\n" + "\n".join(lines) + "\n")


@contextlib.contextmanager
def _locked(params: Params) -> Iterator[Path]:
    root = sim_dir(params)
    with file_lock(root / ".lock"):
        yield root


def _emulated_boards(root: Path) -> set[str]:
    """The ARM64 boards of the fleet.yaml `sim up` last wrote (none when there is none)."""
    try:
        boards = (yaml.safe_load((root / "fleet.yaml").read_text()) or {}).get("boards") or []
    except (OSError, yaml.YAMLError, AttributeError):
        return set()
    return {str(b.get("name")) for b in boards
            if isinstance(b, dict) and (b.get("labels") or {}).get("arch") == "aarch64"}


def _board_status(root: Path, params: Params, name: str, action: str | None = None) -> SimBoard:
    proc = sshd_process(root, name)
    st = proc.status()
    return SimBoard(name, _port(params, name), board_dir(root, name) / "home", st.state, st.pid, proc.log_path,
                    action, st.detail, name in _emulated_boards(root))


# ----------------------------------------------------------------------------------------------
# public


def sim_up(params: Params, boards: int | None = None, canary: int | None = None,
           arm64: int | None = None) -> list[SimBoard]:
    """Start (or keep) exactly `boards` simulated boards and write fleet.yaml + known_hosts; idempotent.

    The last `arm64` of them are ARM64 boards (their python emulated, docs/fleet.md). Creates
    fleet.signing_key (and its .pub) when it does not exist yet. A board whose config changed is
    restarted; boards beyond the count are stopped and removed (listed last, action "removed").
    """
    n = params.fleet.sim.boards if boards is None else boards
    n_canary = params.fleet.sim.canary if canary is None else canary
    n_arm64 = params.fleet.sim.arm64 if arm64 is None else arm64
    if not 1 <= n <= 64:
        raise NativelmError(f"--boards must be between 1 and 64, got {n}")
    if not 0 <= n_canary <= n:
        raise NativelmError(f"--canary must be between 0 and the number of boards ({n}), got {n_canary}")
    if not 0 <= n_arm64 <= n:
        raise NativelmError(f"--arm64 must be between 0 and the number of boards ({n}), got {n_arm64}")
    if params.fleet.sim.base_port + n - 1 > 65535:
        raise NativelmError(f"fleet.sim.base_port {params.fleet.sim.base_port} leaves no room for {n} boards")
    if not SSHD.is_file():
        raise NativelmError(f"{SSHD} not found: install openssh-server (bash infra/setup.sh does)")
    user = _user()
    names = [board_name(i) for i in range(1, n + 1)]
    python = arm64_python(params) if n_arm64 else SIM_PYTHON
    arm64_boards = {name: python for name in names[n - n_arm64:]}
    with _locked(params) as root:
        privsep_dir()
        removed = []
        for extra in [b for b in _known_boards(root) if b not in names]:
            before = _board_status(root, params, extra)
            kill_board(root, extra)
            removed.append(SimBoard(extra, before.port, before.home, ProcState.STOPPED, None, before.log_path,
                                    "removed"))
            shutil.rmtree(board_dir(root, extra), ignore_errors=True)
            for path in (host_key(root, extra), host_key(root, extra).with_name(f"{extra}_host_ed25519.pub")):
                path.unlink(missing_ok=True)
        client_pub = public_line(root / "keys" / CLIENT_KEY, "nativelm-fleet-client")
        create_signing_key(Path(params.fleet.signing_key))  # the simulated fleet's release key (docs/fleet.md)
        actions: dict[str, str] = {}
        for name in names:
            changed = prepare_board(root, name, _port(params, name), user, client_pub)
            running = sshd_process(root, name).is_running()
            if running and not changed:
                actions[name] = "already running"
                continue
            if running:
                kill_board(root, name)
            elif sshd_process(root, name).status().state is ProcState.DEAD:
                sshd_process(root, name).stop()
            start_sshd(root, name, _port(params, name))
            actions[name] = "restarted" if running else "started"
        wait_ready(root, {name: _port(params, name) for name, act in actions.items() if act != "already running"})
        _write_inventory(root, params, names, n_canary, user, arm64_boards)
        return [_board_status(root, params, name, actions[name]) for name in names] + removed


def sim_down(params: Params, purge: bool = False) -> list[SimBoard]:
    """Stop every simulated board and its sessions; `purge` also deletes the whole sim folder."""
    with _locked(params) as root:
        result = []
        for name in _known_boards(root):
            before = _board_status(root, params, name)
            outcome = kill_board(root, name)
            result.append(SimBoard(name, before.port, before.home, ProcState.STOPPED, before.pid, before.log_path,
                                   outcome, before.detail))
        if purge:
            for entry in root.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        return result


def sim_status(params: Params) -> list[SimBoard]:
    """Each simulated board's sshd: running, stopped or dead."""
    root = sim_dir(params)
    return [_board_status(root, params, name) for name in _known_boards(root)]


def render_sim(boards: list[SimBoard]) -> list[str]:
    """Text lines for `nativelm fleet sim ...`: one per board."""
    if not boards:
        return ["no simulated boards (run `nativelm fleet sim up`)"]
    lines = []
    for b in boards:
        what = b.action or str(b.state)
        pid = f" (pid {b.pid})" if b.pid and b.state is ProcState.RUNNING else ""
        detail = f": {b.detail}" if b.detail else ""
        arm64 = " [ARM64: python under qemu-user]" if b.emulated else ""
        lines.append(f"{b.name:<10} {SIM_HOST}:{b.port:<6} {what}{pid}{detail}{arm64}")
    return lines


def _existing_board(root: Path, name: str) -> str:
    if name not in _known_boards(root):
        raise NativelmError(f"no simulated board {name!r} (boards: {', '.join(_known_boards(root)) or 'none'})")
    return name


def stop_board(params: Params, name: str) -> None:
    """Fault hook: kill one board's sshd and all its sessions at once (SIGKILL), as a power cut would."""
    with _locked(params) as root:
        kill_board(root, _existing_board(root, name))


def start_board(params: Params, name: str) -> None:
    """Fault hook: start one stopped board again (same host key, same home) and wait until it answers."""
    with _locked(params) as root:
        _existing_board(root, name)
        if not sshd_process(root, name).is_running():
            sshd_process(root, name).stop()  # clears a stale pid file
            start_sshd(root, name, _port(params, name))
            wait_ready(root, {name: _port(params, name)})


def rotate_host_key(params: Params, name: str) -> str:
    """Fault hook: give a board a new host key and restart it, leaving known_hosts pinned to the old one.

    Returns the new public key line (what an attacker's or a reinstalled board would offer).
    """
    with _locked(params) as root:
        _existing_board(root, name)
        line = new_ed25519_key(host_key(root, name), f"nativelm-sim-{name}-rotated")
        kill_board(root, name)
        start_sshd(root, name, _port(params, name))
        wait_ready(root, {name: _port(params, name)})
        return line
