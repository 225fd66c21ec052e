"""CPU inference speed of the four ONNX exports against PyTorch eager, with a memory-bandwidth roofline.

    python bench/inference.py [--sizes tiny,bench] [--threads N] [--prompt-len 128] [--new-tokens 64] [--rounds 3]
                              [--profile-steps 64] [--kv-cache shared|copied|both]
                              [--repeats 3] [--bench-layers 4] [--expert-quant int8] [--bw-mb 2048] [--workdir DIR] [--json OUT]

For each model size a random-weight NativeLM (vocab 4096, seed 0) is built and exported four ways
with ``build_graph`` directly (no parity checks: the weights are random): ``ternary-ops`` (nativelm's
TernaryMatMul + TernaryMoE, five trits per byte; run with the operator library of
``nativelm.runtime.custom_ops.find_ops_library``, skipped with a note where it is not built),
``ternary`` (2-bit MatMulNBits + 2-bit QMoE), ``int4`` (4-bit MatMulNBits + 4-bit QMoE) and ``fp32``
(MatMul, MoE as dense standard ONNX over all experts). Each variant, and PyTorch eager, then runs in its own
subprocess (so the peak RSS of one does not include another's), with ONNX Runtime sessions opened
as ``nativelm.runtime.session.open_session`` does (CPU EP, intra-op threads, inter-op 1) and fed
with the runtime's I/O convention (input_ids, attention_mask, past_key_values.{i}.key/value and, where
the graph takes it, num_logits_to_keep 1 -> the last position's logits, present.{i}.*):

- prefill: one run over a ``prompt-len`` prompt of fixed pseudo-random ids, tokens/s;
- decode: ``new-tokens`` greedy steps of one token each with the KV cache, tokens/s; the cache kept in
  place (``--kv-cache shared``, the default: the board runtime's ``nativelm.runtime.kvcache.SharedCache``,
  one buffer of ``max_seq_len`` positions per layer bound as past and present), copied every step
  (``copied``: fed as arrays, returned as new ones), or ``both`` side by side (``<variant>:copied``,
  with the ratio);
- PyTorch eager has no KV cache (``NativeLM.forward`` attends the sequence to itself), so its decode
  RECOMPUTES the whole sequence for every new token (and re-quantizes the weights on each forward,
  as the training forward does). Its decode speed is therefore not comparable per byte read. It is
  slow, so it decodes ``--eager-new-tokens`` (16) tokens in ``--eager-repeats`` (1) timed runs.

Medians over ``repeats`` timed runs after one warm-up; with ``--rounds R`` every runner is measured R
times, the sweeps interleaved, and each ratio is the median of the ratios measured in the same round
(side by side), printed with its range. Peak RSS: VmHWM of the child (Linux's ru_maxrss
is inherited across fork + exec, so it would carry the parent's bandwidth arrays); it includes the
Python / numpy / torch / ORT import baseline. File size: ``model.onnx`` + its external data.

Roofline: bandwidth ÷ bytes read per decoded token. The bandwidth is the tuned C read loop built
beside the operator library (``bench/ternary_kernels.py``'s, same threads, a ``bw-mb`` buffer) where
it is built, else numpy reductions over a ``bw-mb`` array (best of several, with 1 and with
``threads`` threads), which read slower and so flatter the exports; both are printed. Bytes per token are taken from the exported
initializers of each part: attention + router + norms + LM head + one embedding row + top_k/n_experts
of the expert bytes (the active experts). The fp32 export's dense MoE really reads all experts, so its
"graph" bytes per token are also shown; eager is compared against the fp32 active bytes.

The "bench" size is the ``gpu`` preset shape (d_model 768, 32 experts of 384, top-4, GQA 12/4)
with ``--bench-layers`` layers (default 12: the full preset, 362.8M parameters; 4 layers: 122.8M).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 4096
VARIANTS = ("ternary-ops", "ternary", "int4", "fp32")
CUSTOM = "ternary-ops"  # the export on nativelm's operators: its session registers the library
RUNNERS = VARIANTS + ("torch-eager",)
KV_MODES = ("shared", "copied", "both")
COPIED = ":copied"  # suffix of a runner measured with the copying KV cache beside the shared one (--kv-cache both)


# ---- model shapes ---------------------------------------------------------------------------------
def model_params(size: str, bench_layers: int, expert_quant: str | None = None) -> Any:
    """The model of a size; `expert_quant` (qmoe, int8) replaces the preset's experts when given."""
    from nativelm.model import preset_params

    experts = {"expert_quant": expert_quant} if expert_quant else {}
    if size == "tiny":
        return preset_params("tiny", **experts)
    if size == "bench":
        return preset_params("gpu", n_layers=bench_layers, **experts)
    raise SystemExit(f"unknown size {size!r} (tiny, bench)")


