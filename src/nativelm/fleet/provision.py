"""`nativelm fleet provision`: get boards ready to run releases, over SSH, idempotently.

Per board: check its Python (3.9 or newer), create the layout under the remote root, install
the agent (only when its sha256 differs), write ``<root>/keys/allowed_signers`` from
``fleet.allowed_signers`` (the keys a release must be signed by, docs/fleet.md), and build ``<root>/venv`` with the pinned
``fleet.runtime_packages``. Boards often have no internet, so the controller fills a wheelhouse
with ``pip download`` for the board's Python version and platform (cached under
``<state_dir>/wheelhouse/<key>``), uploads the wheels the board lacks (sha256-compared) and
installs with ``pip install --no-index --find-links``. The pins installed are recorded in
``<root>/venv/nativelm-packages.json``, so a second run finds them and installs nothing.

Last, nativelm's operator library (docs/kernels.md): the controller's build for the board's
architecture (``uname -m`` from its facts: ``native/build/x86_64-linux-gnu/`` from ``native/build.sh``,
``native/build/aarch64-linux-gnu/`` from ``native/build.sh aarch64``, cross-compiled) goes to
``<root>/venv/lib/libnativelm_ops.so``, where the board runtime looks for it; it is sent only when its
bytes differ. A board whose architecture has no build on the controller keeps running the fallback
graph, and the provision line says so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from nativelm.errors import NativelmError
from nativelm.fleet.agent import AGENT_NAME, PACKAGES_FILE
from nativelm.fleet.agent_pack import agent_bytes
from nativelm.fleet.signing import allowed_signers_text
from nativelm.fleet.ssh import BoardSession, last_line
from nativelm.fleet.ssh_trust import BoardError
from nativelm.fsutil import atomic_dir, atomic_write_text, sha256_file
from nativelm.runtime import custom_ops
from nativelm.stack.process import file_lock

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.params.fleet import FleetParams

MIN_PYTHON = (3, 9)
# a requirement pin: a distribution name, optional extras, optional version constraints; never an option
PACKAGE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._,-]+\])?([<>=!~]=?[A-Za-z0-9.*+!_-]+)*")
_PROBE = ("import json, platform, sys; print(json.dumps({'version': list(sys.version_info[:3]), "
          "'machine': platform.machine(), 'libc': list(platform.libc_ver())}))")
T = TypeVar("T")


@dataclass(frozen=True)
class BoardPython:
    """What the board's interpreter is: it decides which wheels the board can install."""

    version: tuple[int, int, int]
    machine: str
    libc: str  # "glibc" or "musl" ("" when unknown)
    libc_version: str

    @property
    def key(self) -> str:
        """Wheelhouse key: cp311-x86_64-glibc2.36."""
        return f"cp{self.version[0]}{self.version[1]}-{self.machine}-{self.libc}{self.libc_version}"


@dataclass(frozen=True)
class ProvisionResult:
    """What provisioning did on one board, or why it failed (`error`, one line)."""

    board: str
    ok: bool
    python: str = ""
    arch: str = ""
    actions: tuple[str, ...] = ()  # e.g. "agent installed", "venv created", "3 packages installed"
    uploaded_bytes: int = 0
    installed: bool = False  # pip ran
    error: str | None = None
    seconds: float = 0.0
    ops: str = ""  # the operator library: "nativelm library installed", "... up to date", or why the fallback


# ----------------------------------------------------------------------------------------------
# the agent and the layout


def ensure_layout(session: BoardSession) -> None:
    """Create the remote root's folders (lock/ is not one: it exists only while a rollout holds the board)."""
    session.run(["mkdir", "-p", *(session.path(name) for name in ("bin", "releases", "bench", "wheels", "keys"))])


