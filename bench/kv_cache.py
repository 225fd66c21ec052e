"""One decode step with the KV cache kept in place against the copying cache, side by side in one process.

    python bench/kv_cache.py [--size bench] [--variants ternary-ops,ternary,int4] [--positions 128,512] [--threads 2]
                             [--steps 50] [--rounds 3]

The random-weight model of ``bench/inference.py`` (same sizes) is exported per variant with
``build_graph`` and opened once as the board runtime opens it. Per round and cached length P, the
same one-token step after P positions runs ``steps`` times in each mode, interleaved step by step:
``copied`` (past fed as arrays, present returned as new ones: ``Model.forward``) and ``shared``
(``nativelm.runtime.kvcache.SharedCache``: one buffer of ``max_seq_len`` positions per layer, bound
as past and present). The step time of a mode is its minimum over the steps (a busy machine's other
load only ever adds time) and its median; the ratio copied / shared of the minima is the step's
speed-up, its range over the rounds printed beside it. What the buffers hold does not change the
kernels' time, so they hold random values (copied) and zeros (shared) rather than a prompt's cache.
The copying path here feeds the same past at every step, still warm in the caches, so it reads
cheaper than in a real decode, where each step's past is the previous step's fresh output:
``bench/inference.py --kv-cache both`` measures that.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from inference import VOCAB, model_params


def sessions(size: str, variant: str, threads: int) -> tuple[Any, Any]:
    """(model params, an ORT session of the `variant` export) as the board runtime opens it."""
    import onnxruntime as ort

    from nativelm.export.graph import build_graph
    from nativelm.model import build_model
    from nativelm.params.export import ExportParams

    params = model_params(size, 12)
    graph = build_graph(build_model(params, VOCAB, seed=0).eval(), ExportParams(variant=variant))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = threads, 1, 3
    if variant == "ternary-ops":  # nativelm's operators: the library the board runtime would load
        from nativelm.runtime.custom_ops import find_ops_library

        library = find_ops_library()
        if library is None:
            raise SystemExit("ternary-ops needs nativelm's operator library (bash native/build.sh)")
        options.register_custom_ops_library(str(library.path))
    return params, ort.InferenceSession(graph.model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def step_times(params: Any, session: Any, positions: int, steps: int) -> dict[str, list[float]]:
    """Seconds of each of `steps` one-token steps after `positions` cached positions, per mode."""
    from nativelm.runtime.kvcache import SharedCache

    layers, kv, hd = params.n_layers, params.n_kv_heads, params.head_dim
    rng = np.random.default_rng(0)
    token = np.array([[7]], dtype=np.int64)
    feed: dict[str, np.ndarray] = {"input_ids": token, "attention_mask": np.ones((1, positions + 1), np.int64)}
    for i in range(layers):
        for part in ("key", "value"):
            feed[f"past_key_values.{i}.{part}"] = rng.standard_normal((1, kv, positions, hd)).astype(np.float32)
    names = [o.name for o in session.get_outputs()]
    cache = SharedCache(session, layers, kv, hd, params.max_seq_len)

    def shared() -> None:
        cache.length = positions
        cache.run(token)

    modes = {"copied": lambda: session.run(names, feed), "shared": shared}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(steps):
        for mode, run in modes.items():
            start = time.perf_counter()
            run()
            times[mode].append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="bench", help="tiny or bench (bench/inference.py's shapes, 12 layers)")
    ap.add_argument("--variants", default="ternary-ops,ternary,int4")
    ap.add_argument("--positions", default="128,512", help="cached positions before the step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    for variant in args.variants.split(","):
        params, session = sessions(args.size, variant, args.threads)
        for positions in (int(p) for p in args.positions.split(",")):
            step_times(params, session, positions, 3)  # warm-up
            rounds = [step_times(params, session, positions, args.steps) for _ in range(args.rounds)]
            ratios = sorted(min(r["copied"]) / min(r["shared"]) for r in rounds)
            cells = ", ".join(f"{mode} min {1e3 * min(min(r[mode]) for r in rounds):.2f} ms "
                              f"median {1e3 * statistics.median(t for r in rounds for t in r[mode]):.2f} ms"
                              for mode in ("copied", "shared"))
            print(f"{args.size} {variant} step after {positions} positions: {cells}; copied / shared "
                  f"{statistics.median(ratios):.3f} (range {ratios[0]:.3f}-{ratios[-1]:.3f} over {len(ratios)} rounds)",
                  flush=True)


if __name__ == "__main__":
    main()
