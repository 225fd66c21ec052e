"""One SSH session to one board (paramiko): pinned host keys, key authentication, quoted commands, uploads.

Security rules kept here so no caller can forget them:
- host keys come only from the inventory's pinned known_hosts file (never ~/.ssh/known_hosts,
  never the system's); an unknown key or a changed key is refused (:class:`HostKeyError`) and
  nothing is ever added to the file;
- authentication is by the inventory's private key only (no agent, no ~/.ssh key search, no
  password);
- every argv element is quoted with shlex.quote before it reaches the remote shell, and remote
  paths are built from validated parts only (:meth:`BoardSession.path`);
- no key material reaches a message, a log or an exception.
"""

from __future__ import annotations

import errno
import io
import json
import posixpath
import re
import select
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Self

import paramiko

from nativelm.fleet.agent import AGENT_NAME
from nativelm.fleet.agent_pack import inline_source
from nativelm.fleet.known_hosts import KnownHostsError, known_host_keys
from nativelm.fleet.ssh_trust import (
    BoardError,
    HostKeyError,
    RefuseUnknown,
    connect_reason,
    connection_dropped,
    fingerprint,
    load_private_key,
)

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board, Inventory
    from nativelm.params.fleet import FleetParams

PART_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # one component of a remote path
_HOME_PATTERN = re.compile(r"/[A-Za-z0-9._/@+-]*")
AGENT_REMOTE = ("bin", AGENT_NAME)  # where ensure_agent puts the agent, under the root
_CHUNK = 256 * 1024


@dataclass(frozen=True)
class CommandResult:
    """Exit status and decoded output of one remote command."""

    rc: int
    stdout: str
    stderr: str


