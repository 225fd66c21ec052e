"""The logits of the last position only (`num_logits_to_keep`, README "nativelm's own operators") against
every position's, side by side on the same sessions: prefill and decode tokens/s of each export.

    python bench/last_logits.py [--sizes tiny,bench] [--bench-layers 4] [--variants ternary-ops,int4]
                                [--threads 2] [--prompt-len 128] [--new-tokens 64] [--rounds 5] [--cpu-time]

For each size (`bench/inference.py`'s random-weight shapes) each variant is built with ``build_graph``
and opened once (as the board runtime opens it); every round then times a prefill of a
``prompt-len``-token prompt and ``new-tokens`` greedy decode steps with the KV cache, once feeding
``num_logits_to_keep`` 1 (what the board runtime feeds while generating) and once 0 (every
position: the graph before the input existed), interleaved, the order swapped every round.
Printed: tokens/s of each (median over rounds) and the ratio last/all of each round, as a range.
Decode steps have one position either way, so only prefill can change. ``--cpu-time`` times with
the process's CPU time (all its threads) instead of the wall clock: on a machine other jobs share,
the work done, less disturbed by waiting for a core.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from inference import VOCAB, model_params  # bench/inference.py, beside this script


def session(model: Any, variant: str, threads: int) -> Any:
    """The variant's graph of `model` in a CPU session (nativelm's operator library registered for ternary-ops)."""
    import onnxruntime as ort

    from nativelm.export.graph import build_graph
    from nativelm.params.export import ExportParams
    from nativelm.runtime.custom_ops import find_ops_library

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    if variant == "ternary-ops":
        options.register_custom_ops_library(str(find_ops_library().path))
    graph = build_graph(model, ExportParams(variant=variant)).model.SerializeToString()
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def timed_run(sess: Any, prompt: np.ndarray, new_tokens: int, keep: int,
              clock: Any = time.perf_counter) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one prompt and `new_tokens` greedy steps, `keep` fed."""
    inputs = {i.name: i for i in sess.get_inputs()}
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    kv, hd = inputs["past_key_values.0.key"].shape[1], inputs["past_key_values.0.key"].shape[3]
    outputs = [o.name for o in sess.get_outputs()]
    past = [np.zeros((1, kv, 0, hd), np.float32)] * (2 * layers)

    def run(ids: np.ndarray) -> np.ndarray:
        nonlocal past
        feed = {"input_ids": ids, "attention_mask": np.ones((1, past[0].shape[2] + ids.shape[1]), np.int64),
                "num_logits_to_keep": np.array([keep], np.int64)}
        feed.update({f"past_key_values.{i // 2}.{'key' if i % 2 == 0 else 'value'}": p for i, p in enumerate(past)})
        logits, *past = sess.run(outputs, feed)
        return logits

    t0 = clock()
    token = run(prompt)[0, -1].argmax()
    prefill = prompt.shape[1] / (clock() - t0)
    t0 = clock()
    for _ in range(new_tokens):
        token = run(np.array([[int(token)]], np.int64))[0, -1].argmax()
    return prefill, new_tokens / (clock() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,bench")
    ap.add_argument("--bench-layers", type=int, default=4)
    ap.add_argument("--variants", default="ternary-ops,int4")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time, not the wall clock")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    import torch

    from nativelm.model import build_model

    torch.set_num_threads(args.threads)
    prompt = np.random.default_rng(0).integers(0, VOCAB, size=(1, args.prompt_len), dtype=np.int64)
    for size in args.sizes.split(","):
        model = build_model(model_params(size, args.bench_layers), VOCAB, seed=0).eval()
        sessions = {v: session(model, v, args.threads) for v in args.variants.split(",")}
        figures: dict[str, dict[int, list[tuple[float, float]]]] = {v: {1: [], 0: []} for v in sessions}
        for round_no in range(args.rounds):
            for variant, sess in sessions.items():
                timed_run(sess, prompt[:, :8], 2, 1)  # warm-up
                for keep in ((1, 0) if round_no % 2 == 0 else (0, 1)):
                    figures[variant][keep].append(timed_run(sess, prompt, args.new_tokens, keep, clock))
        print(f"== {size} ({args.threads} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
              f"{args.rounds} rounds, {'CPU' if args.cpu_time else 'wall'} time)")
        for variant, runs in figures.items():
            for what, i in (("prefill", 0), ("decode", 1)):
                last, every = [r[i] for r in runs[1]], [r[i] for r in runs[0]]
                ratios = [a / b for a, b in zip(last, every)]
                print(f"{variant:12s} {what:7s} last {statistics.median(last):8.1f} tok/s  all "
                      f"{statistics.median(every):8.1f} tok/s  last/all {min(ratios):.3f}-{max(ratios):.3f}")


if __name__ == "__main__":
    main()