# ---- children ---------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """Peak RSS of this process: VmHWM (per address space, so not inherited across fork + exec as Linux's
    ru_maxrss is); ru_maxrss where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_export(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the random model once and write the three exports (model.onnx + model.onnx.data each)."""
    import onnx
    import torch

    from nativelm.export.graph import build_graph
    from nativelm.model import build_model, param_counts
    from nativelm.params.export import ExportParams

    torch.set_num_threads(spec["threads"])
    params = model_params(spec["size"], spec["bench_layers"], spec["expert_quant"])
    t0 = time.perf_counter()
    model = build_model(params, VOCAB, seed=0).eval()
    out: dict[str, Any] = {"params": param_counts(params, VOCAB), "shape": params.model_dump(
        include={"d_model", "n_layers", "n_heads", "n_kv_heads", "n_experts", "expert_ffn", "top_k", "window",
                 "max_seq_len"}),
        "build_s": time.perf_counter() - t0, "variants": {}}
    for variant in VARIANTS:
        t0 = time.perf_counter()
        graph = build_graph(model, ExportParams(variant=variant))
        folder = Path(spec["workdir"]) / spec["size"] / variant
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.onnx"
        onnx.save_model(graph.model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        files = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
        out["variants"][variant] = {"path": str(path), "file_bytes": files, "part_bytes": graph.part_bytes(),
                                    "choices": graph.choices, "notes": graph.notes,
                                    "export_s": time.perf_counter() - t0}
        del graph
    return out


def _prompt(length: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, size=(1, length), dtype=np.int64)


def _session(spec: dict[str, Any], profile: bool = False) -> Any:
    """A CPU session as the board runtime opens one (the operator library registered for ternary-ops)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = profile
    if profile:
        options.profile_file_prefix = str(Path(spec["workdir"]) / "profile")
    if spec.get("library"):
        options.register_custom_ops_library(spec["library"])
    return ort.InferenceSession(spec["path"], options, providers=["CPUExecutionProvider"])


def decode_profile(spec: dict[str, Any], feeds: dict[str, np.ndarray], token: np.ndarray) -> dict[str, Any]:
    """ORT's profiler over `profile_steps` one-token decode steps after the prompt (the same step again:
    `feeds`, or with the cache shared, `token` after prompt-len cached positions): kernel time per operator
    type (share of all kernel time) and nodes per step."""
    from nativelm.export.kernels import profile_kernels

    steps, session = spec["profile_steps"], _session(spec, profile=True)
    cache = _shared_cache(spec, session) if spec["kv_cache"] == "shared" else None

    def shared_step(_: Any) -> None:
        assert cache is not None
        cache.length = spec["prompt_len"]  # what the buffer holds does not change the kernels' time
        cache.run(token)
    runs = profile_kernels(session, feeds if cache is None else shared_step, runs=steps)
    by_op: dict[str, int] = {}
    for r in runs:
        by_op[r.op_type] = by_op.get(r.op_type, 0) + r.duration_us
    total = sum(by_op.values()) or 1
    return {"steps": steps, "nodes_per_step": len(runs) / steps, "kernel_us_per_step": total / steps,
            "share": {op: us / total for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])}}


def _cache_shape(session: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head size) of a decoder session's past_key_values inputs."""
    inputs = {i.name: i for i in session.get_inputs()}
    n_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    return n_layers, inputs["past_key_values.0.key"].shape[1], inputs["past_key_values.0.key"].shape[3]


def _keeps_logits(session: Any) -> bool:
    """Whether the graph takes `num_logits_to_keep` (an input with a default: an overridable initializer)."""
    from nativelm.formats.export_folder import LOGITS_TO_KEEP

    return LOGITS_TO_KEEP in {i.name for i in session.get_overridable_initializers()}


def _shared_cache(spec: dict[str, Any], session: Any) -> Any:
    """The board runtime's KV cache kept in place, `max_seq_len` positions (nativelm.runtime.kvcache)."""
    from nativelm.runtime.kvcache import SharedCache

    return SharedCache(session, *_cache_shape(session), spec["max_len"], logits_to_keep=_keeps_logits(session))


