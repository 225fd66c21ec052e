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
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from nativelm.errors import NativelmError
from nativelm.fleet.inventory import USER_PATTERN
from nativelm.fsutil import atomic_write_bytes, atomic_write_text
from nativelm.stack.process import (
    BackgroundProcess,
    ProcState,
    ReadyResult,
    failure_message,
    file_lock,
    pid_alive,
    port_in_use,
    port_owner,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nativelm.params.root import Params

SSHD = Path("/usr/sbin/sshd")
SIM_HOST = "127.0.0.1"
SIM_PYTHON = "/usr/bin/python3"  # the system interpreter, as on a real board (never the project's .venv)
CLIENT_KEY = "client_ed25519"
START_TIMEOUT_S = 20.0
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


# ----------------------------------------------------------------------------------------------
# paths


def sim_dir(params: Params) -> Path:
    """The simulated fleet's folder, absolute; refused if sshd_config and remote paths cannot hold it."""
    folder = Path(params.fleet.sim.dir).expanduser().absolute()
    if not _SAFE_PATH.fullmatch(str(folder)):
        raise NativelmError(f"fleet.sim.dir: {folder} holds characters an sshd config or a remote path "
                            f"cannot take; choose a folder whose path is letters, digits and ._/+@- only")
    return folder


def board_name(i: int) -> str:
    """board-1, board-2, ..."""
    return f"board-{i}"


def _board_dir(root: Path, name: str) -> Path:
    return root / "boards" / name


def _host_key(root: Path, name: str) -> Path:
    return root / "keys" / f"{name}_host_ed25519"


def _proc(root: Path, name: str) -> BackgroundProcess:
    return BackgroundProcess("sshd", _board_dir(root, name))


def _known_boards(root: Path) -> list[str]:
    """Boards that have a folder, in number order."""
    folder = root / "boards"
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if re.fullmatch(r"board-[1-9][0-9]*", p.name)]
    return sorted(names, key=lambda n: int(n.split("-")[1]))


def _port(params: Params, name: str) -> int:
    return params.fleet.sim.base_port + int(name.split("-")[1]) - 1


# ----------------------------------------------------------------------------------------------
# keys


def new_ed25519_key(path: Path, comment: str) -> str:
    """Write a new ed25519 private key (OpenSSH format, mode 600) and its .pub; return the public line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)  # nobody else can read the key between its write and its chmod
    atomic_write_bytes(path, private)
    path.chmod(0o600)
    line = f"{public.decode()} {comment}"
    atomic_write_text(path.with_name(path.name + ".pub"), line + "\n")
    return line


def _public_line(path: Path, comment: str) -> str:
    """The key's public line, creating the key when it does not exist yet."""
    pub = path.with_name(path.name + ".pub")
    if path.is_file() and pub.is_file():
        return pub.read_text().strip()
    return new_ed25519_key(path, comment)


# ----------------------------------------------------------------------------------------------
# one board


def _user() -> str:
    user = pwd.getpwuid(os.getuid()).pw_name
    if not re.fullmatch(USER_PATTERN, user):
        raise NativelmError(f"the simulated boards run as you, but your user name {user!r} does not match "
                            f"{USER_PATTERN} (the inventory's pattern)")
    return user


def sshd_config(root: Path, name: str, port: int, user: str) -> str:
    """The sshd_config of one simulated board: key authentication only, its own host key and home."""
    folder = _board_dir(root, name)
    home = folder / "home"
    return "\n".join([
        f"# nativelm simulated board {name} (generated by `nativelm fleet sim up`)",
        f"Port {port}",
        f"ListenAddress {SIM_HOST}",
        f"HostKey {_host_key(root, name)}",
        "PidFile none",
        f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "AuthenticationMethods publickey",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        f"AllowUsers {user}",
        f"SetEnv HOME={home} NATIVELM_SIM_BOARD={name}",
        f"Subsystem sftp internal-sftp -d {home}",
        "AllowTcpForwarding no",
        "AllowAgentForwarding no",
        "X11Forwarding no",
        "PermitTunnel no",
        "PrintMotd no",
        "PrintLastLog no",
        "MaxStartups 100:30:200",
        "MaxSessions 64",
        "LogLevel INFO",
        "",
    ])


def _prepare_board(root: Path, name: str, port: int, user: str, client_pub: str) -> bool:
    """Write the board's host key, authorized key and config; True if the config changed."""
    folder = _board_dir(root, name)
    (folder / "home").mkdir(parents=True, exist_ok=True)
    _public_line(_host_key(root, name), f"nativelm-sim-{name}")
    atomic_write_text(folder / "authorized_keys", client_pub + "\n")
    config = sshd_config(root, name, port, user)
    path = folder / "sshd_config"
    if path.is_file() and path.read_text() == config:
        return False
    atomic_write_text(path, config)
    return True


