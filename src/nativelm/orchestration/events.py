"""Prefect events the pipeline emits; deployments' triggers (automations) react to them."""

from __future__ import annotations

from prefect.events import emit_event

from nativelm.gate.promote import GateResult


def promotion_resource(model: str, version: int) -> dict[str, str]:
    """The Prefect resource a promotion event is about: one registered model version."""
    return {"prefect.resource.id": f"nativelm.model.{model}.{version}",
            "prefect.resource.name": f"{model} v{version}",
            "nativelm.model": model, "nativelm.version": str(version)}


def emit_promotion(event_name: str, result: GateResult) -> str | None:
    """Announce that `result.version` became the champion; returns the event id (None: no Prefect API)."""
    event = emit_event(event=event_name, resource=promotion_resource(result.model, result.version),
                       payload={"model": result.model, "version": str(result.version),
                                "previous_champion": result.previous_champion, "reason": result.reason})
    return str(event.id) if event is not None else None
