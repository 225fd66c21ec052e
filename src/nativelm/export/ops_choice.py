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
from nativelm.export.ptq import ExportPlan
from nativelm.export.variants import Ternary, TernaryOps
from nativelm.runtime.custom_ops import OpsLibrary, find_ops_library
from nativelm.runtime.errors import RuntimeFailure

VARIANT = "ternary-ops"  # the graph on nativelm's operators (export/custom_graph.py)
FALLBACK_VARIANT = "ternary"  # the contrib-operator graph beside it, and where `native` falls back


def controller_library() -> OpsLibrary:
    """nativelm's operator library on this machine; its absence is one clear line (the graph could not be checked)."""
    try:
        library = find_ops_library()
    except RuntimeFailure as exc:
        raise NativelmError(f"export {VARIANT}: {exc}") from None
    if library is None:
        raise NativelmError(f"export {VARIANT}: nativelm's operator library is not built on this machine (the set-up "
                            "builds it from native/), so the custom-operator graph cannot be checked against PyTorch; "
                            f"build it, or export variant {FALLBACK_VARIANT}")
    return library


def custom_ops_refusal(plan: ExportPlan) -> str | None:
    """Why the custom-operator graph cannot be this ternary plan's export (the model, or no library here);
    None: it can."""
    refusal = TernaryOps(plan.params).custom_refusal(plan.model)
    if refusal is not None:
        return refusal
    try:
        controller_library()
    except NativelmError as exc:
        head = f"export {VARIANT}: "  # the reason names the variant already
        return str(exc).removeprefix(head)
    return None


def with_custom_ops(plan: ExportPlan) -> ExportPlan:
    """`plan` on ``ternary-ops`` when ``native`` resolved it to ``ternary`` and the custom graph fits;
    else `plan`, its reason saying why it stays on the contrib graph."""
    if plan.requested != "native" or plan.params.variant != FALLBACK_VARIANT:
        return plan
    try:
        Ternary(plan.params).refuse(plan.model)
    except ParamsError:
        return plan  # no ternary graph either: check_model refuses it in one line
    refusal = custom_ops_refusal(plan)
    if refusal is not None:
        return replace(plan, reason=f"{plan.reason}; the contrib-operator graph, since {refusal}")
    params = plan.params.model_copy(update={"variant": VARIANT})
    return replace(plan, params=params, reason=f"{plan.reason}; nativelm's operators represent it exactly and "
                                                "their library is on this machine")