def last_line(text: str) -> str:
    """The last non-empty line of `text` (stripped), or ''."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class BoardSession:
    """A context manager holding one SSH connection to `board`; see the module docstring for the rules."""

    def __init__(self, board: Board, inventory: Inventory, fleet: FleetParams) -> None:
        self.board = board
        self.inventory = inventory
        self.fleet = fleet
        self.home = ""
        self.root = ""
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    # ---- connection

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect and authenticate; learn the remote home. BoardError / HostKeyError on failure."""
        board, fleet = self.board, self.fleet
        pkey = load_private_key(self.inventory.key_path(board), board.name)
        client = paramiko.SSHClient()
        try:
            known_host_keys(self.inventory.known_hosts, into=client.get_host_keys())  # the pinned file only
        except KnownHostsError as exc:
            raise BoardError(board.name, "connect", str(exc)) from None
        client.set_missing_host_key_policy(RefuseUnknown(board.name, self.inventory.known_hosts))
        timeout = fleet.connect_timeout_s
        try:
            client.connect(board.host, port=board.port, username=board.user, pkey=pkey, timeout=timeout,
                           banner_timeout=timeout, auth_timeout=timeout, channel_timeout=timeout,
                           allow_agent=False, look_for_keys=False)
        except HostKeyError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyError(board.name, "host key",
                               f"the key of {board.address} changed: pinned {exc.expected_key.get_name()} "
                               f"{fingerprint(exc.expected_key)}, offered {exc.key.get_name()} "
                               f"{fingerprint(exc.key)}; refused (if the board was reinstalled, verify the new "
                               f"fingerprint out of band and replace the line in {self.inventory.known_hosts})"
                               ) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise BoardError(board.name, "connect", connect_reason(exc, board, timeout),
                             transient=connection_dropped(exc)) from None
        transport = client.get_transport()
        if transport is not None and fleet.keepalive_s:
            transport.set_keepalive(fleet.keepalive_s)
        self._client = client
        try:
            self._learn_home()
        except BaseException:
            self.close()
            raise

    def _learn_home(self) -> None:
        home = last_line(self.run(["printenv", "HOME"], timeout=self.fleet.connect_timeout_s).stdout)
        if not _HOME_PATTERN.fullmatch(home) or ".." in home.split("/"):
            raise BoardError(self.board.name, "connect", f"unusable home folder {home!r} (expected an absolute "
                                                         f"path of letters, digits and ._/@+-)")
        self.home = home.rstrip("/") or "/"
        self.root = self.fleet.remote_root_under(self.home)  # validated with the params (params/fleet.py)

    def close(self) -> None:
        """Close the SFTP channel and the connection (safe to call twice)."""
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _require_client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise BoardError(self.board.name, "connect", "not connected")
        return self._client

    # ---- paths

    def path(self, *parts: str) -> str:
        """Absolute remote path under the root; each part one plain component of a strict alphabet."""
        for part in parts:
            if not PART_PATTERN.fullmatch(part) or part == "..":
                raise BoardError(self.board.name, "path", f"refused remote path component {part!r} "
                                                          f"(allowed: {PART_PATTERN.pattern})")
        return posixpath.join(self.root, *parts)

    @property
    def runtime_python(self) -> str:
        """The board runtime's interpreter, inside the provisioned virtualenv."""
        return self.path("venv", "bin", "python")

    @property
    def agent_path(self) -> str:
        """Where the board-side agent lives (installed by provision.ensure_agent)."""
        return self.path(*AGENT_REMOTE)

    # ---- commands

    def run(self, argv: Sequence[str], *, timeout: float | None = None, check: bool = True,
            stdin: bytes | None = None) -> CommandResult:
        """Run argv (each element shell-quoted) and collect its output.

        Timeout (default fleet.command_timeout_s) → BoardError phase "command"; with `check`, a
        non-zero exit → BoardError(phase=argv[0]'s name, reason=last stderr line).
        """
        if not argv:
            raise ValueError("empty argv")
        limit = self.fleet.command_timeout_s if timeout is None else timeout
        command = " ".join(shlex.quote(str(arg)) for arg in argv)
        try:
            channel = self._require_client().get_transport().open_session(timeout=self.fleet.connect_timeout_s)
        except (paramiko.SSHException, OSError, EOFError, AttributeError) as exc:
            raise BoardError(self.board.name, "command", f"cannot open a channel: {exc or type(exc).__name__}",
                             transient=True) from None
        try:
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            out, err = _collect(channel, time.monotonic() + limit)
            if out is None:
                raise BoardError(self.board.name, "command", f"timed out after {limit:g} s")
            rc = channel.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise BoardError(self.board.name, "command", f"connection lost: {exc or type(exc).__name__}",
                             transient=True) from None
        finally:
            channel.close()
        result = CommandResult(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        if check and rc == -1:
            raise BoardError(self.board.name, posixpath.basename(str(argv[0])), self.lost(), transient=True)
        if check and rc != 0:
            reason = last_line(result.stderr) or f"exit status {rc}"
            raise BoardError(self.board.name, posixpath.basename(str(argv[0])), reason)
        return result

    def agent(self, command: str, *args: str, stdin: bytes | None = None, timeout: float | None = None,
              inline: bool = False) -> dict:
        """Run one board-agent command; return the JSON object it printed.

        `inline`: run this controller's copy of the agent fed through stdin (`python - --root ROOT`),
        for read-only commands on boards not provisioned yet (no stdin of its own then).
        """
        if inline:
            if stdin is not None:
                raise ValueError("an inline agent command cannot take stdin")
            argv = [self.board.python, "-", "--root", self.root, command, *args]
            stdin = inline_source()
        else:
            argv = [self.board.python, self.agent_path, command, *args]
        result = self.run(argv, stdin=stdin, timeout=timeout, check=False)
        if result.rc == -1:  # the channel closed without an exit status: sshd (or its session) died
            raise BoardError(self.board.name, command, self.lost(), transient=True)
        if result.rc != 0:
            errors = [line.strip()[len("error:"):].strip() for line in result.stderr.splitlines()
                      if line.strip().startswith("error:")]
            reason = errors[-1] if errors else last_line(result.stderr) or f"exit status {result.rc}"
            raise BoardError(self.board.name, command, reason)
        try:
            reply = json.loads(result.stdout)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            raise BoardError(self.board.name, command,
                             f"the agent printed no JSON object (got {result.stdout[:80]!r})")
        return reply

    # ---- files

    @property
    def sftp(self) -> paramiko.SFTPClient:
        """The session's SFTP channel, opened on first use."""
        if self._sftp is None:
            try:
                self._sftp = self._require_client().open_sftp()
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise BoardError(self.board.name, "sftp", f"cannot open SFTP: {exc or type(exc).__name__}",
                                 transient=connection_dropped(exc)) from None
        return self._sftp

    def remote_size(self, remote: str) -> int | None:
        """Size of a remote file, or None when there is none."""
        try:
            return self.sftp.stat(remote).st_size
        except FileNotFoundError:
            return None
        except OSError as exc:
            if getattr(exc, "errno", None) == errno.ENOENT:
                return None
            raise BoardError(self.board.name, "sftp", f"cannot stat {remote}: {exc}") from None

    def put_file(self, local: Path, remote: str, *, progress: Callable[[int], None] | None = None,
                 resume: bool = True) -> int:
        """Upload `local` to `remote` through `remote.part` (renamed into place when complete).

        A `.part` left by an interrupted upload, no larger than the local file, is continued from its
        size (`resume=False` starts over). Returns the bytes sent by this call; `progress` gets the
        bytes sent so far by this call after each chunk.
        """
        local = Path(local)
        size = local.stat().st_size
        part = remote + ".part"
        offset = self.remote_size(part) if resume else None
        if offset is None or offset > size:
            offset = 0
        sent = 0
        try:
            with open(local, "rb") as source, self.sftp.open(part, "r+b" if offset else "wb") as target:
                target.set_pipelined(True)
                source.seek(offset)
                target.seek(offset)
                while block := source.read(_CHUNK):
                    target.write(block)
                    sent += len(block)
                    if progress is not None:
                        progress(sent)
            final = self.sftp.stat(part).st_size
            if final != size:  # pipelined writes may fail silently: the size tells
                raise BoardError(self.board.name, "upload", self._upload_failure(
                    remote, size - final, f"{final} bytes arrived of {size}"))
            self.sftp.posix_rename(part, remote)
        except BoardError:
            raise
        except (OSError, paramiko.SSHException, EOFError) as exc:
            reason = self._upload_failure(remote, size - offset - sent, str(exc) or type(exc).__name__, exc)
            raise BoardError(self.board.name, "upload", reason,
                             transient=connection_dropped(exc) and "no space left" not in reason) from None
        return sent

    def write_bytes(self, remote: str, data: bytes) -> None:
        """Write a small remote file atomically (through `remote.part` and a rename)."""
        try:
            with self.sftp.open(remote + ".part", "wb") as target:
                target.write(data)
            self.sftp.posix_rename(remote + ".part", remote)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise BoardError(self.board.name, "upload", self._upload_failure(
                remote, len(data), str(exc) or type(exc).__name__, exc)) from None

    def read_bytes(self, remote: str, limit: int = 1 << 20) -> bytes | None:
        """A small remote file's contents (None when it does not exist; at most `limit` bytes)."""
        try:
            with self.sftp.open(remote, "rb") as source:
                return source.read(limit)
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise BoardError(self.board.name, "sftp", f"cannot read {remote}: {exc}") from None

    def connected(self) -> bool:
        """Whether the SSH transport still runs (after a failure: was it the connection, or the board's answer?)."""
        transport = self._client.get_transport() if self._client is not None else None
        return bool(transport is not None and transport.is_active())

    def lost(self) -> str:
        """The one line for a connection that dropped under a command or an upload."""
        return f"connection to board {self.board.name} lost (sshd gone?)"

    def _upload_failure(self, remote: str, still_to_send: int, detail: str, exc: BaseException | None = None) -> str:
        """'FILE: no space left on device ...' when the board's disk is the cause, else 'FILE: detail'.

        SFTP servers report a full disk as a bare "Failure", so the free space is asked for.
        """
        if exc is not None and not self.connected():  # the transport died: not an SFTP status such as a full disk
            return f"{remote}: {self.lost()}"
        free = self._free_bytes(posixpath.dirname(remote))
        if getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < max(still_to_send, 1) + 65536):
            shown = "" if free is None else f" ({free / 2**20:.1f} MiB free, {still_to_send / 2**20:.1f} MiB to go)"
            return f"{remote}: no space left on device{shown}"
        return f"{remote}: {detail}"

    def _free_bytes(self, folder: str) -> int | None:
        try:
            result = self.run(["df", "-Pk", folder], check=False, timeout=self.fleet.connect_timeout_s)
            return int(result.stdout.splitlines()[-1].split()[3]) * 1024
        except (BoardError, ValueError, IndexError):
            return None


def _collect(channel: paramiko.Channel, deadline: float) -> tuple[bytes | None, bytes]:
    """Read stdout and stderr until the command exits; (None, stderr) if the deadline passes first."""
    out, err = io.BytesIO(), io.BytesIO()
    while True:
        while channel.recv_ready():
            out.write(channel.recv(_CHUNK))
        while channel.recv_stderr_ready():
            err.write(channel.recv_stderr(_CHUNK))
        finished = channel.exit_status_ready() and (channel.eof_received or channel.closed)
        if finished and not channel.recv_ready() and not channel.recv_stderr_ready():
            return out.getvalue(), err.getvalue()
        left = deadline - time.monotonic()
        if left <= 0:
            return None, err.getvalue()
        select.select([channel], [], [], min(left, 0.5))