def child_onnx(spec: dict[str, Any]) -> dict[str, Any]:
    from nativelm.formats.export_folder import LOGITS_TO_KEEP

    t0 = time.perf_counter()
    session = _session(spec)
    load_s = time.perf_counter() - t0
    outputs = [o.name for o in session.get_outputs()]
    n_layers, kv_heads, head_dim = _cache_shape(session)
    keep_input = _keeps_logits(session)
    shared = _shared_cache(spec, session) if spec["kv_cache"] == "shared" else None

    def feeds(ids: np.ndarray, past: list[np.ndarray]) -> dict[str, np.ndarray]:
        total = past[0].shape[2] + ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, total), dtype=np.int64)}
        for i in range(n_layers):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i], past[2 * i + 1]
        if keep_input:  # the last position's logits only, as the board runtime generates
            feed[LOGITS_TO_KEEP] = np.ones(1, dtype=np.int64)
        return feed

    def run(ids: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        if shared is not None:  # the cache stays in its buffers; `past` is only "empty" (a new prompt) or not
            if past is empty:
                shared.reset()
            return shared.run(ids, last_only=True), None
        res = session.run(outputs, feeds(ids, past))
        return res[0], res[1:]

    empty = [np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)] * (2 * n_layers)
    prompt = _prompt(spec["prompt_len"])

    def once(new_tokens: int) -> tuple[float, float]:
        start = time.perf_counter()
        logits, past = run(prompt, empty)
        prefill = time.perf_counter() - start
        token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits, past = run(token, past)
            token = np.array([[int(logits[0, -1].argmax())]], dtype=np.int64)
        return prefill, time.perf_counter() - start

    result = _timed(once, spec, load_s)
    result["kv_cache"] = spec["kv_cache"]
    if spec.get("profile_steps"):
        res = session.run(outputs, feeds(prompt, empty))
        token = np.array([[int(res[0][0, -1].argmax())]])
        result["profile"] = decode_profile(spec, feeds(token, res[1:]), token)
    return result


