"""Train/validation split: deterministic, keyed on content, close to val_fraction, never an empty side."""

from __future__ import annotations

import pytest

from nativelm.data.clean import CleanDocument, text_sha256
from nativelm.data.split import split_documents, split_score
from nativelm.errors import NativelmError
from nativelm.params.data import SplitParams


def docs(n: int, prefix: str = "doc") -> list[CleanDocument]:
    texts = [f"{prefix} number {i}" for i in range(n)]
    return [CleanDocument(f"{i:05d}", text, text_sha256(text)) for i, text in enumerate(texts)]


def ids(items: list[CleanDocument]) -> list[str]:
    return [d.doc_id for d in items]


def test_same_input_same_split() -> None:
    corpus = docs(200)
    first = split_documents(corpus, SplitParams(val_fraction=0.1))
    second = split_documents(list(corpus), SplitParams(val_fraction=0.1))
    assert ids(first.val) == ids(second.val) and ids(first.train) == ids(second.train)


def test_split_follows_content_not_order_or_id() -> None:
    corpus = docs(200)
    renamed = [CleanDocument(f"renamed-{d.doc_id}", d.text, d.sha256) for d in reversed(corpus)]
    val = {d.text for d in split_documents(corpus, SplitParams(val_fraction=0.1)).val}
    val_renamed = {d.text for d in split_documents(renamed, SplitParams(val_fraction=0.1)).val}
    assert val == val_renamed


def test_each_side_keeps_corpus_order_and_nothing_is_lost() -> None:
    corpus = docs(300)
    split = split_documents(corpus, SplitParams(val_fraction=0.2))
    assert ids(split.train) == sorted(ids(split.train)) and ids(split.val) == sorted(ids(split.val))
    assert sorted(ids(split.train) + ids(split.val)) == ids(corpus)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.4])
def test_fraction_is_respected_on_many_documents(fraction: float) -> None:
    corpus = docs(4000)
    n_val = len(split_documents(corpus, SplitParams(val_fraction=fraction)).val)
    expected = fraction * len(corpus)
    spread = 4 * (expected * (1 - fraction)) ** 0.5  # four standard deviations of the binomial
    assert abs(n_val - expected) < spread


def test_salt_draws_a_different_split() -> None:
    corpus = docs(400)
    a = ids(split_documents(corpus, SplitParams(val_fraction=0.2, salt="one")).val)
    b = ids(split_documents(corpus, SplitParams(val_fraction=0.2, salt="two")).val)
    assert a != b


def test_score_is_uniform_in_unit_interval() -> None:
    scores = [split_score("s", text_sha256(str(i))) for i in range(2000)]
    assert all(0.0 <= s < 1.0 for s in scores)
    assert 0.45 < sum(scores) / len(scores) < 0.55


def test_two_documents_always_one_each_side() -> None:
    for salt in ("a", "b", "c", "d", "e", "f"):
        for fraction in (0.01, 0.49):
            split = split_documents(docs(2, salt), SplitParams(val_fraction=fraction, salt=salt))
            assert len(split.train) == 1 and len(split.val) == 1


def test_fallback_is_deterministic_and_picks_extreme_scores() -> None:
    corpus = docs(5)
    params = SplitParams(val_fraction=0.0001, salt="x")
    split = split_documents(corpus, params)
    assert len(split.val) == 1
    lowest = min(corpus, key=lambda d: split_score("x", d.sha256))
    assert split.val == [lowest]
    assert split_documents(corpus, params) == split


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_documents_is_one_clear_error(n: int) -> None:
    with pytest.raises(NativelmError) as info:
        split_documents(docs(n), SplitParams(), origin="local corpus/")
    message = str(info.value)
    assert message.startswith("local corpus/: need at least 2 documents") and f"got {n}" in message
    assert "\n" not in message
