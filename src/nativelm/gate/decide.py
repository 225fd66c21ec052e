"""The promotion rule, as a pure function of two versions' figures (so it is tested without a server)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nativelm.params.gate import GateParams


@dataclass(frozen=True)
class VersionFigures:
    """What the gate reads about one registered version (from the run that registered it)."""

    version: int
    ppl_onnx: float | None
    top1_agreement: float | None
    ppl_rel_diff: float | None
    kv_cache_match: float | None
    ptq: float | None = None  # 1: a post-training-quantized export, measured against the model it came from


@dataclass(frozen=True)
class ParityLimits:
    """The export's parity thresholds (params.export), which the gate re-checks on the version."""

    min_top1_agreement: float
    max_ppl_rel_diff: float


@dataclass(frozen=True)
class Decision:
    """Promote or not, and the one-line reason recorded on the version."""

    promote: bool
    reason: str


def _parity_problem(new: VersionFigures, limits: ParityLimits) -> str | None:
    """Why the version's parity fails, or None. A PTQ version's held-out figures say what quantizing after
    training cost (ONNX vs the fp model), not whether the graph is right: only its KV-cache check counts."""
    problem = None if new.ptq else _held_out_problem(new, limits)
    if problem is None and new.kv_cache_match is not None and new.kv_cache_match < 1:
        return "parity: KV-cache decoding differs from full recomputation"
    return problem


def _held_out_problem(new: VersionFigures, limits: ParityLimits) -> str | None:
    if new.top1_agreement is None or new.ppl_rel_diff is None:
        return "parity figures missing from the evaluate run"
    if new.top1_agreement < limits.min_top1_agreement:
        return f"parity: top-1 agreement {new.top1_agreement:.4f} < {limits.min_top1_agreement}"
    if new.ppl_rel_diff > limits.max_ppl_rel_diff:
        return f"parity: perplexity difference {new.ppl_rel_diff:.3g} > {limits.max_ppl_rel_diff}"
    return None


def decide(new: VersionFigures, champion: VersionFigures | None, gate: GateParams,
           limits: ParityLimits) -> Decision:
    """Promote `new` when parity holds and its perplexity is within the allowed regression of the champion's."""
    if gate.require_parity:
        problem = _parity_problem(new, limits)
        if problem:
            return Decision(False, problem)
    decision = _by_perplexity(new, champion, gate)
    if new.ptq:
        return Decision(decision.promote, f"{decision.reason}; PTQ export: held-out parity recorded, not gated")
    return decision


def _by_perplexity(new: VersionFigures, champion: VersionFigures | None, gate: GateParams) -> Decision:
    if new.ppl_onnx is None or not math.isfinite(new.ppl_onnx):
        return Decision(False, "no finite ONNX validation perplexity (ppl_onnx) on the evaluate run")
    if champion is None:
        return Decision(True, f"first champion (ppl_onnx {new.ppl_onnx:.4g})")
    if champion.version == new.version:
        return Decision(True, f"already champion (version {new.version})")
    if champion.ppl_onnx is None:
        return Decision(True, f"champion version {champion.version} has no ppl_onnx to compare with")
    limit = champion.ppl_onnx * (1.0 + gate.max_ppl_regression)
    verdict = (f"ppl_onnx {new.ppl_onnx:.4g} vs champion v{champion.version} {champion.ppl_onnx:.4g} "
               f"(limit {limit:.4g}, max regression {gate.max_ppl_regression:.2%})")
    return Decision(new.ppl_onnx <= limit, verdict)
