"""The `nativelm` command: the parser of every subcommand, and the dispatch to its handler.

A subcommand names its handler as "module:function"; the module (`cli/stages.py`, `cli/loop.py`,
the fleet's command modules) is imported only when that command runs, so `nativelm --help` does
not load torch, MLflow or Prefect. Every NativelmError becomes one line on stderr and its exit
code (2 for bad parameters).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from nativelm import __version__
from nativelm.cliargs import at_least, nonblank
from nativelm.errors import NativelmError
from nativelm.fleet import commands, deploy_commands
from nativelm.params.study import ALL_ROWS

Handler = Callable[[argparse.Namespace], int]


def _register_plugins(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Subcommands that live with their stage: the fleet and the rollout."""
    commands.register(sub, common)
    deploy_commands.register(sub, common)


STAGE_COMMANDS: tuple[tuple[str, str, str], ...] = (  # name, --help line, description (the DVC stages)
    ("prepare",
     "corpus -> tokenizer + token shards (DVC stage `prepare`)",
     "Fetch the corpus chosen in params.yaml (data.source), clean it, split it by "
     "document, train a byte-level BPE tokenizer and write token shards, a manifest "
     "and metrics to data.out_dir / data.metrics_file; logs to MLflow when a server "
     "is reachable."),
    ("train",
     "token shards -> trained model (DVC stage `train`)",
     "Train the sparse 1.58-bit model of params.yaml (model, train) on the token "
     "shards of data.out_dir: periodic atomic checkpoints (a killed run resumes "
     "exactly with train.resume: auto), metrics to MLflow, final metrics to "
     "train.metrics_file, the model to train.model_file. Under `torchrun` it trains "
     "with DDP. train.preset (tiny | gpu) fills every train size knob and model shape key left null; "
     "a value written in params.yaml always wins."),
    ("export",
     "trained model -> quantized ONNX folder (DVC stage `export`)",
     "Export train.model_file to ONNX with ONNX Runtime's quantized operators "
     "(export.variant: native, the default = the precision the model was trained in, a ternary "
     "model on ternary-ops where nativelm's operators represent it and their library is built, else "
     "ternary, the manifest saying which and why; ternary = 2-bit MatMulNBits + QMoE, ternary-ops = "
     "nativelm's TernaryMatMul + TernaryMoE with the ternary graph beside it as fallback, int4, fp32), check it against the PyTorch model on "
     "held-out text (top-1 agreement, perplexity, KV cache), record golden "
     "continuations and write export.out_dir atomically. A lower precision than "
     "training is post-training quantization (ternary of an fp model only with "
     "export.ptq: true): labelled ptq, its held-out parity recorded, not gated."),
    ("evaluate",
     "ONNX export -> perplexity, CPU speed, release folder, registered version "
     "(DVC stage `evaluate`)",
     "Verify export.out_dir against its manifest, score the ONNX model's perplexity on "
     "evaluate.ppl_tokens validation tokens (0: all), copy the export's parity figures, "
     "benchmark it on this CPU with the board runtime (prefill/decode tokens/s, time "
     "to first token, latency p50/p95, peak RSS) and write evaluate.metrics_file. "
     "Then build evaluate.release_dir atomically: the export's files, "
     "nativelm-runtime.pyz and release.json (sha256 of every file, git commit, data "
     "hash, params hash, source model sha256). With an MLflow server the release is "
     "logged as artifacts under release/ and registered as a new version of "
     "evaluate.registered_model, tagged git_commit, data_hash, params_hash."),
)


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

    for name, summary, description in STAGE_COMMANDS:
        stage = sub.add_parser(name, parents=[common], help=summary, description=description)
        stage.set_defaults(handler=f"nativelm.cli.stages:{name}")

    p = sub.add_parser("generate", parents=[common], help="continue a prompt with the exported model",
                       description="Load an export folder with the board runtime (every file's sha256 is "
                                   "checked first) and print the continuation of --prompt: greedy by default, "
                                   "sampled with --temperature > 0 (and --top-k / --top-p / --seed).")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--model", metavar="DIR", default=None, type=nonblank("the export folder"),
                   help="export folder (default: export.out_dir of the parameters file)")
    p.add_argument("--max-new-tokens", type=at_least(0), default=64, metavar="N",
                   help="tokens to generate at most (default 64; stops early at end of text)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    p.add_argument("--top-k", type=at_least(0), default=0, metavar="K", help="0 (default): no limit")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 (default): no limit")
    p.add_argument("--seed", type=at_least(0), default=None, metavar="S",
                   help="seed of the sampler, >= 0 (reproducible text)")
    p.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                   help="ONNX Runtime intra-op threads, at most 4 x the CPUs (default: every CPU this process "
                        "may use)")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.set_defaults(handler="nativelm.cli.stages:generate")

    p = sub.add_parser("study", parents=[common], help="native against compressed: train, export and compare "
                                                       "the study's rows on this project's data",
                       description="Train every row of the study (params.yaml `study`: fp dense and MoE, native "
                                   "ternary MoE and dense, openelm, the progressive schedule, the BitNet recipe, and "
                                   "ternary / int4 post-training quantization of the fp models, including fp models "
                                   "sized to the native rows' bytes) on the prepared data with the same seeds and "
                                   "steps, at every learning rate of the grid; export each to ONNX and evaluate it "
                                   "the same way (ONNX perplexity, bytes, bytes read per token, CPU decode and "
                                   "prefill; with --boards, decode on the boards, never made live). Prints the "
                                   "table (each row at its best rate) and writes it with the "
                                   "charts to study.out_dir/NAME; one MLflow parent run, a nested run per row. A "
                                   "killed study started again continues where it stopped. Needs prepared data "
                                   "(`nativelm prepare`).")
    p.add_argument("--rows", default=None, metavar="A,B|all", help=f"rows to run (all: {', '.join(ALL_ROWS)})")
    p.add_argument("--lrs", default=None, metavar="LR,LR", help="learning-rate grid (default: study.lrs)")
    p.add_argument("--seeds", default=None, metavar="S,S", help="seeds (default: study.seeds)")
    p.add_argument("--steps", type=at_least(1), default=None, metavar="N", help="optimizer steps of every row")
    p.add_argument("--preset", choices=["tiny", "gpu"], default=None, help="shape and run size of every row")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where the rows train")
    p.add_argument("--name", default=None, help="the study's name (its folder and MLflow run)")
    p.add_argument("--boards", default=None, metavar="B,B|all",
                   help="also benchmark every row on these boards of fleet.inventory, never making it live "
                        "(default: study.boards)")
    p.set_defaults(handler="nativelm.cli.study:study")

    p = sub.add_parser("stack", parents=[common], help="start/stop/show the local MLflow + Prefect servers",
                       description="Manage the local stack: an MLflow tracking server (SQLite, local artifacts) "
                                   "and a Prefect server, as background processes with logs and pid files under "
                                   "stack.state_dir. `up` is idempotent; `status` prints the URLs.")
    p.add_argument("action", choices=["up", "down", "status"], help="up: start (idempotent); down: stop; status: show")
    p.set_defaults(handler="nativelm.cli.loop:stack")

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
    p.set_defaults(handler="nativelm.cli.loop:run")

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
    p.set_defaults(handler="nativelm.cli.loop:serve")
    _register_plugins(sub, common)
    return parser


def _handler(spec: str) -> Handler:
    """The function a subcommand names ("module:function"), its module imported now."""
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


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
        return _handler(args.handler)(args)
    except NativelmError as exc:
        print(f"nativelm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("nativelm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
