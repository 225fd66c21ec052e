"""The prepared-data folder (`prepare` writes it, `train`, `export` and `evaluate` read it).

Token shards are raw little-endian token ids, memory-mapped by training. A split is one stream:
every document's tokens followed by `<|endoftext|>` (so the id both ends a document and
separates it from the next), cut into files of `shard_tokens` tokens. `manifest.json` records
dtype, counts and the sha256 of every file, so a reader can tell a complete, untouched output
from a partial or edited one. `tokenizer.json` beside them is the tokenizer they were made with.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nativelm.errors import NativelmError
from nativelm.formats import envelope
from nativelm.fsutil import sha256_file

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "nativelm-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")
EOT = "<|endoftext|>"  # ends every document; token id 0 of every nativelm tokenizer
EOT_ID = 0


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and memory), uint32 beyond; little-endian always."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    """`train_000.bin`, `val_001.bin`, ..."""
    return f"{split}_{index:03d}.bin"


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
    return envelope.write_json(out_dir / MANIFEST, manifest)


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """manifest.json of a prepared folder; missing or unreadable is one clear line."""
    path = Path(out_dir) / MANIFEST
    return envelope.checked(envelope.read_json(path, "run `nativelm prepare` first"), path, FORMAT, FORMAT_VERSION,
                            f"{FORMAT} manifest")


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


def validation_windows(shards: Sequence[np.ndarray], n_tokens: int, max_len: int) -> np.ndarray:
    """Evenly spaced windows (rows, length) of the validation split, about `n_tokens` tokens in all.

    length = min(n_tokens, max_len); a window never crosses a shard boundary.
    """
    length = min(n_tokens, max_len)
    starts = [(i, s) for i, shard in enumerate(shards) for s in range(0, len(shard) - length + 1, length)]
    if length < 2 or not starts:
        longest = max((len(s) for s in shards), default=0)
        raise NativelmError(f"the validation split has no window of {length} tokens (longest shard {longest} "
                            "tokens)")
    rows = min(max(1, n_tokens // length), len(starts))
    picks = np.linspace(0, len(starts) - 1, rows).round().astype(int)
    return np.stack([np.asarray(shards[i][s:s + length], dtype=np.int64) for i, s in (starts[p] for p in picks)])
