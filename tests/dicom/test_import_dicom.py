"""``tumorseg import-dicom`` and ``tumorseg predict`` on DICOM, end to end on a small generated study:
the case written, the transforms against the truth, labels brought back onto the T1ce series' grid,
the DICOM-SEG read back against the series it references, and a bad study refused in one line with
nothing written.

The brain extractor is a fixed one-voxel rule (a checkpoint in the trained network's format): these
tests check geometry and files; the trained network's accuracy is ``tumorseg dicom-check``'s.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
import yaml

from tumorseg.cli import main
from tumorseg.config import SynthConfig, apply_overrides, read_params
from tumorseg.data.conventions import get_convention
from tumorseg.data.synth import synthesize_case
from tumorseg.dicom import brain
from tumorseg.dicom.config import StudiesConfig
from tumorseg.dicom.heads import synth_head
from tumorseg.dicom.outputs import labels_to_reference, resample_labels
from tumorseg.dicom.prepare import IMPORT_RECORD, Geometry, ImportedCase
from tumorseg.dicom.seg import read_dicom_seg
from tumorseg.dicom.study_synth import write_study

ROOT = Path(__file__).resolve().parents[2]
SEED = 13


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = synthesize_case(2, SynthConfig(spacing_mm=3.0, seed=SEED, tumour_free_fraction=0.0))
    out = tmp_path_factory.mktemp("studies")
    return write_study(case, synth_head(case, SEED), out, 1, StudiesConfig(), SEED, spacing_scale=2.5)


def _rule_extractor() -> brain.BrainExtractor:
    """A brain extractor whose rule is "T1, normalised, above 0.5" (largest component, holes filled)."""
    network = torch.nn.Conv3d(4, 1, kernel_size=1)
    with torch.no_grad():
        network.weight.zero_()
        network.weight[0, 0] = 20.0
        network.bias.fill_(-10.0)
    return brain.BrainExtractor(network, channels=[1, 1], spacing_mm=2.0)


@pytest.fixture(scope="module", autouse=True)
def brain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``dicom.brain.model`` loads the rule (the trained network's loading is tested in tests/unit)."""
    path = tmp_path_factory.mktemp("brain") / brain.CHECKPOINT_FILE
    path.write_bytes(b"")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(brain, "load_brain_extractor", lambda uri, *, tracking_uri: _rule_extractor())
        yield path


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, brain_checkpoint: Path) -> tuple[Path, Path]:
    """``(params.yaml, tumour checkpoint)``: a tiny random-weight U-Net at 4 mm."""
    from tumorseg.models.checkpoint import CONFIG_CHECKPOINT_KEY
    from tumorseg.models.networks import build_network
    from tumorseg.training.config import load_training_config

    root = tmp_path_factory.mktemp("project")
    params = apply_overrides(
        read_params(ROOT / "params.yaml"),
        {
            "paths.mlruns": str(root / "mlruns"),
            "preprocess.target_spacing_mm": [4.0] * 3,
            "data_loader.patch_size": [16, 16, 16],
            "model.unet.channels": [4, 8],
            "model.unet.strides": [2],
            "model.unet.num_res_units": 1,
            "sliding_window.threshold": 0.45,
            "predict.min_component_mm3": 0.0,
            "dicom.brain.model": str(brain_checkpoint),
        },
    )
    cfg = load_training_config(params)
    torch.manual_seed(3)
    network = build_network(
        cfg.model, spatial_dims=3, patch_size=cfg.data_loader.network_patch, spacing=[4.0] * 3
    )
    ckpt = root / "best.ckpt"
    torch.save(
        {
            "state_dict": {f"network.{k}": v for k, v in network.state_dict().items()},
            CONFIG_CHECKPOINT_KEY: cfg.to_dict(),
        },
        ckpt,
    )
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    return params_file, ckpt


def _truth(study: Path) -> dict[str, Any]:
    return json.loads((study.parent / "truth" / study.name / "truth.json").read_text())


