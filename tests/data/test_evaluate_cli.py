"""``tumorseg evaluate`` end to end on tiny NIfTI folders: columns, missing cases, conventions, one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from tumorseg.cli import main
from tumorseg.config import EvaluateConfig
from tumorseg.errors import DataError
from tumorseg.evaluation.evaluate import (
    convention_from_dataset_json,
    evaluate_folders,
    find_background_image,
)

SHAPE = (24, 24, 16)
SPACING = 2.0
AFFINE = np.diag([SPACING, SPACING, SPACING, 1.0])
VOXEL_ML = SPACING**3 / 1000

EXPECTED_COLUMNS = [
    "case_id",
    "region",
    "dice",
    "iou",
    "precision",
    "sensitivity",
    "specificity",
    "hd95",
    "assd",
    "lesion_dice",
    "lesion_hd95",
    "volume_ref_ml",
    "volume_pred_ml",
    "lesions_ref",
    "lesions_tp",
    "lesions_fn",
    "lesions_fp",
    "prediction_missing",
]

FAST = EvaluateConfig(bootstrap_resamples=200, plots=False)


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _tumour(et_label: int, centre: tuple[int, int, int] = (12, 12, 8)) -> np.ndarray:
    """Oedema shell (2) around necrosis (1) and enhancing tumour (``et_label``)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    x, y, z = centre
    labels[x - 6 : x + 6, y - 6 : y + 6, z - 5 : z + 5] = 2
    labels[x - 3 : x + 3, y - 3 : y + 3, z - 3 : z + 3] = et_label
    labels[x - 1 : x + 1, y - 1 : y + 1, z - 1 : z + 1] = 1
    return labels


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """BraTS 2021 labels: a perfect case, a missing prediction, a tumour-free case with a false
    positive, a shifted prediction, and one prediction without a reference."""
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    perfect = _tumour(4)
    _save(ref / "case_a.nii.gz", perfect)
    _save(pred / "case_a.nii.gz", perfect)
    _save(ref / "case_b.nii.gz", _tumour(4, (10, 11, 8)))
    free = np.zeros(SHAPE, dtype=np.uint8)
    _save(ref / "case_c.nii.gz", free)
    blob = free.copy()
    blob[2:5, 2:5, 2:5] = 2
    _save(pred / "case_c.nii.gz", blob)
    _save(ref / "case_d.nii.gz", _tumour(4))
    _save(pred / "case_d.nii.gz", _tumour(4, (13, 12, 8)))
    _save(pred / "extra_x.nii.gz", perfect)
    return pred, ref


