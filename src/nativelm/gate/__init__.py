"""The gate: a registered version becomes the `champion` only when it is at least as good as the current one."""

from nativelm.lazy import lazy_getattr

__getattr__ = lazy_getattr(__name__, {
    "GateParams": "nativelm.gate.params",
    "Decision": "nativelm.gate.decide",
    "VersionFigures": "nativelm.gate.decide",
    "decide": "nativelm.gate.decide",
    "GateResult": "nativelm.gate.promote",
    "gate_version": "nativelm.gate.promote",
})
