"""The board's folders and the file operations every command builds on: hashes, atomic writes,
atomic symlink swaps, verification against release.json, copy-on-write copies, read-only releases
and their verification stamps (verified/<release>.json: each file's size, mtime and sha256)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from . import (
    FILE_PATTERN,
    PART,
    RELEASE_MANIFEST,
    RELEASE_PATTERN,
    AgentError,
    release_name,
)


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
        self.verified = root / "verified"
        self.allowed_signers = root / "keys" / "allowed_signers"
        self.pull = root / "pull"

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
    """Delete a folder: renamed aside first, so a half-deleted folder never keeps its name.

    A read-only release folder (0555) is made writable first, or its files could not be removed.
    """
    if not path.exists() and not path.is_symlink():
        return
    aside = path.with_name(f".{path.name}.del-{os.getpid()}")
    os.rename(str(path), str(aside))
    if aside.is_dir() and not aside.is_symlink():
        os.chmod(str(aside), 0o755)
    shutil.rmtree(str(aside), ignore_errors=True)


FICLONE = 0x40049409  # ioctl of Linux: share the source's blocks copy-on-write (btrfs, xfs, bcachefs)


def clone_file(source: Path, target: Path) -> str:
    """Copy `source` to `target` (a new file), copy-on-write where the filesystem has it.

    Never a hard link: one flipped byte in a shared inode would damage every release holding it.
    Returns "reflink" or "copy".
    """
    with open(str(source), "rb") as src, open(str(target), "wb") as dst:
        try:
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
            return "reflink"
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS,
                                 errno.EPERM, errno.EBADF):
                raise
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    return "copy"


def make_writable(folder: Path) -> None:
    """Open a release folder for changes (uploads, repairs): the folder 0755, its files 0644."""
    if not folder.is_dir() or folder.is_symlink():
        return
    os.chmod(str(folder), 0o755)
    for path in complete_files(folder).values():
        os.chmod(str(path), 0o644)


def make_read_only(folder: Path) -> None:
    """Seal a verified release: its files 0444, the folder 0555 (removal makes it writable first).

    A file hard-linked to another release (as an older agent linked shared files) gets its own copy first.
    """
    for path in complete_files(folder).values():
        if os.stat(str(path)).st_nlink > 1:
            tmp = path.with_name(f".{path.name}.unlink-{os.getpid()}")
            clone_file(path, tmp)
            os.replace(str(tmp), str(path))
        os.chmod(str(path), 0o444)
    os.chmod(str(folder), 0o555)


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


JSON_LIMIT = 4 << 20  # release.json and owner.json hold file lists and a holder: kilobytes


def read_json(path: Path) -> Any:
    """A bounded JSON file of the board's tree (None when absent): too large or nested too deep is one
    AgentError, never a memory or recursion error."""
    try:
        with open(str(path), encoding="utf-8") as handle:
            text = handle.read(JSON_LIMIT + 1)
        if len(text) > JSON_LIMIT:
            raise AgentError(f"cannot read {path}: larger than {JSON_LIMIT} bytes")
        return json.loads(text)
    except FileNotFoundError:
        return None
    except RecursionError:
        raise AgentError(f"cannot read {path}: nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise AgentError(f"cannot read {path}: {exc}") from None


def listed_files(lay: Layout, release: str) -> dict[str, str]:
    """{file: sha256} of what release.json lists (release.json itself not included)."""
    folder = lay.release(release)
    if not folder.is_dir():
        raise AgentError(f"no release {release} on this board")
    manifest = read_json(folder / RELEASE_MANIFEST)
    if manifest is None:
        raise AgentError("missing file: " + RELEASE_MANIFEST)
    listed = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not listed:
        raise AgentError(f"{RELEASE_MANIFEST} has no \"sha256\" map of the release's files")
    for name in listed:
        if not isinstance(name, str) or not FILE_PATTERN.fullmatch(name) or name == RELEASE_MANIFEST:
            raise AgentError(f"bad file name in {RELEASE_MANIFEST}: {name!r}")
    return dict(listed)


def verify_release(lay: Layout, release: str) -> int:
    """Check every file release.json lists; return how many files were checked (release.json included)."""
    folder = lay.release(release)
    listed = listed_files(lay, release)
    problems = []
    for name in sorted(listed):
        path = folder / name
        if not path.is_file():
            problems.append("missing file: " + name)
        elif sha256_file(path) != listed[name]:
            problems.append("hash mismatch: " + name)
    if problems:
        raise AgentError("; ".join(problems))
    return len(listed) + 1


def stamp_path(lay: Layout, release: str) -> Path:
    return lay.verified / (release + ".json")


def write_stamp(lay: Layout, release: str) -> dict:
    """Record size, mtime and sha256 of every file of a release that just verified (full check: now)."""
    folder = lay.release(release)
    names = [*listed_files(lay, release), RELEASE_MANIFEST]
    files = {}
    for name in sorted(names):
        info = os.stat(str(folder / name))
        files[name] = {"size": info.st_size, "mtime_ns": info.st_mtime_ns, "sha256": sha256_file(folder / name)}
    stamp = {"release": release, "full_at": time.time(), "files": files}
    write_atomic(stamp_path(lay, release), json.dumps(stamp, indent=1).encode())
    return stamp


def read_stamp(lay: Layout, release: str) -> dict | None:
    stamp = read_json(stamp_path(lay, release))
    ok = isinstance(stamp, dict) and isinstance(stamp.get("files"), dict) and isinstance(stamp.get("full_at"), (int, float))
    return stamp if ok else None


def quick_problems(lay: Layout, release: str, stamp: dict) -> list[str]:
    """What differs from the stamp by size and mtime alone (cheap: no file is read)."""
    folder = lay.release(release)
    problems = []
    for name, want in sorted(stamp["files"].items()):
        try:
            info = os.stat(str(folder / name))
        except FileNotFoundError:
            problems.append("missing file: " + name)
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append("not a file: " + name)
        elif isinstance(want, dict) and (info.st_size, info.st_mtime_ns) != (want.get("size"), want.get("mtime_ns")):
            size = want.get("size")
            problems.append(f"changed since verified: {name} "
                            + (f"(size {info.st_size}, was {size})" if info.st_size != size else "(modified)"))
    return problems


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each complete file in `folder`."""
    return {name: sha256_file(path) for name, path in complete_files(folder).items()}
