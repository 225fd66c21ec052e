"""The release commands: facts, upload bookkeeping (hashes, link, remove, discard), verify, the
atomic switch (activate, rollback), prune and the saved benchmarks."""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from . import FILE_PATTERN, PACKAGES_FILE, PART, RELEASE_MANIFEST, AgentError, command
from .files import (
    Layout,
    complete_files,
    file_hashes,
    point_link,
    read_json,
    remove_tree,
    sha256_file,
    verify_release,
    write_atomic,
)
from .lock import lock_owner


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
        "lock": lock_owner(lay),
        "last_bench": bench if isinstance(bench, dict) else None,
    }


@command("hashes RELEASE")
def cmd_hashes(lay: Layout, release: str) -> dict[str, Any]:
    folder = lay.release(release)
    folder.mkdir(parents=True, exist_ok=True)
    partial = {}
    for path in sorted(folder.iterdir()):
        base = path.name[: -len(PART)]
        if path.name.endswith(PART) and FILE_PATTERN.fullmatch(base) and path.is_file() and not path.is_symlink():
            partial[base] = path.stat().st_size
    return {"files": file_hashes(folder), "partial": partial}


@command("wheel-hashes")
def cmd_wheel_hashes(lay: Layout) -> dict[str, Any]:
    lay.wheels.mkdir(parents=True, exist_ok=True)
    return {"files": file_hashes(lay.wheels)}


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
