"""The release commands: facts, upload bookkeeping (hashes, link, remove, discard), verify (which
seals a release read-only and stamps it), check (the live release against its stamp), the atomic
switch (activate, rollback, restore), prune and the saved benchmarks."""

from __future__ import annotations

import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from . import FILE_PATTERN, PACKAGES_FILE, PART, RELEASE_MANIFEST, AgentError, command
from .files import (
    Layout,
    clone_file,
    complete_files,
    file_hashes,
    make_read_only,
    make_writable,
    point_link,
    quick_problems,
    read_json,
    read_stamp,
    remove_tree,
    sha256_file,
    stamp_path,
    verify_release,
    write_atomic,
    write_stamp,
)
from .lock import lock_owner
from .signature import check_signature


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
    make_writable(folder)  # an update (or a repair) of this release starts here
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
    make_writable(target.parent)
    tmp = target.with_name(f".{name}.link-{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        how = clone_file(source, tmp)
        os.replace(str(tmp), str(target))
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"linked": True, "from": source.parent.name, "how": how}


def _find_by_hash(lay: Layout, release: str, name: str, sha: str) -> Path | None:
    """A complete file with this sha256 in another release: same name first, then any name of equal size."""
    others = [lay.releases / r for r in reversed(lay.release_names()) if r != release]
    same_name = (folder / name for folder in others)
    any_name = (path for folder in others for other, path in complete_files(folder).items() if other != name)
    return next((path for path in itertools.chain(same_name, any_name)
                 if path.is_file() and not path.is_symlink() and sha256_file(path) == sha), None)


@command("verify RELEASE")
def cmd_verify(lay: Layout, release: str) -> dict[str, Any]:
    """Hash every file and check the manifest's signature; a release that verifies is sealed
    read-only and stamped (see `check`)."""
    checked = verify_release(lay, release)
    check_signature(lay, release)
    make_read_only(lay.release(release))
    write_stamp(lay, release)
    return {"ok": True, "files": checked}


@command("check RELEASE EVERY_S [MODE]")
def cmd_check(lay: Layout, release: str, every_s: float, mode: str = "quick") -> dict[str, Any]:
    """A verified release still intact? Size and mtime against its stamp; every file hashed when `mode`
    is full, when the last full check is older than EVERY_S seconds, or when there is no stamp.
    Damage is reported in the reply ({"ok": false, "problems": [...]}), not as an error."""
    stamp = read_stamp(lay, release)
    full = mode == "full" or stamp is None or time.time() - float(stamp["full_at"]) >= every_s
    if not full:
        problems = quick_problems(lay, release, stamp)
        return {"ok": not problems, "mode": "quick", "problems": problems, "full_at": stamp["full_at"]}
    try:
        verify_release(lay, release)
    except AgentError as exc:
        return {"ok": False, "mode": "full", "problems": str(exc).split("; ")}
    stamp = write_stamp(lay, release)
    return {"ok": True, "mode": "full", "problems": [], "full_at": stamp["full_at"]}


@command("remove RELEASE NAME")
def cmd_remove(lay: Layout, release: str, name: str) -> dict[str, Any]:
    folder = lay.release(release)
    make_writable(folder)
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
    _forget(lay, release)
    return {"discarded": existed}


def _forget(lay: Layout, release: str) -> None:
    """Remove what the board keeps about a deleted release (its stamp, its benchmark)."""
    for path in (stamp_path(lay, release), lay.bench / (release + ".json")):
        if path.exists():
            path.unlink()


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


def _verified(lay: Layout, target: str, doing: str) -> None:
    try:
        verify_release(lay, target)
    except AgentError as exc:
        raise AgentError(f"cannot {doing} {target}: {exc}") from None


@command("rollback [RELEASE]")
def cmd_rollback(lay: Layout, release: str | None = None) -> dict[str, Any]:
    target = release or lay.link_target(lay.previous)
    if target is None:
        raise AgentError("nothing to roll back to: no previous release")
    _verified(lay, target, "roll back to")
    return _swap(lay, target)


@command("restore RELEASE [PREVIOUS]")
def cmd_restore(lay: Layout, release: str, previous: str | None = None) -> dict[str, Any]:
    """current := RELEASE and previous := PREVIOUS (or none), after RELEASE verifies.

    What a rollout does when the release it switched to fails its health check: the failed release
    must not become `previous` (which is always the last release that passed its health check).
    """
    _verified(lay, release, "restore")
    if previous is not None and not (lay.release(previous) / RELEASE_MANIFEST).is_file():
        raise AgentError(f"cannot restore {release}: previous release {previous} is not on this board")
    failed = lay.link_target(lay.current)
    if previous is None:
        if lay.previous.is_symlink():
            lay.previous.unlink()
    else:
        point_link(lay.previous, "releases/" + previous)
    point_link(lay.current, "releases/" + release)
    return {"current": release, "previous": previous, "replaced": failed}


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
        _forget(lay, name)
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
