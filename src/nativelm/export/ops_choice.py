"""Whether a ``native`` export runs on nativelm's own operators (docs/kernels.md).

``export.variant: native`` (the default) resolves a ternary model (trained ternary, or ternary by
``export.ptq``) to ``ternary-ops`` when the custom-operator graph represents it exactly and this
machine has the operator library (the export checks that graph against PyTorch on it); otherwise to
``ternary``, the contrib-operator graph, saying why. A named variant is never changed. The choice and
its reason go to the manifest (``variant``, ``variant_reason``) and to one line of the stage's output.
"""

from __future__ import annotations

from dataclasses import replace

from nativelm.errors import NativelmError, ParamsError
from nativelm.export import custom_graph
from nativelm.export.ptq import ExportPlan
from nativelm.export.variants import Ternary, TernaryOps


def custom_ops_refusal(plan: ExportPlan) -> str | None:
    """Why the custom-operator graph cannot be this ternary plan's export (the model, or no library here);
    None: it can."""
    refusal = TernaryOps(plan.params).custom_refusal(plan.model)
    if refusal is not None:
        return refusal
    try:
        custom_graph.controller_library()
    except NativelmError as exc:
        head = f"export {custom_graph.VARIANT}: "  # the reason names the variant already
        return str(exc).removeprefix(head)
    return None


def with_custom_ops(plan: ExportPlan) -> ExportPlan:
    """`plan` on ``ternary-ops`` when ``native`` resolved it to ``ternary`` and the custom graph fits;
    else `plan`, its reason saying why it stays on the contrib graph."""
    if plan.requested != "native" or plan.params.variant != custom_graph.FALLBACK_VARIANT:
        return plan
    try:
        Ternary(plan.params).refuse(plan.model)
    except ParamsError:
        return plan  # no ternary graph either: check_model refuses it in one line
    refusal = custom_ops_refusal(plan)
    if refusal is not None:
        return replace(plan, reason=f"{plan.reason}; the contrib-operator graph, since {refusal}")
    params = plan.params.model_copy(update={"variant": custom_graph.VARIANT})
    return replace(plan, params=params, reason=f"{plan.reason}; nativelm's operators represent it exactly and "
                                                "their library is on this machine")