@pytest.fixture
def params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("evaluate:\n  bootstrap_resamples: 200\n  seed: 7\n")
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------- end to end
def test_cli_writes_exactly_the_columns_and_scores_every_case(
    folders: tuple[Path, Path],
    params: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    pred, ref = folders
    out = tmp_path / "reports" / "eval.csv"
    with caplog.at_level(logging.WARNING):
        code, stdout, stderr = _run(
            capsys,
            "evaluate",
            "--params",
            str(params),
            "--pred",
            str(pred),
            "--ref",
            str(ref),
            "--out",
            str(out),
        )
    assert code == 0, stderr
    assert stdout.startswith("evaluated 4 cases (brats2021): Dice WT ")
    assert len(stdout.strip().splitlines()) == 1

    table = pd.read_csv(out)
    assert list(table.columns) == EXPECTED_COLUMNS
    assert len(table) == 12
    assert sorted(table["case_id"].unique()) == ["case_a", "case_b", "case_c", "case_d"]
    rows = table.set_index(["case_id", "region"])
    assert (rows.loc["case_a", ["dice", "iou", "lesion_dice"]] == 1.0).all().all()
    assert (rows.loc["case_a", "hd95"] == 0.0).all()

    # Missing prediction: scored as an empty prediction, flagged.
    assert rows.loc["case_b", "prediction_missing"].all()
    assert (rows.loc["case_b", "dice"] == 0.0).all()
    assert (rows.loc["case_b", "hd95"] == 374.0).all()
    assert rows.loc[("case_b", "ET"), "volume_ref_ml"] == pytest.approx(6**3 * VOXEL_ML - 8 * VOXEL_ML)

    # Tumour-free case: WT false positive, TC and ET both empty.
    assert rows.loc[("case_c", "WT"), "dice"] == 0.0
    assert rows.loc[("case_c", "WT"), "volume_pred_ml"] == pytest.approx(27 * VOXEL_ML)
    assert rows.loc[("case_c", "WT"), "lesions_fp"] == 1
    assert rows.loc[("case_c", "TC"), "dice"] == 1.0 and rows.loc[("case_c", "TC"), "hd95"] == 0.0
    assert 0.0 < rows.loc[("case_d", "WT"), "dice"] < 1.0

    summary = json.loads(out.with_name("eval.summary.json").read_text())
    assert summary["label_convention"] == "brats2021"
    assert summary["missing_predictions"] == ["case_b"]
    assert summary["extra_predictions"] == ["extra_x"]
    assert summary["n_cases"] == 4
    dice_wt = summary["regions"]["WT"]["dice"]
    assert set(dice_wt) == {"n", "mean", "median", "std", "ci_low", "ci_high"}
    assert dice_wt["mean"] == pytest.approx(rows.xs("WT", level="region")["dice"].mean())
    assert dice_wt["ci_low"] <= dice_wt["mean"] <= dice_wt["ci_high"]
    assert summary["bootstrap"]["resamples"] == 200
    detection = summary["detection"]
    assert (detection["positives"], detection["negatives"], detection["fp"], detection["fn"]) == (3, 1, 1, 1)
    assert detection["roc_auc"] is not None

    plots = out.with_name("eval_plots")
    assert sorted(p.name for p in plots.iterdir()) == [
        "boxplots.png",
        "overlay_best.png",
        "overlay_median.png",
        "overlay_worst.png",
    ]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in plots.iterdir())
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert "case_b" in warnings and "extra_x" in warnings