def _privsep_dir() -> None:
    """sshd started by root needs /run/sshd (its privilege separation folder)."""
    if os.getuid() == 0 and not Path("/run/sshd").is_dir():
        try:
            Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise NativelmError(f"sshd needs /run/sshd when started by root and it cannot be created: "
                                f"{exc.strerror}") from None


def _start(root: Path, name: str, port: int) -> None:
    if port_in_use(SIM_HOST, port):
        owner = port_owner(port)
        raise NativelmError(f"{name}: port {port} on {SIM_HOST} is already in use"
                            f"{f' by {owner}' if owner else ''}; stop it or choose another fleet.sim.base_port")
    config = _board_dir(root, name) / "sshd_config"
    _proc(root, name).start([str(SSHD), "-D", "-e", "-f", str(config)], meta={"board": name, "port": port})


def _answers_ssh(port: int) -> bool:
    """True if something on the port sends an SSH banner."""
    try:
        with socket.create_connection((SIM_HOST, port), timeout=1.0) as sock:
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _wait_ready(root: Path, boards: dict[str, int], timeout_s: float = START_TIMEOUT_S) -> None:
    """Wait until every started board answers with an SSH banner; NativelmError with the log tail otherwise."""
    started = time.monotonic()
    pending = dict(boards)
    failures: list[str] = []
    while pending:
        for name, port in list(pending.items()):
            proc = _proc(root, name)
            elapsed = time.monotonic() - started
            url = f"ssh://{SIM_HOST}:{port}"
            if not proc.is_running():
                failures.append(failure_message(proc, ReadyResult(name, False, "exited", elapsed, url)))
            elif _answers_ssh(port):
                pass
            elif elapsed > timeout_s:
                failures.append(failure_message(proc, ReadyResult(name, False, "timeout", elapsed, url)))
            else:
                continue
            del pending[name]
        if pending:
            time.sleep(0.1)
    if failures:
        raise NativelmError("\n".join(failures))


