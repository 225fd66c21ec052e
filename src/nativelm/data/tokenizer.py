"""Byte-level BPE, trained on the training split only, so validation text stays unseen.

Byte-level means every string is encodable and decodes back exactly (no unknown token),
which the shard round trip and the board runtime both rely on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nativelm.errors import NativelmError
from nativelm.formats.prepared import EOT, EOT_ID
from nativelm.params.data import TokenizerParams


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer (no normaliser: cleaning already normalised)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Sequence[str], params: TokenizerParams) -> Tokenizer:
    """Train on `texts` in the given order; `<|endoftext|>` gets id 0.

    The texts are fed as one list in corpus order. The trainer counts words in parallel, but
    the saved tokenizer came out byte-identical run after run and with TOKENIZERS_PARALLELISM
    on or off (measured on the Shakespeare corpus; tests check it byte for byte), so
    parallelism is left as the user set it.
    """
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    if tokenizer.token_to_id(EOT) != EOT_ID:
        raise NativelmError(f"tokenizer: {EOT} did not get id {EOT_ID}")  # a tokenizers behaviour change
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Write tokenizer.json (pretty, key order fixed by tokenizers: byte-identical reruns)."""
    tokenizer.save(str(path), pretty=True)


def load_tokenizer(path: Path) -> Tokenizer:
    """Read a tokenizer.json written by `save_tokenizer`; a broken file is one clear line."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception
        reason = (str(exc).strip().splitlines() or [repr(exc)])[0]
        raise NativelmError(f"{path}: not a readable tokenizer ({reason})") from None