def ensure_file(session: BoardSession, local: bytes, remote: str, name: str) -> bool:
    """Upload `local` to the board's `remote` path (through a .part and a rename) unless it already holds
    these bytes; whether it was sent."""
    if session.read_bytes(remote, limit=len(local) + 1) == local:
        return False
    session.run(["mkdir", "-p", remote.rsplit("/", 1)[0]])
    with tempfile.TemporaryDirectory(prefix="nativelm-provision-") as staging:
        upload = Path(staging) / name
        upload.write_bytes(local)
        session.put_file(upload, remote, resume=False)
    return True


def ensure_agent(session: BoardSession) -> bool:
    """Upload the agent to <root>/bin/nativelm-agent.pyz unless the board already has this version."""
    return ensure_file(session, agent_bytes(), session.agent_path, AGENT_NAME)


def ensure_ops_library(session: BoardSession, arch: str) -> str:
    """Put the controller's operator library build for `arch` into <root>/venv/lib (module docstring);
    what the board will run, for the provision line."""
    build = custom_ops.source_build(arch)
    if build is None:
        return f"fallback graph (nativelm builds no operator library for {arch})"
    if not build.is_file():
        target = " aarch64" if build.parent.name.startswith("aarch64") else ""
        return f"fallback graph (no {arch} build of {custom_ops.LIBRARY} here: run native/build.sh{target})"
    remote = session.path("venv", "lib", custom_ops.LIBRARY)
    if ensure_file(session, build.read_bytes(), remote, custom_ops.LIBRARY):
        return f"nativelm library installed ({arch})"
    return f"nativelm library up to date ({arch})"


# ----------------------------------------------------------------------------------------------
# Python and wheels


def board_python(session: BoardSession) -> BoardPython:
    """Ask the board's interpreter for its version and platform; BoardError if it is missing or too old."""
    python = session.board.python
    result = session.run([python, "-c", _PROBE], check=False, timeout=session.fleet.connect_timeout_s * 3)
    if result.rc != 0:
        why = last_line(result.stderr) or f"exit status {result.rc}"
        if result.rc == 127:
            why = f"{python} not found on the board (set `python:` for this board in the inventory)"
        raise BoardError(session.board.name, "python", why)
    try:
        raw = json.loads(result.stdout)
        version = tuple(int(x) for x in raw["version"])
        info = BoardPython(version=(version[0], version[1], version[2]), machine=str(raw["machine"]),
                           libc=str(raw["libc"][0]), libc_version=str(raw["libc"][1]))
    except (ValueError, KeyError, IndexError, TypeError):
        raise BoardError(session.board.name, "python", f"{python} gave an unreadable answer: "
                                                       f"{result.stdout[:80]!r}") from None
    if info.version[:2] < MIN_PYTHON:
        raise BoardError(session.board.name, "python",
                         f"{python} is Python {'.'.join(map(str, info.version))}; the agent and the runtime need "
                         f"Python {'.'.join(map(str, MIN_PYTHON))} or newer (install one and set `python:` in "
                         f"the inventory)")
    return info


