"""Host helpers for background processes: ports, HTTP health, log tails, a file lock, who a pid is."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import http.client
import os
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import psutil

from nativelm.errors import NativelmError

LOG_TAIL_LINES = 15


def describe_pid(pid: int, width: int = 80) -> str:
    """'pid 123: python -m http.server 8000' (the command line shortened), best effort."""
    cmd = ""
    with contextlib.suppress(psutil.Error):
        cmd = " ".join(psutil.Process(pid).cmdline()).strip()
    if len(cmd) > width:
        cmd = cmd[: width - 3] + "..."
    return f"pid {pid}: {cmd}" if cmd else f"pid {pid}"


# --------------------------------------------------------------------------------------------
# ports and HTTP


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on host:port (checked by binding, as the server will)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise NativelmError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
            try:
                sock.bind(addr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
                raise NativelmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return False


def port_owner(port: int) -> str | None:
    """'pid 123: <command>' of the process listening on TCP `port` (own processes), else None."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return describe_pid(conn.pid)
    return None


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def http_ok(url: str, timeout_s: float = 2.0, *, direct: bool = True) -> bool:
    """True if GET `url` answers 2xx within `timeout_s`.

    `direct` (our loopback servers) bypasses proxies from the environment; a remote server (a team
    stack's MLflow or Prefect) is asked with direct=False, through them as any client would.
    """
    opener = _DIRECT if direct else urllib.request.build_opener()
    try:
        with opener.open(url, timeout=timeout_s) as reply:  # noqa: S310 - http(s) URLs
            return 200 <= reply.status < 300
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# logs

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def tail_lines(path: Path, n: int = LOG_TAIL_LINES, width: int = 300) -> list[str]:
    """The last `n` non-empty lines of a text file (ANSI colours removed, long lines cut); [] if none."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read()
    except OSError:
        return []
    lines = [_ANSI.sub("", line).rstrip() for line in data.decode("utf-8", errors="replace").splitlines()]
    lines = [line if len(line) <= width else line[: width - 3] + "..." for line in lines if line.strip()]
    return lines[-n:]


def format_tail(lines: Sequence[str], indent: str = "    | ") -> str:
    """Log lines as an indented block (empty string for no lines)."""
    return "\n".join(indent + line for line in lines)


# --------------------------------------------------------------------------------------------
# locking


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on `path` (created if missing), so two `up`/`down` never interleave."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise NativelmError(f"cannot create lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


