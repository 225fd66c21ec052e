"""The ternary-ops export: nativelm's TernaryMatMul / TernaryMoE graph, beside the contrib graph as fallback.

Structure (node counts, attributes, packed initializers, bits per weight) and the numbers each node
stands for: its initializers run through the operators' numpy reference (`runtime.ternary_reference`,
what the C kernels are held to) reproduce the PyTorch layer they were exported from. The tiny MoE
shape of test_export_graph, random weights (the structure does not depend on training).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from nativelm.errors import NativelmError, ParamsError
from nativelm.export.stage import run_export
from nativelm.export import custom_graph, ops_choice, parity, ternary_ops
from nativelm.export.graph import ExportGraph, build_graph
from nativelm.formats.release import RUNTIME_FILE, build_release
from nativelm.formats.ternary_pack import packed_row_bytes, unpack_ternary
from nativelm.model import ModelParams, build_model
from nativelm.params.export import ExportParams
from nativelm.formats import ternary_reference
from nativelm.runtime import benchmark, custom_ops, load_model
from nativelm.runtime.__main__ import main as runtime_main
from nativelm.runtime.errors import IntegrityError
from nativelm.runtime.health import check_health
from nativelm.runtime.custom_ops import OPS_ENV
from nativelm.runtime.session import CONTRIB_OPS, CUSTOM_GRAPH, FALLBACK_GRAPH
from tests.unit.runtime_model import update_manifest
from tests.unit.test_export_graph import TINY, attrs, model_file, nodes_by_op, prepared, trained  # noqa: F401

VOCAB = 320


def tiny(**overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(ModelParams(**{**TINY, **overrides}), VOCAB).eval()


@pytest.fixture(scope="module")
def moe_model() -> torch.nn.Module:
    return tiny()


@pytest.fixture(scope="module")
def custom(moe_model: torch.nn.Module) -> ExportGraph:
    return build_graph(moe_model, ExportParams(variant="ternary-ops"))


def inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def test_every_bitlinear_is_one_ternary_matmul_and_every_moe_one_ternary_moe(
        moe_model: torch.nn.Module, custom: ExportGraph) -> None:
    onnx.checker.check_model(custom.model)
    by_op = nodes_by_op(custom.model)
    p = moe_model.params
    matmuls = by_op["TernaryMatMul"]
    assert sorted(n.name for n in matmuls) == sorted(f"layers.{i}.attn.{m}_proj" for i in range(p.n_layers)
                                                     for m in "qkvo")
    assert [n.name for n in by_op["TernaryMoE"]] == [f"layers.{i}.moe" for i in range(p.n_layers)]
    assert all(n.domain == ternary_ops.DOMAIN for n in matmuls + by_op["TernaryMoE"])
    assert "QMoE" not in by_op and "RMSNormalization" not in {n.op_type for n in by_op.get("RMSNormalization", [])
                                                              if n.name.endswith("_proj.norm")}
    assert [n.name for n in by_op["MatMulNBits"]] == ["lm_head"]  # tables as the ternary variant
    assert len(by_op["GroupQueryAttention"]) == p.n_layers
    assert (ternary_ops.DOMAIN, ternary_ops.OPSET) in [(o.domain, o.version) for o in custom.model.opset_import]
    assert custom.model.metadata_props[0].value == "ternary-ops"


def test_ternary_matmul_inputs_attributes_and_packed_weights(moe_model: torch.nn.Module,
                                                              custom: ExportGraph) -> None:
    tensors = inits(custom.model)
    for n in nodes_by_op(custom.model)["TernaryMatMul"]:
        layer, _, proj = n.name.split(".")[1:]
        module = getattr(moe_model.blocks[int(layer)].attn, proj)
        codes, scale = module.ternary_weight()
        out_f, in_f = codes.shape
        a = attrs(n)
        assert (a["K"], a["N"], a["act_bits"]) == (in_f, out_f, 8)
        assert a["act_eps"] == pytest.approx(module.eps) and a["norm_eps"] == pytest.approx(module.norm.eps)
        assert len(n.input) == 4  # the BitLinear's RMSNorm gain is the 4th input, no separate norm node
        weight, s, gain = (tensors[i] for i in n.input[1:])
        assert weight.dtype == np.uint8 and weight.shape == (out_f, packed_row_bytes(in_f))
        np.testing.assert_array_equal(unpack_ternary(weight, in_f), codes.numpy())
        assert s.shape == () and s == np.float32(scale)
        np.testing.assert_array_equal(gain, module.norm.weight.detach().numpy())


def test_ternary_layers_take_at_most_1_7_bits_per_weight(custom: ExportGraph) -> None:
    tensors = inits(custom.model)
    weights = [i for n in custom.model.graph.node if n.domain == ternary_ops.DOMAIN
               for i in n.input if i.endswith(".weight")]
    codes = sum(tensors[w].shape[-2] * attrs(node(custom.model, w.rsplit(".", 1)[0]))["K"]
                for w in weights if ".moe." not in w)
    codes += sum(int(np.prod(tensors[w].shape[:-1])) * (TINY["d_model"] if ".down." not in w else TINY["expert_ffn"])
                 for w in weights if ".moe." in w)
    bits = 8 * sum(tensors[w].nbytes for w in weights) / codes
    assert 1.58 < bits <= 1.7
    ternary = build_graph(tiny(), ExportParams(variant="ternary"))
    assert custom.part_bytes()["ffn"] < 0.9 * ternary.part_bytes()["ffn"]  # 2-bit QMoE codes are larger


def test_ternary_matmul_reference_reproduces_bitlinear(moe_model: torch.nn.Module, custom: ExportGraph) -> None:
    tensors = inits(custom.model)
    x = torch.randn(2, 5, TINY["d_model"], generator=torch.Generator().manual_seed(1)) * 3
    for proj in ("q_proj", "o_proj"):
        n = node(custom.model, f"layers.1.attn.{proj}")
        a = attrs(n)
        with torch.no_grad():
            expected = getattr(moe_model.blocks[1].attn, proj)(x).numpy()
        got = ternary_reference.ternary_matmul(x.numpy(), tensors[n.input[1]], tensors[n.input[2]], a["K"],
                                               a["act_bits"], tensors[n.input[3]], a["act_eps"], a["norm_eps"])
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * float(np.abs(expected).max()))


def test_ternary_moe_reference_reproduces_the_moe_layer(moe_model: torch.nn.Module, custom: ExportGraph) -> None:
    tensors = inits(custom.model)
    moe = moe_model.blocks[0].ffn
    n = node(custom.model, "layers.0.moe")
    a = attrs(n)
    assert (a["top_k"], a["act_bits"]) == (moe.top_k, 0)
    # the normed hidden state and the router logits as they are: no Reshape around the operator
    assert list(n.input[:2]) == ["layers.0.ffn_norm", "layers.0.router.logits"]
    assert not any(m.op_type == "Reshape" and "moe" in m.name for m in custom.model.graph.node)
    h = torch.randn(1, 7, TINY["d_model"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = moe.router(h)
        expected = moe(h, logits)[0].numpy()[0]
    weights = [tensors[i] for i in n.input[2:]]
    for w in weights[0::2]:
        assert w.dtype == np.uint8
    got = ternary_reference.ternary_moe(h.numpy()[0], logits.numpy()[0], *weights, top_k=a["top_k"],
                                        act_bits=a["act_bits"], act_eps=a["act_eps"])
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5 * float(np.abs(expected).max()))


def test_dense_ffn_linears_are_ternary_matmuls_too() -> None:
    graph = build_graph(tiny(ffn="dense", dense_ffn=256), ExportParams(variant="ternary-ops"))
    names = Counter(n.name.rsplit(".", 1)[-1] for n in nodes_by_op(graph.model)["TernaryMatMul"])
    assert names == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 2, "gate": 2, "up": 2, "down": 2}
    assert "TernaryMoE" not in nodes_by_op(graph.model)


@pytest.mark.parametrize(("overrides", "says"), [
    ({"quantize": False}, "model.quantize: false"),
    ({"expert_quant": "bitlinear"}, "expert_quant is 'bitlinear'"),
    ({"act_bits": 4}, "model.act_bits"),
])
def test_models_the_operators_cannot_represent_are_refused(overrides: dict[str, object], says: str) -> None:
    with pytest.raises(ParamsError, match="export ternary-ops") as caught:
        build_graph(tiny(**overrides), ExportParams(variant="ternary-ops"))
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_the_fallback_graph_is_the_ternary_variant(custom: ExportGraph) -> None:
    fallback = custom_graph.fallback_params(ExportParams(variant="ternary-ops", block_size=64))
    assert (fallback.variant, fallback.block_size) == ("ternary", 64)


# --------------------------------------------------------------------------- the board runtime's choice


def with_custom_graph(folder: Path, custom: ExportGraph, golden: object = None) -> Path:
    """`folder` (a runtime test export) with a custom-operator graph and the manifest's ``graphs`` naming it."""
    onnx.save(custom.model, str(folder / custom_graph.MODEL_FILE))
    manifest = json.loads((folder / "manifest.json").read_text())
    graphs = {CUSTOM_GRAPH: {"file": custom_graph.MODEL_FILE, "golden": golden or []},
              FALLBACK_GRAPH: {"file": "model.onnx", "variant": "ternary"}}
    update_manifest(folder, graphs=graphs, variant="ternary-ops")
    assert "graphs" not in manifest  # a plain export before
    return folder


