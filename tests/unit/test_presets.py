"""Training presets: `tumorseg preset list | show | apply` rewrite params.yaml keys in place.

Every test works on a copy of the repository's params.yaml in tmp_path, so the committed file is
both the fixture and the expectation (demo-cpu must reproduce it byte for byte).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tumorseg.cli import main
from tumorseg.config import section
from tumorseg.errors import ConfigError
from tumorseg.presets import (
    apply_preset,
    compare,
    get_preset,
    list_lines,
    load_presets,
    same_value,
    show_lines,
)
from tumorseg.training.config import load_training_config

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"
PRESETS = load_presets()
OTHERS = sorted(set(PRESETS) - {"demo-cpu"})


@pytest.fixture
def params(tmp_path: Path) -> Path:
    """A copy of the repository's params.yaml."""
    path = tmp_path / "params.yaml"
    shutil.copyfile(REPO_PARAMS, path)
    return path


def write_presets(path: Path, set_block: str) -> Path:
    """A one-preset file named ``custom`` whose ``set:`` block is ``set_block`` (4-space indented lines)."""
    path.write_text(
        "custom:\n"
        "  summary: a test recipe\n"
        "  expected: {time: 1 s (made up), memory: 1 MiB (made up), how: not measured}\n"
        "  sources: [this test]\n"
        "  set:\n" + set_block
    )
    return path


def yaml_kind(value: object) -> type:
    """The plain YAML type of a value (ruamel's ScalarFloat is a float, and so on)."""
    return next(kind for kind in (bool, int, float, str, list, dict, type(None)) if isinstance(value, kind))


def test_the_three_recipes_exist_and_set_the_same_keys() -> None:
    assert {"demo-cpu", "brats-cpu", "brats-gpu"} <= set(PRESETS)
    keys = {name: set(p.values) for name, p in PRESETS.items()}
    reference = keys["demo-cpu"]
    for name, preset_keys in keys.items():
        # same keys everywhere: the recipe in force never depends on which preset came before
        assert preset_keys == reference, f"{name}: {sorted(preset_keys ^ reference)}"
    assert "data_loader.cache_mb" in reference


def test_demo_cpu_holds_the_committed_params(params: Path) -> None:
    differing = [str(change) for change in compare(PRESETS["demo-cpu"], params) if change.changed]
    assert differing == [], "demo-cpu no longer matches params.yaml; update presets.yaml"


def test_apply_demo_cpu_to_the_committed_file_is_a_byte_for_byte_no_op(params: Path) -> None:
    before, mtime = params.read_bytes(), params.stat().st_mtime_ns
    assert apply_preset(PRESETS["demo-cpu"], params) == []
    assert params.read_bytes() == before
    assert params.stat().st_mtime_ns == mtime  # not even rewritten


@pytest.mark.parametrize("name", OTHERS)
def test_apply_then_demo_cpu_gives_back_the_original_bytes(params: Path, name: str) -> None:
    before = params.read_bytes()
    changes = apply_preset(PRESETS[name], params)
    assert changes and params.read_bytes() != before
    assert apply_preset(PRESETS[name], params) == []  # applying twice changes nothing more
    restored = apply_preset(PRESETS["demo-cpu"], params)
    assert sorted(c.key for c in restored) == sorted(c.key for c in changes)
    assert params.read_bytes() == before


def test_apply_touches_only_the_changed_keys_lines_and_keeps_their_comments(params: Path) -> None:
    before = params.read_text().splitlines()
    changes = apply_preset(PRESETS["brats-gpu"], params)
    after = params.read_text().splitlines()
    assert len(after) == len(before)
    changed = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert len(changed) == len(changes)
    leaves = sorted(c.key.rsplit(".", 1)[-1] for c in changes)
    assert sorted(new.split(":", 1)[0].strip() for _, new in changed) == leaves
    for old, new in changed:
        if "#" in old:  # the end-of-line comment survives, at its column when the value still fits
            assert new.endswith(old[old.index("#") :])
    # e.g. the patch size line, comment included
    assert any(line.startswith("  patch_size: [128, 128, 128]    # 3-D training patch") for line in after)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_is_read_back_as_written(params: Path, name: str) -> None:
    preset = PRESETS[name]
    apply_preset(preset, params)
    loaded = yaml.safe_load(params.read_text())  # as the DVC stages and the CLI read it (PyYAML, YAML 1.1)
    for key, value in preset.values.items():
        node = loaded
        for part in key.split("."):
            node = node[part]
        assert same_value(node, value), f"{key}: wrote {value!r}, read back {node!r}"
        assert yaml_kind(node) == yaml_kind(value), key  # a preset's 1e-5 would come back as a str
    for name_ in sorted(preset.sections):
        section(name_, loaded)
    load_training_config(loaded)  # the rules spanning sections (patch vs network downsampling)


