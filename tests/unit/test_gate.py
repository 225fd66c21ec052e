"""The promotion rule: parity first, then perplexity within the allowed regression of the champion."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nativelm.errors import ParamsError
from nativelm.gate.decide import ParityLimits, VersionFigures, decide
from nativelm.params.gate import GateParams
from nativelm.params.root import parse_params

LIMITS = ParityLimits(min_top1_agreement=0.99, max_ppl_rel_diff=0.01)
GATE = GateParams()


def figures(version: int, ppl: float | None = 100.0, top1: float | None = 0.995, rel: float | None = 0.001,
            kv: float | None = 1.0, ptq: float | None = None) -> VersionFigures:
    return VersionFigures(version=version, ppl_onnx=ppl, top1_agreement=top1, ppl_rel_diff=rel, kv_cache_match=kv,
                          ptq=ptq)


def test_first_version_becomes_champion() -> None:
    decision = decide(figures(1), None, GATE, LIMITS)
    assert decision.promote and "first champion" in decision.reason


def test_within_regression_is_promoted_and_beyond_is_not() -> None:
    champion = figures(1, ppl=100.0)
    assert decide(figures(2, ppl=101.9), champion, GATE, LIMITS).promote
    refused = decide(figures(3, ppl=102.1), champion, GATE, LIMITS)
    assert not refused.promote
    assert "v1" in refused.reason and "102.1" in refused.reason


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"top1": 0.98}, "top-1 agreement"),
    ({"rel": 0.02}, "perplexity difference"),
    ({"kv": 0.0}, "KV-cache"),
    ({"top1": None}, "parity figures missing"),
])
def test_parity_failure_blocks_even_a_better_model(kwargs: dict, needle: str) -> None:
    decision = decide(figures(2, ppl=50.0, **kwargs), figures(1, ppl=100.0), GATE, LIMITS)
    assert not decision.promote and needle in decision.reason


@pytest.mark.parametrize("kwargs", [{"top1": 0.6}, {"rel": 0.3}, {"top1": None, "rel": None}])
def test_a_ptq_version_is_not_held_to_held_out_parity(kwargs: dict) -> None:
    """Its held-out figures compare ONNX with the fp model it was quantized from: what PTQ cost, recorded."""
    decision = decide(figures(2, ppl=99.0, ptq=1.0, **kwargs), figures(1, ppl=100.0), GATE, LIMITS)
    assert decision.promote and "PTQ" in decision.reason and "v1" in decision.reason
    assert not decide(figures(2, ppl=99.0, ptq=0.0, **kwargs), figures(1, ppl=100.0), GATE, LIMITS).promote


def test_a_ptq_version_is_still_blocked_by_the_cache_check_and_by_perplexity() -> None:
    decision = decide(figures(2, ppl=50.0, top1=0.5, kv=0.0, ptq=1.0), figures(1, ppl=100.0), GATE, LIMITS)
    assert not decision.promote and "KV-cache" in decision.reason
    worse = decide(figures(2, ppl=150.0, top1=0.5, ptq=1.0), figures(1, ppl=100.0), GATE, LIMITS)
    assert not worse.promote and "PTQ" in worse.reason


def test_parity_check_can_be_switched_off() -> None:
    gate = GateParams(require_parity=False)
    assert decide(figures(2, ppl=50.0, top1=0.5), figures(1), gate, LIMITS).promote


def test_missing_or_infinite_perplexity_is_refused() -> None:
    assert not decide(figures(2, ppl=None), figures(1), GATE, LIMITS).promote
    assert not decide(figures(2, ppl=float("inf")), figures(1), GATE, LIMITS).promote


def test_same_version_is_already_champion() -> None:
    decision = decide(figures(4), figures(4), GATE, LIMITS)
    assert decision.promote and "already champion" in decision.reason


@given(champion=st.floats(1.0, 1e4), ratio=st.floats(0.5, 1.5), allowed=st.floats(0.0, 0.5))
def test_rule_is_exactly_the_threshold(champion: float, ratio: float, allowed: float) -> None:
    gate = GateParams(max_ppl_regression=allowed)
    new = champion * ratio
    decision = decide(figures(2, ppl=new), figures(1, ppl=champion), gate, LIMITS)
    assert decision.promote == (new <= champion * (1 + allowed))


def test_gate_params_refuse_equal_aliases() -> None:
    with pytest.raises(ParamsError, match="champion_alias and candidate_alias"):
        parse_params("gate:\n  champion_alias: x\n  candidate_alias: x\n")
