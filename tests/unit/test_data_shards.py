"""Token shards: sizes, dtype, separators, manifest hashes and the checking reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nativelm.data.shards import ShardWriter, encode_documents, write_split
from nativelm.data.tokenizer import save_tokenizer, train_tokenizer
from nativelm.errors import NativelmError
from nativelm.formats.prepared import (
    EOT,
    EOT_ID,
    build_manifest,
    load_shards,
    read_manifest,
    token_dtype,
    write_manifest,
)
from nativelm.fsutil import sha256_file
from nativelm.params.data import TokenizerParams

TEXTS = [f"Document {i}: the noble king speaks to the fair queen, line {i}.\nAnd she answers." for i in range(40)]


def test_dtype_by_vocab_size() -> None:
    assert token_dtype(4096) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    assert token_dtype(65537).byteorder in ("<", "=") and token_dtype(65537).itemsize == 4


def test_writer_cuts_full_shards_and_keeps_the_rest(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "train", shard_tokens=4, dtype=np.dtype("<u2"))
    writer.write([1, 2, 3])
    writer.write([4, 5, 6, 7, 8, 9, 10])
    writer.write([11])
    assert writer.close() == [4, 4, 3]
    assert np.fromfile(tmp_path / "train_000.bin", dtype="<u2").tolist() == [1, 2, 3, 4]
    assert np.fromfile(tmp_path / "train_002.bin", dtype="<u2").tolist() == [9, 10, 11]
    assert (tmp_path / "train_001.bin").read_bytes() == bytes([5, 0, 6, 0, 7, 0, 8, 0])  # little-endian


def test_uint32_shards_hold_large_ids(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, "val", shard_tokens=8, dtype=token_dtype(100_000))
    writer.write([0, 70_000, 99_999])
    writer.close()
    assert np.fromfile(tmp_path / "val_000.bin", dtype="<u4").tolist() == [0, 70_000, 99_999]


def test_every_document_ends_with_eot_and_literal_eot_is_text() -> None:
    tokenizer = train_tokenizer(TEXTS, TokenizerParams(vocab_size=300))
    texts = ["first doc", f"second mentions {EOT} literally"]
    encoded = list(encode_documents(tokenizer, texts))
    assert [ids[-1] for ids in encoded] == [EOT_ID, EOT_ID]
    assert [ids.count(EOT_ID) for ids in encoded] == [1, 1]
    assert tokenizer.decode(encoded[1], skip_special_tokens=False) == texts[1] + EOT
    assert tokenizer.encode(EOT).ids == [EOT_ID]  # the flag is restored after encoding


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A small prepared folder written with the module's own functions."""
    tokenizer = train_tokenizer(TEXTS, TokenizerParams(vocab_size=300))
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    dtype = token_dtype(tokenizer.get_vocab_size())
    counts = {"train": write_split(tokenizer, TEXTS[:30], tmp_path, "train", 128, dtype),
              "val": write_split(tokenizer, TEXTS[30:], tmp_path, "val", 128, dtype)}
    manifest = build_manifest(tmp_path, tokenizer.get_vocab_size(), dtype, 128, counts, {"train": 30, "val": 10})
    write_manifest(tmp_path, manifest)
    return tmp_path


def test_round_trip_through_files(prepared: Path) -> None:
    from nativelm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(prepared / "tokenizer.json")
    train = np.concatenate(load_shards(prepared, "train"))
    assert len(load_shards(prepared, "train")) > 1  # the fixture's 128-token shards cut the split
    assert tokenizer.decode(train.tolist(), skip_special_tokens=False) == "".join(t + EOT for t in TEXTS[:30])
    val = np.concatenate(load_shards(prepared, "val"))
    assert tokenizer.decode(val.tolist(), skip_special_tokens=False) == "".join(t + EOT for t in TEXTS[30:])


def test_manifest_lists_every_file_with_its_hash(prepared: Path) -> None:
    manifest = read_manifest(prepared)
    names = sorted(p.name for p in prepared.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["sha256"]) == names
    assert all(manifest["sha256"][n] == sha256_file(prepared / n) for n in names)
    assert manifest["dtype"] == "uint16" and manifest["eot_id"] == 0
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        assert all((prepared / s["file"]).stat().st_size == 2 * s["tokens"] for s in info["shards"])


def test_reader_refuses_a_changed_shard(prepared: Path) -> None:
    shard = prepared / "train_000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(NativelmError, match=r"train_000.bin: sha256 differs from manifest.json"):
        load_shards(prepared, "train")
    assert len(load_shards(prepared, "train", verify=False)) > 1  # same size: only the hash tells


def test_reader_refuses_a_truncated_or_missing_shard(prepared: Path) -> None:
    shard = prepared / "val_000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(NativelmError, match=r"val_000.bin: expected \d+ bytes from manifest.json, found \d+"):
        load_shards(prepared, "val", verify=False)
    shard.unlink()
    with pytest.raises(NativelmError, match=r"val_000.bin: missing"):
        load_shards(prepared, "val")


def test_reader_errors_on_missing_manifest_or_split(tmp_path: Path, prepared: Path) -> None:
    with pytest.raises(NativelmError, match=r"manifest.json: not found \(run `nativelm prepare` first\)"):
        load_shards(tmp_path / "empty", "train")
    with pytest.raises(NativelmError, match=r"no split 'test' \(has train, val\)"):
        load_shards(prepared, "test")
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest["format_version"] = 99
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NativelmError, match="format version 99"):
        read_manifest(prepared)
