"""Training batches from token shards: random windows drawn by a seeded, checkpointable generator.

Each batch is `batch_size` windows of `seq_len + 1` consecutive tokens (inputs are the first
`seq_len`, targets the last `seq_len`), drawn uniformly over every start position of every
shard of the split (a window never crosses a shard boundary). The generator is a numpy PCG64
seeded from the seed alone; its state is a small JSON-able dict that checkpoints save and
restore, so a resumed run draws exactly the batches the uninterrupted run would have drawn.

Under DDP every process runs the same generator and draws the global micro-batch
(`batch_size x world_size` windows); process `rank` reads its contiguous slice of it. So the
windows of a step depend on the global batch only, not on how many processes share it: one
process with batch 16 and two with batch 8 train on the same windows, and a checkpoint written
by N processes resumes on any other number with the same data order (docs/training.md).

Validation uses fixed batches: windows at evenly spaced starts over the validation split,
the same every time and on every run, so validation losses are comparable across steps
and runs. Under DDP its batches are global micro-batches too, each rank scoring its slice, so
the validation set does not depend on the number of processes either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nativelm.errors import NativelmError
from nativelm.formats.prepared import load_shards, read_manifest


@dataclass
class TokenData:
    """The memory-mapped shards of both splits and the vocabulary size from the manifest."""

    train: list[np.ndarray]
    val: list[np.ndarray]
    vocab_size: int
    manifest: dict[str, Any]

    @property
    def train_tokens(self) -> int:
        return sum(len(s) for s in self.train)

    @property
    def val_tokens(self) -> int:
        return sum(len(s) for s in self.val)


def load_token_data(out_dir: Path | str, verify: bool = True) -> TokenData:
    """Read `data.out_dir` (manifest + shards) written by the `prepare` stage."""
    manifest = read_manifest(Path(out_dir))
    return TokenData(train=load_shards(Path(out_dir), "train", verify=verify),
                     val=load_shards(Path(out_dir), "val", verify=verify),
                     vocab_size=int(manifest["vocab_size"]), manifest=manifest)


def _window_starts(shards: Sequence[np.ndarray], span: int, split: str) -> np.ndarray:
    """Number of valid window starts per shard (a window of `span` tokens inside one shard)."""
    counts = np.array([max(0, len(s) - span + 1) for s in shards], dtype=np.int64)
    if counts.sum() == 0:
        longest = max((len(s) for s in shards), default=0)
        raise NativelmError(f"{split} split too short for sequences of {span - 1} tokens "
                            f"(longest shard has {longest} tokens): lower train.seq_len or add data")
    return counts


class BatchSampler:
    """Random training windows from a seeded generator whose state can be saved and restored."""

    def __init__(self, shards: Sequence[np.ndarray], batch_size: int, seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise NativelmError(f"rank {rank} is outside a job of {world_size} process(es)")
        self.shards = list(shards)
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._starts = _window_starts(self.shards, seq_len + 1, "train")
        self._cum = np.cumsum(self._starts)
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0, 0x7A1])))

    def state_dict(self) -> dict[str, Any]:
        """The generator's state (plain dict of ints and strings), the same on every rank."""
        return {"seed": self.seed, "bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]

    def positions(self) -> list[tuple[int, int]]:
        """Draw the next global micro-batch and return this rank's (shard index, start) pairs."""
        flat = self.rng.integers(0, int(self._cum[-1]), size=self.batch_size * self.world_size)
        shard_idx = np.searchsorted(self._cum, flat, side="right")
        offsets = flat - np.concatenate([[0], self._cum[:-1]])[shard_idx]
        pairs = [(int(s), int(o)) for s, o in zip(shard_idx, offsets, strict=True)]
        return rank_slice(pairs, self.rank, self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), int64 tensors of shape (batch_size, seq_len), on CPU."""
        return windows_to_batch(self.shards, self.positions(), self.seq_len)


def windows_to_batch(shards: Sequence[np.ndarray], positions: Sequence[tuple[int, int]],
                     seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows of seq_len + 1 tokens into (inputs, targets)."""
    rows = np.stack([np.asarray(shards[s][o:o + seq_len + 1], dtype=np.int64) for s, o in positions])
    tensor = torch.from_numpy(rows)
    return tensor[:, :-1].contiguous(), tensor[:, 1:].contiguous()


def rank_slice(global_batch: Sequence[tuple[int, int]], rank: int, batch_size: int) -> list[tuple[int, int]]:
    """Rank `rank`'s contiguous share of a global micro-batch (empty past a short last batch)."""
    return list(global_batch[rank * batch_size:(rank + 1) * batch_size])


def validation_positions(shards: Sequence[np.ndarray], n_batches: int, batch_size: int,
                         seq_len: int) -> list[list[tuple[int, int]]]:
    """Fixed validation windows: n_batches x batch_size starts evenly spaced over the split.

    If the split has fewer distinct windows than asked for, the batches are fewer (at least one).
    """
    starts = _window_starts(shards, seq_len + 1, "val")
    total = int(starts.sum())
    # non-overlapping where possible: stride of at least seq_len tokens
    wanted = n_batches * batch_size
    available = max(1, min(wanted, math.ceil(total / max(1, seq_len))))
    flat = np.linspace(0, total - 1, num=available).round().astype(np.int64)
    cum = np.cumsum(starts)
    shard_idx = np.searchsorted(cum, flat, side="right")
    offsets = flat - np.concatenate([[0], cum[:-1]])[shard_idx]
    pairs = [(int(s), int(o)) for s, o in zip(shard_idx, offsets, strict=True)]
    return [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]


def unigram_entropies(data: TokenData) -> dict[str, float]:
    """Unigram statistics in nats: entropy of the train and val token distributions, and the
    cross-entropy of the val tokens under the train unigram model (add-one smoothed).

    The last is what a model that ignores context would score on validation: a trained
    language model's val loss must be clearly below it.
    """
    def counts(shards: Sequence[np.ndarray]) -> np.ndarray:
        total = np.zeros(data.vocab_size, dtype=np.int64)
        for shard in shards:
            total += np.bincount(np.asarray(shard), minlength=data.vocab_size)[: data.vocab_size]
        return total

    def entropy(c: np.ndarray) -> float:
        p = c[c > 0] / c.sum()
        return float(-(p * np.log(p)).sum())

    train, val = counts(data.train), counts(data.val)
    smoothed = (train + 1) / (train.sum() + data.vocab_size)
    xent = float(-(val * np.log(smoothed)).sum() / max(1, val.sum()))
    return {"unigram_entropy_train": entropy(train), "unigram_entropy_val": entropy(val),
            "unigram_xent_val": xent}
