"""Cleaning: one normal form for every document, licence boilerplate out, short and duplicate docs dropped.

The tokenizer and the model should learn the prose, not the Project Gutenberg licence that
comes with every file, nor the platform's line endings; and a text present twice would leak
between the train and validation splits.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from nativelm.data.documents import Document
from nativelm.params.data import CleanParams

_FLAGS = re.IGNORECASE | re.MULTILINE
# everything up to and including these lines is a header: modern and old Gutenberg headers
_HEADER_ENDS = (
    re.compile(r"^\*{3}\s*START OF (?:THE |THIS )?PROJECT GUTENBERG.*$", _FLAGS),
    re.compile(r"^\*END\*\s*THE SMALL PRINT!.*$", _FLAGS),
)
# these lines and everything after them are a trailer (the licence follows the END marker)
_TRAILER_STARTS = (
    re.compile(r"^\*{3}\s*END OF (?:THE |THIS )?PROJECT GUTENBERG.*$", _FLAGS),
    re.compile(r"^[ \t]*End of (?:the )?Project Gutenberg\b.*$", _FLAGS),
)
# licence blocks inside the text: the "<<THIS ELECTRONIC VERSION ... >>" notices of the
# Gutenberg/World Library Shakespeare, repeated between plays
_INLINE_BLOCKS = (re.compile(r"^<<THIS ELECTRONIC VERSION\b.*?>>[ \t]*$\n?", _FLAGS | re.DOTALL),)
# a first paragraph naming who produced the e-text
_PRODUCER = re.compile(r"\A\s*(?:Produced by|E-?text prepared by|This e-?text was prepared by)\b.*?(?:\n[ \t]*\n|\Z)",
                       re.IGNORECASE | re.DOTALL)


class CleanDocument(NamedTuple):
    """A cleaned document with the sha256 of its text (the key for dedup and for the split)."""

    doc_id: str
    text: str
    sha256: str


@dataclass
class CleanedCorpus:
    """The documents that survive cleaning, in corpus order, and what was dropped."""

    documents: list[CleanDocument]
    short: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


def normalize_text(text: str, form: str) -> str:
    """Unicode normal form, `\\n` line endings, no trailing spaces, no blank lines at either end."""
    text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def strip_boilerplate(text: str) -> str:
    """Drop Gutenberg headers, trailers and licence blocks; text without them is unchanged."""
    for pattern in _HEADER_ENDS:
        match = pattern.search(text)
        if match:
            text = text[match.end():]
    cut = min((m.start() for p in _TRAILER_STARTS if (m := p.search(text))), default=len(text))
    text = text[:cut]
    for pattern in _INLINE_BLOCKS:
        text = pattern.sub("", text)
    return _PRODUCER.sub("", text, count=1)


def clean_text(text: str, params: CleanParams) -> str:
    """The full cleaning of one document's text."""
    text = normalize_text(text, params.unicode_form)
    if params.strip_boilerplate:
        text = strip_boilerplate(text).strip("\n")
    return text


def text_sha256(text: str) -> str:
    """Hex sha256 of the UTF-8 text: the identity of a document's content."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def clean_corpus(documents: Sequence[Document], params: CleanParams) -> CleanedCorpus:
    """Clean every document; drop empty or shorter-than-`min_chars` ones and exact duplicates.

    Duplicates (same cleaned text as an earlier document) are always counted, and dropped
    when `drop_duplicates` is set; the first occurrence in corpus order is kept.
    """
    result = CleanedCorpus(documents=[])
    seen: set[str] = set()
    for doc in documents:
        text = clean_text(doc.text, params)
        if not text or len(text) < params.min_chars:
            result.short.append(doc.doc_id)
            continue
        digest = text_sha256(text)
        if digest in seen:
            result.duplicates.append(doc.doc_id)
            if params.drop_duplicates:
                continue
        seen.add(digest)
        result.documents.append(CleanDocument(doc.doc_id, text, digest))
    return result