def child_eager(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from nativelm.model import build_model

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = build_model(model_params(spec["size"], spec["bench_layers"], spec["expert_quant"]), VOCAB, seed=0).eval()
    load_s = time.perf_counter() - t0
    prompt = torch.from_numpy(_prompt(spec["prompt_len"]))

    def once(new_tokens: int) -> tuple[float, float]:
        with torch.inference_mode():
            start = time.perf_counter()
            logits = model(prompt).logits
            prefill = time.perf_counter() - start
            seq = torch.cat([prompt, logits[:, -1:].argmax(-1)], dim=1)
            start = time.perf_counter()
            for _ in range(new_tokens):  # no KV cache in NativeLM: recompute the whole sequence
                logits = model(seq).logits
                seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
            return prefill, time.perf_counter() - start

    return _timed(once, spec, load_s)


def _timed(once: Any, spec: dict[str, Any], load_s: float) -> dict[str, Any]:
    once(4)  # warm-up
    runs = [once(spec["new_tokens"]) for _ in range(spec["repeats"])]
    return {"load_s": load_s,
            "prefill_tokens_per_s": statistics.median(spec["prompt_len"] / p for p, _ in runs),
            "decode_tokens_per_s": statistics.median(spec["new_tokens"] / d for _, d in runs),
            "peak_rss_mb": peak_rss_mb()}


def child_main(kind: str, spec: dict[str, Any]) -> None:
    result = {"export": child_export, "onnx": child_onnx, "eager": child_eager}[kind](spec)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(kind: str, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    proc = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"child {kind} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


# ---- bandwidth --------------------------------------------------------------------------------------
def bandwidth(mb: int, threads: int, tries: int = 7) -> dict[str, float]:
    """Streaming bandwidth, GB/s (1e9), best of `tries`, over a `mb` MiB float64 array, with 1 and with
    `threads` threads (numpy releases the GIL): read = sum and dot (each reads the array once), copy =
    copyto (counted as read + write bytes). The roofline uses the best read figure."""
    n = mb * (1 << 20) // 8
    a = np.ones(n, dtype=np.float64)
    b = np.empty_like(a)

    def best(fn: Any, nbytes: int, k: int) -> float:
        bounds = [(c[0], c[-1] + 1) for c in np.array_split(np.arange(n), k)]
        times = []
        for _ in range(tries):
            workers = [threading.Thread(target=fn, args=bo) for bo in bounds]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            times.append(time.perf_counter() - start)
        return nbytes / min(times) / 1e9

    def read_sum(lo: int, hi: int) -> None:
        a[lo:hi].sum()

    def read_dot(lo: int, hi: int) -> None:
        np.dot(a[lo:hi], a[lo:hi])

    def copy(lo: int, hi: int) -> None:
        np.copyto(b[lo:hi], a[lo:hi])

    copy(0, n)  # fault in b
    out: dict[str, float] = {}
    for k in sorted({1, max(1, threads)}):
        out[f"sum_{k}t"] = best(read_sum, a.nbytes, k)
        out[f"dot_{k}t"] = best(read_dot, a.nbytes, k)
        out[f"copy_{k}t"] = best(copy, 2 * a.nbytes, k)
    out["numpy_roofline_gbs"] = max(v for key, v in out.items() if key.startswith(("sum", "dot")))
    out["roofline_gbs"] = out["numpy_roofline_gbs"]
    c_loop = c_read_loop(mb, threads, tries)
    if c_loop is not None:  # the tuned C read loop reads faster than numpy: the honest roofline
        out["c_read_gbs"] = c_loop
        out["roofline_gbs"] = c_loop
    return out


def c_read_loop(mb: int, threads: int, tries: int) -> float | None:
    """Best GB/s of the C read loop built beside the operator library (bench/ternary_kernels.py), None
    where it is not built."""
    from nativelm.runtime.custom_ops import find_library

    if find_library() is None or not (find_library().parent / "read_bandwidth").is_file():
        return None
    from ternary_kernels import roofline

    return max(roofline(mb, threads, tries))


# ---- bytes per token ----------------------------------------------------------------------------------
def bytes_per_token(export: dict[str, Any], shape: dict[str, Any]) -> tuple[float, float]:
    """(active bytes, bytes the graph really reads) per decoded token, from the exported part sizes."""
    parts = export["part_bytes"]
    dense = sum(v for k, v in parts.items() if k not in ("embedding", "ffn", "rope", "constants"))
    embed_row = parts.get("embedding", 0) / VOCAB
    ffn = parts.get("ffn", 0)
    active = dense + embed_row + ffn * shape["top_k"] / shape["n_experts"]
    routed = any(op in json.dumps(export["choices"].get("moe", {})) for op in ("QMoE", "TernaryMoE"))
    graph = active if routed else dense + embed_row + ffn
    return active, graph


# ---- report -----------------------------------------------------------------------------------------
def median_round(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per runner, the round of median decode speed, with the range of decode and prefill over all rounds."""
    out: dict[str, dict[str, Any]] = {}
    for name in rounds[0]:
        runs = sorted((r[name] for r in rounds), key=lambda r: r["decode_tokens_per_s"])
        pick = dict(runs[len(runs) // 2])
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            pick[f"{key}_range"] = [min(r[key] for r in runs), max(r[key] for r in runs)]
        out[name] = pick
    return out


def report(size: str, info: dict[str, Any], results: dict[str, dict[str, Any]], bw: float,
           rounds: list[dict[str, dict[str, Any]]] | None = None) -> list[str]:
    p, shape = info["params"], info["shape"]
    lines = [(f"\n== {size}: {p['total'] / 1e6:.1f}M params ({p['active'] / 1e6:.1f}M active non-embedding), "
              f"d_model {shape['d_model']}, {shape['n_layers']} layers, {shape['n_experts']} experts x "
              f"{shape['expert_ffn']} top-{shape['top_k']}, vocab {VOCAB}; built in {info['build_s']:.1f}s"),
             (f"{'variant':<12}{'file MB':>9}{'act MB/tok':>11}{'graph MB/tok':>13}{'prefill t/s':>12}"
              f"{'decode t/s':>11}{'roofline t/s':>13}{'% roof':>8}{'% graph roof':>13}{'peak RSS MB':>12}"
              f"{'load s':>8}{'export s':>9}")]
    fp32_active = None
    for name in RUNNERS:
        r = results.get(name)
        if r is None:
            continue
        if name in info["variants"]:
            ex = info["variants"][name]
            active, graph = bytes_per_token(ex, shape)
            file_mb, export_s = ex["file_bytes"] / 1e6, f"{ex['export_s']:.1f}"
            if name == "fp32":
                fp32_active = active
        else:
            active = graph = fp32_active or float("nan")
            file_mb, export_s = float("nan"), "-"
        roof = bw * 1e9 / active
        r.update(active_bytes_per_token=active, graph_bytes_per_token=graph, roofline_tokens_per_s=roof,
                 roofline_fraction=r["decode_tokens_per_s"] / roof,
                 graph_roofline_fraction=r["decode_tokens_per_s"] * graph / (bw * 1e9))
        lines.append(f"{name:<12}{file_mb:>9.1f}{active / 1e6:>11.2f}{graph / 1e6:>13.2f}"
                     f"{r['prefill_tokens_per_s']:>12.1f}{r['decode_tokens_per_s']:>11.1f}{roof:>13.0f}"
                     f"{100 * r['roofline_fraction']:>7.1f}%{100 * r['graph_roofline_fraction']:>12.1f}%{r['peak_rss_mb']:>12.0f}{r['load_s']:>8.2f}{export_s:>9}")

    spans: dict[str, str] = {}

    def ratio(a: str, b: str, key: str) -> float | None:
        """Median over the rounds of a / b measured in the same round (side by side); its range noted."""
        if a not in results or b not in results:
            return None
        per_round = sorted(r[a][key] / r[b][key] for r in (rounds or [results]))
        spans[f"{a}/{b}/{key}"] = f"range {per_round[0]:.3f}-{per_round[-1]:.3f} over {len(per_round)} rounds"
        return statistics.median(per_round)

    t, f = info["variants"].get("ternary", {}), info["variants"].get("fp32", {})
    checks = [("ternary-ops decode / int4 decode", ratio(CUSTOM, "int4", "decode_tokens_per_s"), ">= 2.0", 2.0, True),
              ("ternary-ops prefill / int4 prefill", ratio(CUSTOM, "int4", "prefill_tokens_per_s"), ">= 1.0", 1.0,
               True),
              ("ternary-ops decode / ternary decode", ratio(CUSTOM, "ternary", "decode_tokens_per_s"), "", None, True),
              ("ternary-ops decode % of roofline", results[CUSTOM]["roofline_fraction"] if CUSTOM in results
               else None, ">= 0.60", 0.6, True),
              ("ternary decode / fp32 decode", ratio("ternary", "fp32", "decode_tokens_per_s"), ">= 2.5", 2.5, True),
              ("ternary decode / int4 decode", ratio("ternary", "int4", "decode_tokens_per_s"), ">= 1.2", 1.2, True),
              ("ternary file / fp32 file", t.get("file_bytes", 0) / f["file_bytes"] if f else None, "<= 0.100",
               0.1, False),
              ("ternary prefill / fp32 prefill", ratio("ternary", "fp32", "prefill_tokens_per_s"), "", None, True),
              ("ternary decode / torch-eager decode", ratio("ternary", "torch-eager", "decode_tokens_per_s"), "",
               None, True)]
    checks += [(f"{name} decode, cache shared / copied", ratio(name, name + COPIED, "decode_tokens_per_s"), "", None,
                True) for name in RUNNERS if name + COPIED in results]
    for label, value, target, bound, higher in checks:
        if value is None:
            continue
        verdict = "" if bound is None else ("  PASS" if (value >= bound if higher else value <= bound) else "  FAIL")
        lines.append(f"  {label:<36}{value:>8.3f}  {('target ' + target) if target else ''}{verdict}")
    lines += [f"  {key}: {text}" for key, text in spans.items() if rounds and len(rounds) > 1]
    for name, r in results.items():
        if "profile" in r:
            prof = r["profile"]
            lines.append(f"  {name} decode profile ({prof['steps']} steps, {prof['nodes_per_step']:.0f} nodes/step, "
                         f"{prof['kernel_us_per_step']:.0f} us kernels/step): "
                         + ", ".join(f"{op} {100 * v:.0f}%" for op, v in prof["share"].items() if v >= 0.01))
    for name, ex in info["variants"].items():
        parts = sorted(ex["part_bytes"].items(), key=lambda kv: -kv[1])
        lines.append(f"  {name} file parts (MB): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in parts if v >= 1e4))
    notes = {n for ex in info["variants"].values() for n in ex["notes"]}
    for n in sorted(notes):
        lines.append(f"  note: {n}")
    return lines


def _library() -> Any:
    """nativelm's operator library as the board runtime finds it (None: not built)."""
    from nativelm.runtime.custom_ops import find_ops_library

    return find_ops_library()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,bench")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="sweeps over all runners, interleaved (a busy machine's load drifts): medians and ranges")
    ap.add_argument("--eager-new-tokens", type=int, default=16, help="decode steps of torch eager (recompute)")
    ap.add_argument("--eager-repeats", type=int, default=1, help="timed runs of torch eager")
    ap.add_argument("--bench-layers", type=int, default=12, help="layers of the bench model (gpu preset shape)")
    ap.add_argument("--expert-quant", choices=("qmoe", "int8"), default=None,
                    help="the models' experts (model.expert_quant; default: each preset's): int8 runs TernaryMoE's "
                         "integer path, qmoe its float path; the QMoE exports are the same size either way")
    ap.add_argument("--bw-mb", type=int, default=2048, help="array size of the bandwidth test, MiB")
    ap.add_argument("--only", default=",".join(RUNNERS), help="subset of " + ",".join(RUNNERS))
    ap.add_argument("--workdir", default=None, help="where exports go (default: a temporary folder, removed)")
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="also profile this many decode steps of each export with ORT's profiler (kernel time by op)")
    ap.add_argument("--kv-cache", choices=KV_MODES, default="shared",
                    help="ONNX decode with the KV cache kept in place (shared, as the board runtime does where the "
                         "graph allows it), copied every step, or both side by side (name:copied)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return

    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, threads {args.threads}, "
          f"prompt {args.prompt_len}, new tokens {args.new_tokens}, repeats {args.repeats}", flush=True)
    bw = bandwidth(args.bw_mb, args.threads)
    print(f"memory bandwidth (GB/s, best of 7, {args.bw_mb} MiB; roofline_gbs: the C read loop where built): "
          + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()), flush=True)
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="nativelm-bench-")
    workdir = args.workdir or tmp.name  # type: ignore[union-attr]
    only = [r for r in args.only.split(",") if r]
    library = _library()
    if library is None and CUSTOM in only:
        only.remove(CUSTOM)
        print(f"note: nativelm's operator library is not built here; {CUSTOM} is not run", flush=True)
    elif library is not None:
        print(f"operator library: {library.path} (kernel {library.kernel})", flush=True)
    out: dict[str, Any] = {"bandwidth": bw, "args": {k: v for k, v in vars(args).items() if k != "child"},
                           "sizes": {}}
    lines_all: list[str] = []
    try:
        for size in [s for s in args.sizes.split(",") if s]:
            base = {"size": size, "bench_layers": args.bench_layers, "expert_quant": args.expert_quant,
                    "threads": args.threads,
                    "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                    "workdir": workdir, "profile_steps": args.profile_steps}
            t0 = time.perf_counter()
            info = spawn("export", base)
            base["max_len"] = info["shape"]["max_seq_len"]
            print(f"[{size}] built + exported in {time.perf_counter() - t0:.1f}s", flush=True)
            rounds: list[dict[str, dict[str, Any]]] = []
            for round_no in range(args.rounds):
                results: dict[str, dict[str, Any]] = {}
                for name in [r for r in RUNNERS if r in only]:
                    t0 = time.perf_counter()
                    if name == "torch-eager":
                        results[name] = spawn("eager", {**base, "new_tokens": args.eager_new_tokens,
                                                        "repeats": args.eager_repeats})
                        print(f"[{size}] round {round_no + 1}: {name}: decode "
                              f"{results[name]['decode_tokens_per_s']:.1f} tok/s ({time.perf_counter() - t0:.1f}s)",
                              flush=True)
                        continue
                    modes = ["shared", "copied"][::1 if round_no % 2 == 0 else -1]  # alternate who runs first
                    for mode in modes if args.kv_cache == "both" else [args.kv_cache]:
                        key = name + (COPIED if args.kv_cache == "both" and mode == "copied" else "")
                        results[key] = spawn("onnx", {**base, "path": info["variants"][name]["path"],
                                                      "library": library.path if name == CUSTOM else None,
                                                      "kv_cache": mode,
                                                      "profile_steps": args.profile_steps if round_no == 0 else 0})
                        if name == CUSTOM:
                            results[key]["ops"] = f"nativelm:{library.kernel}"
                        print(f"[{size}] round {round_no + 1}: {key}: decode {results[key]['decode_tokens_per_s']:.1f}"
                              f" tok/s, KV cache {mode} ({time.perf_counter() - t0:.1f}s)", flush=True)
                rounds.append(results)
            results = median_round(rounds)
            for name, profiled in rounds[0].items():
                if "profile" in profiled:
                    results[name]["profile"] = profiled["profile"]
            lines = report(size, info, results, bw["roofline_gbs"], rounds)
            print("\n".join(lines), flush=True)
            lines_all += lines
            out["sizes"][size] = {"model": info, "results": results, "rounds": rounds}
    finally:
        if tmp is not None:
            tmp.cleanup()
    print("\n".join(["", "=" * 40, *lines_all]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