def _process_tree(pid: int) -> list[int]:
    """`pid` and every live descendant of it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                data = (entry / "stat").read_bytes()
                ppid = int(data[data.rindex(b")") + 2:].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def _kill_board(root: Path, name: str) -> str:
    """SIGKILL the board's sshd and every session it forked (those run in sessions of their own)."""
    proc = _proc(root, name)
    status = proc.status()
    if status.state is not ProcState.RUNNING or status.pid is None:
        return proc.stop() if status.state is ProcState.DEAD else "not running"
    frozen: set[int] = set()
    while True:  # freeze the tree first, so nothing forks while it is being killed
        tree = set(_process_tree(status.pid)) if Path("/proc").is_dir() else {status.pid}
        if tree <= frozen:
            break
        for pid in tree - frozen:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= tree
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while pid_alive(status.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.stop()  # reaps and clears the pid file (or kills what is left of its process group)
    return "stopped"


# ----------------------------------------------------------------------------------------------
# inventory and known_hosts


def _write_inventory(root: Path, params: Params, names: list[str], canary: int, user: str) -> None:
    boards = []
    for i, name in enumerate(names):
        groups = ["fleet", "canary"] if i < canary else ["fleet"]
        boards.append({"name": name, "host": SIM_HOST, "port": _port(params, name), "user": user,
                       "key": f"keys/{CLIENT_KEY}", "groups": groups, "labels": {"kind": "simulated"},
                       "python": SIM_PYTHON})
    head = ("# The simulated fleet, written by `nativelm fleet sim up` (real sshd on loopback ports).\n"
            "# Paths are relative to this file's folder. Do not edit: the next `sim up` rewrites it.\n")
    body = yaml.safe_dump({"known_hosts": "known_hosts", "boards": boards}, sort_keys=False)
    atomic_write_text(root / "fleet.yaml", head + body)
    lines = [f"[{SIM_HOST}]:{_port(params, name)} {' '.join(_public_line(_host_key(root, name), '').split()[:2])}"
             for name in names]
    atomic_write_text(root / "known_hosts", "# pinned host keys of the simulated fleet\n" + "\n".join(lines) + "\n")


@contextlib.contextmanager
def _locked(params: Params) -> Iterator[Path]:
    root = sim_dir(params)
    with file_lock(root / ".lock"):
        yield root


def _board_status(root: Path, params: Params, name: str, action: str | None = None) -> SimBoard:
    proc = _proc(root, name)
    st = proc.status()
    return SimBoard(name, _port(params, name), _board_dir(root, name) / "home", st.state, st.pid, proc.log_path,
                    action, st.detail)


# ----------------------------------------------------------------------------------------------
# public


def sim_up(params: Params, boards: int | None = None, canary: int | None = None) -> list[SimBoard]:
    """Start (or keep) exactly `boards` simulated boards and write fleet.yaml + known_hosts; idempotent.

    A board whose config changed is restarted; boards beyond the count are stopped and removed
    (listed last, action "removed").
    """
    n = params.fleet.sim.boards if boards is None else boards
    n_canary = params.fleet.sim.canary if canary is None else canary
    if not 1 <= n <= 64:
        raise NativelmError(f"--boards must be between 1 and 64, got {n}")
    if not 0 <= n_canary <= n:
        raise NativelmError(f"--canary must be between 0 and the number of boards ({n}), got {n_canary}")
    if params.fleet.sim.base_port + n - 1 > 65535:
        raise NativelmError(f"fleet.sim.base_port {params.fleet.sim.base_port} leaves no room for {n} boards")
    if not SSHD.is_file():
        raise NativelmError(f"{SSHD} not found: install openssh-server (bash infra/setup.sh does)")
    user = _user()
    names = [board_name(i) for i in range(1, n + 1)]
    with _locked(params) as root:
        _privsep_dir()
        removed = []
        for extra in [b for b in _known_boards(root) if b not in names]:
            before = _board_status(root, params, extra)
            _kill_board(root, extra)
            removed.append(SimBoard(extra, before.port, before.home, ProcState.STOPPED, None, before.log_path,
                                    "removed"))
            shutil.rmtree(_board_dir(root, extra), ignore_errors=True)
            for path in (_host_key(root, extra), _host_key(root, extra).with_name(f"{extra}_host_ed25519.pub")):
                path.unlink(missing_ok=True)
        client_pub = _public_line(root / "keys" / CLIENT_KEY, "nativelm-fleet-client")
        actions: dict[str, str] = {}
        for name in names:
            changed = _prepare_board(root, name, _port(params, name), user, client_pub)
            running = _proc(root, name).is_running()
            if running and not changed:
                actions[name] = "already running"
                continue
            if running:
                _kill_board(root, name)
            elif _proc(root, name).status().state is ProcState.DEAD:
                _proc(root, name).stop()
            _start(root, name, _port(params, name))
            actions[name] = "restarted" if running else "started"
        _wait_ready(root, {name: _port(params, name) for name, act in actions.items() if act != "already running"})
        _write_inventory(root, params, names, n_canary, user)
        return [_board_status(root, params, name, actions[name]) for name in names] + removed


def sim_down(params: Params, purge: bool = False) -> list[SimBoard]:
    """Stop every simulated board and its sessions; `purge` also deletes the whole sim folder."""
    with _locked(params) as root:
        result = []
        for name in _known_boards(root):
            before = _board_status(root, params, name)
            outcome = _kill_board(root, name)
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
        lines.append(f"{b.name:<10} {SIM_HOST}:{b.port:<6} {what}{pid}{detail}")
    return lines


def _existing_board(root: Path, name: str) -> str:
    if name not in _known_boards(root):
        raise NativelmError(f"no simulated board {name!r} (boards: {', '.join(_known_boards(root)) or 'none'})")
    return name


def stop_board(params: Params, name: str) -> None:
    """Fault hook: kill one board's sshd and all its sessions at once (SIGKILL), as a power cut would."""
    with _locked(params) as root:
        _kill_board(root, _existing_board(root, name))


def start_board(params: Params, name: str) -> None:
    """Fault hook: start one stopped board again (same host key, same home) and wait until it answers."""
    with _locked(params) as root:
        _existing_board(root, name)
        if not _proc(root, name).is_running():
            _proc(root, name).stop()  # clears a stale pid file
            _start(root, name, _port(params, name))
            _wait_ready(root, {name: _port(params, name)})


def rotate_host_key(params: Params, name: str) -> str:
    """Fault hook: give a board a new host key and restart it, leaving known_hosts pinned to the old one.

    Returns the new public key line (what an attacker's or a reinstalled board would offer).
    """
    with _locked(params) as root:
        _existing_board(root, name)
        line = new_ed25519_key(_host_key(root, name), f"nativelm-sim-{name}-rotated")
        _kill_board(root, name)
        _start(root, name, _port(params, name))
        _wait_ready(root, {name: _port(params, name)})
        return line
