"""Every model family through the real pipeline (`dvc repro`: prepare, train, export, evaluate) at a
tiny size, and its release rolled out to a real sshd board that health-checks it before serving it.

One project, the family switched between runs: `prepare` runs once, the other stages again for each
family. The export variant is the default, `native`: each family's the exporter picks by itself
(the ternary ones on nativelm's operators, phi3 at full precision).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from nativelm.fleet.release import load_release
from nativelm.fleet.rollout import render_rollout, rollout
from nativelm.model.trained import load_trained_model
from tests.conftest import BIN, make_project, run_checked
from tests.integration.conftest import SimFleet, running_sim_fleet
from tests.integration.test_fleet_deploy import BENCH, serving

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# family -> (the variant native resolves to, what the trained model must be: ffn, quantize, ffn_act, layer scaling on)
FAMILIES = {
    "smallthinker": ("ternary-ops", ("moe", True, "reglu", False)),
    "bitnet": ("ternary-ops", ("dense", True, "swiglu", False)),
    "openelm": ("ternary-ops", ("dense", True, "swiglu", True)),
    "phi3": ("fp32", ("dense", False, "swiglu", False)),
}


@pytest.fixture(scope="module")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    """One provisioned simulated board of this module's own (the session's fleet is left alone)."""
    with running_sim_fleet(tmp_path_factory.mktemp("family-fleet"), boards=1, canary=1) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # window null: each family's own attention (the tiny test model writes a window of 16)
    return make_project(tmp_path_factory.mktemp("families") / "proj", {"tracking.uri": "off", "model.window": None})


def _set_family(project: Path, family: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"]["family"] = family
    assert params["export"]["variant"] == "native"  # the default, left as it is
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_trains_exports_and_serves_on_a_board(family: str, project: Path, board: SimFleet) -> None:
    variant, knobs = FAMILIES[family]
    _set_family(project, family)
    repro = run_checked([str(BIN / "dvc"), "repro"], project)
    for stage in ("train", "export", "evaluate"):
        assert f"Running stage '{stage}'" in repro.stdout, repro.stdout

    model, _ = load_trained_model(project / "models/model.pt")
    p = model.params
    assert (p.family, p.ffn, p.quantize, p.ffn_act, p.scaling is not None) == (family, *knobs)
    assert p.window == (64 if family == "smallthinker" else 0)  # the family's attention, not the test's window
    if family == "openelm":  # d_model 64, 4 heads, 2 kv heads, 2 layers: alpha 0.5 -> 1, beta 0.5 -> 4
        assert [b.attn.n_heads for b in model.blocks] == [2, 4]
        assert [b.ffn.hidden for b in model.blocks] == [128, 256]
    manifest = json.loads((project / "models/onnx/manifest.json").read_text())
    assert (manifest["variant_requested"], manifest["variant"]) == ("native", variant) and manifest["parity"]["passed"]
    assert json.loads((project / "metrics/evaluate.json").read_text())["ppl_onnx"] > 0

    fleet = board.params.fleet.model_copy(update=BENCH)
    release = load_release(project / "models/release")
    result = rollout(board.inventory, board.inventory.boards, release, fleet, Path(board.params.stack.state_dir))
    assert result.ok, "\n".join(render_rollout(result))
    assert [r.outcome for r in result.boards] == ["updated"]  # health-checked on the board, then switched
    ops = result.boards[0].extra["ops"]  # the provisioned board has the operator library
    assert ops.startswith("nativelm:") if variant == "ternary-ops" else ops == "contrib", ops
    assert serving(board.inventory, fleet) == {"board-1": release.name}
