"""The `prepare` stage: corpus -> cleaned documents -> split -> tokenizer + token shards + metrics.

Everything is built in a temporary sibling of `data.out_dir` and swapped in at the end, so a
failure at any step leaves the previous outputs as they were. No timestamps or absolute paths
go into any output: the same parameters give byte-identical files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nativelm.data.clean import CleanedCorpus, clean_corpus
from nativelm.data.documents import Corpus
from nativelm.data.progress import note
from nativelm.data.shards import write_split
from nativelm.data.sources import DatasetLoader, read_corpus
from nativelm.data.split import Split, split_documents
from nativelm.data.tokenizer import save_tokenizer, train_tokenizer
from nativelm.errors import NativelmError
from nativelm.formats.prepared import MANIFEST, TOKENIZER_FILE, build_manifest, shard_name, token_dtype, write_manifest
from nativelm.fsutil import atomic_dir, atomic_write_text
from nativelm.params.data import DataParams

Stats = dict[str, int | float]


@dataclass(frozen=True)
class PrepareResult:
    """What `run_prepare` produced: the statistics (also in the metrics file) and where things are."""

    stats: Stats
    out_dir: Path
    tokenizer_path: Path
    manifest_path: Path
    metrics_path: Path
    shards: dict[str, list[Path]]


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_paths(data: DataParams, cache_dir: Path) -> None:
    """Refuse an out_dir whose replacement would delete the working folder, the corpus or the cache.

    The whole out_dir is swapped for a new one, so anything else kept inside it would be lost.
    """
    out_dir = Path(data.out_dir).resolve()
    name = f"data.out_dir {data.out_dir!r}"
    if _within(Path.cwd().resolve(), out_dir):
        raise NativelmError(f"{name}: must be a folder of its own, not the working folder or above it")
    keep = [(Path(cache_dir), "the download cache"), (Path(data.metrics_file), "data.metrics_file")]
    if data.source.kind == "local":
        keep += [(Path(p), f"corpus path {p!r}") for p in data.source.paths]
    for path, what in keep:
        if _within(path.resolve(), out_dir):
            raise NativelmError(f"{name}: holds {what}, which replacing the folder would delete; move one of them")
    if Path(data.metrics_file).is_dir():
        raise NativelmError(f"data.metrics_file {data.metrics_file!r}: is a folder, expected a JSON file path")


def corpus_stats(corpus: Corpus, cleaned: CleanedCorpus, split: Split) -> Stats:
    """Document and character counts of each step (the token counts come later)."""
    eligible = len(corpus.documents) - len(cleaned.short)
    return {
        "documents_raw": len(corpus.documents),
        "documents_binary_skipped": len(corpus.skipped_binary),
        "documents_short": len(cleaned.short),
        "documents_duplicate": len(cleaned.duplicates),
        "documents_kept": len(cleaned.documents),
        "documents_train": len(split.train),
        "documents_val": len(split.val),
        "duplicate_ratio": round(len(cleaned.duplicates) / eligible, 6) if eligible else 0.0,
        "characters_raw": sum(len(doc.text) for doc in corpus.documents),
        "characters": sum(len(doc.text) for doc in cleaned.documents),
        "characters_train": sum(len(doc.text) for doc in split.train),
        "characters_val": sum(len(doc.text) for doc in split.val),
    }


def token_stats(stats: Stats, vocab_size: int, counts: dict[str, list[int]]) -> Stats:
    """Token counts per split (separators included) and tokens per character (separators excluded)."""
    tokens = {split: sum(c) for split, c in counts.items()}
    total = tokens["train"] + tokens["val"]
    text_tokens = total - int(stats["documents_train"]) - int(stats["documents_val"])
    chars = int(stats["characters"])
    return {
        **stats,
        "vocab_size": vocab_size,
        "tokens_train": tokens["train"],
        "tokens_val": tokens["val"],
        "tokens_total": total,
        "tokens_per_char": round(text_tokens / chars, 6) if chars else 0.0,
        "shards_train": len(counts["train"]),
        "shards_val": len(counts["val"]),
    }


def build_outputs(data: DataParams, split: Split, folder: Path) -> tuple[int, dict[str, list[int]]]:
    """Train the tokenizer on the training split and write tokenizer, shards and manifest to `folder`."""
    note(f"training byte-level BPE (vocab {data.tokenizer.vocab_size}) on {len(split.train)} documents")
    tokenizer = train_tokenizer([doc.text for doc in split.train], data.tokenizer)
    save_tokenizer(tokenizer, folder / TOKENIZER_FILE)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    counts: dict[str, list[int]] = {}
    for name, docs in (("train", split.train), ("val", split.val)):
        note(f"encoding {name}: {len(docs)} documents")
        counts[name] = write_split(tokenizer, [doc.text for doc in docs], folder, name, data.shard_tokens, dtype)
    documents = {"train": len(split.train), "val": len(split.val)}
    write_manifest(folder, build_manifest(folder, vocab_size, dtype, data.shard_tokens, counts, documents))
    return vocab_size, counts


def run_prepare(data: DataParams, cache_dir: Path, *, load_dataset: DatasetLoader | None = None) -> PrepareResult:
    """Run the whole stage; write `data.out_dir` (swapped in whole) and `data.metrics_file`.

    Paths in the section are relative to the current folder. `load_dataset` stands in for
    `datasets.load_dataset` (tests only). Any bad input raises NativelmError with one line.
    """
    out_dir = Path(data.out_dir)
    metrics_path = Path(data.metrics_file)
    check_paths(data, Path(cache_dir))

    corpus = read_corpus(data.source, Path(cache_dir), load_dataset=load_dataset)
    chars = sum(len(doc.text) for doc in corpus.documents)
    note(f"read {len(corpus.documents)} documents ({chars:,} characters) from {corpus.origin}")
    cleaned = clean_corpus(corpus.documents, data.clean)
    split = split_documents(cleaned.documents, data.split, corpus.origin)
    note(f"kept {len(cleaned.documents)} documents ({len(cleaned.short)} short, {len(cleaned.duplicates)} duplicate); "
         f"{len(split.train)} train / {len(split.val)} val")
    stats = corpus_stats(corpus, cleaned, split)

    with atomic_dir(out_dir) as folder:
        vocab_size, counts = build_outputs(data, split, folder)
        folder.chmod(0o755)  # mkdtemp makes it owner-only; the output is an ordinary folder
    stats = token_stats(stats, vocab_size, counts)
    atomic_write_text(metrics_path, json.dumps(stats, indent=2, sort_keys=True) + "\n")
    note(f"wrote {out_dir}: {stats['tokens_train']:,} train / {stats['tokens_val']:,} val tokens, vocab {vocab_size}")

    shards = {name: [out_dir / shard_name(name, i) for i in range(len(c))] for name, c in counts.items()}
    return PrepareResult(stats=stats, out_dir=out_dir, tokenizer_path=out_dir / TOKENIZER_FILE,
                         manifest_path=out_dir / MANIFEST, metrics_path=metrics_path, shards=shards)
