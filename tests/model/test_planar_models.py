"""2-D training, evaluation, registration, promotion and the predict/detect commands on tiny data.

One tiny model is trained, evaluated and registered once per module (a few seconds); the tests
then use it through the CLI the way a user would.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from tumorseg.cli import main

_SPEC = importlib.util.spec_from_file_location(
    "planar_fixtures", Path(__file__).parents[1] / "planar_fixtures.py"
)
fixtures = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fixtures)
SIZE, head_image, tiny_params, write_preprocessed = (
    fixtures.SIZE,
    fixtures.head_image,
    fixtures.tiny_params,
    fixtures.write_preprocessed,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train, evaluate (registering both challengers) and promote both 2-D models in one workspace."""
    from tumorseg.config import apply_overrides
    from tumorseg.registry.evaluate_stage import evaluate_planar
    from tumorseg.registry.promote import promote
    from tumorseg.training.train import train

    tmp = tmp_path_factory.mktemp("planar")
    preprocessed, split = write_preprocessed(tmp / "preprocessed_2d")
    params = tiny_params(tmp, preprocessed, split)
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    result = train(params, dims=2)
    evaluation = evaluate_planar(params)
    promotions = {
        name: promote(
            apply_overrides(params, {"registry.model_name": name}), report_file=tmp / f"{name}.json"
        )
        for name in ("tumorseg-2d", "tumorseg-detect")
    }
    return {
        "tmp": tmp,
        "params": params,
        "params_file": params_file,
        "train": result,
        "evaluation": evaluation,
        "promotions": promotions,
    }


