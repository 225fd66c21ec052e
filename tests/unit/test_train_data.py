"""Training batches: seeded random windows with a restorable state, fixed validation windows,
unigram statistics. `write_token_data` (a synthetic prepared folder) is shared by the train tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nativelm.errors import NativelmError
from nativelm.train.data import (
    BatchSampler,
    load_token_data,
    unigram_entropies,
    validation_positions,
    windows_to_batch,
)


def write_token_data(folder: Path, vocab: int = 128, train_tokens: int = 30_000, val_tokens: int = 4_000,
                     shard_tokens: int = 12_000, seed: int = 0) -> Path:
    """A prepared folder (manifest + uint16 shards) of a learnable synthetic stream: each token is
    followed by one of 4 fixed successors (5% random), so a model beats the unigram entropy fast."""
    from nativelm.formats.prepared import build_manifest, shard_name, write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    successors = rng.integers(0, vocab, size=(vocab, 4))
    counts: dict[str, list[int]] = {}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        picks, noise, random_ids = rng.integers(0, 4, n), rng.random(n), rng.integers(0, vocab, n)
        stream = np.empty(n, dtype="<u2")
        token = 0
        for i in range(n):
            token = random_ids[i] if noise[i] < 0.05 else successors[token, picks[i]]
            stream[i] = token
        counts[split] = []
        for index, start in enumerate(range(0, n, shard_tokens)):
            part = stream[start:start + shard_tokens]
            part.tofile(folder / shard_name(split, index))
            counts[split].append(len(part))
    (folder / "tokenizer.json").write_text("{}\n")
    write_manifest(folder, build_manifest(folder, vocab, np.dtype("<u2"), shard_tokens, counts,
                                          {"train": 8, "val": 2}))
    return folder


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_token_data(tmp_path_factory.mktemp("tokens") / "prepared")


def test_load_token_data_reads_manifest_and_shards(token_dir: Path) -> None:
    data = load_token_data(token_dir)
    assert data.vocab_size == 128
    assert data.train_tokens == 30_000 and len(data.train) == 3
    assert data.val_tokens == 4_000


def test_missing_prepared_folder_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NativelmError, match="manifest.json: not found"):
        load_token_data(tmp_path / "nowhere")


def test_batches_are_shifted_windows_inside_one_shard(token_dir: Path) -> None:
    data = load_token_data(token_dir)
    sampler = BatchSampler(data.train, batch_size=64, seq_len=32, seed=3)
    positions = sampler.positions()
    assert all(0 <= off <= len(data.train[s]) - 33 for s, off in positions)
    x, y = windows_to_batch(data.train, positions, 32)
    assert x.shape == y.shape == (64, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    s, off = positions[0]
    assert x[0].tolist() == data.train[s][off:off + 32].tolist()


def test_sampler_state_restores_the_same_future_batches(token_dir: Path) -> None:
    data = load_token_data(token_dir)
    a = BatchSampler(data.train, 8, 16, seed=7)
    a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(3)]
    b = BatchSampler(data.train, 8, 16, seed=999)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch()[0]) for e in expected)


def test_ranks_read_slices_of_one_global_batch_whatever_the_process_count(token_dir: Path) -> None:
    data = load_token_data(token_dir)
    one = BatchSampler(data.train, 16, 16, seed=1)
    r0, r1 = (BatchSampler(data.train, 8, 16, seed=1, rank=r, world_size=2) for r in (0, 1))
    for _ in range(3):  # step after step, the two halves are the one-process batch
        whole = one.next_batch()[0]
        assert torch.equal(torch.cat([r0.next_batch()[0], r1.next_batch()[0]]), whole)
    assert r0.state_dict() == r1.state_dict() == one.state_dict()
    other_seed, same_seed = (BatchSampler(data.train, 16, 16, seed=s).next_batch()[0] for s in (2, 1))
    assert not torch.equal(other_seed, same_seed)
    with pytest.raises(NativelmError, match="rank 2 is outside a job of 2"):
        BatchSampler(data.train, 8, 16, seed=1, rank=2, world_size=2)


def test_validation_positions_are_fixed_and_bounded(token_dir: Path) -> None:
    data = load_token_data(token_dir)
    one = validation_positions(data.val, n_batches=3, batch_size=4, seq_len=32)
    assert one == validation_positions(data.val, 3, 4, 32)
    assert len(one) == 3 and all(len(b) == 4 for b in one)
    # a split with fewer windows than asked for gives fewer batches, never an error
    few = validation_positions(data.val, n_batches=1000, batch_size=8, seq_len=1000)
    assert 1 <= sum(len(b) for b in few) <= 4


def test_split_too_short_for_seq_len_is_one_clear_error(token_dir: Path) -> None:
    data = load_token_data(token_dir)
    with pytest.raises(NativelmError, match="seq_len"):
        BatchSampler(data.train, 4, 20_000, seed=0)


def test_unigram_entropies_in_nats(token_dir: Path) -> None:
    data = load_token_data(token_dir)
    stats = unigram_entropies(data)
    assert 0 < stats["unigram_entropy_train"] <= np.log(128) + 1e-9
    assert stats["unigram_xent_val"] >= stats["unigram_entropy_val"] - 1e-9  # Gibbs' inequality (smoothed)
