"""Writing token shards (the layout and the manifest are `nativelm.formats.prepared`).

Documents are encoded in batches (parallel, bounded memory) and streamed into shard files.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from nativelm.data.progress import Throttle, note
from nativelm.formats.prepared import EOT_ID, shard_name

ENCODE_BATCH = 64  # documents per encode_batch call: parallel encoding, bounded memory


def encode_documents(tokenizer: Tokenizer, texts: Sequence[str], label: str = "") -> Iterator[list[int]]:
    """Token ids of each document followed by the `<|endoftext|>` id, in order.

    A literal "<|endoftext|>" inside a document is encoded as plain text, so the separator id
    appears only where a document ends.
    """
    tokenizer.encode_special_tokens = True
    throttle = Throttle()
    try:
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = tokenizer.encode_batch(list(texts[start:start + ENCODE_BATCH]), add_special_tokens=False)
            for encoding in batch:
                yield [*encoding.ids, EOT_ID]
            if throttle.due():
                note(f"encoding {label}: {min(start + ENCODE_BATCH, len(texts))}/{len(texts)} documents")
    finally:
        tokenizer.encode_special_tokens = False


@dataclass
class ShardWriter:
    """Appends token ids to `<split>_NNN.bin` files of at most `shard_tokens` tokens each."""

    out_dir: Path
    split: str
    shard_tokens: int
    dtype: np.dtype
    counts: list[int] = field(default_factory=list)
    _buffer: list[int] = field(default_factory=list)

    def write(self, ids: Sequence[int]) -> None:
        """Buffer ids and flush every full shard."""
        self._buffer.extend(ids)
        while len(self._buffer) >= self.shard_tokens:
            self._flush(self._buffer[: self.shard_tokens])
            del self._buffer[: self.shard_tokens]

    def close(self) -> list[int]:
        """Flush the last, partial shard; return the token count of every shard."""
        if self._buffer:
            self._flush(self._buffer)
            self._buffer = []
        return self.counts

    def _flush(self, ids: Sequence[int]) -> None:
        array = np.asarray(ids, dtype=self.dtype)
        array.tofile(self.out_dir / shard_name(self.split, len(self.counts)))
        self.counts.append(len(array))


def write_split(tokenizer: Tokenizer, texts: Sequence[str], out_dir: Path, split: str,
                shard_tokens: int, dtype: np.dtype) -> list[int]:
    """Encode and write one split; return the token count of each of its shards."""
    writer = ShardWriter(out_dir, split, shard_tokens, dtype)
    for ids in encode_documents(tokenizer, texts, split):
        writer.write(ids)
    return writer.close()


