"""The simulated ARM64 board's userland builder (nativelm.fleet.sim_arm64) without the network: missing
tools, the cache, a failed download, and the wrapper's command line (run against a stand-in qemu that
prints its arguments). tests/integration/test_board_arm64.py builds and runs the real one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from nativelm.errors import NativelmError
from nativelm.fleet import sim_arm64
from nativelm.fleet.sim import SimBoard, render_sim, sim_up
from nativelm.params.fleet import FleetParams, SimParams
from nativelm.params.root import Params
from nativelm.stack.process import ProcState


def fake_qemu(folder: Path) -> Path:
    """A `qemu-aarch64` that prints its arguments as JSON, first in a PATH that also has the real tools."""
    folder.mkdir(parents=True, exist_ok=True)
    qemu = folder / "qemu-aarch64"
    qemu.write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    qemu.chmod(0o755)
    return qemu


def test_missing_qemu_is_one_line_naming_the_package_and_nothing_is_built(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(NativelmError) as caught:
        sim_arm64.ensure_rootfs(tmp_path / "rootfs")
    assert "qemu-aarch64 (qemu-user)" in str(caught.value) and "infra/setup.sh dev" in str(caught.value)
    assert "\n" not in str(caught.value) and not (tmp_path / "rootfs").exists()


def test_a_built_rootfs_is_kept_and_a_failed_download_leaves_it_as_it_was(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{fake_qemu(tmp_path / 'bin').parent}:{os.environ['PATH']}")
    rootfs = tmp_path / "rootfs"
    (rootfs / "usr" / "bin").mkdir(parents=True)
    (rootfs / sim_arm64.STAMP).write_text(sim_arm64.rootfs_stamp(rootfs))

    def offline(work: Path) -> list[Path]:
        raise sim_arm64.PackagesUnavailable("apt-get update for arm64 failed: E: no network")

    monkeypatch.setattr(sim_arm64, "download_packages", offline)
    assert sim_arm64.ensure_rootfs(rootfs) == rootfs / sim_arm64.WRAPPER  # cached: apt is not asked
    moved = sim_arm64.rootfs_stamp(tmp_path / "elsewhere")  # the wrapper would name another folder
    (rootfs / sim_arm64.STAMP).write_text(moved)
    with pytest.raises(sim_arm64.PackagesUnavailable, match="no network"):
        sim_arm64.ensure_rootfs(rootfs)
    assert (rootfs / sim_arm64.STAMP).read_text() == moved
    assert sorted(p.name for p in tmp_path.iterdir()) == [".rootfs.lock", "bin", "rootfs"]


def test_the_wrapper_runs_the_arm64_python_under_qemu_with_its_own_path_as_argv0(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    qemu = fake_qemu(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{qemu.parent}:{os.environ['PATH']}")
    rootfs = tmp_path / "root fs"  # a space: every path in the script is quoted
    sim_arm64.write_wrapper(rootfs, rootfs)
    wrapper = sim_arm64.wrapper_path(rootfs)
    link = tmp_path / "venv-python"
    link.symlink_to(wrapper)  # as `python -m venv` links venv/bin/python to sys.executable
    for python in (wrapper, link):
        done = subprocess.run([str(python), "-c", "print('a b')", "--"], capture_output=True, text=True, check=True)
        assert json.loads(done.stdout) == ["-L", str(rootfs), "-0", str(python), str(rootfs / "usr/bin/python3.11"),
                                           "-c", "print('a b')", "--"]


def test_more_arm64_boards_than_boards_are_refused() -> None:
    with pytest.raises(ValueError, match=r"arm64 \(2\) is more than boards \(1\)"):
        SimParams(boards=1, canary=0, arm64=2)
    with pytest.raises(NativelmError, match=r"--arm64 must be between 0 and the number of boards \(2\), got 3"):
        sim_up(Params(fleet=FleetParams(sim=SimParams(boards=2))), arm64=3)


def test_sim_lines_name_the_emulated_boards_only(tmp_path: Path) -> None:
    boards = [SimBoard(name, 2220 + i, tmp_path, ProcState.RUNNING, 100 + i, tmp_path / "log", "started",
                       emulated=(i == 1)) for i, name in enumerate(["board-1", "board-2"])]
    assert render_sim(boards) == ["board-1    127.0.0.1:2220   started (pid 100)",
                                  "board-2    127.0.0.1:2221   started (pid 101) [ARM64: python under qemu-user]"]
