"""Layout detection, case discovery and reading of BraTS 2020/21, BraTS 2023+ and MSD Task01 folders."""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.layouts import (
    case_from_manifest_row,
    detect_layout,
    discover_cases,
    encode_labels,
    label_counts,
    read_case,
    read_nifti,
)
from tumorseg.errors import DataError


def _load_fixtures():
    path = Path(__file__).resolve().parents[1] / "fixtures_nifti.py"
    spec = importlib.util.spec_from_file_location("fixtures_nifti", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fx = _load_fixtures()


def _one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- detection
def test_detects_brats2021_dataset_single_case_and_nested_folder(tmp_path: Path) -> None:
    root = tmp_path / "raw"
    fx.write_brats_case(root, "BraTS2021_00001")
    fx.write_brats_case(root, "BraTS2021_00002")
    assert detect_layout(root) == "brats2021"
    assert detect_layout(root / "BraTS2021_00001") == "brats2021"
    assert [c.case_id for c in discover_cases(root / "BraTS2021_00001")] == ["BraTS2021_00001"]

    nested = tmp_path / "download"
    shutil.copytree(root, nested / "MICCAI_BraTS2021_TrainingData")
    assert [c.case_id for c in discover_cases(nested)] == ["BraTS2021_00001", "BraTS2021_00002"]


def test_brats2020_names_follow_the_brats2021_rule(tmp_path: Path) -> None:
    fx.write_brats_case(tmp_path, "BraTS20_Training_001")
    (case,) = discover_cases(tmp_path)
    assert case.layout == "brats2021" and case.label_convention == "brats2021"
    assert case.paths["t1ce"].name == "BraTS20_Training_001_t1ce.nii.gz"
    assert case.patient_id == case.case_id


def test_brats2023_time_points_share_a_patient_and_any_prefix_works(tmp_path: Path) -> None:
    for case_id in ("BraTS-GLI-00001-000", "BraTS-GLI-00001-001", "BraTS-MEN-00002-000"):
        fx.write_brats_case(tmp_path, case_id, layout="brats2023")
    cases = discover_cases(tmp_path)
    assert detect_layout(tmp_path) == "brats2023"
    assert [(c.case_id, c.patient_id) for c in cases] == [
        ("BraTS-GLI-00001-000", "BraTS-GLI-00001"),
        ("BraTS-GLI-00001-001", "BraTS-GLI-00001"),
        ("BraTS-MEN-00002-000", "BraTS-MEN-00002"),
    ]
    assert cases[0].paths["flair"].name == "BraTS-GLI-00001-000-t2f.nii.gz"
    assert cases[0].label_convention == "brats2023"


def test_msd_task_folder_images_folder_and_hidden_files(tmp_path: Path) -> None:
    task = fx.write_msd_dataset(
        tmp_path / "Task01_BrainTumour", ["BRATS_001", "BRATS_002"], test_ids=("BRATS_485",)
    )
    # The MSD tarball ships macOS resource forks next to every image; they must be ignored.
    (task / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07")
    assert detect_layout(task) == "msd"
    assert detect_layout(tmp_path) == "msd"
    cases = discover_cases(task)
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002", "BRATS_485"]
    train, _, test = cases
    assert len({train.paths[m] for m in CANONICAL_MODALITIES}) == 1
    assert train.paths["seg"] == task / "labelsTr" / "BRATS_001.nii.gz"
    assert test.paths["seg"] is None and test.missing == []
    assert train.channel_order == ("flair", "t1", "t1ce", "t2")
    assert [c.case_id for c in discover_cases(task / "imagesTs")] == ["BRATS_485"]


def test_no_layout_empty_missing_and_mixed_folders_are_one_line_errors(tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "scans").mkdir(parents=True)
    (other / "scans" / "brain.nii.gz").write_bytes(b"x")
    with pytest.raises(DataError) as excinfo:
        detect_layout(other)
    assert "no known dataset layout" in _one_line_error(excinfo)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as excinfo:
        discover_cases(empty)
    assert "empty" in _one_line_error(excinfo)

    with pytest.raises(DataError, match="no such folder"):
        detect_layout(tmp_path / "nope")

    mixed = tmp_path / "mixed"
    fx.write_brats_case(mixed, "BraTS2021_00001")
    fx.write_brats_case(mixed, "BraTS-GLI-00001-000", layout="brats2023")
    with pytest.raises(DataError, match="mixes dataset layouts"):
        detect_layout(mixed)
    assert [c.case_id for c in discover_cases(mixed, "brats2023")] == ["BraTS-GLI-00001-000"]
    with pytest.raises(DataError, match="no msd cases"):
        discover_cases(mixed, "msd")


def test_missing_files_are_listed_and_a_missing_seg_is_an_unlabelled_case(tmp_path: Path) -> None:
    folder = fx.write_brats_case(tmp_path, "BraTS2021_00003", with_seg=False)
    (folder / "BraTS2021_00003_t1ce.nii.gz").unlink()
    (case,) = discover_cases(tmp_path)
    assert case.missing == ["BraTS2021_00003_t1ce.nii.gz"]
    assert case.paths["t1ce"] is None and case.paths["seg"] is None


# ---------------------------------------------------------------------------- reading
@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_read_case_gives_canonical_channels_labels_and_geometry(tmp_path: Path, layout: str) -> None:
    case_id = "BraTS2021_00001" if layout == "brats2021" else "BraTS-GLI-00001-000"
    fx.write_brats_case(tmp_path, case_id, layout=layout, spacing=(1.0, 1.5, 2.0), image_dtype=np.float32)
    volumes = read_case(discover_cases(tmp_path)[0])
    images, labels = fx.phantom()
    assert volumes.image.dtype == np.float32 and volumes.image.shape == (4, 24, 28, 20)
    for channel, modality in enumerate(CANONICAL_MODALITIES):
        np.testing.assert_array_equal(volumes.image[channel], images[modality])
    np.testing.assert_array_equal(volumes.labels, labels)
    assert volumes.labels.dtype == np.uint8 and set(np.unique(volumes.labels)) == {0, 1, 2, 3}
    assert volumes.spacing == pytest.approx((1.0, 1.5, 2.0))
    assert volumes.orientation == "RAS"
    assert volumes.label_convention == layout
    assert set(volumes.sha256) == {"t1", "t1ce", "t2", "flair", "seg"}


def test_read_case_reorders_msd_channels_and_labels(tmp_path: Path) -> None:
    fx.write_msd_dataset(tmp_path, ["BRATS_001"], orientation="LPS")
    volumes = read_case(discover_cases(tmp_path)[0])
    images, labels = fx.phantom()
    for channel, modality in enumerate(CANONICAL_MODALITIES):
        stored, _ = fx.oriented(images[modality], (2.0, 2.0, 2.0), "LPS")
        np.testing.assert_allclose(volumes.image[channel], stored)
    stored_labels, affine = fx.oriented(labels, (2.0, 2.0, 2.0), "LPS")
    np.testing.assert_array_equal(volumes.labels, stored_labels)
    np.testing.assert_allclose(volumes.affine, affine)
    assert volumes.orientation == "LPS" and volumes.label_convention == "msd"


def test_msd_dataset_json_channel_names_are_honoured(tmp_path: Path) -> None:
    import json

    fx.write_msd_dataset(tmp_path, ["BRATS_001"])
    meta = json.loads((tmp_path / "dataset.json").read_text())
    meta["modality"] = {"0": "T1w", "1": "FLAIR", "2": "t1gd", "3": "T2w"}  # channels 0 and 1 swapped
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    volumes = read_case(discover_cases(tmp_path)[0])
    images, _ = fx.phantom()
    np.testing.assert_allclose(volumes.image[CANONICAL_MODALITIES.index("t1")], images["flair"])

    meta["modality"] = {"0": "FLAIR", "1": "T1w", "2": "PD", "3": "T2w"}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="dataset.json"):
        discover_cases(tmp_path)


def test_uncompressed_nii_and_trailing_singleton_axis_are_read(tmp_path: Path) -> None:
    folder = fx.write_brats_case(tmp_path, "BraTS2021_00001")
    images, _ = fx.phantom()
    (folder / "BraTS2021_00001_t2.nii.gz").unlink()
    fx.save(images["t2"][..., None], np.eye(4) * [2, 2, 2, 1], folder / "BraTS2021_00001_t2.nii")
    volumes = read_case(discover_cases(tmp_path)[0])
    np.testing.assert_allclose(volumes.image[2], images["t2"], atol=1e-4)


def _bad_case(tmp_path: Path, damage: str) -> tuple[Path, str]:
    """A BraTS 2021 case with one kind of damage; returns the folder and the damaged file's name."""
    folder = fx.write_brats_case(tmp_path, "BraTS2021_00009")
    name = "BraTS2021_00009_flair.nii.gz"
    target = folder / name
    images, labels = fx.phantom()
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        fx.truncate(target)
    elif damage == "not_nifti":
        target.write_bytes(gzip.compress(b"this is a PNG, honestly" * 50))
    elif damage == "plain_text":
        target.write_text("not an image\n")
    elif damage == "four_d":
        fx.save(np.stack([images["flair"]] * 2, axis=-1), fx.ras_affine(), target)
    elif damage == "shape":
        fx.save(images["flair"][:, :, :18], fx.ras_affine(), target)
    elif damage == "labels":
        name = "BraTS2021_00009_seg.nii.gz"
        bad = np.where(labels == 3, 4, labels)  # brats2021 codes
        bad[0, 0, 0] = 7
        fx.save(bad, fx.ras_affine(), folder / name, np.uint8)
    return folder, name


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("missing", "missing modality file BraTS2021_00009_flair.nii.gz"),
        ("truncated", "BraTS2021_00009_flair.nii.gz is truncated (gzip stream ended early)"),
        ("not_nifti", "BraTS2021_00009_flair.nii.gz is not a NIfTI file"),
        ("plain_text", "BraTS2021_00009_flair.nii.gz is not a NIfTI file"),
        ("four_d", "BraTS2021_00009_flair.nii.gz is 4-D (24x28x20x2); expected a 3-D volume"),
        ("shape", "shapes differ: t1 24x28x20 vs flair 24x28x18"),
        ("labels", "BraTS2021_00009_seg.nii.gz: label values [7] are not in the brats2021 convention"),
    ],
)
def test_read_case_bad_inputs_raise_one_line_errors_naming_the_file(
    tmp_path: Path, damage: str, expected: str
) -> None:
    folder, _ = _bad_case(tmp_path, damage)
    with pytest.raises(DataError) as excinfo:
        read_case(discover_cases(folder)[0])
    message = _one_line_error(excinfo)
    assert message.startswith("BraTS2021_00009: ")
    assert expected in message


