from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tumorseg.config import SECTION_MODELS, apply_overrides, parse_override, read_params, section
from tumorseg.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_validate_for_every_section() -> None:
    params = read_params(ROOT / "params.yaml")
    for name in ("paths", "synth", "ingest", "validate", "preprocess", "split"):
        section(name, params)


def test_every_params_section_has_a_model_and_validates() -> None:
    """The one table names every section params.yaml has, in its order, and each validates."""
    params = read_params(ROOT / "params.yaml")
    sections = [name for name in params if name != "seed"]
    assert sections == [name for name in SECTION_MODELS if name in params]
    assert set(SECTION_MODELS) == set(sections)
    for name in sections:
        assert section(name, params).model_dump() is not None


def test_a_section_validates_whatever_was_imported_first() -> None:
    """Nothing registers at import time: a fresh interpreter reads a 2-D section straight away."""
    code = (
        "from tumorseg.config import section; "
        "print(section('validate_2d', {}).__class__.__name__, section('train', {}).lr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "PlanarValidateConfig"


def test_an_unknown_section_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError, match=r"params.yaml: trian: not a params.yaml section; known: data, "):
        section("trian", {})


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"params.yaml: synth.casess: Extra inputs"):
        section("synth", {"synth": {"casess": 3}}, source="params.yaml")


def test_bad_type_is_named() -> None:
    with pytest.raises(ConfigError, match=r"synth.cases"):
        section("synth", {"synth": {"cases": "many"}})


def test_cross_field_rule_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"split: .*must be 1.0"):
        section("split", {"split": {"train": 0.9, "val": 0.2, "test": 0.1}})


def test_overrides_are_dotted_and_do_not_mutate() -> None:
    params = {"synth": {"cases": 3}}
    out = apply_overrides(params, {"synth.cases": 5, "split.seed": 1})
    assert out == {"synth": {"cases": 5}, "split": {"seed": 1}}
    assert params == {"synth": {"cases": 3}}


def test_parse_override_reads_yaml_values() -> None:
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)
    assert parse_override("preprocess.target_spacing_mm=[1, 1, 2]") == (
        "preprocess.target_spacing_mm",
        [1, 1, 2],
    )
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_missing_and_malformed_params_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        read_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_params(bad)
