"""Corpus documents: the decoded text of one file, archive member or dataset row, and decoding rules.

Files with NUL bytes are binary: they are skipped with a warning (a folder or archive often holds
a stray image or compiled file, and dropping it changes nothing a user wants). Text that is not
UTF-8 is an error naming the file, because silently dropping or mangling prose would change the
model without anyone noticing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from nativelm.data.progress import note
from nativelm.errors import NativelmError
from nativelm.fsutil import size_text

MAX_FILE_BYTES = 1 << 30  # one document: a book is megabytes; more is a mistake (a disk image, a dump)
MAX_CORPUS_BYTES = 8 << 30  # everything a source delivers, held in memory while it is cleaned


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


class ByteBudget:
    """What one corpus may read: no document over `per_file` bytes, no more than `total` in all.

    Checked before a document is read (from its size on disk or in the archive), so an oversized
    corpus stops with one line instead of exhausting memory.
    """

    def __init__(self, origin: str, per_file: int = MAX_FILE_BYTES, total: int = MAX_CORPUS_BYTES) -> None:
        self.origin = origin
        self.per_file = per_file
        self.total = total
        self.used = 0

    def take(self, name: str, size: int) -> int:
        """Count `size` bytes of document `name`; the most that may be read of it (`size`)."""
        if size > self.per_file:
            raise NativelmError(f"{name}: {size} bytes, more than the {size_text(self.per_file)} a corpus file may "
                                f"hold (exclude it with data.source.members)")
        if self.used + size > self.total:
            raise NativelmError(f"{self.origin}: more than {size_text(self.total)} of text in all (at {name}); "
                                f"select fewer files with data.source.members")
        self.used += size
        return size


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


def sample_names(names: list[str], limit: int = 3) -> str:
    """A few names for an error line ("a, b, c, ..."), or "none"."""
    shown = ", ".join(names[:limit])
    return shown + (", ..." if len(names) > limit else "") if names else "none"


def no_match(origin: str, pattern: str, names: list[str]) -> NativelmError:
    """The error for a `data.source.members` pattern that selects nothing, with what there is."""
    return NativelmError(
        f"{origin}: no file matches data.source.members {pattern!r} (it holds e.g. {sample_names(sorted(names))})"
    )
