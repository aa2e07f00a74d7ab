"""The real dvc.yaml's @2d stages on tiny generated data: repro to promote@2d, then nothing to redo."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from tumorseg.config import apply_overrides


def _load(name: str, path: Path):  # noqa: ANN202  (a module)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dvc_support = _load("dvc_support", Path(__file__).parents[1] / "dvc_support.py")
fixtures = _load("planar_fixtures", Path(__file__).parents[1] / "planar_fixtures.py")
ROOT, BIN = dvc_support.ROOT, dvc_support.BIN
PLANAR_STAGES = tuple(f"{stage}@2d" for stage in (*fixtures.PLANAR_STAGES, "promote"))


def _run(cmd: list[str], cwd: Path) -> str:
    return dvc_support.run(cmd, cwd, timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dvc_repro_planar_branch(tmp_path: Path) -> None:
    params = apply_overrides(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        {**fixtures.TINY_2D_DATA_OVERRIDES, **fixtures.TINY_2D_OVERRIDES},
    )
    repo = dvc_support.dvc_repo(tmp_path, params)

    first = _run([str(BIN / "dvc"), "repro", "promote@2d"], repo)
    for stage in PLANAR_STAGES:
        assert f"Running stage '{stage}'" in first, stage
    for stage in ("source", "train", "evaluate"):  # the 3-D dataset is not pulled in
        assert f"Running stage '{stage}@3d'" not in first
    reports = repo / "reports" / "2d"
    summary = json.loads((reports / "test_summary.json").read_text())
    assert summary["detection"]["method"] in ("classifier", "area_rule")
    metrics = json.loads((reports / "metrics.json").read_text())["test"]
    assert metrics["segmentation.dice_tumour.value"] == summary["segmentation"]["dice_tumour"]["value"]
    for name in ("test_per_case.csv", "plots/test_dice.csv", "plots/test_volumes.csv", "train_metrics.json"):
        assert (reports / name).is_file(), name
    promotion = json.loads((reports / "promotion.json").read_text())
    assert [promotion["action"], *(p["action"] for p in promotion["also"])] == ["promoted", "promoted"]

    second = _run([str(BIN / "dvc"), "repro", "promote@2d"], repo)
    assert "Running stage" not in second

    # New data: the champions scored other images, so the gate re-scores them on the challenger's.
    params["synth_2d"]["seed"] = int(params["synth_2d"]["seed"]) + 1
    dvc_support.write_params(repo, params)
    _run([str(BIN / "dvc"), "repro", "promote@2d"], repo)
    promotion = json.loads((reports / "promotion.json").read_text())
    for decision in (promotion, *promotion["also"]):
        assert decision["action"] in ("promoted", "rejected"), decision
        assert decision["evidence_source"] == "champion re-evaluated on the challenger's test cases", decision
