"""Run the pipeline as DVC experiments, and read what they recorded.

A run without overrides is `dvc exp run` in the workspace (its outputs land where `nativelm deploy`
and `generate` look); a run with overrides is `dvc exp run --temp --set-param ...`: DVC copies the
project into a temporary workspace, so params.yaml in the workspace is never modified and runs
with different overrides can go at the same time (docs/architecture.md, "Runs from the dashboard").
Either way an unchanged stage is skipped (or restored from DVC's run cache) and the run is saved
as a named experiment: a git commit under `refs/exps` holding its params, dvc.lock and metrics.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import dvc.api
import yaml
from dvc.exceptions import PathMissingError

from nativelm.errors import NativelmError

# how `dvc exp run` announces each stage: run, or skipped because nothing it depends on changed
_STAGE_LINE = re.compile(r"Running stage '(?P<ran>[^']+)'|Stage '(?P<skipped>[^']+)' (?:didn't change|is cached)")


@dataclass(frozen=True)
class ExperimentRun:
    """One `dvc exp run`: its name and commit, what each stage did and how long it took."""

    name: str
    rev: str
    stages: dict[str, str]  # stage -> "ran" | "skipped", in the order DVC went through them
    seconds: dict[str, float]  # stage -> wall time through DVC, from its line to the next one


def dvc_executable() -> str:
    """The `dvc` of the running interpreter's environment (a bare `dvc` may be another install)."""
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


def _run_streaming(cmd: list[str], cwd: Path, env: dict[str, str],
                   echo: TextIO | None) -> tuple[int, str, list[tuple[float, str]]]:
    """Run a command, echoing its combined output as it comes (progress bars too).

    Returns the exit code, the output, and each output line with the monotonic time it arrived.
    """
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    chunks: list[bytes] = []
    timed: list[tuple[float, str]] = []
    pending = ""
    while chunk := proc.stdout.read1(65536):
        chunks.append(chunk)
        text = chunk.decode("utf-8", "replace")
        if echo is not None:
            echo.write(text)
            echo.flush()
        *lines, pending = (pending + text).split("\n")
        now = time.monotonic()
        timed += [(now, line) for line in lines]
    timed.append((time.monotonic(), pending))
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace"), timed


def _dvc_env(env: dict[str, str] | None) -> dict[str, str]:
    full_env = {**os.environ, **(env or {})}
    # the stage commands (`nativelm ...`) must resolve to this environment even when it is not activated
    full_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), full_env.get("PATH", "")])
    return full_env


def _dvc(args: list[str], project_dir: Path, env: dict[str, str] | None,
         echo: TextIO | None) -> tuple[str, list[tuple[float, str]]]:
    """Run `dvc ARGS`, waiting for DVC's lock if another run holds it; NativelmError with DVC's last lines."""
    code, output, timed = _run_streaming([dvc_executable(), "--wait-for-lock", *args], project_dir,
                                         _dvc_env(env), echo)
    if code != 0:
        tail = " | ".join(line for line in output.strip().splitlines()[-3:] if line.strip())
        raise NativelmError(f"dvc {' '.join(args)} failed in {project_dir}: {tail}")
    return output, timed


def _git_identity_env(project_dir: Path) -> dict[str, str]:
    """A committer for DVC's experiment commits on machines with no git identity configured."""
    found = subprocess.run(["git", "config", "user.email"], cwd=project_dir, capture_output=True, text=True,
                           check=False).stdout.strip()
    if found:
        return {}
    return {"GIT_AUTHOR_NAME": "nativelm", "GIT_AUTHOR_EMAIL": "nativelm@localhost",
            "GIT_COMMITTER_NAME": "nativelm", "GIT_COMMITTER_EMAIL": "nativelm@localhost"}


def stage_outcomes(timed: list[tuple[float, str]], ended: float) -> tuple[dict[str, str], dict[str, float]]:
    """What DVC did with each stage, and how long each took (from its announcement to the next one)."""
    marks: list[tuple[float, str, str]] = []
    for at, line in timed:
        found = _STAGE_LINE.search(line)
        if found:
            marks.append((at, found["ran"] or found["skipped"], "ran" if found["ran"] else "skipped"))
    ends = [at for at, _, _ in marks[1:]] + [ended]
    stages = {stage: outcome for _, stage, outcome in marks}
    seconds = {stage: end - at for (at, stage, _), end in zip(marks, ends, strict=True)}
    return stages, seconds


def exp_run(name: str, set_params: list[str], project_dir: Path, env: dict[str, str] | None = None,
            echo: TextIO | None = sys.stderr) -> ExperimentRun:
    """`dvc exp run -n NAME` of the whole pipeline; in a temporary workspace when `set_params` is not empty.

    `set_params` are ready `--set-param` values (`overrides.set_param_args`). The experiment's commit
    is what `dvc exp apply NAME && dvc repro` rebuilds the run from.
    """
    temp = ["--temp", *(arg for value in set_params for arg in ("--set-param", value))] if set_params else []
    _, timed = _dvc(["exp", "run", "-n", name, *temp], project_dir,
                         {**_git_identity_env(project_dir), **(env or {})}, echo)
    stages, seconds = stage_outcomes(timed, time.monotonic())
    return ExperimentRun(name, experiment_rev(name, project_dir), stages, seconds)


def experiment_rev(name: str, project_dir: Path) -> str:
    """The commit of DVC experiment `name` (its ref under `refs/exps`)."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
                          cwd=project_dir, capture_output=True, text=True, check=False).stdout
    for line in refs.splitlines():
        sha, ref = line.split(" ", 1)
        if ref.rsplit("/", 1)[-1] == name:
            return sha
    raise NativelmError(f"dvc exp run -n {name}: no experiment ref named {name} afterwards in {project_dir}")


def lock_out_hash(project_dir: Path, stage: str, out_path: str, rev: str | None = None) -> str | None:
    """The md5 DVC recorded in dvc.lock for one output of a stage (the data hash of a run), at `rev`.

    `rev` None reads the workspace's dvc.lock (what a stage sees while DVC runs it).
    """
    try:
        lock = yaml.safe_load(dvc.api.read("dvc.lock", repo=str(project_dir), rev=rev)) or {}
    except (FileNotFoundError, PathMissingError):
        return None
    for out in lock.get("stages", {}).get(stage, {}).get("outs", []):
        if out.get("path") == out_path:
            return out.get("md5")
    return None


def read_metrics(project_dir: Path, path: str, rev: str) -> dict[str, float]:
    """Numeric values of one DVC metrics file at `rev`, flattened with '/' (empty if it has none).

    Read from git: a metrics file is a git-tracked (cache: false) output, and DVC 3.67's own reader
    cannot find one at an experiment commit whose baseline never held it.
    """
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=project_dir, capture_output=True, check=False)
    if shown.returncode != 0:
        return {}
    flat: dict[str, float] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}/")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            flat[prefix.rstrip("/")] = float(node)

    walk(json.loads(shown.stdout), "")
    return flat


def params_at(project_dir: Path, rev: str) -> dict:
    """The params.yaml an experiment ran with (what its stages read)."""
    return dvc.api.params_show(repo=str(project_dir), rev=rev)
