"""Token shards: raw little-endian token ids on disk, memory-mapped by training, checked by a manifest.

A split is one stream: every document's tokens followed by `<|endoftext|>` (so the id both
ends a document and separates it from the next). The stream is cut into files of
`shard_tokens` tokens. `manifest.json` records dtype, counts and the sha256 of every file, so
a reader can tell a complete, untouched output from a partial or edited one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from nativelm.data.progress import Throttle, note
from nativelm.data.tokenizer import EOT, EOT_ID
from nativelm.errors import NativelmError
from nativelm.fsutil import sha256_file

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "nativelm-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
ENCODE_BATCH = 64  # documents per encode_batch call: parallel encoding, bounded memory


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and memory), uint32 beyond; little-endian always."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    """`train_000.bin`, `val_001.bin`, ..."""
    return f"{split}_{index:03d}.bin"


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


def build_manifest(out_dir: Path, vocab_size: int, dtype: np.dtype, shard_tokens: int,
                   shard_counts: dict[str, list[int]], documents: dict[str, int]) -> dict[str, Any]:
    """The manifest: format, dtype, per-shard and per-split counts, sha256 of every other file."""
    splits = {
        split: {
            "documents": documents[split],
            "tokens": sum(counts),
            "shards": [{"file": shard_name(split, i), "tokens": n} for i, n in enumerate(counts)],
        }
        for split, counts in shard_counts.items()
    }
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file() and p.name != MANIFEST)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype.name,
        "byteorder": "little",
        "vocab_size": vocab_size,
        "eot_token": EOT,
        "eot_id": EOT_ID,
        "document_separator": "eot_after_each_document",
        "shard_tokens": shard_tokens,
        "tokenizer": TOKENIZER_FILE,
        "splits": splits,
        "sha256": {name: sha256_file(out_dir / name) for name in files},
    }


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json (sorted keys: the same outputs give the same bytes) into a folder being built."""
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """manifest.json of a prepared folder; missing or unreadable is one clear line."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NativelmError(f"{path}: not found (run `nativelm prepare` first)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NativelmError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise NativelmError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version")
        raise NativelmError(f"{path}: format version {found}, this nativelm reads {FORMAT_VERSION}")
    return manifest


def verify_file(out_dir: Path, name: str, manifest: dict[str, Any]) -> None:
    """The file exists and has the sha256 the manifest recorded for it."""
    path = Path(out_dir) / name
    expected = manifest["sha256"].get(name)
    if expected is None:
        raise NativelmError(f"{path}: not listed in {MANIFEST}")
    if not path.is_file():
        raise NativelmError(f"{path}: missing (listed in {MANIFEST})")
    if sha256_file(path) != expected:
        raise NativelmError(f"{path}: sha256 differs from {MANIFEST} (file changed or corrupt; run prepare again)")


def load_shards(out_dir: Path, split: str, verify: bool = True) -> list[np.memmap]:
    """Read-only memmaps of a split's shards, in order, after checking them against the manifest.

    Sizes are always checked; `verify` also checks every shard's sha256 (a full read).
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if split not in manifest["splits"]:
        raise NativelmError(f"{out_dir / MANIFEST}: no split {split!r} (has {', '.join(sorted(manifest['splits']))})")
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    maps = []
    for shard in manifest["splits"][split]["shards"]:
        path = out_dir / shard["file"]
        if verify:
            verify_file(out_dir, shard["file"], manifest)
        expected_bytes = shard["tokens"] * dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected_bytes:
            size = path.stat().st_size if path.is_file() else "missing"
            raise NativelmError(f"{path}: expected {expected_bytes} bytes from {MANIFEST}, found {size}")
        maps.append(np.memmap(path, dtype=dtype, mode="r", shape=(shard["tokens"],)))
    return maps
