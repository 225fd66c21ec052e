"""Archives (sdists and url bodies) read in memory: nothing is extracted to disk.

Members are chosen by the `data.source.members` glob and returned sorted by name, so the same
archive always gives the same documents in the same order.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import urllib.parse
import zipfile
from fnmatch import fnmatchcase
from pathlib import Path
from typing import BinaryIO

from nativelm.data.documents import ByteBudget, RawDocument, no_match
from nativelm.errors import NativelmError


def read_tar_members(handle: BinaryIO, pattern: str, origin: str, budget: ByteBudget | None = None) -> list[RawDocument]:
    """Regular-file members of a (possibly compressed) tar whose name matches `pattern`, sorted."""
    try:
        with tarfile.open(fileobj=handle, mode="r:*") as tar:
            files = [m for m in tar.getmembers() if m.isfile()]
            chosen = sorted((m for m in files if fnmatchcase(m.name, pattern)), key=lambda m: m.name)
            if not chosen:
                raise no_match(origin, pattern, [m.name for m in files])
            docs = []
            budget = budget or ByteBudget(origin)
            for member in chosen:
                budget.take(member.name, member.size)  # a compressed bomb stops before it is inflated
                extracted = tar.extractfile(member)
                assert extracted is not None  # regular files always extract
                docs.append(RawDocument(member.name, extracted.read()))
            return docs
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise NativelmError(f"{origin}: not a readable tar archive ({exc})") from None


def read_zip_members(handle: BinaryIO, pattern: str, origin: str, budget: ByteBudget | None = None) -> list[RawDocument]:
    """File members of a zip archive whose name matches `pattern`, sorted by name."""
    try:
        with zipfile.ZipFile(handle) as archive:
            files = [info for info in archive.infolist() if not info.is_dir()]
            chosen = sorted((i for i in files if fnmatchcase(i.filename, pattern)), key=lambda i: i.filename)
            if not chosen:
                raise no_match(origin, pattern, [i.filename for i in files])
            budget = budget or ByteBudget(origin)
            for info in chosen:  # zipfile inflates no more than a member's declared size
                budget.take(info.filename, info.file_size)
            return [RawDocument(info.filename, archive.read(info)) for info in chosen]
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise NativelmError(f"{origin}: not a readable zip archive ({exc})") from None


def read_archive(path: Path, pattern: str, origin: str, budget: ByteBudget | None = None) -> list[RawDocument]:
    """Members of a .tar.gz/.tar.bz2/.tar or .zip archive on disk matching `pattern` (within `budget`)."""
    with open(path, "rb") as handle:
        if zipfile.is_zipfile(handle):
            handle.seek(0)
            return read_zip_members(handle, pattern, origin, budget)
        handle.seek(0)
        return read_tar_members(handle, pattern, origin, budget)


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

