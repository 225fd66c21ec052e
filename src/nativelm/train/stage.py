"""The `train` stage: token shards -> trained model, checkpoints, metrics, plots.

Takes the ``model`` and ``train`` sections, the seed, the prepared-data folder (manifest, shards)
and the `TrainOutputs` (in params.yaml: the ``train`` section's paths); writes (rank 0 only when
distributed):

- ``checkpoint_dir``: ``step_NNNNNNN.pt`` checkpoints + ``latest`` (resume state);
- ``model_file``: the trained model (format: `nativelm.formats.trained_model`);
- ``metrics_file``: final metrics (a DVC metrics file);
- ``plots_dir``: ``loss.png`` and ``expert_load.png``;

and logs per-interval metrics, the effective settings and the PNGs to the given RunLogger.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nativelm.errors import NativelmError, ParamsError
from nativelm.formats import trained_model
from nativelm.fsutil import atomic_write_text
from nativelm.model import BitSchedule, build_model, expert_load_matrix, layer_metrics, model_metrics, set_weight_bits
from nativelm.params.model import with_preset
from nativelm.params.train import ResolvedTrain, TrainParams
from nativelm.tracking.flatten import params_hash
from nativelm.train import distributed as dist
from nativelm.train.data import BatchSampler, load_token_data, unigram_entropies
from nativelm.train.loop import Trainer, resolve_precision, torch_threads
from nativelm.train.metrics import device_peak_flops, flops_per_token, mfu
from nativelm.train.optim import build_optimizer
from nativelm.train.plots import plot_expert_load, plot_loss_curve

if TYPE_CHECKING:
    from nativelm.model import ModelParams, NativeLM
    from nativelm.tracking.runs import RunLogger

LOSS_PNG = "loss.png"
EXPERT_LOAD_PNG = "expert_load.png"
# settings that change what a run computes; the others (intervals, paths, progress ...) do not
# (batch_size enters as the global micro-batch, batch_size x processes: docs/training.md)
_TRAJECTORY_FIELDS = ("seq_len", "grad_accum", "max_steps", "lr", "warmup_steps", "schedule",
                      "decay_frac", "decay_shape", "min_lr_ratio", "recipe", "recipe_split", "recipe_lr_drop", "optimizer", "beta1", "beta2", "eps",
                      "weight_decay", "grad_clip")


@dataclass(frozen=True)
class TrainOutputs:
    """Where the stage writes; the CLI takes them from the ``train`` section of params.yaml."""

    model_file: Path
    checkpoint_dir: Path
    metrics_file: Path
    plots_dir: Path

    @classmethod
    def of(cls, train: TrainParams) -> TrainOutputs:
        """The paths a ``train`` section names."""
        return cls(Path(train.model_file), Path(train.checkpoint_dir), Path(train.metrics_file), Path(train.plots_dir))


@dataclass
class TrainResult:
    """What `run_train` produced."""
    metrics: dict[str, Any]  # the content of metrics_file
    model_file: Path
    metrics_file: Path
    plots: list[Path]
    checkpoint_dir: Path
    steps: int
    resumed_from: int | None
    is_main: bool = True
    model: Any = field(default=None, repr=False)  # the trained NativeLM (every rank)
    history: list[dict[str, float]] = field(default_factory=list, repr=False)  # logged intervals, resumes included


def resolve_device(requested: str) -> torch.device:
    """auto: CUDA when available, else CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise NativelmError("train.device is `cuda` but no CUDA device is available (use auto or cpu)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# parameter layout of NativeLM; bump when parameters are re-shaped (e.g. experts stacked [E, out, in])
# so a checkpoint of the old layout starts a fresh run instead of failing to load its optimizer state
MODEL_LAYOUT = 2


def fingerprint(cfg: ResolvedTrain, model_params: ModelParams, seed: int, world_size: int,
                vocab_size: int, manifest: dict[str, Any], precision: str) -> str:
    """Hash of everything that shapes the trajectory: a checkpoint resumes only a run with the same one.

    The process count enters only through the global micro-batch (batch_size x world_size): the
    batches of a step are the same windows for any split of it (`data.BatchSampler`), so a
    checkpoint written by N processes resumes on M with the same global batch.
    """
    shards = {k: v for k, v in manifest.get("sha256", {}).items() if k.startswith("train_") or k == "tokenizer.json"}
    tree = {"train": {k: getattr(cfg, k) for k in _TRAJECTORY_FIELDS}, "model": model_params.model_dump(mode="json"),
            "layout": MODEL_LAYOUT,
            "global_micro_batch": cfg.batch_size * world_size,
            "seed": seed, "vocab_size": vocab_size, "data": shards, "precision": precision}
    return params_hash(tree)


def compiles(setting: bool | str, device: torch.device, model: ModelParams) -> bool:
    """Whether `train.compile` wraps the model in torch.compile on `device`. auto: on CUDA, except a MoE
    (`ffn: moe`, any experts), whose compiled gradients upstream of the experts were seen to differ from
    eager on an H200 and an H100, now for each expert kind in turn (docs/training.md, "Compiled training on
    a GPU"): a MoE stays eager unless `train.compile: true` asks for it."""
    if setting == "auto":
        return device.type == "cuda" and model.ffn != "moe"
    return setting is True


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _note(message: str) -> None:
    print(f"train: {message}", file=sys.stderr, flush=True)


def _summary(val_stats: list[dict[str, torch.Tensor]]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-layer metrics of the final validation pass and their means over layers."""
    per_layer = layer_metrics(SimpleNamespace(stats=val_stats))
    means: dict[str, float] = {}
    for name in ("expert_load_cv", "router_entropy", "neuron_sparsity"):
        values = [v for k, v in per_layer.items() if k.endswith(f"/{name}")]
        if values:
            means[name] = float(np.mean(values))
    return per_layer, means


def run_train(model_section: ModelParams, train: TrainParams, seed: int, data_dir: Path, out: TrainOutputs,
              logger: RunLogger | None = None, *, stop_after: int | None = None) -> TrainResult:
    """Train the model of `model_section` on the shards in `data_dir`; the module docstring lists outputs.

    `stop_after` ends the run after that many completed steps, as an interruption would (tests).
    """
    started = time.perf_counter()
    cfg = train.resolved()
    model_params = with_preset(model_section, cfg.preset)
    if cfg.seq_len > model_params.max_seq_len:
        raise ParamsError(f"train.seq_len ({cfg.seq_len}) exceeds model.max_seq_len ({model_params.max_seq_len})")
    device = resolve_device(cfg.device)
    ctx = dist.init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank if ctx.enabled else device.index)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    clean = False
    try:
        cfg = cfg.for_processes(ctx.world_size)
        precision = resolve_precision(cfg.precision, device)
        with torch_threads(cfg.threads):
            _seed_everything(seed)
            data = load_token_data(data_dir)
            model = build_model(model_params, data.vocab_size, seed=seed).to(device)
            optimizer = build_optimizer(model, cfg, fused=True if device.type == "cuda" else None)
            wrapped = dist.wrap_ddp(model, ctx, device)
            compiled = compiles(cfg.compile, device, model_params)
            if compiled:
                wrapped = torch.compile(wrapped)
            sampler = BatchSampler(data.train, cfg.batch_size, cfg.seq_len, seed=seed, rank=ctx.rank,
                                   world_size=ctx.world_size)
            fp = fingerprint(cfg, model_params, seed, ctx.world_size, data.vocab_size, data.manifest,
                             precision.name)
            counts = {"total_params": model.num_params(), "active_params": model.active_params(),
                      "non_embedding_params": model.num_params(non_embedding=True)}
            if ctx.is_main:
                _note(f"{model_params.n_layers} layers, d_model {model_params.d_model}, "
                      f"{model_params.n_experts if model_params.ffn == 'moe' else 0} experts (top "
                      f"{model_params.top_k}); {counts['total_params']:,} parameters, {counts['active_params']:,} "
                      f"active non-embedding; {data.train_tokens:,} train tokens; device {device}, "
                      f"{precision.name}{', compiled' if compiled else ''}, {ctx.world_size} process(es), {cfg.max_steps} steps of "
                      f"{cfg.batch_size * cfg.grad_accum * ctx.world_size} x {cfg.seq_len} tokens")
                if cfg.compile == "auto" and device.type == "cuda" and not compiled:
                    _note("train.compile auto: a MoE trains eagerly on CUDA (its compiled gradients upstream of the "
                          "experts were seen wrong there: docs/training.md, \"Compiled training on a GPU\")")
                if logger is not None:
                    logger.log_params({"resolved": {"train": cfg.model_dump(mode="json"),
                                                    "model": model_params.model_dump(mode="json")},
                                       **counts, "world_size": ctx.world_size, "precision": precision.name,
                                       "device": device.type, "vocab_size": data.vocab_size})
                    logger.set_tags({"nativelm.train.fingerprint": fp, "nativelm.train.preset": cfg.preset})
            schedule = BitSchedule.from_params(model_params)
            trainer = Trainer(
                model=wrapped, optimizer=optimizer, cfg=cfg, sampler=sampler, val_shards=data.val, device=device,
                precision=precision, ctx=ctx, bits_at=schedule.bits_at, set_bits=set_weight_bits,
                layer_metrics=layer_metrics, model_metrics=model_metrics, fingerprint=fp,
                checkpoint_dir=out.checkpoint_dir, sink=logger.log_metrics if logger is not None else None,
                flops_per_token=flops_per_token(model, cfg.seq_len), peak_flops=device_peak_flops(device),
                stop_after=stop_after)
            result = trainer.run()
            if not result.last_val:  # nothing left to train (resumed a finished run): validate once
                result.last_val, result.val_stats = trainer.validate()
            if not result.last_train:
                result.last_train = next((h for h in reversed(trainer.state.history) if "train/loss" in h), {})
            finished = _finish(cfg, out, seed, ctx, model, model_params, data, trainer, result, counts, fp, logger,
                               started)
            clean = True
            return finished
    except RuntimeError as exc:  # a collective that broke off: another process died
        if not ctx.enabled or not dist.is_peer_loss(exc):
            raise
        raise dist.peer_lost(ctx.rank, exc) from None
    finally:
        dist.shutdown(ctx, clean)


def _finish(cfg: ResolvedTrain, out: TrainOutputs, seed: int, ctx: Any, model: NativeLM, model_params: ModelParams,
            data: Any, trainer: Any, result: Any, counts: dict[str, int], fp: str, logger: RunLogger | None,
            started: float) -> TrainResult:
    """Rank 0: final metrics, model file, plots, artifacts (only once the run reached max_steps)."""
    state = trainer.state
    finished = state.step >= cfg.max_steps
    model_file, metrics_file, plots_dir = out.model_file, out.metrics_file, out.plots_dir
    if not ctx.is_main:
        return TrainResult({}, model_file, metrics_file, [], out.checkpoint_dir, state.step, state.resumed_from,
                           is_main=False, model=model)
    per_layer, means = _summary(result.val_stats)
    unigram = unigram_entropies(data)
    bits = float(model.bits)
    metrics: dict[str, Any] = {
        "train_loss": float(result.last_train.get("train/loss", float("nan"))),
        "train_ce_loss": float(result.last_train.get("train/ce_loss", float("nan"))),
        "val_loss": result.last_val["val/loss"],
        "val_perplexity": result.last_val["val/perplexity"],
        "tokens_per_s": state.tokens / state.train_time_s if state.train_time_s > 0 else 0.0,
        "step_time_s": state.train_time_s / state.step if state.step else 0.0,
        **means,
        **counts,
        **unigram,
        "steps": state.step,
        "tokens": state.tokens,
        "bits": bits,
        "wall_time_s": time.perf_counter() - started,
        "per_layer": per_layer,
    }
    value = mfu(metrics["tokens_per_s"], trainer.flops_per_token or 0.0, trainer.peak_flops, ctx.world_size)
    if value is not None:
        metrics["mfu"] = value
    plots: list[Path] = []
    if finished:
        trained_model.write(model_file, model.state_dict(), model_params, model.vocab_size, {
            "step": state.step, "weight_bits": bits, "train_fingerprint": fp, "seed": seed,
            "tokenizer_sha256": data.manifest.get("sha256", {}).get("tokenizer.json", ""),
            "val_loss": metrics["val_loss"]})
        reference = {"unigram x-entropy (val)": unigram["unigram_xent_val"]}
        plots.append(plot_loss_curve(state.history, plots_dir / LOSS_PNG, reference,
                                     title=f"{cfg.preset} preset: {counts['active_params']:,} active parameters"))
        load = expert_load_matrix(SimpleNamespace(stats=result.val_stats)).numpy()
        plots.append(plot_expert_load(load, plots_dir / EXPERT_LOAD_PNG))
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(metrics_file, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if logger is not None:
            logger.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                               step=state.step)
            for path in plots:
                logger.log_artifact(path, "plots")
            logger.log_artifact(metrics_file)
        _note(f"done: {state.step} steps, val loss {metrics['val_loss']:.4f} (unigram x-entropy "
              f"{unigram['unigram_xent_val']:.4f}), {metrics['tokens_per_s']:,.0f} tokens/s; model in {model_file}")
    return TrainResult(metrics, model_file, metrics_file, plots, out.checkpoint_dir, state.step, state.resumed_from,
                       model=model, history=list(state.history))
