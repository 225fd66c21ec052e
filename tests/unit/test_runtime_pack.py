"""The runtime zipapp: one reproducible file holding only the runtime, runnable with `python FILE.pyz`."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from nativelm.runtime.pack import build_zipapp, main
from tests.unit.runtime_model import Export


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def test_zipapp_contents_and_reproducibility(tmp_path: Path) -> None:
    first = build_zipapp(tmp_path / "a" / "nativelm-runtime.pyz")
    second = build_zipapp(tmp_path / "b" / "nativelm-runtime.pyz")
    assert first.read_bytes() == second.read_bytes()  # same sources, same bytes: rollouts skip it
    assert first.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    assert os.access(first, os.X_OK)
    with zipfile.ZipFile(first) as archive:
        names = set(archive.namelist())
        stub = archive.read("nativelm/__init__.py").decode()
    assert {"__main__.py", "nativelm/__init__.py", "nativelm/runtime/__init__.py", "nativelm/runtime/__main__.py",
            "nativelm/runtime/session.py", "nativelm/runtime/generate.py", "nativelm/runtime/bench.py"} <= names
    assert all(name.startswith("nativelm/runtime/") or name in ("__main__.py", "nativelm/__init__.py",
                                                                 "nativelm/jsonfile.py")
               for name in names)
    assert "nativelm/jsonfile.py" in names  # the bounded manifest reader the runtime imports
    assert "nativelm/runtime/pack.py" not in names and not any("__pycache__" in n for n in names)
    assert "import" not in stub  # the board's `nativelm` package is only a version string
    assert sorted(os.listdir(tmp_path / "a")) == ["nativelm-runtime.pyz"]  # no temp files left


def test_pack_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "rt.pyz")]) == 0
    assert str(tmp_path / "rt.pyz") in capsys.readouterr().out


def test_zipapp_runs_its_own_copy(export: Export, tmp_path: Path) -> None:
    pyz = build_zipapp(tmp_path / "nativelm-runtime.pyz")
    where = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import nativelm.runtime.session as s; print(s.__file__)", str(pyz)],
                           capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=60)
    assert where.stdout.strip().startswith(str(pyz)), where
    proc = subprocess.run([sys.executable, str(pyz), "health", "--model", str(export.folder), "--threads", "1"],
                          capture_output=True, text=True, cwd=tmp_path, env=clean_env(), timeout=120)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr
