"""The gate against a real MLflow server: aliases move only for a good enough version, reasons are tagged."""

from __future__ import annotations

import uuid

import pytest

from nativelm.errors import NativelmError
from nativelm.gate.promote import REASON_TAG, STATUS_TAG, alias_version, gate_version
from nativelm.params.evaluate import EvaluateParams
from nativelm.params.root import Params
from nativelm.params.tracking import TrackingParams


def _params(local_stack: dict, model: str) -> Params:
    return Params(stack=local_stack["params"].stack,
                  tracking=TrackingParams(uri=local_stack["env"]["MLFLOW_TRACKING_URI"], experiment="gate-test"),
                  evaluate=EvaluateParams(registered_model=model))


def _register(client, model: str, ppl: float, top1: float = 0.995) -> int:
    """A version whose registering run carries the evaluate metrics the gate reads."""
    experiment = client.get_experiment_by_name("gate-test") or client.get_experiment(client.create_experiment("gate-test"))
    run = client.create_run(experiment.experiment_id)
    for key, value in {"ppl_onnx": ppl, "top1_agreement": top1, "ppl_rel_diff": 0.001, "kv_cache_match": 1.0}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(model)
    except Exception:
        pass
    version = client.create_model_version(model, source=f"{run.info.artifact_uri}/release", run_id=run.info.run_id)
    return int(version.version)


def test_champion_moves_only_when_the_new_version_is_good_enough(local_stack: dict) -> None:
    from mlflow import MlflowClient

    model = f"gate-{uuid.uuid4().hex[:8]}"
    params = _params(local_stack, model)
    client = MlflowClient(tracking_uri=params.tracking.uri)

    first = _register(client, model, ppl=100.0)
    result = gate_version(params, first)
    assert result.promoted and result.changed and result.previous_champion is None
    assert alias_version(client, model, "champion") == first

    better = _register(client, model, ppl=90.0)
    assert gate_version(params, better).changed
    assert alias_version(client, model, "champion") == better

    worse = _register(client, model, ppl=120.0)
    result = gate_version(params, worse)
    assert not result.promoted and result.alias == "candidate"
    assert alias_version(client, model, "champion") == better
    assert alias_version(client, model, "candidate") == worse
    tags = client.get_model_version(model, str(worse)).tags
    assert tags[STATUS_TAG] == "candidate" and "ppl_onnx 120" in tags[REASON_TAG]

    broken = _register(client, model, ppl=10.0, top1=0.5)
    assert not gate_version(params, broken).promoted
    assert "parity" in client.get_model_version(model, str(broken)).tags[REASON_TAG]

    again = gate_version(params, better)
    assert again.promoted and not again.changed  # re-gating the champion announces nothing


def test_unknown_version_is_one_line(local_stack: dict) -> None:
    params = _params(local_stack, f"gate-{uuid.uuid4().hex[:8]}")
    with pytest.raises(NativelmError, match="not found in the registry"):
        gate_version(params, 99)
