"""The pinned known_hosts file, read strictly: every line a valid `hosts keytype key`, or one clear error.

Its own module (below the inventory and the SSH transport, which both read it) so the inventory can
check the file when it loads without importing the transport.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

import paramiko

from nativelm.errors import NativelmError
from nativelm.fsutil import BoundedReadError, read_bounded

KNOWN_HOSTS_BYTES = 16 << 20


class KnownHostsError(NativelmError):
    """The pinned known_hosts file cannot be read, or one of its lines is malformed."""

    exit_code = 2


def _host_key(fields: list[str]) -> paramiko.PKey:
    """The key of one known_hosts line split in fields (hosts, type, base64 key, comment...); ValueError why not."""
    if fields[0].startswith("@"):
        raise ValueError(f"marker {fields[0]} is not supported here (pin each board's own host key)")
    if len(fields) < 3:
        raise ValueError("expected `hosts keytype base64-key [comment]`")
    hosts, keytype, blob = fields[:3]
    if any(not host for host in hosts.split(",")):
        raise ValueError(f"empty host name in {hosts[:60]!r}")
    try:
        raw = base64.b64decode(blob, validate=True)
    except binascii.Error:
        raise ValueError(f"the {keytype[:40]} key is not base64") from None
    try:
        return paramiko.PKey.from_type_string(keytype, raw)
    except Exception as exc:  # noqa: BLE001 - paramiko's key classes raise many types on bad bytes
        raise ValueError(f"not a valid {keytype[:40]} key ({type(exc).__name__})") from None


def known_host_keys(path: Path, into: paramiko.HostKeys | None = None) -> paramiko.HostKeys:
    """The pinned host keys of `path` (added to `into` when given), every line checked.

    paramiko's own loader skips some malformed lines silently and raises on others (a traceback);
    here any line that is not blank, a comment or a valid `hosts keytype key` is a KnownHostsError
    naming the file and line. Nothing is ever written to the file.
    """
    try:
        text = read_bounded(path, KNOWN_HOSTS_BYTES).decode("utf-8")
    except (OSError, BoundedReadError) as exc:
        raise KnownHostsError(f"{path}: cannot read the pinned host keys: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
    except UnicodeDecodeError as exc:
        raise KnownHostsError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    keys = into if into is not None else paramiko.HostKeys()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        try:
            key = _host_key(fields)
        except ValueError as exc:
            raise KnownHostsError(f"{path}:{number}: malformed known_hosts line: {exc}") from None
        for host in fields[0].split(","):
            keys.add(host, key.get_name(), key)
    return keys