def test_unknown_preset_is_a_one_line_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        get_preset("brats-tpu", PRESETS)
    message = str(err.value)
    assert "'brats-tpu'" in message and "\n" not in message
    assert all(name in message for name in PRESETS)


def test_a_key_missing_from_params_is_refused_and_the_file_left_untouched(
    params: Path, tmp_path: Path
) -> None:
    custom = load_presets(
        write_presets(tmp_path / "presets.yaml", "    train.lr: 0.5\n    train.no_such_key: 1\n")
    )["custom"]
    before = params.read_bytes()
    with pytest.raises(ConfigError, match=r"train\.no_such_key \(set by preset custom\) is not in this file"):
        apply_preset(custom, params)
    assert params.read_bytes() == before  # train.lr, listed first, was not written either


@pytest.mark.parametrize(
    ("set_block", "named"),
    [
        ("    trainer.precision: fp8\n", "trainer.precision"),
        # valid alone, but not divisible by the U-Net's downsampling factor 8: a cross-section rule
        ("    data_loader.patch_size: [60, 64, 64]\n", "data_loader.patch_size"),
    ],
)
def test_a_preset_that_would_invalidate_params_is_refused(
    params: Path, tmp_path: Path, set_block: str, named: str
) -> None:
    custom = load_presets(write_presets(tmp_path / "presets.yaml", set_block))["custom"]
    before = params.read_bytes()
    with pytest.raises(ConfigError) as err:
        apply_preset(custom, params)
    assert named in str(err.value) and "left unchanged" in str(err.value)
    assert "\n" not in str(err.value)
    assert params.read_bytes() == before


def test_a_malformed_preset_file_names_preset_and_field(tmp_path: Path) -> None:
    path = tmp_path / "presets.yaml"
    path.write_text("custom:\n  summary: no expected block\n  sources: [x]\n  set: {train.lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"custom\.expected: Field required"):
        load_presets(path)


def test_values_follow_the_style_of_the_line_they_replace(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "model:  # comment\n  unet:\n    channels:\n    - 16\n    - 32\n    strides: [2]\n  dropout: 0.1   # the rate\n"
    )
    custom = load_presets(
        write_presets(
            tmp_path / "presets.yaml",
            "    model.dropout: 1.0e-4\n    model.unet.channels: [8, 16, 32]\n    model.unet.strides:\n    - 2\n    - 2\n",
        )
    )["custom"]
    apply_preset(custom, params)
    assert params.read_text() == (
        "model:  # comment\n  unet:\n    channels:\n    - 8\n    - 16\n    - 32\n    strides: [2, 2]\n"
        "  dropout: 1.0e-4 # the rate\n"
    )


def test_a_file_ruamel_would_reformat_is_refused(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.1\n  sizes: [1,2]\n")  # ruamel writes [1, 2]
    custom = load_presets(write_presets(tmp_path / "presets.yaml", "    train.lr: 0.2\n"))["custom"]
    with pytest.raises(ConfigError, match=r"line 3: a rewrite would reformat lines"):
        apply_preset(custom, params)
    assert params.read_text() == "train:\n  lr: 0.1\n  sizes: [1,2]\n"


def test_same_value_is_yaml_equality() -> None:
    assert same_value(2, 2.0) and same_value([1, 2], (1, 2))
    assert not same_value(True, 1) and not same_value(None, 0) and not same_value([1], [1, 2])


def test_list_and_show(params: Path) -> None:
    lines = list_lines(PRESETS)
    assert [line.split()[0] for line in lines] == sorted(PRESETS)
    assert all(PRESETS[line.split()[0]].expected.time in line for line in lines)
    shown = show_lines(PRESETS["brats-gpu"], params)
    differing = [c for c in compare(PRESETS["brats-gpu"], params) if c.changed]
    assert sum(line.startswith("* ") for line in shown) == len(differing) > 0
    assert "* train.optimizer: sgd  <- adamw" in shown


def test_cli_apply_prints_the_changes_and_nothing_else(params: Path, capsys: pytest.CaptureFixture) -> None:
    expected = [str(c) for c in compare(PRESETS["brats-gpu"], params) if c.changed]
    assert main(["preset", "apply", "brats-gpu", "--params", str(params)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == expected and err == ""
    assert "train.max_epochs: 20 -> 1000" in expected


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["preset", "apply", "brats-tpu"], "unknown preset 'brats-tpu'; known presets: brats-cpu"),
        (["preset", "apply"], "name a preset"),
        (["preset", "apply", "brats-gpu", "-S", "train.lr=1"], "-S overrides do not apply"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    params: Path, capsys: pytest.CaptureFixture, argv: list[str], fragment: str
) -> None:
    before = params.read_bytes()
    assert main([*argv, "--params", str(params)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("tumorseg preset: error: ") and fragment in err
    assert params.read_bytes() == before


def test_cli_apply_with_a_missing_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.1\n")
    assert main(["preset", "apply", "brats-gpu", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "is not in this file" in err
    assert params.read_text() == "train:\n  lr: 0.1\n"
