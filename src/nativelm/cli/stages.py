"""The stage commands: prepare, train, export, evaluate (the DVC stages) and generate.

Each resolves its inputs and outputs from params.yaml, opens the stage's MLflow run and calls the
stage with its own section and explicit paths.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nativelm import runtime
from nativelm.cliargs import params_of
from nativelm.data.prepare import run_prepare
from nativelm.errors import NativelmError
from nativelm.evaluate.stage import Provenance, run_evaluate
from nativelm.export.stage import load_source, run_export
from nativelm.orchestration.dvc import lock_out_hash
from nativelm.params.model import with_preset
from nativelm.params.root import Params
from nativelm.tracking.flatten import params_hash
from nativelm.tracking.runs import git_commit, stage_run
from nativelm.train.distributed import (LAUNCHED_ENV, PEER_LOST_EXIT, PeerLost, ddp_forced, env_rank,
                                        launched_by_torchrun)
from nativelm.train.launch import check_devices, launch_training
from nativelm.train.stage import TrainOutputs, run_train


def _sections(params: Params, *names: str) -> dict:
    """The params sections a stage logs as its MLflow params, as plain data."""
    return {name: getattr(params, name).model_dump(mode="json") for name in names}


def _print_figures(metrics: dict, keys: Sequence[str]) -> None:
    """Print a stage's headline figures (all of them are in its metrics file and in MLflow)."""
    for key in keys:
        if key in metrics:
            value = metrics[key]
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


def prepare(args: argparse.Namespace) -> int:
    """corpus -> cleaned documents -> tokenizer.json + token shards + metrics (DVC stage `prepare`)."""
    params = params_of(args)
    with stage_run(params, "prepare", _sections(params, "data")) as run:
        result = run_prepare(params.data, cache_dir=Path(params.stack.state_dir) / "cache")
        run.log_metrics(result.stats)
        run.log_artifact(Path(params.data.metrics_file))
        run.log_artifact(Path(params.data.out_dir) / "manifest.json")
    _print_figures(result.stats, list(result.stats))
    return 0


def train(args: argparse.Namespace) -> int:
    """token shards -> trained model + checkpoints + metrics (DVC stage `train`); --nproc N: a DDP job."""
    params = params_of(args)
    nproc = getattr(args, "nproc", 1)
    if (nproc > 1 or ddp_forced()) and not launched_by_torchrun():
        params.train.resolved().for_processes(nproc)  # a global batch that does not split: one line, nothing started
        check_devices(nproc, params.train.device)
        child = ["train", *(["--params", args.params] if args.params else [])]
        return launch_training(nproc, child, Path(params.train.checkpoint_dir))
    try:
        return _train_this_process(params)
    except PeerLost:
        if os.environ.get(LAUNCHED_ENV):  # the launcher names the rank that died
            return PEER_LOST_EXIT
        raise


def _train_this_process(params: Params) -> int:
    """One process of the job (the only one without DDP): rank 0 logs to MLflow and prints the figures."""
    train_here = functools.partial(run_train, params.model, params.train, params.seed, Path(params.data.out_dir),
                                   TrainOutputs.of(params.train))
    if env_rank() != 0:  # under torchrun only rank 0 talks to MLflow
        train_here()
        return 0
    with stage_run(params, "train", _sections(params, "model", "train"), name=train_run_name(params),
                   with_system_metrics=True) as run:
        result = train_here(logger=run)
    _print_figures(result.metrics, ("val_loss", "val_perplexity", "unigram_entropy_val", "tokens_per_s", "wall_time_s"))
    print(f"model: {result.model_file}")
    return 0


def train_run_name(params: Params) -> str:
    """What a training run is, as its MLflow name: precision, FFN kind, shape and length."""
    cfg = params.train.resolved()
    model = with_preset(params.model, cfg.preset)
    kind = f"{'ternary' if model.quantize else 'fp'} {model.ffn}"
    return f"train {kind} {model.d_model}x{model.n_layers} {cfg.max_steps} steps"


def export(args: argparse.Namespace) -> int:
    """trained model -> ONNX folder with quantized operators, parity-checked (DVC stage `export`)."""
    params = params_of(args)
    model_file = Path(params.train.model_file)
    source = load_source(model_file, params.export)  # a variant that does not fit: one line, no run opened
    with stage_run(params, "export", _sections(params, "export"), name=f"export {params.export.variant}") as run:
        result = run_export(model_file, Path(params.data.out_dir), params.export, logger=run, source=source)
        ptq = " (ptq)" if result.manifest.get("ptq") else ""
        run.set_tags({"mlflow.runName": f"export {result.manifest['variant']}{ptq}"})  # native resolved
    _print_figures(result.metrics, ("top1_agreement", "ppl_rel_diff", "model_bytes", "bits_per_weight"))
    print(f"export: {result.out_dir}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """export folder -> ONNX perplexity, CPU speed, release folder, registered version (DVC stage `evaluate`)."""
    params = params_of(args)
    provenance = Provenance(git_commit(), lock_out_hash(Path.cwd(), "prepare", params.data.out_dir) or "unknown",
                            params_hash(params.model_dump(mode="json")))
    with stage_run(params, "evaluate", _sections(params, "evaluate")) as run:
        result = run_evaluate(Path(params.export.out_dir), Path(params.data.out_dir), params.evaluate, provenance,
                              logger=run)
    _print_figures(result.metrics, ("ppl_onnx", "top1_agreement", "model_bytes", "bits_per_weight",
                                    "prefill_tokens_per_s", "decode_tokens_per_s", "time_to_first_token_ms",
                                    "inter_token_latency_p50_ms", "inter_token_latency_p95_ms", "peak_rss_mb"))
    if result.model_version is not None:
        print(f"model_version: {params.evaluate.registered_model} {result.model_version}")
    print(f"release: {result.release_dir}")
    return 0


def generate(args: argparse.Namespace) -> int:
    """Continue a prompt with an export folder, through the board runtime."""
    model_dir = args.model
    if model_dir is None:
        model_dir = params_of(args).export.out_dir
    try:
        sampling = runtime.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                    seed=args.seed)
        model = runtime.load_model(model_dir, threads=args.threads)
        if args.stream:
            for piece in runtime.stream(model, args.prompt, args.max_new_tokens, sampling):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            print(runtime.generate(model, args.prompt, args.max_new_tokens, sampling).text)
    except runtime.RuntimeFailure as exc:
        error = NativelmError(str(exc))
        error.exit_code = exc.exit_code  # 2 for a bad argument (BadArgument), as the board runtime exits
        raise error from None
    return 0


