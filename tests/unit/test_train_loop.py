"""The training step: loss goes down, accumulation equals a bigger batch, clipping bounds the
update, precision choices, progressive weight width, metric names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nativelm.errors import NativelmError
from nativelm.model import BitSchedule, ModelParams, build_model, set_weight_bits
from nativelm.params.train import TrainParams
from nativelm.train.loop import Trainer, resolve_precision, torch_threads
from nativelm.train.metrics import flops_per_token, interval_metric_names, mfu, peak_flops
from nativelm.train.optim import build_optimizer, param_groups

VOCAB = 64
SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "n_experts": 4, "expert_ffn": 16,
         "top_k": 2, "window": 8, "max_seq_len": 64}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: small ops on a busy 2-core machine are far slower with two (OpenMP spin waits)."""
    with torch_threads(1):
        yield


class FixedSampler:
    """Hands out the given (inputs, targets) batches in turn (a stand-in for BatchSampler)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.i = batches, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def _batch(n: int, seq: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, seq + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _trainer(model: torch.nn.Module, sampler: FixedSampler, optimizer: torch.optim.Optimizer | None = None,
             **train: object) -> Trainer:
    values = {"seq_len": 16, "batch_size": 4, "max_steps": 100, "warmup_steps": 0, "log_interval": 1000,
              "eval_interval": 1000, "checkpoint_interval": 1000, "progress": False, **train}
    cfg = TrainParams.model_validate(values).resolved()
    optimizer = optimizer or build_optimizer(model, cfg)
    return Trainer(model=model, optimizer=optimizer, cfg=cfg, sampler=sampler,
                   val_shards=[np.arange(200, dtype=np.uint16) % VOCAB], device=torch.device("cpu"),
                   precision=resolve_precision("fp32", torch.device("cpu")))


def test_a_few_steps_reduce_the_loss_on_a_repeated_batch() -> None:
    torch.manual_seed(0)
    model = build_model(ModelParams(**SMALL), VOCAB, seed=0)
    trainer = _trainer(model, FixedSampler([_batch(4)]), lr=3e-3, weight_decay=0.0)
    losses = [float(trainer.train_step(step)["loss"]) for step in range(25)]
    assert losses[-1] < losses[0] - 0.5, losses


def _sgd_step(model: torch.nn.Module, batches: list, grad_accum: int, batch_size: int, grad_clip: float = 0.0):
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    trainer = _trainer(model, FixedSampler(batches), sgd, lr=1.0, grad_accum=grad_accum, batch_size=batch_size,
                       grad_clip=grad_clip, max_steps=10, decay_frac=0.1)
    out = trainer.train_step(0)  # lr 1.0 at step 0 (no warmup): the update is minus the gradient
    deltas = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
    return out, deltas


def test_accumulating_two_micro_batches_equals_one_double_batch() -> None:
    params = ModelParams(**SMALL, router_aux_weight=0.0)  # the balancing loss is not additive over batches
    x, y = _batch(8, seed=1)
    a_out, a = _sgd_step(build_model(params, VOCAB, seed=3), [(x[:4], y[:4]), (x[4:], y[4:])], 2, 4)
    b_out, b = _sgd_step(build_model(params, VOCAB, seed=3), [(x, y)], 1, 8)
    assert float(a_out["loss"]) == pytest.approx(float(b_out["loss"]), rel=1e-6)
    assert float(a_out["grad_norm"]) == pytest.approx(float(b_out["grad_norm"]), rel=1e-5)
    for da, db in zip(a, b, strict=True):
        torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-7)


def test_gradient_clipping_bounds_the_update_norm() -> None:
    params = ModelParams(**SMALL)
    out, deltas = _sgd_step(build_model(params, VOCAB, seed=0), [_batch(4)], 1, 4, grad_clip=0.01)
    update = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas]))
    assert float(out["grad_norm"]) > 0.01  # the reported norm is the one before clipping
    assert float(update) == pytest.approx(0.01, rel=1e-4)
    out, deltas = _sgd_step(build_model(params, VOCAB, seed=0), [_batch(4)], 1, 4, grad_clip=0.0)
    update = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in deltas]))
    assert float(update) == pytest.approx(float(out["grad_norm"]), rel=1e-4)


def test_progressive_precision_sets_the_width_each_step() -> None:
    params = ModelParams(**SMALL, bit_schedule=[[0.0, 8.0], [0.5, 1.58]])
    model = build_model(params, VOCAB)
    trainer = _trainer(model, FixedSampler([_batch(4)]), max_steps=10, decay_frac=0.1)
    trainer.bits_at, trainer.set_bits = BitSchedule.from_params(params).bits_at, set_weight_bits
    assert trainer.train_step(0)["bits"] == 8.0 and model.bits == 8.0
    assert trainer.train_step(5)["bits"] == 1.58 and model.bits == 1.58


def test_bf16_autocast_step_runs_on_cpu() -> None:
    model = build_model(ModelParams(**SMALL), VOCAB)
    trainer = _trainer(model, FixedSampler([_batch(4)]))
    trainer.precision = resolve_precision("bf16", torch.device("cpu"))
    out = trainer.train_step(0)
    assert torch.isfinite(out["loss"]) and all(p.dtype == torch.float32 for p in model.parameters())


def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32" and resolve_precision("auto", cpu).dtype is None
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    with pytest.raises(NativelmError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)


def test_weight_decay_only_on_matrices_not_norms_or_embeddings() -> None:
    model = build_model(ModelParams(**SMALL), VOCAB)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    assert id(model.embed.weight) not in decayed  # tied with the LM head: not decayed either
    assert all(p.ndim >= 2 for p in groups["decay"]["params"])
    assert all(p.ndim == 1 or p is model.embed.weight for p in groups["no_decay"]["params"])
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == model.num_params()  # every parameter exactly once
    radam = build_optimizer(model, TrainParams(optimizer="radam").resolved())
    assert isinstance(radam, torch.optim.RAdam)


def test_metric_names_are_fixed() -> None:
    names = interval_metric_names(2)
    for required in ("train/loss", "train/ce_loss", "train/aux_loss", "val/loss", "val/perplexity", "lr",
                     "grad_norm", "tokens_per_s", "bits", "layer0/expert_load_cv", "layer1/router_entropy",
                     "layer1/neuron_sparsity", "ternary/share_neg", "ternary/share_zero", "ternary/share_pos"):
        assert required in names
    assert "mfu" not in names and "mfu" in interval_metric_names(2, cuda=True)
    assert interval_metric_names(2) == interval_metric_names(2)


def test_mfu_from_peak_table_and_flops_per_token() -> None:
    assert peak_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert peak_flops("Some CPU") is None
    model = build_model(ModelParams(**SMALL), VOCAB)
    per_token = flops_per_token(model, 16)
    dense_part = 6 * (model.active_params() + SMALL["d_model"] * VOCAB)
    assert per_token > dense_part
    assert mfu(1e6, per_token, 1e12) == pytest.approx(1e6 * per_token / 1e12)
    assert mfu(1e6, per_token, None) is None
