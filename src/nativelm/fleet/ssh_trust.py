"""Who a board connection trusts, and what its failures mean: pinned host keys, the client key, errors.

- a host key is accepted only from the inventory's pinned known_hosts file; an unknown or changed
  key is refused (:class:`HostKeyError`) with the fingerprint offered, and nothing is ever added;
- that file is parsed strictly (:func:`nativelm.fleet.known_hosts.known_host_keys`): a line that is
  not `hosts keytype key [comment]` with a valid key is one line naming the file and the line
  number, never skipped;
- the client authenticates with the inventory's private key only, whose contents never reach a
  message;
- a failure of the connection itself (refused, no answer, dropped) is `transient`: the same step
  may succeed when tried again; what the board answered (a hash mismatch, a failing command, a
  refused key) is not.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from nativelm.errors import NativelmError

if TYPE_CHECKING:
    from nativelm.fleet.inventory import Board

_NETWORK_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                   errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE}


class BoardError(NativelmError):
    """Something failed on or while talking to one board; `phase` says what was being done.

    `transient`: the connection failed (refused, no answer, dropped), not the board's answer, so
    the same step may succeed when tried again.
    """

    def __init__(self, board: str, phase: str, reason: str, transient: bool = False) -> None:
        self.board = board
        self.phase = phase
        self.reason = reason
        self.transient = transient
        super().__init__(f"board {board}: {phase}: {reason}")

    def __reduce__(self):  # picklable across processes despite the multi-argument constructor
        return (type(self), (self.board, self.phase, self.reason, self.transient))


class HostKeyError(BoardError):
    """The board's host key is not pinned, or differs from the pinned one: the connection is refused."""


def connection_dropped(exc: BaseException) -> bool:
    """Whether `exc` says the SSH connection failed (refused, timed out, closed), not the board's answer.

    A refused host key or key authentication is never transient; neither is a name that does
    not resolve, nor an SFTP status such as permission denied (an OSError with an errno).
    """
    if isinstance(exc, (paramiko.AuthenticationException, paramiko.BadHostKeyException, socket.gaierror)):
        return False
    if isinstance(exc, (EOFError, paramiko.SSHException, ConnectionError, TimeoutError, socket.timeout)):
        return True
    return isinstance(exc, OSError) and (exc.errno is None or exc.errno in _NETWORK_ERRNOS)


def fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:...` as `ssh-keygen -lf` and `ssh` print it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


class RefuseUnknown(paramiko.RejectPolicy):
    """RejectPolicy that says which key was offered and where it would have to be pinned."""

    def __init__(self, board: str, known_hosts: Path) -> None:
        self.board = board
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyError(self.board, "host key",
                           f"{hostname} offered {key.get_name()} key {fingerprint(key)}, which is not pinned in "
                           f"{self.known_hosts}: refused (verify the fingerprint out of band, then add the key "
                           f"there)")


def connect_reason(exc: BaseException, board: Board, timeout: float) -> str:
    where = f"{board.host}:{board.port}"
    if isinstance(exc, paramiko.AuthenticationException):
        return f"key authentication failed for user {board.user} at {where}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"no answer from {where} within {timeout:g} s"
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        return f"connection refused by {where}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host {board.host}: {exc.strerror}"
    if isinstance(exc, OSError):
        return f"{where}: {exc.strerror or exc}"
    return f"{where}: {exc}"


def load_private_key(path: Path, board: str) -> paramiko.PKey:
    """The inventory's private key for `board` (BoardError naming the file, never its contents)."""
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        reason = f"private key not found: {path}"
    except PermissionError:
        reason = f"cannot read private key {path}: permission denied"
    except paramiko.PasswordRequiredException:
        reason = f"private key {path} is encrypted; use a key without a passphrase for the fleet"
    except (paramiko.SSHException, ValueError, OSError) as exc:
        reason = f"cannot load private key {path}: {type(exc).__name__}"
    raise BoardError(board, "connect", reason)
