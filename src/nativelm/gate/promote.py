"""Apply the gate to a registered version: read figures from MLflow, decide, move the aliases, tag why."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from nativelm.errors import NativelmError
from nativelm.gate.decide import Decision, ParityLimits, VersionFigures, decide
from nativelm.tracking.runs import required_tracking_uri

if TYPE_CHECKING:

    from nativelm.params.root import Params

STATUS_TAG = "gate.status"
REASON_TAG = "gate.reason"
# metric names of the evaluate run that registered the version
FIGURES = ("ppl_onnx", "top1_agreement", "ppl_rel_diff", "kv_cache_match", "ptq")


@dataclass(frozen=True)
class GateResult:
    """What the gate did to one version."""
    model: str
    version: int
    promoted: bool  # the version is the champion now
    changed: bool  # the champion alias moved (False: it already was the champion, or not promoted)
    reason: str
    alias: str
    previous_champion: int | None


def version_figures(client: MlflowClient, name: str, version: int) -> VersionFigures:
    """The gate's figures of `version`, from the metrics of the run that registered it."""
    model_version = client.get_model_version(name, str(version))
    metrics = client.get_run(model_version.run_id).data.metrics if model_version.run_id else {}
    values = {key: (float(metrics[key]) if key in metrics else None) for key in FIGURES}
    return VersionFigures(version=int(version), **values)


def alias_version(client: MlflowClient, name: str, alias: str) -> int | None:
    """The version an alias points at, or None when the alias is not set."""
    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _client(params: Params) -> MlflowClient:
    return MlflowClient(tracking_uri=required_tracking_uri(params, "gate"))


def _record(client: MlflowClient, name: str, version: int, alias: str, decision: Decision) -> None:
    """Move `alias` to the version and tag it with the outcome, so the registry UI says why."""
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), STATUS_TAG, alias)
    client.set_model_version_tag(name, str(version), REASON_TAG, decision.reason[:4000])
    client.set_model_version_tag(name, str(version), "gate.checked_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def gate_version(params: Params, version: int) -> GateResult:
    """Promote `version` of evaluate.registered_model to champion if it passes, else mark it candidate."""
    gate = params.gate
    name = params.evaluate.registered_model
    client = _client(params)
    try:
        new = version_figures(client, name, version)
    except MlflowException as exc:
        raise NativelmError(f"gate: model {name!r} version {version} not found in the registry "
                            f"({str(exc).splitlines()[0]})") from None
    champion_no = alias_version(client, name, gate.champion_alias)
    champion = version_figures(client, name, champion_no) if champion_no is not None else None
    limits = ParityLimits(params.export.min_top1_agreement, params.export.max_ppl_rel_diff)
    decision = decide(new, champion, gate, limits)
    alias = gate.champion_alias if decision.promote else gate.candidate_alias
    _record(client, name, version, alias, decision)
    return GateResult(model=name, version=int(version), promoted=decision.promote,
                      changed=decision.promote and champion_no != int(version), reason=decision.reason,
                      alias=alias, previous_champion=champion_no)
