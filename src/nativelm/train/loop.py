"""The training loop: accumulation, mixed precision, clipping, schedules, validation, checkpoints.

One optimizer step ``s`` (0-based) does, in this order:

1. weight width ``bits = bit_schedule.bits_at(s, max_steps)`` -> ``set_weight_bits``;
2. learning rate and weight decay ``schedule.apply(optimizer, s)`` (recipe included);
3. ``grad_accum`` micro-batches from the sampler: forward under autocast, ``loss / grad_accum``
   backward (DDP syncs gradients on the last micro-batch only);
4. unscale (fp16), clip the global norm, optimizer step, scaler update, zero the gradients.

After the step, ``s + 1`` steps are complete: metrics are logged every ``log_interval``
steps, validation runs every ``eval_interval`` steps, a checkpoint is written every
``checkpoint_interval`` steps; all three also at the last step. Everything that decides the
next step (weights, optimizer and scaler state, RNG states, sampler state, step) is in the
checkpoint and the learning rate and width are pure functions of the step, so a resumed run
repeats exactly the steps the interrupted one would have taken (bit for bit on CPU with the
same thread count and process count). On another process count with the same global batch it
resumes the same state and data order, but not bit for bit (`RESUMED_ELSEWHERE`).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from nativelm.errors import NativelmError
from nativelm.params.train import ResolvedTrain
from nativelm.train import checkpoint as ckpt
from nativelm.train.data import BatchSampler, rank_slice, validation_positions, windows_to_batch
from nativelm.train.distributed import DistContext, all_reduce_sum, barrier, unwrap
from nativelm.train.guards import check_every_parameter_learns
from nativelm.train.metrics import mfu
from nativelm.train.precision import Precision, resolve_precision, torch_threads
from nativelm.train.progress import training_bar
from nativelm.train.schedule import StepSchedule

MetricSink = Callable[[dict[str, float], int], None]
# the one line a resume on another process count prints (docs/training.md)
RESUMED_ELSEWHERE = ("checkpoint written by {written} process(es), resumed on {now}: model, optimizer, schedule, step "
                     "and data order are restored exactly, but the run is not bit-identical to an uninterrupted "
                     "one (gradients are averaged in another order, and the MoE balance loss is per process)")

# resolve_precision and torch_threads live in nativelm.train.precision; importable from here as before
__all__ = ["LoopResult", "LoopState", "MetricSink", "Precision", "Trainer", "resolve_precision", "torch_threads"]


@dataclass
class LoopState:
    """What the loop carries between steps and across a resume."""

    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed (all ranks)
    train_time_s: float = 0.0  # seconds spent in training steps (no validation, no checkpoints)
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None


@dataclass
class LoopResult:
    """The outcome of `train_loop`."""

    state: LoopState
    last_train: dict[str, float]
    last_val: dict[str, float]
    val_stats: list[dict[str, torch.Tensor]]  # per-layer stats summed over the final validation pass
    val_batches: int
    tokens_per_s: float
    step_time_s: float


@dataclass
class Trainer:
    """Everything one training run needs; `run()` trains to `cfg.max_steps` (or `stop_after`)."""

    model: nn.Module  # possibly DDP / compiled; unwrap(model) is the NativeLM
    optimizer: torch.optim.Optimizer
    cfg: ResolvedTrain
    sampler: BatchSampler
    val_shards: Sequence[np.ndarray]
    device: torch.device
    precision: Precision
    ctx: DistContext = field(default_factory=DistContext)
    bits_at: Callable[[int, int], float] | None = None
    set_bits: Callable[[nn.Module, float], None] | None = None
    layer_metrics: Callable[[Any], dict[str, float]] | None = None
    model_metrics: Callable[[nn.Module], dict[str, float]] | None = None
    fingerprint: str = ""
    checkpoint_dir: Path | None = None
    sink: MetricSink | None = None
    flops_per_token: float | None = None
    peak_flops: float | None = None
    stop_after: int | None = None  # stop (as if killed) after this many completed steps: tests

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision.name == "fp16")
        self.schedule = StepSchedule(self.cfg)
        self.state = LoopState()
        self._gradients_checked = False
        self._val_positions: list[list[tuple[int, int]]] | None = None

    # ---- pieces -----------------------------------------------------------------------------------
    @property
    def raw_model(self) -> nn.Module:
        return unwrap(self.model)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _sync_context(self, last_micro: bool) -> contextlib.AbstractContextManager:
        if not last_micro and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def set_step_controls(self, step: int) -> tuple[float, float | None]:
        """Learning rate, weight decay and weight width of step `step`, applied to the optimizer and the model."""
        lr = self.schedule.apply(self.optimizer, step)
        bits = None
        if self.bits_at is not None and self.set_bits is not None:
            bits = self.bits_at(step, self.cfg.max_steps)
            self.set_bits(self.raw_model, bits)
        return lr, bits

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (all micro-batches); returns detached losses, grad norm and the last output."""
        lr, bits = self.set_step_controls(step)
        self.model.train()
        accum = self.cfg.grad_accum
        loss_sum = torch.zeros((), device=self.device)
        ce_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        out = None
        for micro in range(accum):
            inputs, targets = self.sampler.next_batch()
            inputs, targets = self._to_device(inputs), self._to_device(targets)
            with self._sync_context(micro == accum - 1):
                with self.precision.autocast():
                    out = self.model(inputs, targets)
                loss = out.loss / accum
                self.scaler.scale(loss).backward()
            loss_sum += out.loss.detach().float()
            ce_sum += out.ce_loss.detach().float()
            if out.aux_loss is not None:
                aux_sum += out.aux_loss.detach().float()
        self.scaler.unscale_(self.optimizer)
        if not self._gradients_checked:  # the first step of this process: every parameter must learn
            check_every_parameter_learns(self.raw_model)
            self._gradients_checked = True
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        # keep the last micro-batch's per-layer stats for logging, not its logits
        return {"loss": loss_sum / accum, "ce_loss": ce_sum / accum, "aux_loss": aux_sum / accum,
                "grad_norm": grad_norm.detach(), "lr": lr, "bits": bits,
                "output": SimpleNamespace(stats=out.stats if out is not None else [])}

    # ---- validation -------------------------------------------------------------------------------
    def val_positions(self) -> list[list[tuple[int, int]]]:
        """The fixed validation batches, global micro-batches (each rank scores its slice)."""
        if self._val_positions is None:
            self._val_positions = validation_positions(self.val_shards, self.cfg.eval_batches,
                                                       self.cfg.batch_size * self.ctx.world_size, self.cfg.seq_len)
        return self._val_positions

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], list[dict[str, torch.Tensor]]]:
        """Mean CE over the fixed validation batches (split across ranks) and summed per-layer stats."""
        model = self.raw_model  # no DDP needed without gradients
        was_training = model.training
        model.eval()
        sliced = (rank_slice(batch, self.ctx.rank, self.cfg.batch_size) for batch in self.val_positions())
        mine = [positions for positions in sliced if positions]
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # ce * tokens, tokens
        stats: list[dict[str, torch.Tensor]] | None = None
        for positions in mine:
            inputs, targets = windows_to_batch(self.val_shards, positions, self.cfg.seq_len)
            inputs, targets = self._to_device(inputs), self._to_device(targets)
            with self.precision.autocast():
                out = model(inputs, targets)
            n = targets.numel()
            totals[0] += out.ce_loss.double() * n
            totals[1] += n
            stats = _add_stats(stats, out.stats)
        all_reduce_sum(self.ctx, totals)
        stats = self._reduce_stats(stats, len(mine))
        model.train(was_training)
        loss = float(totals[0] / totals[1].clamp_min(1))
        return {"val/loss": loss, "val/perplexity": math.exp(min(loss, 50.0))}, stats

    def _reduce_stats(self, stats: list[dict[str, torch.Tensor]] | None,
                      n_batches: int) -> list[dict[str, torch.Tensor]]:
        """Sum per-layer stats over ranks; scalar stats become means over all validation batches."""
        if stats is None:
            stats = _zero_stats(self.raw_model, self.device)
        count = all_reduce_sum(self.ctx, torch.tensor([float(n_batches)], device=self.device))
        reduced = []
        for layer in stats:
            row = {}
            for key, value in layer.items():
                value = all_reduce_sum(self.ctx, value.detach().float().clone())
                row[key] = value if key == "expert_counts" else value / count.clamp_min(1)[0]
            reduced.append(row)
        return reduced

    # ---- checkpoints ------------------------------------------------------------------------------
    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ckpt.capture_rng(),
            "sampler": self.sampler.state_dict(),  # the same on every rank (data.BatchSampler)
            "world_size": self.ctx.world_size,
            "tokens": self.state.tokens,
            "train_time_s": self.state.train_time_s,
            "history": self.state.history,
        }

    def save(self) -> Path | None:
        payload = self.checkpoint_payload()  # every rank joins the sampler gather
        if not self.ctx.is_main or self.checkpoint_dir is None:
            return None
        return ckpt.save_checkpoint(self.checkpoint_dir, self.state.step, payload, keep=self.cfg.keep_checkpoints)

    def restore(self, data: dict[str, Any]) -> None:
        """Load a checkpoint's state into this trainer (model, optimizer, scaler, RNGs, sampler, step)."""
        self.raw_model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        if data.get("scaler"):
            self.scaler.load_state_dict(data["scaler"])
        self.sampler.load_state_dict(data["sampler"])
        written_by = int(data["world_size"])
        if written_by != self.ctx.world_size:
            _note(self.ctx, RESUMED_ELSEWHERE.format(written=written_by, now=self.ctx.world_size))
        ckpt.restore_rng(data["rng"])
        self.state = LoopState(step=int(data["step"]), tokens=int(data["tokens"]),
                               train_time_s=float(data["train_time_s"]), history=list(data["history"]),
                               resumed_from=int(data["step"]))

    def maybe_resume(self) -> int | None:
        """Apply `cfg.resume`: continue from the latest matching checkpoint; returns its step or None.

        Every rank reads the same checkpoint and reaches the same decision; old checkpoints are
        removed (by rank 0) only after every rank has read them.
        """
        if self.checkpoint_dir is None:
            return None
        folder = self.checkpoint_dir
        data, clear = None, self.cfg.resume == "off"
        path = None if clear else ckpt.latest_checkpoint(folder)
        if path is None and self.cfg.resume == "require":
            raise NativelmError(f"train.resume is `require` but {folder} holds no checkpoint")
        if path is not None:
            data = ckpt.load_checkpoint(path)
            if data.get("fingerprint") != self.fingerprint:
                if self.cfg.resume == "require":
                    raise NativelmError(f"{path}: made with different settings (model, training, data or "
                                        "global batch); train.resume is `require`, so not starting over")
                _note(self.ctx, f"{path.name} was made with different settings: starting fresh")
                data, clear = None, True
            elif int(data["step"]) > self.cfg.max_steps:
                raise NativelmError(f"{path}: step {data['step']} is past train.max_steps {self.cfg.max_steps}")
        barrier(self.ctx)
        if clear and self.ctx.is_main:
            ckpt.clear_checkpoints(folder)
        if data is None:
            return None
        self.restore(data)
        _note(self.ctx, f"resumed from {path} (step {self.state.step})")
        return self.state.step

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        cfg, ctx = self.cfg, self.ctx
        self.maybe_resume()
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ctx.world_size
        last_train: dict[str, float] = {}
        last_val: dict[str, float] = {}
        val_stats: list[dict[str, torch.Tensor]] = []
        interval_steps, interval_time = 0, 0.0
        sums: dict[str, torch.Tensor] = {}
        throughput, step_time = 0.0, 0.0
        bar = training_bar(cfg.max_steps, self.state.step, cfg.progress and ctx.is_main)
        try:
            while self.state.step < cfg.max_steps:
                if self.stop_after is not None and self.state.step >= self.stop_after:
                    break
                step = self.state.step
                t0 = time.perf_counter()
                result = self.train_step(step)
                for key in ("loss", "ce_loss", "aux_loss"):
                    sums[key] = sums.get(key, 0) + result[key]
                self.state.step = step + 1
                self.state.tokens += tokens_per_step
                done = self.state.step
                last = done == cfg.max_steps
                if done % cfg.log_interval == 0 or last:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                interval_steps += 1
                interval_time += dt
                self.state.train_time_s += dt
                bar.update(1)

                metrics: dict[str, float] = {}
                if done % cfg.log_interval == 0 or last:
                    throughput = tokens_per_step * interval_steps / max(interval_time, 1e-9)
                    step_time = interval_time / interval_steps
                    metrics.update({f"train/{k}": float(v) / interval_steps for k, v in sums.items()})
                    metrics.update({"lr": result["lr"], "grad_norm": float(result["grad_norm"]),
                                    "tokens_per_s": throughput, "step_time_s": step_time})
                    if result["bits"] is not None:
                        metrics["bits"] = float(result["bits"])
                    if self.layer_metrics is not None:
                        metrics.update(self.layer_metrics(result["output"]))
                    if self.model_metrics is not None:
                        metrics.update({k: v for k, v in self.model_metrics(self.raw_model).items() if k != "bits"})
                    value = mfu(throughput, self.flops_per_token or 0.0, self.peak_flops, ctx.world_size)
                    if value is not None:
                        metrics["mfu"] = value
                    last_train = dict(metrics)
                    sums, interval_steps, interval_time = {}, 0, 0.0
                    bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", tok_s=f"{throughput:,.0f}",
                                    lr=f"{result['lr']:.2e}", refresh=False)
                if done % cfg.eval_interval == 0 or last:
                    last_val, val_stats = self.validate()
                    metrics.update(last_val)
                    bar.set_postfix(loss=f"{last_train.get('train/loss', float('nan')):.3f}",
                                    val=f"{last_val['val/loss']:.3f}", tok_s=f"{throughput:,.0f}", refresh=False)
                if metrics:
                    self.state.history.append({"step": float(done), **metrics})
                    if ctx.is_main and self.sink is not None:
                        self.sink(metrics, done)
                if done % cfg.checkpoint_interval == 0 or last:
                    self.save()
        finally:
            bar.close()
        return LoopResult(self.state, last_train, last_val, val_stats, len(self.val_positions()),
                          throughput, step_time)


def _add_stats(acc: list[dict[str, torch.Tensor]] | None,
               stats: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    fresh = [{k: v.detach().float() for k, v in layer.items()} for layer in stats]
    if acc is None:
        return fresh
    return [{k: a[k] + b[k] for k in a} for a, b in zip(acc, fresh, strict=True)]


def _zero_stats(model: nn.Module, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Stats of a rank that got no validation batch (so every rank joins the same reductions)."""
    p = getattr(model, "params", None)
    if p is None:
        return []
    rows = []
    for _ in range(p.n_layers):
        row = {"neuron_sparsity": torch.zeros((), device=device)}
        if p.ffn == "moe":
            row.update({"router_prob_mean": torch.zeros(p.n_experts, device=device),
                        "expert_counts": torch.zeros(p.n_experts, device=device),
                        "router_entropy": torch.zeros((), device=device)})
        rows.append(row)
    return rows


def _note(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        print(f"train: {message}", file=sys.stderr, flush=True)
