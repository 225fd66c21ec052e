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
from nativelm.cliargs import at_least, params_of
from nativelm.errors import NativelmError

Handler = Callable[[argparse.Namespace], int]


def _sections(params, *names: str) -> dict:
    """The params sections a stage logs as its MLflow params, as plain data."""
    return {name: getattr(params, name).model_dump(mode="json") for name in names}


def _print_figures(metrics: dict, keys: Sequence[str]) -> None:
    """Print a stage's headline figures (all of them are in its metrics file and in MLflow)."""
    for key in keys:
        if key in metrics:
            value = metrics[key]
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


def cmd_prepare(args: argparse.Namespace) -> int:
    """corpus -> cleaned documents -> tokenizer.json + token shards + metrics (DVC stage `prepare`)."""
    params = params_of(args)
    from nativelm.data.prepare import run_prepare
    from nativelm.tracking.runs import stage_run

    with stage_run(params, "prepare", _sections(params, "data")) as run:
        result = run_prepare(params, cache_dir=Path(params.stack.state_dir) / "cache")
        run.log_metrics(result.stats)
        run.log_artifact(Path(params.data.metrics_file))
        run.log_artifact(Path(params.data.out_dir) / "manifest.json")
    _print_figures(result.stats, list(result.stats))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """token shards -> trained model + checkpoints + metrics (DVC stage `train`)."""
    params = params_of(args)
    from nativelm.tracking.runs import stage_run
    from nativelm.train.distributed import env_rank
    from nativelm.train.stage import run_train

    if env_rank() != 0:  # under torchrun only rank 0 talks to MLflow
        run_train(params)
        return 0
    with stage_run(params, "train", _sections(params, "model", "train")) as run:
        result = run_train(params, run)
    _print_figures(result.metrics, ("val_loss", "val_perplexity", "unigram_entropy_val", "tokens_per_s", "wall_time_s"))
    print(f"model: {result.model_file}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """trained model -> ONNX folder with quantized operators, parity-checked (DVC stage `export`)."""
    params = params_of(args)
    from nativelm.export.stage import run_export
    from nativelm.tracking.runs import stage_run

    with stage_run(params, "export", _sections(params, "export")) as run:
        result = run_export(Path(params.train.model_file), Path(params.data.out_dir), params.export, logger=run)
    _print_figures(result.metrics, ("top1_agreement", "ppl_rel_diff", "model_bytes", "bits_per_weight"))
    print(f"export: {result.out_dir}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """export folder -> ONNX perplexity, CPU speed, release folder, registered version (DVC stage `evaluate`)."""
    params = params_of(args)
    from nativelm.evaluate.stage import Provenance, run_evaluate
    from nativelm.orchestration.dvc import lock_out_hash
    from nativelm.tracking.flatten import params_hash
    from nativelm.tracking.runs import git_commit, stage_run

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


def cmd_generate(args: argparse.Namespace) -> int:
    """Continue a prompt with an export folder, through the board runtime."""
    from nativelm import runtime

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
        raise NativelmError(str(exc)) from None
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    """Start, stop or show the local MLflow + Prefect servers."""
    params = params_of(args)
    from nativelm import stack

    if args.action == "down":  # the runner uses the servers: stop it first
        from nativelm.orchestration.serve import serve_stop

        serve_stop(params)
    action = {"up": stack.up, "down": stack.down, "status": stack.status}[args.action]
    for line in stack.render(action(params)):
        print(line)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Run the pipeline flow (through Prefect and DVC) on the local stack and print a summary."""
    params = params_of(args)
    from nativelm.orchestration.run import run_local, run_pipeline

    run = run_local if args.local else run_pipeline
    for line in run(params, Path(args.params or "params.yaml"), Path.cwd()):
        print(line)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Register the deployments and run them: in the foreground, or as a background process."""
    params = params_of(args)
    from nativelm.orchestration import serve

    if args.stop:
        status = serve.serve_stop(params)
    elif args.background:
        status = serve.serve_background(params, Path(args.params or "params.yaml"), Path.cwd())
    else:
        serve.serve_foreground(params, Path.cwd())
        return 0
    from nativelm import stack

    took = f" in {status.seconds:.1f} s" if status.seconds else ""
    pid = f"pid {status.pid}  " if status.pid else ""
    print(f"runner   {status.action}{took}  {pid}log {status.log_path}")
    if status.running:
        print(f"deployments: {', '.join(serve.deployment_ref(name) for name in serve.FLOWS)}")
        print(f"Prefect UI: {stack.prefect_ui_url(params)}/deployments")
    return 0


def _register_plugins(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Subcommands that live with their stage: the fleet and the rollout."""
    from nativelm.fleet import commands, deploy_commands

    commands.register(sub, common)
    deploy_commands.register(sub, common)


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

    p = sub.add_parser("evaluate", parents=[common],
                       help="ONNX export -> perplexity, CPU speed, release folder, registered version "
                            "(DVC stage `evaluate`)",
                       description="Verify export.out_dir against its manifest, score the ONNX model's perplexity on "
                                   "evaluate.ppl_tokens validation tokens (0: all), copy the export's parity figures, "
                                   "benchmark it on this CPU with the board runtime (prefill/decode tokens/s, time "
                                   "to first token, latency p50/p95, peak RSS) and write evaluate.metrics_file. "
                                   "Then build evaluate.release_dir atomically: the export's files, "
                                   "nativelm-runtime.pyz and release.json (sha256 of every file, git commit, data "
                                   "hash, params hash, source model sha256). With an MLflow server the release is "
                                   "logged as artifacts under release/ and registered as a new version of "
                                   "evaluate.registered_model, tagged git_commit, data_hash, params_hash.")
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("generate", parents=[common], help="continue a prompt with the exported model",
                       description="Load an export folder with the board runtime (every file's sha256 is "
                                   "checked first) and print the continuation of --prompt: greedy by default, "
                                   "sampled with --temperature > 0 (and --top-k / --top-p / --seed).")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="export folder (default: export.out_dir of the parameters file)")
    p.add_argument("--max-new-tokens", type=at_least(0), default=64, metavar="N",
                   help="tokens to generate at most (default 64; stops early at end of text)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    p.add_argument("--top-k", type=at_least(0), default=0, metavar="K", help="0 (default): no limit")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 (default): no limit")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="seed of the sampler (reproducible text)")
    p.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                   help="ONNX Runtime intra-op threads (default: every CPU this process may use)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.set_defaults(handler=cmd_generate)

    p = sub.add_parser("stack", parents=[common], help="start/stop/show the local MLflow + Prefect servers",
                       description="Manage the local stack: an MLflow tracking server (SQLite, local artifacts) "
                                   "and a Prefect server, as background processes with logs and pid files under "
                                   "stack.state_dir. `up` is idempotent; `status` prints the URLs.")
    p.add_argument("action", choices=["up", "down", "status"], help="up: start (idempotent); down: stop; status: show")
    p.set_defaults(handler=cmd_stack)

    p = sub.add_parser("run", parents=[common], help="the whole loop: retrain, gate, automatic rollout, on-board "
                                                     "benchmark, then a summary",
                       description="Trigger the `retrain` deployment as the dashboard's Run button does (starting "
                                   "`nativelm serve --background` if it is not running), print its logs, then follow "
                                   "the `rollout` run that the promotion of the new version triggers (or, when the "
                                   "version already was the champion, start one: unchanged boards cost a hash check) "
                                   "and print a summary: per-stage wall time and the orchestration overhead, "
                                   "validation perplexity, file size, CPU tokens/s, tokens/s per board, UI URLs. "
                                   "Each stage runs through `dvc repro` (unchanged stages are skipped), logged as one "
                                   "MLflow parent run with a nested run per stage; the workspace is saved as a DVC "
                                   "experiment. Needs `nativelm stack up` and a fleet (`nativelm fleet sim up`).")
    p.add_argument("--local", action="store_true",
                   help="run the retrain flow in this process instead (no runner, no rollout)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("serve", parents=[common], help="the dashboard: serve the retrain, rollout and fleet-health "
                                                       "deployments on the local Prefect server",
                       description="Register the Prefect deployments retrain (the form to retrain from the UI), "
                                   "rollout (triggered automatically when the gate promotes a version to champion) "
                                   "and fleet-health (every serve.fleet_health_every_min minutes) against the "
                                   "local stack's Prefect server, and execute their runs (one process per run, in "
                                   "this folder). Runs in the foreground until Ctrl-C, or with --background as a "
                                   "managed process (log and pid file under stack.state_dir/stack). Needs "
                                   "`nativelm stack up`.")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--background", action="store_true",
                      help="start as a background process (idempotent) and wait until the deployments are ready")
    mode.add_argument("--stop", action="store_true", help="stop the background process")
    p.set_defaults(handler=cmd_serve)
    _register_plugins(sub, common)
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
