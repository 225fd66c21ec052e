"""A simulated ARM64 board (docs/fleet.md#an-arm64-board): Debian's arm64 Python under qemu-user behind
the same real x86-64 sshd. Provisioning reads `aarch64` from the board, fetches aarch64 wheels and installs
the cross-compiled ARM64 operator library; a `ternary-ops` release then deploys, passes its health check
(the golden continuation computed on this x86-64 controller) and benchmarks there on `nativelm:neon-dot`,
and in the board's own ONNX Runtime every ARM64 kernel gives the portable kernel's logits bit for bit.

Skipped only when qemu-user or the cross compiler is missing, or Debian's arm64 packages cannot be
downloaded (infra/setup.sh dev installs the tools; CI has apt). Speed under emulation means nothing here.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from nativelm.export.stage import run_export
from nativelm.fleet.board_job import health_report
from nativelm.fleet.onboard_bench import bench_fleet
from nativelm.fleet.provision import provision, render_provision
from nativelm.fleet.rollout import render_rollout, rollout
from nativelm.fleet.rollout_log import RolloutResult
from nativelm.fleet.sim import render_sim, sim_status
from nativelm.fleet.sim_arm64 import PackagesUnavailable, ensure_rootfs, missing_tools
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.status import fleet_status
from nativelm.runtime import custom_ops
from nativelm.runtime.session import load_model
from tests.integration.conftest import SimFleet, running_sim_fleet
from tests.integration.test_board_ops import release_of, remote_library
from tests.integration.test_fleet_deploy import BENCH
from tests.unit.test_export_custom import stage_params
from tests.unit.test_export_graph import model_file, prepared, trained  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "anna sees the old"
KERNELS = ("neon-dot", "neon", "portable")
EM_AARCH64 = 183  # ELF e_machine of ARM64
# run on the board by the release's runtime: the prompt's logits with one kernel, exactly (JSON floats round-trip)
LOGITS = ("import json, sys; import numpy as np; sys.path.insert(0, sys.argv[1] + '/nativelm-runtime.pyz'); "
          "from nativelm.runtime.session import load_model; m = load_model(sys.argv[1], threads=1); "
          "logits, _ = m.forward(np.array([m.encode(sys.argv[2])])); "
          "print(json.dumps({'ops': m.ops, 'logits': logits[0].astype(float).tolist()}))")


@pytest.fixture(scope="session")
def arm64_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Debian's arm64 userland and the ARM64 operator library, built once per session."""
    missing = missing_tools() + ([] if shutil.which("aarch64-linux-gnu-gcc") else ["gcc-aarch64-linux-gnu"])
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (bash infra/setup.sh dev installs them)")
    subprocess.run(["bash", str(ROOT / "native" / "build.sh"), "aarch64"], check=True, capture_output=True)
    rootfs = tmp_path_factory.mktemp("arm64") / "rootfs"
    try:
        ensure_rootfs(rootfs)
    except PackagesUnavailable as exc:
        pytest.skip(f"Debian's arm64 packages cannot be obtained here: {exc}")
    return rootfs


