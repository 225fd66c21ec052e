"""The `nativelm` command: one subcommand per stage; each is also a plain function in the library.

Heavy imports (torch, mlflow, prefect) happen inside the commands so `--help` stays fast.
Every NativelmError becomes one line on stderr and its exit code (2 for bad parameters).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nativelm import __version__
from nativelm.errors import NativelmError

Handler = Callable[[argparse.Namespace], int]


def _params(args: argparse.Namespace):  # -> Params, imported lazily
    from nativelm.config import load_params

    return load_params(args.params)


def cmd_prepare(args: argparse.Namespace) -> int:
    """corpus -> cleaned documents -> tokenizer.json + token shards + metrics (DVC stage `prepare`)."""
    params = _params(args)
    from nativelm.data.prepare import run_prepare
    from nativelm.tracking.runs import stage_run

    with stage_run(params, "prepare", {"data": params.data.model_dump(mode="json")}) as run:
        result = run_prepare(params, cache_dir=Path(params.stack.state_dir) / "cache")
        run.log_metrics(result.stats)
        run.log_artifact(Path(params.data.metrics_file))
        run.log_artifact(Path(params.data.out_dir) / "manifest.json")
    for key, value in result.stats.items():
        print(f"{key}: {value}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """token shards -> trained model + checkpoints + metrics (DVC stage `train`)."""
    params = _params(args)
    from nativelm.tracking.runs import stage_run
    from nativelm.train.distributed import env_rank
    from nativelm.train.stage import run_train

    if env_rank() != 0:  # under torchrun only rank 0 talks to MLflow
        run_train(params)
        return 0
    section = {"model": params.model.model_dump(mode="json"), "train": params.train.model_dump(mode="json")}
    with stage_run(params, "train", section) as run:
        result = run_train(params, run)
    for key in ("val_loss", "val_perplexity", "unigram_entropy_val", "tokens_per_s", "wall_time_s"):
        if key in result.metrics:
            print(f"{key}: {result.metrics[key]:.4g}")
    print(f"model: {result.model_file}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """trained model -> ONNX folder with quantized operators, parity-checked (DVC stage `export`)."""
    params = _params(args)
    from nativelm.export.stage import run_export
    from nativelm.tracking.runs import stage_run

    with stage_run(params, "export", {"export": params.export.model_dump(mode="json")}) as run:
        result = run_export(params, logger=run)
    for key in ("top1_agreement", "ppl_rel_diff", "model_bytes", "bits_per_weight"):
        if key in result.metrics:
            print(f"{key}: {result.metrics[key]:.6g}")
    print(f"export: {result.out_dir}")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    """Start, stop or show the local MLflow + Prefect servers."""
    params = _params(args)
    from nativelm import stack

    action = {"up": stack.up, "down": stack.down, "status": stack.status}[args.action]
    for line in stack.render(action(params)):
        print(line)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline flow (through Prefect and DVC) on the local stack and print a summary."""
    params = _params(args)
    from nativelm.orchestration.run import run_pipeline

    for line in run_pipeline(params, Path(args.params or "params.yaml"), Path.cwd()):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; `--params` is accepted before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", metavar="PATH", default=argparse.SUPPRESS,
                        help="parameters file (default: params.yaml in the current folder)")
    parser = argparse.ArgumentParser(
        prog="nativelm", parents=[common],
        description="Train natively sparse 1.58-bit language models, export them to quantized ONNX "
                    "and roll them out to a fleet of edge boards.")
    parser.add_argument("--version", action="version", version=f"nativelm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("prepare", parents=[common], help="corpus -> tokenizer + token shards (DVC stage `prepare`)",
                       description="Fetch the corpus chosen in params.yaml (data.source), clean it, split it by "
                                   "document, train a byte-level BPE tokenizer and write token shards, a manifest "
                                   "and metrics to data.out_dir / data.metrics_file; logs to MLflow when a server "
                                   "is reachable.")
    p.set_defaults(handler=cmd_prepare)

    p = sub.add_parser("train", parents=[common], help="token shards -> trained model (DVC stage `train`)",
                       description="Train the sparse 1.58-bit model of params.yaml (model, train) on the token "
                                   "shards of data.out_dir: periodic atomic checkpoints (a killed run resumes "
                                   "exactly with train.resume: auto), metrics to MLflow, final metrics to "
                                   "train.metrics_file, the model to train.model_file. Under `torchrun` it trains "
                                   "with DDP.")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("export", parents=[common], help="trained model -> quantized ONNX folder (DVC stage `export`)",
                       description="Export train.model_file to ONNX with ONNX Runtime's quantized operators "
                                   "(export.variant: ternary = 2-bit MatMulNBits + QMoE, int4, fp32), check it "
                                   "against the PyTorch model on held-out text (top-1 agreement, perplexity, "
                                   "KV cache), record golden continuations and write export.out_dir atomically.")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("stack", parents=[common], help="start/stop/show the local MLflow + Prefect servers",
                       description="Manage the local stack: an MLflow tracking server (SQLite, local artifacts) "
                                   "and a Prefect server, as background processes with logs and pid files under "
                                   "stack.state_dir. `up` is idempotent; `status` prints the URLs.")
    p.add_argument("action", choices=["up", "down", "status"], help="up: start (idempotent); down: stop; status: show")
    p.set_defaults(handler=cmd_stack)

    p = sub.add_parser("run", parents=[common], help="run the pipeline flow on the local stack and print a summary",
                       description="Run the pipeline as a Prefect flow against the local Prefect server: each "
                                   "stage through `dvc repro` (unchanged stages are skipped), logged as one MLflow "
                                   "parent run with a nested run per stage. Needs `nativelm stack up`.")
    p.set_defaults(handler=cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nativelm` command."""
    # torch's busy-waiting OpenMP threads starve each other on small, shared CPUs (20x slower steps
    # measured on 2 cores); must be set before torch is imported
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "params"):
        args.params = None
    try:
        return args.handler(args)
    except NativelmError as exc:
        print(f"nativelm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nativelm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