def test_without_the_library_the_runtime_runs_the_fallback_and_records_it(
        folder: Path, custom: ExportGraph, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPS_ENV, "off")
    plain = load_model(folder, threads=1)
    assert (plain.ops, plain.ops_reason) == (CONTRIB_OPS, None)
    with_custom_graph(folder, custom, golden=[{"prompt": "x", "tokens": [1, 2, 3]}])  # would fail if it were read
    model = load_model(folder, threads=1)
    assert model.ops == FALLBACK_GRAPH and OPS_ENV in model.ops_reason
    assert model.model_file == folder / "model.onnx"
    assert check_health(model) == 3  # the fallback graph's golden continuations, not the custom graph's
    results = benchmark(model, prompt_len=8, new_tokens=4, repeats=1, warmup=0)
    assert (results["ops"], results["variant"]) == (FALLBACK_GRAPH, "ternary-ops")


def test_health_json_says_which_graph_ran(folder: Path, custom: ExportGraph, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(OPS_ENV, "off")
    with_custom_graph(folder, custom)
    assert runtime_main(["health", "--model", str(folder), "--threads", "1", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert (reply["ok"], reply["prompts"], reply["ops"]) == (True, 3, FALLBACK_GRAPH) and reply["ops_reason"]


def test_an_unlisted_custom_graph_is_refused(folder: Path, custom: ExportGraph,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPS_ENV, "off")
    with_custom_graph(folder, custom)
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["sha256"][custom_graph.MODEL_FILE]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match=f"no sha256 for {custom_graph.MODEL_FILE}"):
        load_model(folder, threads=1)


# --------------------------------------------------------------------------- the export stage


def stage_params(folder: Path, **overrides: object) -> ExportParams:
    return ExportParams(**{"variant": "ternary-ops", "out_dir": str(folder / "onnx"),
                           "metrics_file": str(folder / "metrics/export.json"), "parity_tokens": 256,
                           "golden_prompts": ["anna sees", "the old"], "golden_tokens": 8, "cache_check_tokens": 40,
                           "threads": 1, **overrides})


def test_without_the_library_on_the_controller_the_export_is_refused_and_nothing_written(
        prepared: Path, model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setenv(OPS_ENV, "off")
    with pytest.raises(NativelmError, match="operator library is not built") as caught:
        run_export(model_file, prepared, stage_params(tmp_path))
    assert "\n" not in str(caught.value) and "export variant ternary" in str(caught.value)
    assert not (tmp_path / "onnx").exists() and not (tmp_path / "metrics").exists()


def test_ternary_ops_export_runs_on_the_library_and_falls_back_without_it(
        prepared: Path, model_file: Path, trained: torch.nn.Module, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_export(model_file, prepared, stage_params(tmp_path))
    folder = tmp_path / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest == result.manifest and manifest["variant"] == "ternary-ops"
    graphs = manifest["graphs"]
    assert graphs[FALLBACK_GRAPH] == {"file": "model.onnx", "variant": "ternary"}
    custom = graphs[CUSTOM_GRAPH]
    assert custom["file"] == custom_graph.MODEL_FILE and custom["nodes"] == {"TernaryMatMul": 8, "TernaryMoE": 2}
    assert set(manifest["sha256"]) >= {"model.onnx", custom_graph.MODEL_FILE}
    held = custom["parity"]["held_out"]
    assert custom["parity"]["passed"] and custom["parity"]["kv_cache"]["match"]
    assert held["top1_agreement"] >= 0.999 and held["ppl_rel_diff"] <= 1e-3
    assert custom["weights"]["parts"]["ffn"]["bits_per_weight"] <= 1.7
    assert result.metrics["nativelm_top1_agreement"] == held["top1_agreement"]

    model = load_model(folder, threads=1)
    assert model.ops == f"{CUSTOM_GRAPH}:{custom['checked_kernel']}" and model.ops_reason is None
    assert model.model_file == folder / custom_graph.MODEL_FILE
    assert check_health(model) == 2  # the custom graph's own golden continuations
    ids = np.random.default_rng(3).integers(0, model.vocab_size, (2, 24))
    logits = model.forward(ids)[0]
    reference = parity.torch_logits(trained, ids)
    scale = float(np.abs(reference).max())
    assert float(np.abs(logits - reference).max()) <= 0.05 * scale
    assert (logits.argmax(-1) == reference.argmax(-1)).mean() >= 0.95

    release = build_release(tmp_path / "release", folder, {"git_commit": "test"})
    assert {"model.onnx", custom_graph.MODEL_FILE, RUNTIME_FILE} <= set(release["sha256"])
    assert load_model(tmp_path / "release", threads=1).ops == model.ops  # what a board with the library runs

    monkeypatch.setenv(OPS_ENV, "off")
    fallback = load_model(folder, threads=1)
    assert (fallback.ops, fallback.model_file) == (FALLBACK_GRAPH, folder / "model.onnx")
    assert check_health(fallback) == 2
    assert float(np.abs(fallback.forward(ids)[0] - logits).max()) <= 0.05 * scale


def test_a_library_that_will_not_load_leaves_the_fallback_running(folder: Path, custom: ExportGraph, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "libnativelm_ops.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setenv(custom_ops.ENV_LIBRARY, str(broken))
    with_custom_graph(folder, custom)
    model = load_model(folder, threads=1)
    assert model.ops == FALLBACK_GRAPH and str(broken) in model.ops_reason
    assert check_health(model) == 3
    with pytest.raises(NativelmError, match="export ternary-ops: .*not a loadable nativelm operator library"):
        ops_choice.controller_library()
