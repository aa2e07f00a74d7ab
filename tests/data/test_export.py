"""``tumorseg export``: nnU-Net raw datasets (checked by nnU-Net's own integrity check) and MONAI datalists."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from tests.fixtures_nifti import write_brats_case, write_msd_dataset

from tumorseg.config import IngestConfig
from tumorseg.data.export import export_cases, monai_datalist, nnunet_dataset_json
from tumorseg.data.ingest import ingest
from tumorseg.data.layouts import case_from_manifest_row, discover_cases, read_case
from tumorseg.data.manifest import read_manifest
from tumorseg.errors import DataError


def _cases(src: Path, tmp_path: Path) -> list:
    ingest(src, tmp_path / "ingested", IngestConfig(workers=1))
    rows = read_manifest(tmp_path / "ingested").to_dict(orient="records")
    return [case_from_manifest_row(row) for row in rows]


@pytest.fixture
def brats2021(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for seed, case_id in enumerate(("BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003")):
        write_brats_case(src, case_id, seed=seed)
    write_brats_case(src, "BraTS2021_00004", seed=9, with_seg=False)
    return src


def _verify_with_nnunet(dataset: Path, tmp_path: Path) -> None:
    """nnU-Net v2's own ``verify_dataset_integrity`` (raises on any violation of its format)."""
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.setdefault(key, str(tmp_path / key))
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(dataset), num_processes=1)


def test_nnunet_export_passes_nnunets_check_and_reads_back(brats2021: Path, tmp_path: Path) -> None:
    cases = _cases(brats2021, tmp_path)
    split = {"train": ["BraTS2021_00001", "BraTS2021_00002"], "val": [], "test": ["BraTS2021_00003"]}
    dataset = export_cases(cases, tmp_path / "out", "nnunet", split=split, dataset_id=7, name="Glioma")
    assert dataset.name == "Dataset007_Glioma"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "WT": [1, 2, 3], "TC": [1, 3], "ET": 3}
    assert meta["regions_class_order"] == [2, 1, 3]
    assert meta["numTraining"] == 3 and meta["tumorseg"]["split"]["test"] == ["BraTS2021_00003"]
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [
        f"BraTS2021_00004_{c:04d}.nii.gz" for c in range(4)
    ]
    _verify_with_nnunet(dataset, tmp_path)

    # Internal codes (consecutive, as nnU-Net requires): BraTS 2021's 4 is written as 3.
    original = read_case(next(c for c in cases if c.case_id == "BraTS2021_00001"))
    exported = np.asarray(nib.load(dataset / "labelsTr" / "BraTS2021_00001.nii.gz").dataobj)
    np.testing.assert_array_equal(exported, original.labels)
    t2 = np.asarray(nib.load(dataset / "imagesTr" / "BraTS2021_00001_0002.nii.gz").dataobj)
    np.testing.assert_allclose(t2, original.image[2])

    # tumorseg reads its own export back as an nnU-Net dataset, same cases and labels.
    again = {c.case_id: c for c in discover_cases(dataset)}
    assert sorted(again) == [f"BraTS2021_0000{i}" for i in range(1, 5)]
    back = read_case(again["BraTS2021_00001"])
    np.testing.assert_array_equal(back.labels, original.labels)
    np.testing.assert_allclose(back.image, original.image)


def test_nnunet_check_rejects_a_broken_export(brats2021: Path, tmp_path: Path) -> None:
    """The check is real: a label outside dataset.json makes nnU-Net's verification fail."""
    dataset = export_cases(_cases(brats2021, tmp_path), tmp_path / "out", "nnunet")
    seg_path = dataset / "labelsTr" / "BraTS2021_00001.nii.gz"
    seg = nib.load(seg_path)
    data = np.asarray(seg.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, seg.affine), seg_path)
    with pytest.raises(RuntimeError):
        _verify_with_nnunet(dataset, tmp_path)


def test_msd_export_writes_internal_codes(tmp_path: Path) -> None:
    src = write_msd_dataset(tmp_path / "Task01_BrainTumour", ["BRATS_001", "BRATS_002"])
    cases = _cases(src, tmp_path)
    dataset = export_cases(cases, tmp_path / "out", "nnunet")
    _verify_with_nnunet(dataset, tmp_path)
    original = read_case(cases[0])
    exported = np.asarray(nib.load(dataset / "labelsTr" / f"{cases[0].case_id}.nii.gz").dataobj)
    np.testing.assert_array_equal(exported, original.labels)


def test_monai_datalist_names_the_source_files_and_the_split(brats2021: Path, tmp_path: Path) -> None:
    cases = _cases(brats2021, tmp_path)
    split = {"train": ["BraTS2021_00001"], "val": ["BraTS2021_00002"], "test": ["BraTS2021_00003"]}
    path = export_cases(cases, tmp_path / "out", "monai", split=split)
    data = json.loads(path.read_text())
    assert [e["case_id"] for e in data["training"]] == ["BraTS2021_00001"]
    assert [e["case_id"] for e in data["validation"]] == ["BraTS2021_00002"]
    assert [e["case_id"] for e in data["testing"]] == ["BraTS2021_00003", "BraTS2021_00004"]
    entry = data["training"][0]
    assert [Path(p).name for p in entry["image"]] == [
        f"BraTS2021_00001_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")
    ]
    assert all(Path(p).is_file() for p in [*entry["image"], entry["label"]])
    assert data["label_convention"] == "brats2021" and data["labels"] == {"1": "NCR", "2": "ED", "4": "ET"}
    # MONAI's own reader accepts it.
    from monai.data import load_decathlon_datalist

    assert len(load_decathlon_datalist(str(path), data_list_key="testing")) == 2
    assert monai_datalist(cases, None)["training"][0]["case_id"] == "BraTS2021_00001"


def test_existing_export_is_kept_unless_forced(brats2021: Path, tmp_path: Path) -> None:
    cases = _cases(brats2021, tmp_path)
    first = export_cases(cases, tmp_path / "out", "monai")
    before = first.read_bytes()
    with pytest.raises(DataError, match="exists; pass --force"):
        export_cases(cases, tmp_path / "out", "monai")
    assert first.read_bytes() == before
    export_cases(cases, tmp_path / "out", "monai", force=True)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_dataset_json_follows_the_label_set(tmp_path: Path) -> None:
    from dataclasses import replace

    case = replace(discover_cases(write_brats_case(tmp_path / "s", "BraTS2021_00001"))[0])
    post = replace(case, label_convention="brats2024-gli")
    meta = nnunet_dataset_json([post], None)
    assert meta["labels"] == {"background": 0, "WT": [1, 2, 3], "TC": [1, 3], "ET": 3, "RC": 4}
    assert meta["regions_class_order"] == [2, 1, 3, 4]
    with pytest.raises(DataError, match="mixes label sets"):
        export_cases([case, replace(post, case_id="x")], tmp_path / "o", "nnunet")