def test_cli_overrides_and_summary_path(
    folders: tuple[Path, Path], params: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, ref = folders
    out, summary = tmp_path / "e.csv", tmp_path / "elsewhere" / "s.json"
    code, _, stderr = _run(
        capsys,
        "evaluate",
        "--params",
        str(params),
        "-S",
        "evaluate.hd95_penalty_mm=100",
        "--pred",
        str(pred),
        "--ref",
        str(ref),
        "--out",
        str(out),
        "--summary",
        str(summary),
        "--no-plots",
    )
    assert code == 0, stderr
    assert (pd.read_csv(out).query("case_id == 'case_b'")["hd95"] == 100.0).all()
    assert json.loads(summary.read_text())["params"]["hd95_penalty_mm"] == 100.0
    assert not (tmp_path / "e_plots").exists()


def test_library_call_returns_the_table_it_wrote(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, ref = folders
    result = evaluate_folders(pred, ref, tmp_path / "r.csv", labels="auto", cfg=FAST)
    written = pd.read_csv(result.csv_path)
    assert list(result.per_case.columns) == EXPECTED_COLUMNS
    pd.testing.assert_frame_equal(written, result.per_case, check_dtype=False)
    assert result.summary_path == tmp_path / "r.summary.json"
    assert result.plot_paths == []


# ---------------------------------------------------------------- label conventions
def _pair(tmp_path: Path, labels: np.ndarray, case: str = "c1") -> tuple[Path, Path]:
    _save(tmp_path / "ref" / f"{case}.nii.gz", labels)
    _save(tmp_path / "pred" / f"{case}.nii.gz", labels)
    return tmp_path / "pred", tmp_path / "ref"


def _tc_et_volumes(table: pd.DataFrame) -> tuple[float, float]:
    rows = table.set_index("region")
    return rows.loc["TC", "volume_ref_ml"], rows.loc["ET", "volume_ref_ml"]


def test_labels_1_2_3_default_to_brats2023(tmp_path: Path) -> None:
    labels = _tumour(3)
    pred, ref = _pair(tmp_path, labels)
    result = evaluate_folders(pred, ref, tmp_path / "o.csv", cfg=FAST)
    assert result.summary["label_convention"] == "brats2023"
    tc, et = _tc_et_volumes(result.per_case)
    assert tc == pytest.approx(np.isin(labels, (1, 3)).sum() * VOXEL_ML)  # 1 = necrosis, in TC
    assert et == pytest.approx((labels == 3).sum() * VOXEL_ML)


@pytest.mark.parametrize("where", ["ref", "parent"])
def test_msd_dataset_json_beside_the_references_selects_msd(tmp_path: Path, where: str) -> None:
    labels = _tumour(3)
    pred, ref = _pair(tmp_path, labels)
    msd_json = {
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    }
    (ref if where == "ref" else tmp_path).joinpath("dataset.json").write_text(json.dumps(msd_json))
    result = evaluate_folders(pred, ref, tmp_path / "o.csv", cfg=FAST)
    assert result.summary["label_convention"] == "msd"
    tc, _ = _tc_et_volumes(result.per_case)
    assert tc == pytest.approx(np.isin(labels, (2, 3)).sum() * VOXEL_ML)  # MSD 1 = oedema, not in TC


def test_explicit_labels_override_detection(tmp_path: Path) -> None:
    labels = _tumour(3)
    pred, ref = _pair(tmp_path, labels)
    result = evaluate_folders(pred, ref, tmp_path / "o.csv", labels="msd", cfg=FAST)
    assert result.summary["label_convention"] == "msd"
    assert _tc_et_volumes(result.per_case)[0] == pytest.approx(np.isin(labels, (2, 3)).sum() * VOXEL_ML)


def test_label_4_selects_brats2021_even_when_only_the_prediction_has_it(tmp_path: Path) -> None:
    ref_labels = _tumour(4)
    pred, ref = _pair(tmp_path, ref_labels)
    no_et = ref_labels.copy()
    no_et[no_et == 4] = 1  # a case whose reference has no ET, predicted with ET
    _save(ref / "c2.nii.gz", no_et)
    _save(pred / "c2.nii.gz", ref_labels)
    result = evaluate_folders(pred, ref, tmp_path / "o.csv", cfg=FAST)
    assert result.summary["label_convention"] == "brats2021"
    c1 = result.per_case[result.per_case["case_id"] == "c1"]
    assert _tc_et_volumes(c1)[1] == pytest.approx((ref_labels == 4).sum() * VOXEL_ML)
    c2 = result.per_case.set_index(["case_id", "region"])
    assert c2.loc[("c2", "ET"), "volume_pred_ml"] == pytest.approx((ref_labels == 4).sum() * VOXEL_ML)


def test_folder_mixing_label_3_and_4_is_an_error(tmp_path: Path) -> None:
    pred, ref = _pair(tmp_path, _tumour(3), "c1")
    _pair(tmp_path, _tumour(4), "c2")
    with pytest.raises(DataError, match=r"c2\.nii\.gz: label 3 in c1\.nii\.gz but label 4.*--labels"):
        evaluate_folders(pred, ref, tmp_path / "o.csv", cfg=FAST)


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}, "msd"),
        ({"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}, "msd"),
        ({"0": "background", "1": "NCR", "2": "ED", "3": "ET"}, "brats2023"),
        ({"0": "background", "1": "NCR/NET", "2": "ED", "4": "ET"}, "brats2021"),
        ({"0": "background", "1": "tumour"}, None),
    ],
)
def test_convention_from_dataset_json(
    tmp_path: Path, labels: dict[str, object], expected: str | None
) -> None:
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"name": "x", "labels": labels}))
    assert convention_from_dataset_json(path) == expected


