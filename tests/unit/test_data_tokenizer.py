"""Byte-level BPE: <|endoftext|> is id 0, exact round trip, byte-identical retraining."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nativelm.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from nativelm.errors import NativelmError
from nativelm.formats.prepared import EOT, EOT_ID
from nativelm.params.data import TokenizerParams

WORDS = ("the king queen lord lady love night day sword crown heart world time death life speak "
         "come go see make know hear fair good great noble sweet true old young thou thee").split()


def corpus(n_docs: int = 30, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                      for _ in range(40)) for _ in range(n_docs)]


PARAMS = TokenizerParams(vocab_size=400, min_frequency=2)


def saved_bytes(tmp_path: Path, name: str, texts: list[str]) -> bytes:
    save_tokenizer(train_tokenizer(texts, PARAMS), tmp_path / name)
    return (tmp_path / name).read_bytes()


def test_eot_is_id_zero_and_vocab_size_reached() -> None:
    tokenizer = train_tokenizer(corpus(), PARAMS)
    assert tokenizer.token_to_id(EOT) == EOT_ID == 0
    assert 257 < tokenizer.get_vocab_size() <= 400  # a small corpus may run out of merges


def test_round_trip_is_exact_for_any_text() -> None:
    tokenizer = train_tokenizer(corpus(), PARAMS)
    for text in ["The king speaks.", "  leading spaces\n\ttabs", "naïve café — 東京 🙂", "\x01\x7f bytes"]:
        ids = tokenizer.encode(text).ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_training_twice_gives_identical_files(tmp_path: Path) -> None:
    texts = corpus()
    assert saved_bytes(tmp_path, "a.json", texts) == saved_bytes(tmp_path, "b.json", texts)


def test_save_load_round_trip(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(corpus(), PARAMS)
    save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert loaded.encode("the noble king").ids == tokenizer.encode("the noble king").ids


def test_unreadable_tokenizer_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(NativelmError, match=r"tokenizer.json: not a readable tokenizer") as info:
        load_tokenizer(tmp_path / "tokenizer.json")
    assert "\n" not in str(info.value)


_CHILD = """
import random, sys
from nativelm.params.data import TokenizerParams
from nativelm.data.tokenizer import save_tokenizer, train_tokenizer
rng = random.Random(5)
# random pseudo-words: many pairs with equal counts, where an unordered merge would show
words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(2, 7))) for _ in range(3000)]
texts = [" ".join(rng.choice(words) for _ in range(400)) for _ in range(200)]
save_tokenizer(train_tokenizer(texts, TokenizerParams(vocab_size=3000, min_frequency=2)), sys.argv[1])
"""


def test_identical_with_parallelism_on_and_off(tmp_path: Path) -> None:
    """Separate processes, so the Rust thread pool starts fresh under each setting."""
    digests = set()
    for setting in ("true", "false", "true"):
        out = tmp_path / f"tok-{setting}-{len(digests)}.json"
        env = {**os.environ, "TOKENIZERS_PARALLELISM": setting, "RAYON_NUM_THREADS": "4" if setting == "true" else "1"}
        subprocess.run([sys.executable, "-c", _CHILD, str(out)], env=env, check=True, timeout=120)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
