"""nativelm-agent: the board side of the fleet (standard library only, Python 3.9 or newer, one file).

Installed on each board as ``<root>/bin/nativelm-agent.py`` and run over SSH as
``python3 nativelm-agent.py COMMAND ARGS``; ``<root>`` is the folder above ``bin/`` (or
``--root DIR`` given before the command, as when the controller pipes this file to ``python3 -``).
Every command prints one JSON object on stdout and exits 0; a failure prints one line
``error: ...`` on stderr and exits 1. Every argument is validated here as well as on the controller,
by what its command's usage line calls it (RELEASE, NAME, SHA256, OWNER, STALE_S, KEEP).

Layout under <root>::

    releases/<release>/...   one folder per release (files arrive as NAME.part, then are renamed)
    current, previous        symlinks to releases/<release>, swapped atomically
    venv/                    the runtime virtualenv (venv/nativelm-packages.json: the pins installed)
    wheels/                  the wheelhouse provisioning installs from
    bin/                     this agent
    lock/owner.json          present while a rollout holds the board
    bench/<release>.json     the last on-board benchmark of each release
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_SOURCE = str(globals().get("__file__", "<stdin>"))
FROM_STDIN = _SOURCE.startswith("<")  # `python3 - --root DIR ...`: this file was piped in
AGENT_FILE = Path(_SOURCE).resolve()  # on the controller: this module, the file ensure_agent uploads
RELEASE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FILE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
OWNER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
RELEASE_MANIFEST = "release.json"
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
    "RELEASE": lambda value: release_name(value),
    "NAME": lambda value: _check(FILE_PATTERN, value, "file name"),
    "SHA256": lambda value: _check(SHA256_PATTERN, value, "sha256"),
    "OWNER": lambda value: _check(OWNER_PATTERN, value, "lock owner"),
    "STALE_S": lambda value: number(value, "STALE_S", 0),
    "KEEP": lambda value: number(value, "KEEP", 1),
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


class Layout:
    """The folders and links under one root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.current = root / "current"
        self.previous = root / "previous"
        self.lock = root / "lock"
        self.bench = root / "bench"
        self.wheels = root / "wheels"
        self.venv = root / "venv"

    def release(self, name: str) -> Path:
        return self.releases / release_name(name)

    def link_target(self, link: Path) -> str | None:
        """The release name a `current`/`previous` link points to, or None."""
        try:
            target = os.readlink(str(link))
        except OSError:
            return None
        name = os.path.basename(target.rstrip("/"))
        return name if RELEASE_PATTERN.fullmatch(name) else None

    def release_names(self) -> list[str]:
        """Release folders, oldest first (by last change: upload or activation), ties by name."""
        if not self.releases.is_dir():
            return []
        found = [p for p in self.releases.iterdir() if p.is_dir() and not p.is_symlink()
                 and RELEASE_PATTERN.fullmatch(p.name)]
        found.sort(key=lambda p: (p.stat().st_mtime, p.name))
        return [p.name for p in found]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(str(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, str(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_tree(path: Path) -> None:
    """Delete a folder: renamed aside first, so a half-deleted folder never keeps its name."""
    if not path.exists() and not path.is_symlink():
        return
    aside = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.rename(str(path), str(aside))
    shutil.rmtree(str(aside), ignore_errors=True)


def point_link(link: Path, target: str) -> None:
    """Make `link` a symlink to `target` atomically (a new link under a temp name, then rename)."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, str(tmp))
    os.replace(str(tmp), str(link))


def complete_files(folder: Path) -> dict[str, Path]:
    """Regular files with valid names that are not partial uploads."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir())
            if FILE_PATTERN.fullmatch(p.name) and not p.name.endswith(PART) and p.is_file() and not p.is_symlink()}


def read_json(path: Path) -> Any:
    try:
        with open(str(path), encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read {path}: {exc}") from None


@command("facts")
def cmd_facts(lay: Layout) -> dict[str, Any]:
    current = lay.link_target(lay.current)
    probe = lay.root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    bench = read_json(lay.bench / (current + ".json")) if current else None
    packages = read_json(lay.venv / PACKAGES_FILE)
    return {
        "arch": platform.machine(),
        "python": platform.python_version(),
        "libc": "-".join(x for x in platform.libc_ver() if x),
        "free_disk_mb": shutil.disk_usage(str(probe)).free // (1 << 20),
        "current": current,
        "previous": lay.link_target(lay.previous),
        "releases": lay.release_names(),
        "runtime_python": (lay.venv / "bin" / "python").exists(),
        "runtime_packages": packages if isinstance(packages, list) else None,
        "lock": _lock_owner(lay),
        "last_bench": bench if isinstance(bench, dict) else None,
    }


def _hashes(folder: Path) -> dict[str, str]:
    return {name: sha256_file(path) for name, path in complete_files(folder).items()}


@command("hashes RELEASE")
def cmd_hashes(lay: Layout, release: str) -> dict[str, Any]:
    folder = lay.release(release)
    folder.mkdir(parents=True, exist_ok=True)
    partial = {}
    for path in sorted(folder.iterdir()):
        base = path.name[: -len(PART)]
        if path.name.endswith(PART) and FILE_PATTERN.fullmatch(base) and path.is_file() and not path.is_symlink():
            partial[base] = path.stat().st_size
    return {"files": _hashes(folder), "partial": partial}


@command("wheel-hashes")
def cmd_wheel_hashes(lay: Layout) -> dict[str, Any]:
    lay.wheels.mkdir(parents=True, exist_ok=True)
    return {"files": _hashes(lay.wheels)}


@command("link RELEASE NAME SHA256")
def cmd_link(lay: Layout, release: str, name: str, sha: str) -> dict[str, Any]:
    target = lay.release(release) / name
    if target.is_file() and sha256_file(target) == sha:
        return {"linked": True, "from": release}
    source = _find_by_hash(lay, release, name, sha)
    if source is None:
        return {"linked": False}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.link-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(str(source), str(tmp))
    except OSError:
        shutil.copyfile(str(source), str(tmp))
    os.replace(str(tmp), str(target))
    return {"linked": True, "from": source.parent.name}


def _find_by_hash(lay: Layout, release: str, name: str, sha: str) -> Path | None:
    """A complete file with this sha256 in another release: same name first, then any name of equal size."""
    others = [lay.releases / r for r in reversed(lay.release_names()) if r != release]
    same_name = (folder / name for folder in others)
    any_name = (path for folder in others for other, path in complete_files(folder).items() if other != name)
    return next((path for path in itertools.chain(same_name, any_name)
                 if path.is_file() and not path.is_symlink() and sha256_file(path) == sha), None)


def verify_release(lay: Layout, release: str) -> int:
    """Check every file release.json lists; return how many files were checked (release.json included)."""
    folder = lay.release(release)
    if not folder.is_dir():
        raise AgentError(f"no release {release} on this board")
    manifest = read_json(folder / RELEASE_MANIFEST)
    if manifest is None:
        raise AgentError("missing file: " + RELEASE_MANIFEST)
    listed = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not listed:
        raise AgentError(f"{RELEASE_MANIFEST} has no \"sha256\" map of the release's files")
    problems = []
    for name in sorted(listed):
        if not isinstance(name, str) or not FILE_PATTERN.fullmatch(name) or name == RELEASE_MANIFEST:
            raise AgentError(f"bad file name in {RELEASE_MANIFEST}: {name!r}")
        path = folder / name
        if not path.is_file():
            problems.append("missing file: " + name)
        elif sha256_file(path) != listed[name]:
            problems.append("hash mismatch: " + name)
    if problems:
        raise AgentError("; ".join(problems))
    return len(listed) + 1


@command("verify RELEASE")
def cmd_verify(lay: Layout, release: str) -> dict[str, Any]:
    return {"ok": True, "files": verify_release(lay, release)}


@command("remove RELEASE NAME")
def cmd_remove(lay: Layout, release: str, name: str) -> dict[str, Any]:
    folder = lay.release(release)
    removed = False
    for path in (folder / name, folder / (name + PART)):
        if path.is_file() or path.is_symlink():
            path.unlink()
            removed = True
    return {"removed": removed}


@command("discard RELEASE")
def cmd_discard(lay: Layout, release: str) -> dict[str, Any]:
    folder = lay.release(release)
    for link in (lay.current, lay.previous):
        if lay.link_target(link) == release:
            raise AgentError(f"release {release} is {link.name}: not discarded")
    existed = folder.is_dir()
    remove_tree(folder)
    return {"discarded": existed}


def _lock_owner(lay: Layout) -> dict[str, Any] | None:
    """owner.json of the lock, {"owner": "unknown", ...} for a lock without one, None when unlocked."""
    if not lay.lock.is_dir():
        return None
    with contextlib.suppress(AgentError):
        owner = read_json(lay.lock / "owner.json")
        if isinstance(owner, dict) and isinstance(owner.get("owner"), str) and isinstance(owner.get("since"), str):
            return owner
    try:
        since = lay.lock.stat().st_mtime
    except FileNotFoundError:
        return None
    return {"owner": "unknown", "since": _iso(since)}


def _iso(epoch: float) -> str:
    utc = datetime.timezone.utc  # noqa: UP017 - datetime.UTC is Python 3.11+
    return datetime.datetime.fromtimestamp(epoch, utc).isoformat(timespec="seconds")


def _age_s(since: str) -> float:
    try:
        then = datetime.datetime.fromisoformat(since).timestamp()
    except ValueError:
        return float("inf")  # unreadable: treat as stale
    return time.time() - then


@contextlib.contextmanager
def _lock_mutex(lay: Layout) -> Iterator[None]:
    """Serialise lock/unlock on this board (flock: released by the kernel even if the agent dies)."""
    lay.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(lay.root / ".lock.mutex"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_lock(lay: Layout, owner: str) -> None:
    """Create lock/ with owner.json already inside (built aside, then renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=".lock.", dir=str(lay.root)))
    try:
        payload = {"owner": owner, "since": _iso(time.time()), "pid": os.getpid()}
        write_atomic(tmp / "owner.json", json.dumps(payload).encode())
        os.rename(str(tmp), str(lay.lock))
    finally:
        shutil.rmtree(str(tmp), ignore_errors=True)


@command("lock OWNER STALE_S")
def cmd_lock(lay: Layout, owner: str, stale_s: float) -> dict[str, Any]:
    with _lock_mutex(lay):
        held = _lock_owner(lay)
        if held is not None and held["owner"] == owner:
            return {"locked": True, "took_over": False}
        if held is not None and _age_s(held["since"]) < stale_s:
            raise AgentError("locked by {} since {}".format(held["owner"], held["since"]))
        if held is not None:
            remove_tree(lay.lock)  # stale: its rollout died
        _write_lock(lay, owner)
        return {"locked": True, "took_over": held is not None}


@command("unlock OWNER")
def cmd_unlock(lay: Layout, owner: str) -> dict[str, Any]:
    with _lock_mutex(lay):
        held = _lock_owner(lay)
        if held is None or held["owner"] != owner:
            return {"unlocked": False}
        remove_tree(lay.lock)
        return {"unlocked": True}


def _swap(lay: Layout, release: str) -> dict[str, Any]:
    """current := release, previous := the release it replaces (unchanged if it already was current)."""
    old = lay.link_target(lay.current)
    if old == release:
        return {"current": release, "previous": lay.link_target(lay.previous), "changed": False}
    if old is not None:
        point_link(lay.previous, "releases/" + old)
    point_link(lay.current, "releases/" + release)
    os.utime(str(lay.release(release)))  # the live release is the newest, for prune
    return {"current": release, "previous": old, "changed": True}


@command("activate RELEASE")
def cmd_activate(lay: Layout, release: str) -> dict[str, Any]:
    folder = lay.release(release)
    if not (folder / RELEASE_MANIFEST).is_file():
        raise AgentError(f"no complete release {release} on this board (missing {RELEASE_MANIFEST})")
    return _swap(lay, release)


@command("rollback [RELEASE]")
def cmd_rollback(lay: Layout, release: str | None = None) -> dict[str, Any]:
    target = release or lay.link_target(lay.previous)
    if target is None:
        raise AgentError("nothing to roll back to: no previous release")
    try:
        verify_release(lay, target)
    except AgentError as exc:
        raise AgentError(f"cannot roll back to {target}: {exc}") from None
    return _swap(lay, target)


@command("prune KEEP")
def cmd_prune(lay: Layout, keep: float) -> dict[str, Any]:
    keep_n = int(keep)
    names = lay.release_names()
    protected = {lay.link_target(lay.current), lay.link_target(lay.previous)}
    removed = []
    for name in names:  # oldest first
        if len(names) - len(removed) <= keep_n:
            break
        if name in protected:
            continue
        remove_tree(lay.releases / name)
        bench = lay.bench / (name + ".json")
        if bench.exists():
            bench.unlink()
        removed.append(name)
    return {"removed": removed, "kept": [n for n in names if n not in removed]}


@command("save-bench RELEASE")
def cmd_save_bench(lay: Layout, release: str) -> dict[str, Any]:
    """The benchmark JSON comes on stdin."""
    try:
        result = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AgentError(f"save-bench: stdin is not JSON: {exc}") from None
    if not isinstance(result, dict):
        raise AgentError("save-bench: stdin must hold one JSON object")
    write_atomic(lay.bench / (release + ".json"), json.dumps(result, indent=2).encode())
    return {"saved": True}


def main(argv: list[str]) -> int:
    """Run one command; print its JSON (exit 0) or one `error:` line (exit 1)."""
    try:
        root = None if FROM_STDIN else AGENT_FILE.parent.parent
        if argv[:1] == ["--root"]:
            if len(argv) < 2 or not os.path.isabs(argv[1]):
                raise AgentError("--root needs an absolute folder")
            root, argv = Path(argv[1]), argv[2:]
        if root is None:
            raise AgentError("--root DIR is needed when the agent is read from stdin")
        if not argv or argv[0] not in COMMANDS:
            raise AgentError("usage: nativelm-agent.py COMMAND ARGS (commands: {})".format(", ".join(COMMANDS)))
        usage, run = COMMANDS[argv[0]]
        reply = run(Layout(root), *checked_args(usage, argv[1:]))
    except AgentError as exc:
        print(f"error: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    except OSError as exc:
        print("error: {}: {}".format(exc.filename or "", exc.strerror or exc).replace("\n", " "), file=sys.stderr)
        return 1
    print(json.dumps(reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