# ---------------------------------------------------------------- tumour types and images
def test_case_info_and_synth_meta_give_per_type_statistics(
    folders: tuple[Path, Path], tmp_path: Path
) -> None:
    pred, ref = folders
    info = tmp_path / "info.csv"
    info.write_text("case_id,tumour_type\ncase_a,GBM\ncase_b,GBM\ncase_c,none\ncase_d,LGG\n")
    result = evaluate_folders(pred, ref, tmp_path / "o.csv", cfg=FAST, case_info=info)
    per_type = result.summary["per_tumour_type"]
    assert {k: v["n_cases"] for k, v in per_type.items()} == {"GBM": 2, "LGG": 1, "none": 1}
    assert per_type["GBM"]["regions"]["WT"]["dice"]["mean"] == pytest.approx(0.5)  # case_a 1, case_b 0

    # The structure `tumorseg synth` writes: tumour-free cases have a null tumour_type.
    meta = {
        "generator": "tumorseg synth",
        "cases": [
            {"case_id": "case_a", "tumour_free": False, "tumour_type": "glioma"},
            {"case_id": "case_c", "tumour_free": True, "tumour_type": None},
            {"case_id": "case_d", "tumour_free": False, "tumour_type": "glioma"},
        ],
    }
    (ref / "synth_meta.json").write_text(json.dumps(meta))
    from_meta = evaluate_folders(pred, ref, tmp_path / "o2.csv", cfg=FAST)
    assert {k: v["n_cases"] for k, v in from_meta.summary["per_tumour_type"].items()} == {
        "glioma": 2,
        "tumour-free": 1,
    }


