"""TrainParams: presets fill null knobs, explicit values win, bad values are one clear error."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nativelm.errors import ParamsError
from nativelm.params.model import PRESETS, ModelParams, with_preset
from nativelm.params.root import parse_params
from nativelm.params.train import PRESET_FIELDS, TRAIN_PRESETS, TrainParams


def test_every_field_is_described() -> None:
    missing = [name for name, f in TrainParams.model_fields.items() if not f.description]
    assert not missing


def test_presets_fill_null_knobs_and_explicit_values_win() -> None:
    tiny = TrainParams().resolved()
    assert {k: getattr(tiny, k) for k in PRESET_FIELDS} == pytest.approx(TRAIN_PRESETS["tiny"])
    gpu = TrainParams(preset="gpu", lr=1e-3).resolved()
    assert gpu.batch_size == TRAIN_PRESETS["gpu"]["batch_size"] and gpu.lr == 1e-3


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"warmup_steps": 500, "max_steps": 400}, "warmup_steps (500) must be smaller than max_steps"),
        ({"warmup_steps": 350, "max_steps": 400}, "exceed max_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"checkpoint_interval": 0}, "checkpoint_interval"),
        ({"precision": "fp8"}, "precision"),
        ({"lr": -1.0}, "lr"),
        ({"precision": "fp16", "device": "cpu"}, "fp16 needs CUDA"),
        ({"schedule": "linear"}, "schedule"),
        ({"lr": "0.003"}, "lr"),  # strict: a quoted number is not a number
        ({"bacth_size": 8}, "bacth_size"),  # typo'd key
        ({"global_batch": 16, "batch_size": 8}, "set batch_size (8) or global_batch (16), not both"),
        ({"global_batch": 15, "grad_accum": 2}, "global_batch (15) does not divide by grad_accum (2)"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(values: dict, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        TrainParams.model_validate(values)


def test_bad_train_section_is_one_params_error_line() -> None:
    from nativelm.params.root import Params, parse_params

    if "train" not in Params.model_fields:
        pytest.skip("config.Params has no train section yet")
    with pytest.raises(ParamsError, match=r"train\.batch_size") as info:
        parse_params("train: {batch_size: 0}")
    assert "\n" not in str(info.value)


def test_tiny_preset_keeps_the_model_section_as_written() -> None:
    section = ModelParams(d_model=64, n_heads=4)
    assert with_preset(section, "tiny") == section


def test_gpu_preset_applies_model_shape_except_changed_fields() -> None:
    gpu = with_preset(ModelParams(), "gpu")
    assert gpu.d_model == PRESETS["gpu"]["d_model"] and gpu.n_layers == PRESETS["gpu"]["n_layers"]
    custom = with_preset(ModelParams(n_layers=3, router_aux_weight=0.05), "gpu")
    assert custom.n_layers == 3 and custom.router_aux_weight == 0.05 and custom.d_model == PRESETS["gpu"]["d_model"]


def test_a_model_value_written_in_params_yaml_survives_the_gpu_preset() -> None:
    # n_heads 8 is also the tiny default: written on purpose, it must not become the gpu preset's 12
    params = parse_params("train: {preset: gpu}\nmodel: {n_heads: 8, n_kv_heads: 4}\n")
    resolved = with_preset(params.model, params.train.preset)
    assert resolved.n_heads == 8 and resolved.n_kv_heads == 4
    assert resolved.d_model == PRESETS["gpu"]["d_model"] and resolved.n_layers == PRESETS["gpu"]["n_layers"]
    untouched = with_preset(parse_params("train: {preset: gpu}\n").model, "gpu")
    assert untouched.n_heads == PRESETS["gpu"]["n_heads"]


def test_a_null_model_shape_key_takes_the_preset_value() -> None:
    params = parse_params("train: {preset: gpu}\nmodel: {d_model: null, n_layers: 3}\n")
    resolved = with_preset(params.model, "gpu")
    assert resolved.d_model == PRESETS["gpu"]["d_model"] and resolved.n_layers == 3
    assert parse_params("model: {d_model: null}\n").model.d_model == ModelParams().d_model
    with pytest.raises(ParamsError, match="model.router_aux_weight"):  # null only means "preset" for shape keys
        parse_params("model: {router_aux_weight: null}\n")


def test_global_batch_is_split_over_the_processes_and_a_remainder_is_one_line() -> None:
    cfg = TrainParams(global_batch=24, grad_accum=2).resolved()
    assert cfg.batch_size == 12  # one process
    assert [cfg.for_processes(n).batch_size for n in (1, 2, 3, 6)] == [12, 6, 4, 2]
    assert TrainParams(batch_size=8).resolved().for_processes(4).batch_size == 8  # per process as written
    with pytest.raises(ParamsError, match=r"^train\.global_batch 24 does not divide over 5 processes x grad_accum 2: "
                                          r"pick a multiple of 10$"):
        cfg.for_processes(5)