@pytest.fixture(scope="module")
def board(arm64_rootfs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    """One provisioned simulated ARM64 board."""
    with running_sim_fleet(tmp_path_factory.mktemp("arm64-fleet"), boards=1, canary=1,
                           sim={"arm64": 1, "arm64_rootfs": str(arm64_rootfs)}, **BENCH) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def export_dir(prepared: Path, model_file: Path, trained: torch.nn.Module,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("arm64-export")
    run_export(model_file, prepared, stage_params(folder))
    return folder / "onnx"


@pytest.fixture(scope="module")
def deployed(board: SimFleet, export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RolloutResult:
    """A `ternary-ops` release rolled out to the ARM64 board."""
    release = release_of(export_dir, tmp_path_factory.mktemp("arm64-release"), "arm64")
    return rollout(board.inventory, board.inventory.boards, release, board.params.fleet,
                   Path(board.params.stack.state_dir))


def test_provisioning_reads_aarch64_and_installs_aarch64_wheels_and_library(board: SimFleet) -> None:
    [entry] = board.inventory.boards
    [line] = render_sim(sim_status(board.params))
    assert line.startswith("board-1") and line.endswith(" [ARM64: python under qemu-user]"), line
    assert entry.labels == {"kind": "simulated", "arch": "aarch64"} and entry.python.endswith("/usr/bin/python3-qemu")
    state = Path(board.params.stack.state_dir)
    [again] = provision(board.inventory, board.inventory.boards, board.params.fleet, state)
    assert again.ok, render_provision([again])
    assert (again.python, again.arch, again.actions, again.ops) == (
        "3.11.2", "aarch64", ("up to date",), "nativelm library up to date (aarch64)")
    [wheelhouse] = [folder for folder in (state / "wheelhouse").iterdir() if folder.is_dir()]
    assert wheelhouse.name.startswith("cp311-aarch64-glibc")
    assert [w.name for w in wheelhouse.glob("onnxruntime-*.whl")][0].endswith("_aarch64.whl")
    build = custom_ops.source_build("aarch64")
    assert build is not None and build.read_bytes()[18] == EM_AARCH64
    with BoardSession(board.inventory.boards[0], board.inventory, board.params.fleet) as session:
        assert session.read_bytes(remote_library(session)) == build.read_bytes()
        # the sshd and the shell are the host's; the board's python and its venv's are emulated ARM64
        assert session.run(["uname", "-m"]).stdout.strip() == platform.machine() != "aarch64"
        for python in (session.board.python, session.runtime_python):
            probe = session.run([python, "-c", "import platform, sys; print(platform.machine(), sys.prefix)"])
            machine, prefix = probe.stdout.split()
            assert machine == "aarch64"
        assert prefix == session.path("venv")


def test_a_release_deploys_checks_and_benchmarks_on_the_neon_kernel(board: SimFleet, deployed: RolloutResult) -> None:
    fleet = board.params.fleet
    assert deployed.ok, "\n".join(render_rollout(deployed))
    assert deployed.boards[0].extra["ops"] == "nativelm:neon-dot"  # qemu's default CPU has the dot product
    with BoardSession(board.inventory.boards[0], board.inventory, fleet) as session:
        failure, report = health_report(session, session.path("current"))
    assert failure is None and report["ops"] == "nativelm:neon-dot" and report["prompts"] >= 1
    [status] = fleet_status(board.inventory, board.inventory.boards, fleet)
    assert (status.state, status.ops) == ("ok", "nativelm:neon-dot")
    [row] = bench_fleet(board.inventory, board.inventory.boards, fleet)
    assert row.error is None and row.ops == "nativelm:neon-dot" and row.value("decode_tokens_per_s") > 0


def test_every_arm64_kernel_gives_the_portable_logits_bit_for_bit_in_the_boards_ort(
        board: SimFleet, export_dir: Path, deployed: RolloutResult) -> None:
    assert deployed.ok, "\n".join(render_rollout(deployed))
    runs = {}
    with BoardSession(board.inventory.boards[0], board.inventory, board.params.fleet) as session:
        for kernel in KERNELS:
            done = session.run(["env", f"{custom_ops.ENV_KERNEL}={kernel}", session.runtime_python, "-c", LOGITS,
                                session.path("current"), PROMPT])
            runs[kernel] = json.loads(done.stdout)
    assert [runs[k]["ops"] for k in KERNELS] == [f"nativelm:{k}" for k in KERNELS]
    portable = np.array(runs["portable"]["logits"], dtype=np.float32)
    for kernel in KERNELS[:-1]:
        assert np.array_equal(np.array(runs[kernel]["logits"], dtype=np.float32), portable), kernel
    # against this x86-64 controller: the same model, other ORT kernels around ours (close, not equal)
    here = load_model(export_dir, threads=1)
    logits, _ = here.forward(np.array([here.encode(PROMPT)]))
    assert portable.shape == logits[0].shape
    np.testing.assert_allclose(portable, logits[0], rtol=0, atol=1e-3 * float(np.abs(logits[0]).max()))
    assert (portable.argmax(-1) == logits[0].argmax(-1)).all()