def _imported(out: Path) -> tuple[Path, dict[str, Any]]:
    (case_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return case_dir, json.loads((case_dir / IMPORT_RECORD).read_text())


@pytest.fixture(scope="module")
def imported(generated: Path, project: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported")
    params_file, _ = project
    assert main(["import-dicom", str(generated), "--out", str(out), "--params", str(params_file)]) == 0
    return out


def test_import_writes_a_brats_case_with_its_way_back(imported: Path, generated: Path) -> None:
    case_dir, record = _imported(imported)
    names = sorted(p.name for p in case_dir.iterdir())
    assert names == sorted(
        [f"{case_dir.name}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2")] + [IMPORT_RECORD]
    )
    t1ce = nib.load(case_dir / f"{case_dir.name}_t1ce.nii.gz")
    assert np.allclose(np.diag(t1ce.affine)[:3], 1.0)  # 1 mm, RAS-aligned
    assert (np.asarray(t1ce.dataobj) > 0).sum() > 1000
    truth = _truth(generated)
    true_uid = {s["modality"]: s["series_uid"] for s in truth["series"] if s["modality"] != "other"}
    assert {m: s["series_uid"] for m, s in record["series"].items()} == true_uid
    left_out = {s["series_uid"] for s in record["left_out"]}
    assert left_out == {s["series_uid"] for s in truth["series"]} - set(true_uid.values())
    # The T1ce geometry recorded is the series' own, as SimpleITK reads it.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(generated / f) for f in record["t1ce_files"]])
    series = reader.Execute()
    geo = record["t1ce_geometry"]
    assert list(series.GetSize()) == geo["size"]
    np.testing.assert_allclose(series.GetOrigin(), geo["origin"], atol=1e-4)
    np.testing.assert_allclose(series.GetDirection(), geo["direction"], atol=1e-6)
    # Registration: the transforms recorded move the brain where the truth does (coarse 2.5 mm series).
    head_to = {
        s["modality"]: np.asarray(s["head_to_scanner"]) for s in truth["series"] if s["modality"] != "other"
    }
    brain_truth = sitk.ReadImage(str(generated.parent / "truth" / generated.name / "brain_t1ce.nii.gz"))
    idx = np.argwhere(sitk.GetArrayFromImage(brain_truth) > 0)[::50, ::-1]
    points = Geometry.of(brain_truth).index_to_lps() @ np.c_[idx, np.ones(len(idx))].T
    for m in ("t1", "t2", "flair"):
        true = head_to[m] @ np.linalg.inv(head_to["t1ce"])
        estimated = np.asarray(record["fixed_to_moving_lps"][m])
        tre = np.linalg.norm((estimated @ points)[:3] - (true @ points)[:3], axis=0).mean()
        assert tre < 2.5, (m, tre)


def test_labels_come_back_onto_the_t1ce_grid(imported: Path, generated: Path) -> None:
    """The truth labels, put on the imported grid through the true transform and brought back with
    the recorded geometry, land on the truth in the T1ce series' grid."""
    case_dir, record = _imported(imported)
    truth = _truth(generated)
    truth_dir = generated.parent / "truth" / generated.name
    head_to_t1ce = np.asarray(next(s for s in truth["series"] if s["modality"] == "t1ce")["head_to_scanner"])
    seg_file = next((truth_dir / truth["nifti"]).glob("*_seg.nii.gz"))
    seg = nib.load(seg_file)
    canonical = get_convention("brats2021").encode(np.asarray(seg.dataobj).astype(np.uint8))
    grid = Geometry.from_dict(record["case_geometry"])
    on_grid = resample_labels(
        canonical, Geometry.from_ras_affine(seg.affine, seg.shape), grid, np.linalg.inv(head_to_t1ce)
    )
    case = ImportedCase("c", case_dir, None, {}, {}, Geometry.from_dict(record["t1ce_geometry"]), grid, [])  # type: ignore[arg-type]
    back = labels_to_reference(on_grid.transpose(2, 1, 0), case)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / "seg_t1ce.nii.gz")))
    wt_back, wt_true = back > 0, expected > 0
    dice = 2 * (wt_back & wt_true).sum() / (wt_back.sum() + wt_true.sum())
    assert dice > 0.85, dice