def test_truncated_uncompressed_nifti_is_reported(tmp_path: Path) -> None:
    path = fx.save(np.ones((8, 8, 8), np.float32), np.eye(4), tmp_path / "x.nii")
    fx.truncate(path, 0.8)
    with pytest.raises(DataError, match=r"x.nii is truncated"):
        read_nifti(path)


def test_msd_image_with_wrong_channel_count_is_an_error(tmp_path: Path) -> None:
    fx.write_msd_dataset(tmp_path, ["BRATS_001"])
    image = tmp_path / "imagesTr" / "BRATS_001.nii.gz"
    fx.save(np.zeros((24, 28, 20, 3), np.float32), np.eye(4), image)
    with pytest.raises(
        DataError, match=r"BRATS_001.nii.gz is 24x28x20x3; expected a 4-D MSD image with 4 channels"
    ):
        read_case(discover_cases(tmp_path)[0])


def test_sha256_is_of_the_bytes_on_disk(tmp_path: Path) -> None:
    import hashlib

    path = fx.save(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4), tmp_path / "a.nii.gz")
    nifti = read_nifti(path, chunk_bytes=7)  # many chunks
    assert nifti.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    np.testing.assert_array_equal(nifti.data, np.asarray(nib.load(path).dataobj))


def test_label_helpers_match_numpy() -> None:
    rng = np.random.default_rng(3)
    seg = np.asfortranarray(rng.choice([0, 1, 2, 4], size=(9, 8, 7)).astype(np.int16))
    values, counts = label_counts(seg)
    ref_values, ref_counts = np.unique(seg, return_counts=True)
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(counts, ref_counts)
    canonical = encode_labels(seg, "brats2021")
    assert canonical.dtype == np.uint8
    np.testing.assert_array_equal(canonical, np.where(seg == 4, 3, seg))
    with pytest.raises(ValueError, match=r"label values \[3\]"):
        encode_labels(np.array([0, 3], dtype=np.uint8), "brats2021")


def test_case_from_manifest_row_round_trips(tmp_path: Path) -> None:
    fx.write_msd_dataset(tmp_path, ["BRATS_001"])
    (case,) = discover_cases(tmp_path)
    row = {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "layout": case.layout,
        "label_convention": case.label_convention,
        "case_dir": str(case.case_dir),
        **{f"path_{k}": str(p) if p else "" for k, p in case.paths.items()},
    }
    rebuilt = case_from_manifest_row(row)
    assert rebuilt.paths == case.paths and rebuilt.channel_order == case.channel_order
