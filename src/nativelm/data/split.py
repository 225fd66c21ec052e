"""Deterministic train/validation split by document, keyed on content so renames do not move text.

Hashing (salt, content sha256) gives every document a fixed place in [0, 1): the split
depends on nothing but the text and the salt, not on corpus order, machine or run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from nativelm.data.clean import CleanDocument
from nativelm.errors import NativelmError
from nativelm.params.data import SplitParams


@dataclass
class Split:
    """Training and validation documents, each in corpus order."""

    train: list[CleanDocument]
    val: list[CleanDocument]


def split_score(salt: str, content_sha256: str) -> float:
    """A uniform number in [0, 1) fixed by the salt and the document's content hash."""
    digest = hashlib.sha256(f"{salt}\x00{content_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(documents: Sequence[CleanDocument], params: SplitParams, origin: str = "corpus") -> Split:
    """The round(n · val_fraction) documents with the lowest scores go to validation (at least one).

    Ranking by score instead of thresholding it keeps the validation share close to the
    requested fraction on small corpora (42 plays), while staying keyed on content and salt.
    """
    if len(documents) < 2:
        raise NativelmError(
            f"{origin}: need at least 2 documents after cleaning for a train/validation split, "
            f"got {len(documents)} (add text or lower data.clean.min_chars)"
        )
    n_val = min(len(documents) - 1, max(1, round(len(documents) * params.val_fraction)))
    ranked = sorted(range(len(documents)),
                    key=lambda i: (split_score(params.salt, documents[i].sha256), documents[i].doc_id))
    chosen = set(ranked[:n_val])
    train = [doc for i, doc in enumerate(documents) if i not in chosen]
    val = [doc for i, doc in enumerate(documents) if i in chosen]
    return Split(train=train, val=val)