def test_predict_on_a_dicom_zip_writes_a_seg_referencing_t1ce(
    generated: Path, project: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file, ckpt = project
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(generated.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(generated))
    out = tmp_path / "pred"
    assert (
        main(["predict", str(archive), "--out", str(out), "--model", str(ckpt), "--params", str(params_file)])
        == 0
    )
    (seg_file,) = out.glob("*_seg.dcm")
    case_id = seg_file.name[: -len("_seg.dcm")]
    assert {p.name for p in out.iterdir() if p.is_file()} >= {
        f"{case_id}.nii.gz",
        f"{case_id}_t1ce.nii.gz",
        seg_file.name,
    }
    _, record = _imported(out / "imported")
    sources = [pydicom.dcmread(generated / f) for f in record["t1ce_files"]]
    regions = read_dicom_seg(seg_file, sources)
    seg = pydicom.dcmread(seg_file)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == record["series"]["t1ce"]["series_uid"]
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case_id}_t1ce.nii.gz")))
    convention = get_convention("brats2021")
    expected = convention.label_set.regions(convention.encode(labels.astype(np.uint8)))
    for i, name in enumerate(convention.label_set.region_names):
        np.testing.assert_array_equal(regions[name], expected[i])
    assert "highdicom" not in capsys.readouterr().err  # no per-module INFO lines


def test_a_study_without_flair_is_refused_in_one_line_with_nothing_written(
    generated: Path, project: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params_file, _ = project
    study = tmp_path / "study"
    shutil.copytree(generated, study)
    truth = _truth(generated)
    flair = next(s for s in truth["series"] if s["modality"] == "flair")
    shutil.rmtree(study / flair["folder"])
    out = tmp_path / "out"
    assert main(["import-dicom", str(study), "--out", str(out), "--params", str(params_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no FLAIR series" in err[0] and "Traceback" not in err[0]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("compare_brain", [False, True])
def test_dicom_check_scores_a_study_and_with_compare_brain_the_extractor_it_did_not_use(
    generated: Path, project: tuple[Path, Path], compare_brain: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tumorseg dicom-check`` on one generated study: the picks against the truth, the TRE, the
    brain extractor (with ``dicom.compare_brain`` also nilearn's MNI152 mask registered to the T1ce:
    on this study's coarse series its rough brain keeps the scalp, so only its presence is checked
    here; tests/unit/test_dicom_atlas.py checks its accuracy), the Dice of the DICOM path and of the
    NIfTI path, written as JSON and Markdown. Without ``compare_brain`` (the default) the other
    extractor is neither run nor reported."""
    params_file, ckpt = project
    params = yaml.safe_load(params_file.read_text())
    params["dicom"]["compare_brain"] = compare_brain
    run_params = params_file.with_name(f"params-compare-{compare_brain}.yaml")
    run_params.write_text(yaml.safe_dump(params))
    args = [
        "dicom-check",
        "--studies",
        str(generated.parent),
        "--model",
        str(ckpt),
        "--params",
        str(run_params),
    ]
    assert main(args) == 0
    assert "dicom-check: 1/1 studies classified right" in capsys.readouterr().out
    report_dir = params_file.parent / "reports" / "dicom"
    report = json.loads((report_dir / "dicom_check.json").read_text())
    (study,) = report["studies"]
    assert study["classification_right"] and study["distractors_picked"] == 0
    assert max(study["tre_mm"].values()) < 2.0  # series 2.5x coarser than a scanner's
    for path in ("dicom_dice", "nifti_dice"):
        assert set(study[path]) == {"WT", "TC", "ET"}
        assert all(0.0 <= v <= 1.0 for v in study[path].values())
    summary = report["summary"]
    assert summary["brain_dice_mean"] == study["brain_dice"] and 0.0 < study["brain_dice"] <= 1.0
    assert summary["dice_gap"] == pytest.approx(
        summary["nifti_dice_mean"] - summary["dicom_dice_mean"], abs=1e-3
    )
    markdown = (report_dir / "dicom_check.md").read_text()
    assert "STUDY_0001" in markdown
    if compare_brain:
        assert report["other_brain_model"] == "mni152"
        assert 0.0 < study["other_brain_dice"] <= 1.0 and study["other_brain_seconds"] > 0
        assert summary["other_brain_dice_mean"] == study["other_brain_dice"]
        assert "brain Dice, mni152" in markdown
    else:
        assert report["other_brain_model"] is None
        assert "other_brain_dice" not in study and "other_brain_dice_mean" not in summary
        assert "mni152" not in markdown and "not scored (`dicom.compare_brain: false`)" in markdown
