"""nativelm-agent: the board side of the fleet (standard library only, Python 3.9 or newer).

Shipped to each board as one zipapp, ``<root>/bin/nativelm-agent.pyz`` (built by
`nativelm.fleet.agent_pack`), and run over SSH as ``python3 nativelm-agent.pyz COMMAND ARGS``;
``<root>`` is the folder above ``bin/`` (or ``--root DIR`` given before the command, as when the
controller pipes the agent to ``python3 -``). Every command prints one JSON object on stdout and
exits 0; a failure prints one line ``error: ...`` on stderr and exits 1. Every argument is validated
here as well as on the controller, by what its command's usage line calls it (RELEASE, NAME,
SHA256, OWNER, STALE_S, KEEP, HOLDER, EVERY_S, MODE, PREVIOUS, START).

Layout under <root>::

    releases/<release>/...   one folder per release (files arrive as NAME.part, then are renamed;
                             read-only once verified; never hard-linked to another release)
    current, previous        symlinks to releases/<release>, swapped atomically
    venv/                    the runtime virtualenv (venv/nativelm-packages.json: the pins installed)
    wheels/                  the wheelhouse provisioning installs from
    bin/                     this agent
    verified/<release>.json  the stamp of a verified release: each file's size, mtime, sha256
    keys/allowed_signers     the public keys a release's signature must verify against (provisioned)
    lock/owner.json          present while a rollout holds the board: its owner and controller
    bench/<release>.json     the last on-board benchmark of each release
    pull/                    pull mode (docs/fleet-at-scale.md): config.json (store, channel, this board's
                             name), credentials.json (optional, 0600), state.json, the last verified channel

This package imports only relatively (it runs on the board under its own name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

AGENT_NAME = "nativelm-agent.pyz"
RELEASE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
OWNER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
HOLDER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}:[0-9]{1,10}:[0-9]{1,12}(\.[0-9]{1,6})?")
MODE_PATTERN = re.compile(r"quick|full")
START_PATTERN = re.compile(r"now|jittered")
RELEASE_MANIFEST = "release.json"
SIGNATURE = "release.json.sig"  # the controller's `ssh-keygen -Y sign` of release.json (docs/fleet.md)
SIGNING_NAMESPACE = "nativelm-release"  # fixed: a signature made for anything else never verifies
SIGNER = "nativelm-release"  # the identity every allowed_signers line names
CHANNEL_NAMESPACE = "nativelm-channel"  # a pull channel's signature (docs/fleet-at-scale.md)
RUNTIME = "nativelm-runtime.pyz"  # the release's own runtime (nativelm.formats.release.RUNTIME_FILE)
PACKAGES_FILE = "nativelm-packages.json"
PART = ".part"


class AgentError(Exception):
    """A failure reported as one `error: ...` line."""


def _check(pattern: re.Pattern[str], value: str, what: str) -> str:
    if not pattern.fullmatch(value) or value in (".", ".."):
        raise AgentError(f"bad {what}: {value!r} (allowed: {pattern.pattern})")
    return value


def release_name(value: str) -> str:
    """A release name (the same pattern as the controller's RELEASE_PATTERN)."""
    return _check(RELEASE_PATTERN, value, "release name")


def number(value: str, what: str, minimum: float) -> float:
    try:
        result = float(value)
    except ValueError:
        raise AgentError(f"bad {what}: {value!r} is not a number") from None
    if not math.isfinite(result) or result < minimum:
        raise AgentError(f"bad {what}: {value!r} (must be a finite number >= {minimum:g})")
    return result


ARGUMENTS: dict[str, Callable[[str], Any]] = {  # what a usage line calls an argument -> its check
    "RELEASE": release_name,
    "NAME": lambda value: _check(FILE_PATTERN, value, "file name"),
    "SHA256": lambda value: _check(SHA256_PATTERN, value, "sha256"),
    "OWNER": lambda value: _check(OWNER_PATTERN, value, "lock owner"),
    "STALE_S": lambda value: number(value, "STALE_S", 0),
    "KEEP": lambda value: number(value, "KEEP", 1),
    "HOLDER": lambda value: _check(HOLDER_PATTERN, value, "lock holder (HOST:PID:START_TIME)"),
    "EVERY_S": lambda value: number(value, "EVERY_S", 0),
    "MODE": lambda value: _check(MODE_PATTERN, value, "check mode"),
    "PREVIOUS": release_name,
    "START": lambda value: _check(START_PATTERN, value, "start (now: no random delay)"),
}
COMMANDS: dict[str, tuple[str, Callable[..., dict[str, Any]]]] = {}  # name -> (usage, function)


def command(usage: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Register a command under the first word of `usage`; the other words name its arguments ([X]: optional)."""

    def register(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        COMMANDS[usage.split()[0]] = (usage, run)
        return run

    return register


def checked_args(usage: str, args: list[str]) -> list[Any]:
    """`args` checked against the usage line: their number, then each one by what it is called."""
    words = usage.split()[1:]
    if not sum(not w.startswith("[") for w in words) <= len(args) <= len(words):
        raise AgentError("usage: " + usage)
    return [ARGUMENTS[word.strip("[]")](value) for word, value in zip(words, args)]
