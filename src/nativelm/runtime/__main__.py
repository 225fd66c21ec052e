"""The board command: `python -m nativelm.runtime ...` or `python nativelm-runtime.pyz ...`.

    generate --model DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K]
             [--top-p P] [--seed S] [--stream] [--json]
    bench    --model DIR [--prompt-len N] [--new-tokens N] [--repeats N] [--json]
    health   --model DIR [--json] prints `ok` (exit 0) only when every golden prompt matches
                                  (--json: {"ok", "prompts", "ops", "ops_reason", "kv_cache"}: which graph
                                  ran, and whether its KV cache stayed in place: shared | copied)

Every command takes --threads N (ONNX Runtime intra-op threads; default: all usable CPUs) and
verifies the sha256 of every file in the folder's manifest.json first (--no-verify skips that).
A failure is one line on stderr (`error: ...`) and exit status 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from . import __version__
from .bench import benchmark
from .errors import RuntimeFailure
from .generate import Generation, Sampling, generate, stream
from .health import check_health
from .session import Model, load_model


def _model(args: argparse.Namespace) -> Model:
    return load_model(args.model, threads=args.threads, verify=not args.no_verify)


def cmd_generate(args: argparse.Namespace) -> int:
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model = _model(args)
    if args.stream and not args.json:
        result = Generation([])
        for piece in stream(model, args.prompt, args.max_new_tokens, sampling, result=result):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        result = generate(model, args.prompt, args.max_new_tokens, sampling)
        if args.json:
            print(json.dumps({"prompt": args.prompt, "text": result.text, "prompt_tokens": result.prompt_ids,
                              "tokens": result.token_ids, "finish_reason": result.finish_reason},
                             ensure_ascii=False))
        else:
            print(result.text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    results = benchmark(_model(args), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                        repeats=args.repeats, warmup=args.warmup)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    model = _model(args)
    prompts = check_health(model)
    if args.json:
        print(json.dumps({"ok": True, "prompts": prompts, "ops": model.ops, "ops_reason": model.ops_reason,
                          "kv_cache": model.kv_cache}))
    else:
        print("ok")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nativelm-runtime",
                                     description="Run a nativelm export folder with ONNX Runtime on this machine.")
    parser.add_argument("--version", action="version", version=f"nativelm-runtime {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--model", required=True, metavar="DIR",
                         help="export folder: model.onnx, tokenizer.json, genai_config.json, manifest.json")
        sub.add_argument("--threads", type=_positive, default=None,
                         help="ONNX Runtime intra-op threads, at most 4 x the CPUs (default: every CPU this process "
                              "may use)")
        sub.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the folder's files")
        return sub

    gen = command("generate", "continue a prompt")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=_non_negative, default=64, metavar="N")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default): greedy")
    gen.add_argument("--top-k", type=_non_negative, default=0, metavar="K", help="0 (default): no limit")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 (default): no limit")
    gen.add_argument("--seed", type=_non_negative, default=None, metavar="S",
                     help="seed of the sampler, >= 0 (reproducible text)")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--json", action="store_true", help="print one JSON object: text, token ids, finish reason")
    gen.set_defaults(handler=cmd_generate)

    bench = command("bench", "measure prefill/decode speed, latency and memory")
    bench.add_argument("--prompt-len", type=_positive, default=64, metavar="N")
    bench.add_argument("--new-tokens", type=_positive, default=32, metavar="N")
    bench.add_argument("--repeats", type=_positive, default=3, metavar="N")
    bench.add_argument("--warmup", type=_non_negative, default=1, metavar="N", help="untimed runs first")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.set_defaults(handler=cmd_bench)

    health = command("health", "verify files and golden continuations; prints ok or the first difference")
    health.add_argument("--json", action="store_true",
                        help="print one JSON object: ok, prompts checked, ops (nativelm:<kernel>, fallback or contrib)")
    health.set_defaults(handler=cmd_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a board with an ASCII locale still prints
    try:
        return args.handler(args)
    except RuntimeFailure as exc:
        sys.stdout.flush()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def run(argv: list[str] | None = None) -> None:
    """Entry point of the zipapp and of `python -m`: exit with main's status."""
    sys.exit(main(argv))


if __name__ == "__main__":
    run()