def wheel_platforms(info: BoardPython) -> list[str]:
    """The platform tags `pip download --platform` should accept for this board, newest first."""
    arch = info.machine
    try:
        major, minor = (int(x) for x in info.libc_version.split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    if info.libc == "glibc" and major == 2:
        tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
        tags.append(f"manylinux2014_{arch}")
        if arch in ("x86_64", "i686"):
            tags += [f"manylinux2010_{arch}", f"manylinux1_{arch}"]
        return tags
    if info.libc == "musl" and major == 1:
        return [f"musllinux_1_{m}_{arch}" for m in range(minor, -1, -1)]
    raise NativelmError(f"cannot tell which wheels fit a {arch} board with C library "
                        f"{info.libc or 'unknown'} {info.libc_version}".rstrip())


def check_packages(packages: Sequence[str]) -> list[str]:
    """The pins, sorted; a value that is not a plain requirement (e.g. a pip option) is refused."""
    for spec in packages:
        if not PACKAGE_PATTERN.fullmatch(spec):
            raise NativelmError(f"fleet.runtime_packages: {spec!r} is not a plain requirement such as "
                                f"'numpy==2.4.6'")
    return sorted(packages)


def fill_wheelhouse(info: BoardPython, packages: Sequence[str], state_dir: Path) -> Path:
    """Wheels for these pins and this board's platform, downloaded once (cached under state_dir)."""
    pins = check_packages(packages)
    folder = Path(state_dir) / "wheelhouse" / info.key
    stamp = json.dumps(pins)
    with file_lock(folder.parent / f".{info.key}.lock"):
        if (folder / ".complete").is_file() and (folder / ".complete").read_text() == stamp:
            return folder
        with atomic_dir(folder) as tmp:
            argv = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--disable-pip-version-check",
                    "--no-input", "-q", "--python-version", f"{info.version[0]}.{info.version[1]}",
                    "--implementation", "cp", "--dest", str(tmp)]
            for tag in wheel_platforms(info):
                argv += ["--platform", tag]
            result = subprocess.run([*argv, *pins], capture_output=True, text=True, check=False)
            if result.returncode != 0:
                errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
                raise NativelmError(f"pip download for {info.key} failed: "
                                    f"{(errors or [last_line(result.stderr)])[0]}")
            atomic_write_text(tmp / ".complete", stamp)
    return folder


def upload_wheels(session: BoardSession, wheelhouse: Path) -> int:
    """Send the wheels the board lacks (or holds with another sha256), delete the ones no pin needs any
    more; return the bytes sent."""
    remote = session.agent("wheel-hashes")["files"]
    wheels = sorted(wheelhouse.glob("*.whl"))
    sent = 0
    for wheel in wheels:
        if remote.get(wheel.name) != sha256_file(wheel):
            sent += session.put_file(wheel, session.path("wheels", wheel.name))
    unused = sorted(set(remote) - {wheel.name for wheel in wheels})
    if unused:
        session.run(["rm", "-f", *(session.path("wheels", name) for name in unused)])
    return sent


# ----------------------------------------------------------------------------------------------
# the virtualenv


def create_venv(session: BoardSession) -> None:
    """python -m venv <root>/venv, with a hint for the Debian package it often needs."""
    result = session.run([session.board.python, "-m", "venv", session.path("venv")], check=False)
    if result.rc != 0:
        why = last_line(result.stderr) or last_line(result.stdout) or f"exit status {result.rc}"
        if "ensurepip" in result.stdout + result.stderr:
            why += " (on Debian/Ubuntu boards: apt-get install python3-venv)"
        raise BoardError(session.board.name, "venv", why)


def install_packages(session: BoardSession, pins: Sequence[str]) -> None:
    """pip install the pins from the uploaded wheelhouse only, then record them."""
    result = session.run([session.runtime_python, "-m", "pip", "install", "--no-index", "--find-links",
                          session.path("wheels"), "--disable-pip-version-check", "--no-input", "-q", *pins],
                         check=False)
    if result.rc != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
        raise BoardError(session.board.name, "pip install", (errors or [last_line(result.stderr)])[0]
                         or f"exit status {result.rc}")
    session.write_bytes(session.path("venv", PACKAGES_FILE), json.dumps(list(pins)).encode())


# ----------------------------------------------------------------------------------------------
# boards


def ensure_allowed_signers(session: BoardSession, text: str) -> bool:
    """Write <root>/keys/allowed_signers (the keys a release must be signed by) unless it holds `text`."""
    remote = session.path("keys", "allowed_signers")
    if session.run(["cat", remote], check=False).stdout == text:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "allowed_signers"
        local.write_text(text, encoding="utf-8")
        session.put_file(local, remote, resume=False)
    return True


def pull_config(fleet: FleetParams, board: str) -> dict[str, Any]:
    """<root>/pull/config.json of `board` in pull mode: the store, the channel, its own name (docs/fleet-at-scale.md)."""
    pull = fleet.pull
    return {"endpoint": pull.endpoint, "bucket": pull.bucket, "channel": pull.channel, "region": pull.region,
            "board": board, "jitter_s": pull.jitter_s, "keep": fleet.keep_releases, "heartbeat_s": pull.heartbeat_s}


