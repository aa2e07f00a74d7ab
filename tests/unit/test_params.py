"""The config root: params.yaml loaded once into one typed Params with every section."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tumorseg.config import read_params
from tumorseg.errors import ConfigError
from tumorseg.params import SECTIONS, Params, as_params, from_mapping, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_the_project_params_load_into_one_object_with_every_section_in_file_order() -> None:
    params = load_params(ROOT / "params.yaml")
    assert list(read_params(ROOT / "params.yaml")) == list(SECTIONS)
    raw = read_params(ROOT / "params.yaml")
    assert params.train.lr == raw["train"]["lr"]
    assert params.validate.max_invalid_fraction == raw["validate"]["max_invalid_fraction"]
    assert params.section("train_2d").out_dir == raw["train_2d"]["out_dir"]
    assert params.source == str(ROOT / "params.yaml")


def test_loading_every_section_imports_no_deep_learning_stack() -> None:
    code = (
        "import sys; from tumorseg.params import load_params; load_params(); "
        "print(sorted(m for m in ('torch', 'lightning', 'monai', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_any_bad_section_fails_the_load_in_one_line_naming_file_and_key(tmp_path: Path) -> None:
    raw = read_params(ROOT / "params.yaml")
    raw["evaluate_2d"]["bootstrap_resamples"] = 0  # a section no stage of the run may read
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"^{path}: evaluate_2d.bootstrap_resamples: ") as err:
        load_params(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"train.lrr": 1}, r"^params.yaml: train.lrr: Extra inputs are not permitted$"),
        ({"train.lr": "fast"}, r"^params.yaml: train.lr: Input should be a valid number"),
        ({"split.train": 0.99}, r"^params.yaml: split: train \+ val \+ test must be 1.0"),
        ({"paths.raw_2d": "x"}, r"^params.yaml: paths.raw_2d: retired; .*; remove the key$"),
        ({"validate.max_invalid_fraction": 2}, r"^params.yaml: validate.max_invalid_fraction: "),
    ],
)
def test_overrides_are_validated_like_the_file(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_mapping({}).with_overrides(overrides)


def test_unknown_section_is_named() -> None:
    with pytest.raises(
        ConfigError, match=r"^params.yaml: trian: not a params.yaml section; known: data, paths"
    ):
        from_mapping({"trian": {}})
    with pytest.raises(ConfigError, match=r"trian: not a params.yaml section"):
        from_mapping({}).section("trian")


def test_with_overrides_returns_a_new_object_and_keeps_the_written_values() -> None:
    base = from_mapping({"train": {"lr": 0.01}}, source="mine.yaml")
    tuned = base.with_overrides({"train.max_epochs": 3})
    assert (base.train.lr, base.train.max_epochs) == (0.01, Params().train.max_epochs)
    assert (tuned.train.lr, tuned.train.max_epochs, tuned.source) == (0.01, 3, "mine.yaml")
    assert tuned.raw == {"train": {"lr": 0.01, "max_epochs": 3}}  # defaults are not written in
    tuned.raw["train"]["lr"] = 1.0
    assert tuned.train.lr == 0.01 and tuned.raw["train"]["lr"] == 0.01
    with pytest.raises(ValueError, match="frozen"):
        tuned.train = base.train  # type: ignore[misc]


def test_as_params_validates_a_mapping_once() -> None:
    params = from_mapping({"synth": {"cases": 3}})
    assert as_params(params) is params
    assert as_params({"synth": {"cases": 3}}).synth.cases == 3


def test_the_one_section_table_and_the_root_model_agree() -> None:
    """``section(name, mapping)`` (stored model configs, presets) validates with Params' own models."""
    from tumorseg.config import SECTION_MODELS, section_model

    assert list(SECTION_MODELS) == list(SECTIONS)
    for name in SECTIONS:
        assert section_model(name) is Params.model_fields[name].annotation
