"""nativelm's operator library on a real sshd board: `fleet provision` installs the controller's build
for the board's architecture (bytes compared: a second run sends nothing), the default export's
release (`export.variant: native` resolves a ternary model to `ternary-ops`) then runs its
custom-operator graph there (health --json, the rollout's record and `fleet status` say
nativelm:<kernel>); with the library gone the same board runs the fallback graph and a deploy still
succeeds (docs/kernels.md)."""

from __future__ import annotations

import platform
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nativelm.export.stage import run_export
from nativelm.fleet.board_job import health_report
from nativelm.fleet.onboard_bench import bench_fleet, render_bench
from nativelm.fleet.provision import provision, render_provision
from nativelm.fleet.release import LocalRelease, load_release
from nativelm.fleet.rollout import render_rollout, rollout
from nativelm.fleet.ssh import BoardSession
from nativelm.fleet.status import fleet_status
from nativelm.params.export import ExportParams
from nativelm.runtime import custom_ops
from tests.integration.conftest import SimFleet, running_sim_fleet
from tests.integration.test_fleet_deploy import BENCH
from tests.unit.test_export_custom import stage_params
from tests.unit.test_export_graph import model_file, prepared, trained  # noqa: F401
from tests.unit.test_fleet_rollout import build_release

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ARCH = platform.machine()


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    """One provisioned simulated board of this module's own."""
    with running_sim_fleet(tmp_path_factory.mktemp("ops-fleet"), boards=1, canary=1) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def export_dir(prepared: Path, model_file: Path, trained: torch.nn.Module,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ops-export")
    manifest = run_export(model_file, prepared, stage_params(folder, variant=ExportParams().variant)).manifest
    assert (manifest["variant_requested"], manifest["variant"]) == ("native", "ternary-ops")  # the default release
    return folder / "onnx"


def release_of(export_dir: Path, root: Path, note: str) -> LocalRelease:
    """A release of the default (ternary-ops) export (the note makes each a release of its own name)."""
    return load_release(build_release(root / f"release-{note}", export_dir, note))


def provision_line(fleet: SimFleet) -> str:
    results = provision(fleet.inventory, fleet.inventory.boards, fleet.params.fleet, Path(fleet.params.stack.state_dir))
    lines = render_provision(results)
    assert results[0].ok, lines
    return lines[0]


def remote_library(session: BoardSession) -> str:
    return session.path("venv", "lib", custom_ops.LIBRARY)


def test_provision_installs_the_library_and_the_board_runs_nativelm_ops(board: SimFleet, export_dir: Path,
                                                                        tmp_path: Path) -> None:
    build = custom_ops.source_build(ARCH)
    assert build is not None and build.is_file(), "native/build.sh has not built this machine's library"
    with BoardSession(board.inventory.boards[0], board.inventory, board.params.fleet) as session:
        assert session.read_bytes(remote_library(session)) == build.read_bytes()  # the fixture's provision
        session.run(["rm", "-f", remote_library(session)])
    assert provision_line(board).endswith(f"; ops: nativelm library installed ({ARCH})")
    assert provision_line(board).endswith(f"; ops: nativelm library up to date ({ARCH})")  # nothing sent again

    fleet = board.params.fleet.model_copy(update=BENCH)
    state = Path(board.params.stack.state_dir)
    first = release_of(export_dir, tmp_path, "ops")
    result = rollout(board.inventory, board.inventory.boards, first, fleet, state)
    assert result.ok, "\n".join(render_rollout(result))
    kernel = custom_ops.kernel_name(build)
    assert result.boards[0].extra["ops"] == f"nativelm:{kernel}"
    with BoardSession(board.inventory.boards[0], board.inventory, fleet) as session:
        failure, report = health_report(session, session.path("current"))
        assert failure is None and report["ops"] == f"nativelm:{kernel}" and report["ops_reason"] is None
        [status] = fleet_status(board.inventory, board.inventory.boards, fleet)
        assert (status.state, status.ops) == ("ok", f"nativelm:{kernel}")
        [row] = bench_fleet(board.inventory, board.inventory.boards, fleet)
        assert row.error is None and row.ops == f"nativelm:{kernel}" and row.value("decode_tokens_per_s") > 0
        assert render_bench([row])[1].split()[3] == f"nativelm:{kernel}"

        # the library removed from the board: the same release falls back, and a deploy still succeeds
        session.run(["rm", "-f", remote_library(session)])
        failure, report = health_report(session, session.path("current"))
        assert failure is None and report["ops"] == "fallback" and "not available" in report["ops_reason"]
    second = release_of(export_dir, tmp_path, "ops-fallback")
    result = rollout(board.inventory, board.inventory.boards, second, fleet, state)
    assert result.ok, "\n".join(render_rollout(result))
    assert ([r.outcome for r in result.boards], result.boards[0].extra["ops"]) == (["updated"], "fallback")
    assert provision_line(board).endswith(f"; ops: nativelm library installed ({ARCH})")  # put back


def test_a_board_without_a_build_for_its_architecture_keeps_the_fallback(
        board: SimFleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert custom_ops.source_build("riscv64") is None  # an architecture native/build.sh does not build
    monkeypatch.setattr(custom_ops, "__file__", str(tmp_path / "src" / "nativelm" / "runtime" / "custom_ops.py"))
    assert custom_ops.source_build(ARCH) == tmp_path / "native" / "build" / custom_ops.TRIPLES[ARCH] / custom_ops.LIBRARY
    line = provision_line(board)
    target = " aarch64" if ARCH == "aarch64" else ""
    assert line.endswith(f"; ops: fallback graph (no {ARCH} build of {custom_ops.LIBRARY} here: "
                         f"run native/build.sh{target})"), line