def test_bad_case_info_is_a_one_line_error(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, ref = folders
    info = tmp_path / "info.csv"
    info.write_text("case,type\na,b\n")
    with pytest.raises(DataError, match=r"info\.csv: needs columns case_id,tumour_type"):
        evaluate_folders(pred, ref, tmp_path / "o.csv", cfg=FAST, case_info=info)
    assert not (tmp_path / "o.csv").exists()


def test_background_image_is_found_in_any_layout(tmp_path: Path) -> None:
    flair = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    _save(tmp_path / "imgs" / "case_a" / "case_a_t1.nii.gz", np.zeros(SHAPE, np.float32))
    _save(tmp_path / "imgs" / "case_a" / "case_a_flair.nii.gz", flair)
    _save(tmp_path / "imgs" / "case_a" / "case_a_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    _save(tmp_path / "imgs" / "case_ab_flair.nii.gz", np.ones(SHAPE, np.float32))  # another case
    msd = np.stack([flair * 2, flair], axis=-1)
    _save(tmp_path / "msd" / "imagesTr" / "BRATS_001.nii.gz", msd)
    np.testing.assert_allclose(find_background_image(tmp_path / "imgs", "case_a", SHAPE), flair)
    np.testing.assert_allclose(find_background_image(tmp_path / "msd", "BRATS_001", SHAPE), flair * 2)
    assert find_background_image(tmp_path / "imgs", "case_a", (5, 5, 5)) is None
    assert find_background_image(tmp_path / "imgs", "case_z", SHAPE) is None


def test_overlays_with_images(folders: tuple[Path, Path], tmp_path: Path) -> None:
    pred, ref = folders
    for case in ("case_a", "case_b", "case_c", "case_d"):
        _save(
            tmp_path / "images" / f"{case}_flair.nii.gz",
            np.random.default_rng(1).random(SHAPE).astype(np.float32),
        )
    cfg = EvaluateConfig(bootstrap_resamples=50, plots=True)
    result = evaluate_folders(pred, ref, tmp_path / "o.csv", cfg=cfg, images_dir=tmp_path / "images")
    assert len(result.plot_paths) == 4 and all(p.stat().st_size > 1000 for p in result.plot_paths)


# ---------------------------------------------------------------- one-line errors
def _assert_one_line_error(code: int, stdout: str, stderr: str, *fragments: str) -> None:
    assert code == 2
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tumorseg evaluate: error: ")
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def _evaluate_argv(params: Path, pred: Path, ref: Path, out: Path) -> list[str]:
    return [
        "evaluate",
        "--params",
        str(params),
        "--pred",
        str(pred),
        "--ref",
        str(ref),
        "--out",
        str(out),
        "--no-plots",
    ]


def test_missing_folder(folders: tuple[Path, Path], params: Path, tmp_path: Path, capsys) -> None:
    _, ref = folders
    out = tmp_path / "o.csv"
    result = _run(capsys, *_evaluate_argv(params, tmp_path / "nope", ref, out))
    _assert_one_line_error(*result, "nope", "prediction folder not found")
    assert not out.exists()


def test_no_matching_case(folders: tuple[Path, Path], params: Path, tmp_path: Path, capsys) -> None:
    _, ref = folders
    other = tmp_path / "other"
    _save(other / "unrelated.nii.gz", np.zeros(SHAPE, np.uint8))
    result = _run(capsys, *_evaluate_argv(params, other, ref, tmp_path / "o.csv"))
    _assert_one_line_error(*result, "no prediction matches a reference case", "case_a.nii.gz")


def test_shape_mismatch_names_the_file_and_keeps_the_old_output(
    folders: tuple[Path, Path], params: Path, tmp_path: Path, capsys
) -> None:
    pred, ref = folders
    _save(pred / "case_d.nii.gz", np.zeros((24, 24, 15), np.uint8))
    out = tmp_path / "o.csv"
    out.write_text("previous results\n")
    result = _run(capsys, *_evaluate_argv(params, pred, ref, out))
    _assert_one_line_error(*result, str(pred / "case_d.nii.gz"), "(24, 24, 15)", "(24, 24, 16)")
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_affine_mismatch_names_the_file(
    folders: tuple[Path, Path], params: Path, tmp_path: Path, capsys
) -> None:
    pred, ref = folders
    shifted = AFFINE.copy()
    shifted[0, 3] = 1.0
    _save(pred / "case_a.nii.gz", _tumour(4), affine=shifted)
    result = _run(capsys, *_evaluate_argv(params, pred, ref, tmp_path / "o.csv"))
    _assert_one_line_error(*result, str(pred / "case_a.nii.gz"), "affine differs")


def test_unreadable_nifti_names_the_file(
    folders: tuple[Path, Path], params: Path, tmp_path: Path, capsys
) -> None:
    pred, ref = folders
    (pred / "case_d.nii.gz").write_bytes(b"this is not a nifti file")
    result = _run(capsys, *_evaluate_argv(params, pred, ref, tmp_path / "o.csv"))
    _assert_one_line_error(*result, str(pred / "case_d.nii.gz"), "cannot read as NIfTI")
    assert not (tmp_path / "o.csv").exists()


def test_label_outside_the_convention_names_the_file(
    folders: tuple[Path, Path], params: Path, tmp_path: Path, capsys
) -> None:
    pred, ref = folders
    bad = _tumour(4)
    bad[0, 0, 0] = 7
    _save(ref / "case_a.nii.gz", bad)
    result = _run(capsys, *_evaluate_argv(params, pred, ref, tmp_path / "o.csv"))
    _assert_one_line_error(*result, str(ref / "case_a.nii.gz"), "[7]", "--labels")


def test_bad_params_value_is_a_one_line_config_error(
    folders: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred, ref = folders
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluate:\n  ci_level: 1.5\n")
    result = _run(capsys, *_evaluate_argv(bad, pred, ref, tmp_path / "o.csv"))
    _assert_one_line_error(*result, "evaluate.ci_level")
