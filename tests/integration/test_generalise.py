"""``tumorseg generalise``: a model scored on a dataset folder it was not trained on, 3-D and 2-D.

The models are tiny and random, so the figures are checked against an independent computation
from the files ``predict`` writes (3-D) and from the images' own masks (2-D), not against a value.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tumorseg.cli import main
from tumorseg.config import SynthConfig, SynthPlanarConfig
from tumorseg.data.conventions import get_convention

TESTS = Path(__file__).resolve().parents[1]


def _load(relative: str, name: str):  # noqa: ANN202 - a test helper module
    spec = importlib.util.spec_from_file_location(name, TESTS / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


support = _load("serving/serving_support.py", "generalise_serving_support")
predict_tests, write_tiny_planar_package = support.predict_tests, support.write_tiny_planar_package
planar_fx = support.planar_fx


def _params_file(tmp_path: Path, params: dict) -> Path:
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two layouts side by side (BraTS 2021 and MSD), two 4 mm cases each."""
    from tumorseg.data.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("independent")
    for layout, seed in (("brats2021", 5), ("msd", 6)):
        cfg = SynthConfig(layout=layout, cases=2, spacing_mm=4.0, tumour_free_fraction=0.0, seed=seed)
        synthesize_dataset(root / layout, cfg, workers=1)
    return root


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else 2.0 * float((pred & ref).sum()) / float(total)


def test_volumes_are_scored_per_dataset_with_the_metrics_of_their_convention(
    tmp_path: Path, two_datasets: Path
) -> None:
    params = predict_tests.tiny_params(tmp_path)
    ckpt = predict_tests.write_checkpoint(tmp_path / "best.ckpt", params, seed=1)
    out = tmp_path / "reports"
    args = ["generalise", "--params", str(_params_file(tmp_path, params)), "--model", str(ckpt)]
    assert main([*args, "--data", str(two_datasets), "--out", str(out)]) == 0

    report = json.loads((out / "generalisation.json").read_text())
    per_case = pd.read_csv(out / "generalisation_per_case.csv")
    assert report["dims"] == 3 and report["n_cases"] == 4
    assert report["datasets"] == {"brats2021": 2, "msd": 2}
    assert set(report["regions"]) == {"WT", "TC", "ET"}
    assert len(per_case) == 4 * 3

    # The figures are those of the predictions `tumorseg predict` writes with the same model.
    pred_dir = tmp_path / "pred"
    assert main(["predict", *args[1:], str(two_datasets / "msd"), "--out", str(pred_dir)]) == 0
    msd = get_convention("msd")

    def regions(path: Path) -> np.ndarray:
        source = np.asarray(nib.load(path).dataobj).astype(np.int64)
        internal = np.zeros_like(source)
        for value, code in msd.to_canonical.items():
            internal[source == value] = code
        return msd.region_masks(internal)

    for case_id, rows in per_case[per_case["dataset"] == "msd"].groupby("case_id"):
        pred = regions(pred_dir / f"{case_id}.nii.gz")
        ref = regions(two_datasets / "msd" / "labelsTr" / f"{case_id}.nii.gz")
        for index, region in enumerate(msd.region_names):
            expected = _dice(pred[index], ref[index])
            got = float(rows.loc[rows["region"] == region, "dice"].iloc[0])
            assert got == pytest.approx(expected, abs=1e-6), (case_id, region)  # the CSV keeps 6 decimals
    wt = per_case[per_case["region"] == "WT"]["dice"]
    assert report["regions"]["WT"]["dice"]["value"] == pytest.approx(wt.mean(), abs=1e-6)
    ci = report["regions"]["WT"]["dice"]
    assert ci["ci_low"] <= ci["value"] <= ci["ci_high"]


def test_images_are_scored_for_masks_and_detection(tmp_path: Path) -> None:
    from tumorseg.data.planar_synth import synthesize_planar_dataset

    data = tmp_path / "independent_2d"
    cfg = SynthPlanarConfig(
        figshare_patients=2, slices_per_patient=2, kaggle_images=4, spacing_mm=4.0, seed=3
    )
    synthesize_planar_dataset(data / "figshare", "figshare", cfg)
    synthesize_planar_dataset(data / "kaggle", "kaggle", cfg)
    package = write_tiny_planar_package(tmp_path / "model")
    params = planar_fx.tiny_params(tmp_path, tmp_path / "preprocessed_2d", tmp_path / "split_2d.json")
    out = tmp_path / "reports_2d"
    argv = ["generalise", "--dims", "2", "--params", str(_params_file(tmp_path, params))]
    assert main([*argv, "--model", str(package), "--data", str(data), "--out", str(out)]) == 0

    report = json.loads((out / "generalisation.json").read_text())
    per_case = pd.read_csv(out / "generalisation_per_case.csv")
    assert report["n_images"] == 2 * 2 + 4 == len(per_case)
    assert per_case["dice"].notna().sum() == 4  # the .mat slices carry masks, the yes/no images none
    kaggle = per_case[per_case["source"] == "kaggle"]
    assert kaggle["has_tumour"].tolist() == [name.startswith("kaggle-yes") for name in kaggle["case_id"]]
    assert report["detection_accuracy"]["value"] == pytest.approx(per_case["correct"].mean())
    assert report["dice_tumour"]["value"] == pytest.approx(per_case["dice"].dropna().mean())


def test_a_folder_without_a_dataset_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    params = predict_tests.tiny_params(tmp_path)
    argv = ["generalise", "--params", str(_params_file(tmp_path, params)), "--data", str(tmp_path / "empty")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty: no dataset in a supported layout" in err[0]
    assert "Traceback" not in err[0]
