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


def _dvc_env(env: dict[str, str] | None) -> dict[str, str]:
    full_env = {**os.environ, **(env or {})}
    # the stage commands (`nativelm ...`) must resolve to this environment even when it is not activated
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
    return full_env


def _dvc(args: list[str], project_dir: Path, env: dict[str, str] | None, echo: TextIO | None) -> str:
    """Run `dvc ARGS`; on failure raise NativelmError with the tail of DVC's output."""
    code, output = _run_streaming([dvc_executable(), *args], project_dir, _dvc_env(env), echo)
    if code != 0:
        tail = " | ".join(line for line in output.strip().splitlines()[-3:] if line.strip())
        raise NativelmError(f"dvc {' '.join(args)} failed in {project_dir}: {tail}")
    return output


def repro(target: str, project_dir: Path, env: dict[str, str] | None = None,
          echo: TextIO | None = sys.stderr) -> ReproResult:
    """`dvc repro TARGET` in `project_dir`, showing its progress on `echo`."""
    output = _dvc(["repro", target], project_dir, env, echo)
    return ReproResult(target, tuple(_RAN.findall(output)), output)


def _git_identity_env(project_dir: Path) -> dict[str, str]:
    """A committer for DVC's experiment commits on machines with no git identity configured."""
    found = subprocess.run(["git", "config", "user.email"], cwd=project_dir, capture_output=True, text=True,
                           check=False).stdout.strip()
    if found:
        return {}
    return {"GIT_AUTHOR_NAME": "nativelm", "GIT_AUTHOR_EMAIL": "nativelm@localhost",
            "GIT_COMMITTER_NAME": "nativelm", "GIT_COMMITTER_EMAIL": "nativelm@localhost"}


def exp_save(name: str, project_dir: Path, echo: TextIO | None = None) -> str:
    """`dvc exp save -n NAME`: record the workspace (params, dvc.lock, outputs) as a DVC experiment.

    Returns the experiment's commit, from which `dvc exp apply NAME && dvc repro` rebuilds the run.
    """
    _dvc(["exp", "save", "--force", "-n", name], project_dir, _git_identity_env(project_dir), echo)
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
                          cwd=project_dir, capture_output=True, text=True, check=False).stdout
    for line in refs.splitlines():
        sha, ref = line.split(" ", 1)
        if ref.rsplit("/", 1)[-1] == name:
            return sha
    raise NativelmError(f"dvc exp save -n {name}: no experiment ref named {name} afterwards in {project_dir}")


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
