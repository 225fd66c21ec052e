"""Run DVC stages from Python: `dvc repro` skips a stage whose deps and params are unchanged."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from nativelm.errors import NativelmError

_RAN = re.compile(r"Running stage '([^']+)'")


@dataclass(frozen=True)
class ReproResult:
    """Which stages `dvc repro` actually ran (the others were up to date and skipped)."""

    target: str
    ran: tuple[str, ...]
    output: str

    @property
    def skipped(self) -> bool:
        return self.target not in self.ran


def dvc_executable() -> str:
    """The `dvc` of the running interpreter's environment (a bare `dvc` may be another install)."""
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


def _run_streaming(cmd: list[str], cwd: Path, env: dict[str, str], echo: TextIO | None) -> tuple[int, str]:
    """Run a command, echoing its combined output as it comes (progress bars too), and return it."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    while chunk := proc.stdout.read1(65536):
        chunks.append(chunk)
        if echo is not None:
            echo.write(chunk.decode("utf-8", "replace"))
            echo.flush()
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def repro(target: str, project_dir: Path, env: dict[str, str] | None = None,
          echo: TextIO | None = sys.stderr) -> ReproResult:
    """`dvc repro TARGET` in `project_dir`, showing its progress on `echo`.

    Raises NativelmError with the tail of DVC's output on failure.
    """
    full_env = {**os.environ, **(env or {})}
    # the stage commands (`nativelm ...`) must resolve to this environment even when it is not activated
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
    code, output = _run_streaming([dvc_executable(), "repro", target], project_dir, full_env, echo)
    if code != 0:
        tail = " | ".join(line for line in output.strip().splitlines()[-3:] if line.strip())
        raise NativelmError(f"dvc repro {target} failed in {project_dir}: {tail}")
    return ReproResult(target, tuple(_RAN.findall(output)), output)


def lock_out_hash(project_dir: Path, stage: str, out_path: str) -> str | None:
    """The md5 DVC recorded in dvc.lock for one output of a stage (the data hash of a run)."""
    lock = project_dir / "dvc.lock"
    if not lock.exists():
        return None
    import yaml

    data = yaml.safe_load(lock.read_text()) or {}
    for out in data.get("stages", {}).get(stage, {}).get("outs", []):
        if out.get("path") == out_path:
            return out.get("md5")
    return None


def read_metrics(project_dir: Path, path: str) -> dict[str, float]:
    """Numeric values of a DVC metrics JSON file, flattened with '/' (empty if absent)."""
    file = project_dir / path
    if not file.exists():
        return {}
    flat: dict[str, float] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}/")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[prefix.rstrip("/")] = float(node)

    walk(json.loads(file.read_text()), "")
    return flat