def test_training_writes_checkpoint_metrics_and_mlflow_run(trained: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    result = trained["train"]
    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
    assert result.global_step == 2 and result.epochs == 1
    assert "val_dice_mean" in result.best_val
    summary = json.loads((trained["tmp"] / "reports" / "2d" / "train_metrics.json").read_text())
    assert summary["global_step"] == 2 and summary["n_train"] == result.n_train
    run = MlflowClient(trained["params"]["mlflow"]["tracking_uri"]).get_run(result.mlflow_run_id)
    assert run.data.tags["tumorseg.branch"] == "2d"
    assert "model_2d.input_size" in run.data.params


def test_evaluation_reports_test_metrics_with_cis(trained: dict[str, Any]) -> None:
    reports = trained["tmp"] / "reports" / "2d"
    metrics = json.loads((reports / "test_summary.json").read_text())
    per_case = pd.read_csv(reports / "test_per_case.csv")
    split = json.loads(Path(trained["params"]["paths"]["split_2d"]).read_text())
    # test images only: nothing from training or validation is scored
    assert sorted(per_case["case_id"]) == sorted(split["test"])
    assert metrics["n_test_images"] == len(split["test"])
    det = metrics["detection"]
    assert det["method"] in ("classifier", "area_rule")
    assert set(det["validation"]) == {"classifier", "area_rule"}
    for name in ("accuracy", "sensitivity", "specificity", "auc"):
        m = det[name]
        assert m["ci_low"] <= m["value"] <= m["ci_high"], name
    seg = metrics["segmentation"]
    assert 0.0 <= seg["dice_tumour"]["value"] <= 1.0
    masked = per_case[per_case["has_mask"] & per_case["has_tumour"]]
    assert set(seg["per_tumour_type"]) == set(masked["tumour_type"])
    assert seg["dice_tumour"]["value"] == pytest.approx(masked["dice"].mean(), abs=1e-6)
    # the papers' overlap figures, with the same patient-level CIs; F1 is Dice for binary masks
    for name in ("iou", "precision", "recall", "specificity", "f1", "pixel_accuracy", "pixel_accuracy_empty"):
        m = seg[f"{name}_tumour"]
        assert m["ci_low"] <= m["value"] <= m["ci_high"] and m["value"] == pytest.approx(
            masked[name].mean()
        ), name
    assert masked["f1"].to_numpy() == pytest.approx(masked["dice"].to_numpy())
    assert (masked["iou"] <= masked["dice"] + 1e-12).all()
    # DVC's metrics file is the flat headline of the same figures; the plots come from the per-case table
    flat = json.loads((reports / "metrics.json").read_text())["test"]
    assert flat["detection.accuracy.value"] == det["accuracy"]["value"]
    dice_plot = pd.read_csv(reports / "plots" / "test_dice.csv")
    assert list(dice_plot.columns) == ["case_id", "dice", "hd95_px"] and len(dice_plot) == int(
        per_case["has_mask"].sum()
    )
    sizes = pd.read_csv(reports / "plots" / "test_volumes.csv")
    assert (sizes["ref_px"] >= 0).all() and sizes["case_id"].tolist() == dice_plot["case_id"].tolist()
    # the registered package holds the chosen detector
    from tumorseg.registry.loading import load_planar_model

    uri = trained["params"]["mlflow"]["tracking_uri"]
    assert (
        load_planar_model("models:/tumorseg-2d@champion", tracking_uri=uri).detector.method == det["method"]
    )


def test_both_models_registered_and_promoted(trained: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    uri = trained["params"]["mlflow"]["tracking_uri"]
    client = MlflowClient(uri, registry_uri=uri)
    for name in ("tumorseg-2d", "tumorseg-detect"):
        assert trained["promotions"][name].action == "promoted"
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags["branch"] == "2d" and champion.tags["test_cases_md5"]
        assert "Not for clinical use" in (champion.description or "") or "not for clinical use" in (
            champion.description or ""
        )
    versions = json.loads((trained["tmp"] / "reports" / "2d" / "model_version.json").read_text())
    assert {v["name"] for v in versions.values()} == {"tumorseg-2d", "tumorseg-detect"}


@pytest.mark.slow
def test_second_challenger_goes_through_the_same_gate(trained: dict[str, Any]) -> None:
    """The same model evaluated again ties with the champion: the margin rejects it, the champion stays."""
    from mlflow import MlflowClient

    from tumorseg.config import apply_overrides
    from tumorseg.registry.evaluate_stage import evaluate_planar
    from tumorseg.registry.promote import promote

    params = trained["params"]
    evaluate_planar(params)
    decision = promote(
        apply_overrides(params, {"registry.model_name": "tumorseg-2d"}), report_file=trained["tmp"] / "p.json"
    )
    assert decision.action == "rejected"
    assert decision.comparison is not None and decision.comparison.mean_improvement == pytest.approx(0.0)
    uri = params["mlflow"]["tracking_uri"]
    assert (
        str(MlflowClient(uri, registry_uri=uri).get_model_version_by_alias("tumorseg-2d", "champion").version)
        == "1"
    )


def _png(path: Path, height: int, width: int, rgb: bool = False) -> Path:
    image, _ = head_image(np.random.default_rng(5), (height, width), "glioma")
    pixels = np.clip(image * 100, 0, 255).astype(np.uint8)
    Image.fromarray(np.stack([pixels] * 3, axis=-1) if rgb else pixels).save(path)
    return path


def test_predict_writes_masks_at_each_input_size(trained: dict[str, Any], tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    _png(inputs / "odd.png", 371, 293)
    _png(inputs / "wide.jpg", 120, 500, rgb=True)
    out = tmp_path / "masks"
    code = main(["predict", str(inputs), "--out", str(out), "--params", str(trained["params_file"])])
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert len(written) == 2 and all(name.endswith("_mask.png") for name in written)
    sizes = {}
    for path in out.iterdir():
        mask = np.asarray(Image.open(path))
        assert set(np.unique(mask)) <= {0, 255}
        sizes[mask.shape] = path.name
    assert set(sizes) == {(371, 293), (120, 500)}


def test_predict_planar_function_takes_arrays(trained: dict[str, Any]) -> None:
    from tumorseg.models.predictor import predict_planar
    from tumorseg.registry.loading import load_planar_model

    model = load_planar_model(
        "models:/tumorseg-2d@champion", tracking_uri=trained["params"]["mlflow"]["tracking_uri"]
    )
    image, _ = head_image(np.random.default_rng(1), (203, 157), "pituitary")
    prediction = predict_planar(image, model, case_id="array")
    assert prediction.mask.shape == (203, 157) and prediction.mask.dtype == np.uint8
    assert 0.0 <= prediction.probability <= 1.0
    assert prediction.label == (prediction.probability >= model.detector.threshold)
    assert pytest.approx(sum(prediction.type_probabilities.values()), abs=1e-5) == 1.0


def test_detect_writes_csv(trained: dict[str, Any], tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, (h, w) in enumerate([(SIZE, SIZE), (371, 293), (90, 140)]):
        _png(inputs / f"img{i}.png", h, w)
    out = tmp_path / "detect.csv"
    code = main(["detect", str(inputs), "--out", str(out), "--params", str(trained["params_file"])])
    assert code == 0
    table = pd.read_csv(out)
    assert list(table.columns) == ["case_id", "probability", "label"]
    assert len(table) == 3
    assert set(table["label"]) <= {"yes", "no"}
    assert table["probability"].between(0, 1).all()


def test_bad_input_is_one_line_exit_2(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = str(trained["params_file"])
    image = _png(tmp_path / "x.png", 80, 80)
    cases = [
        ["detect", str(tmp_path / "missing.png"), "--out", str(tmp_path / "d.csv"), "--params", params],
        [
            "detect",
            str(image),
            "--out",
            str(tmp_path / "d.csv"),
            "--model",
            "models:/no-such-model@champion",
            "--params",
            params,
        ],
        [
            "predict",
            str(image),
            "--out",
            str(tmp_path / "m"),
            "--model",
            "models:/tumorseg-2d@nope",
            "--params",
            params,
        ],
        [
            "predict",
            str(image),
            "--out",
            str(tmp_path / "m"),
            "--model",
            str(tmp_path / "nothing"),
            "--params",
            params,
        ],
    ]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err, err
    assert not (tmp_path / "d.csv").exists() and not (tmp_path / "m").exists()


def test_bad_config_is_one_line_naming_the_key(
    trained: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["train", "--dims", "2", "--params", str(trained["params_file"]), "-S", "model_2d.input_size=30"]
    )
    assert code == 2
    assert "model_2d.input_size" in capsys.readouterr().err


def test_registered_pyfunc_serves_image_paths(trained: dict[str, Any], tmp_path: Path) -> None:
    """The registered model loads with plain MLflow and answers one row per image, mask at the input size."""
    import base64
    import io

    import mlflow

    uri = trained["params"]["mlflow"]["tracking_uri"]
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = mlflow.pyfunc.load_model("models:/tumorseg-detect@champion")
    image = _png(tmp_path / "scan.png", 150, 110)
    out = model.predict(pd.DataFrame({"image_path": [str(image)]}))
    assert list(out.columns) == [
        "case_id",
        "probability",
        "label",
        "tumour_type",
        "height",
        "width",
        "mask_png",
    ]
    row = out.iloc[0]
    assert (row["height"], row["width"]) == (150, 110) and row["label"] in ("yes", "no")
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["mask_png"]))))
    assert mask.shape == (150, 110)