def ensure_pull_config(session: BoardSession, fleet: FleetParams) -> bool:
    """Write <root>/pull/config.json unless it holds what fleet.pull says already."""
    text = json.dumps(pull_config(fleet, session.board.name), indent=1, sort_keys=True)
    remote = session.path("pull", "config.json")
    if session.run(["cat", remote], check=False).stdout == text:
        return False
    session.run(["mkdir", "-p", session.path("pull")])
    session.write_bytes(remote, text.encode("utf-8"))
    return True


def provision_board(session: BoardSession, fleet: FleetParams, state_dir: Path) -> ProvisionResult:
    """Everything provisioning does on one connected board; raises BoardError on failure."""
    started = time.monotonic()
    pins = check_packages(fleet.runtime_packages)
    info = board_python(session)
    actions: list[str] = []
    ensure_layout(session)
    if ensure_agent(session):
        actions.append("agent installed")
    signers = allowed_signers_text(fleet.allowed_signers)
    if ensure_allowed_signers(session, signers):
        actions.append(f"allowed_signers written ({signers.count(chr(10))} keys)")
    if fleet.mode == "pull" and ensure_pull_config(session, fleet):
        actions.append("pull/config.json written")
    facts = session.agent("facts")
    sent = 0
    installed = False
    if not (facts["runtime_python"] and facts.get("runtime_packages") == pins):
        wheelhouse = fill_wheelhouse(info, pins, state_dir)
        sent = upload_wheels(session, wheelhouse)
        if sent:
            actions.append(f"wheels uploaded ({sent / 2**20:.1f} MiB)")
        if not facts["runtime_python"]:
            create_venv(session)
            actions.append("venv created")
        install_packages(session, pins)
        installed = True
        actions.append(f"{len(pins)} packages installed")
    ops = ensure_ops_library(session, str(facts.get("arch") or info.machine))
    return ProvisionResult(session.board.name, True, ".".join(map(str, info.version)), info.machine,
                           tuple(actions) or ("up to date",), sent, installed, None,
                           time.monotonic() - started, ops)


def for_each_board(boards: Sequence[Board], max_parallel: int, work: Callable[[Board], T]) -> list[T]:
    """Run `work` on every board, at most `max_parallel` at once; results in board order."""
    if not boards:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(boards)))) as pool:
        return list(pool.map(work, boards))


def provision(inv: Inventory, boards: Sequence[Board], fleet: FleetParams, state_dir: Path) -> list[ProvisionResult]:
    """Provision boards in parallel (fleet.max_parallel); each result says what was done or why it failed."""
    check_packages(fleet.runtime_packages)
    allowed_signers_text(fleet.allowed_signers)  # bad keys: one line before any board is touched

    def one(board: Board) -> ProvisionResult:
        started = time.monotonic()
        try:
            with BoardSession(board, inv, fleet) as session:
                return provision_board(session, fleet, Path(state_dir))
        except BoardError as exc:
            return ProvisionResult(board.name, False, error=f"{exc.phase}: {exc.reason}",
                                   seconds=time.monotonic() - started)
        except NativelmError as exc:
            return ProvisionResult(board.name, False, error=str(exc), seconds=time.monotonic() - started)

    return for_each_board(boards, fleet.max_parallel, one)


def render_provision(results: Sequence[ProvisionResult]) -> list[str]:
    """One line per board: what was done, or the error."""
    lines = []
    for r in results:
        if r.ok:
            lines.append(f"{r.board}: ok in {r.seconds:.1f} s (python {r.python}, {r.arch}): {', '.join(r.actions)}; "
                         f"ops: {r.ops}")
        else:
            lines.append(f"{r.board}: FAILED: {r.error}")
    return lines
