"""dvc.yaml's code deps cover every module a stage really imports, so a code change re-runs the stage.

The modules are derived, not listed by hand: each stage's module is imported in a fresh interpreter
and every `nativelm` module it loaded must lie in one of the stage's `deps` (a file or a folder).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
STAGE_MODULES = {
    "prepare": "nativelm.data.prepare",
    "train": "nativelm.train.stage",
    "export": "nativelm.export.stage",
    "evaluate": "nativelm.evaluate.stage",
}
# where results are logged and the local servers that receive them: they change no stage output
NOT_OUTPUT_SHAPING = ("src/nativelm/tracking/runs.py", "src/nativelm/tracking/registry.py", "src/nativelm/stack/")


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _imported_files(module: str) -> list[str]:
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted({m.__file__ for n, m in list(sys.modules.items()) "
            "if n.split('.')[0] == 'nativelm' and getattr(m, '__file__', None)})))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, check=True).stdout
    return [Path(f).resolve().relative_to(REPO).as_posix() for f in json.loads(out)]


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage: str) -> None:
    deps = [d.rstrip("/") for d in _stages()[stage]["deps"] if d.startswith("src/")]
    missing = [f for f in _imported_files(STAGE_MODULES[stage])
               if not f.startswith(NOT_OUTPUT_SHAPING) and not any(f == d or f.startswith(d + "/") for d in deps)]
    assert not missing, f"dvc.yaml stage {stage} misses deps: {missing}"


def test_every_code_dep_exists() -> None:
    for name, stage in _stages().items():
        for dep in stage["deps"]:
            if dep.startswith("src/"):
                assert (REPO / dep).exists(), f"dvc.yaml stage {name}: dep {dep} does not exist"
