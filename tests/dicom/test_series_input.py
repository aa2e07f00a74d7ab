"""DICOM studies as they come, and broken ones: grouping, picking and reading a generated study; a
folder with no DICOM, a study missing a modality, missing slices, an irregular slice spacing, a file
that is not an image, pixel data the decoders cannot read, a zip. Each bad input is one line naming
the series and what is wrong; the user's files are never modified."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tumorseg.config import SynthConfig
from tumorseg.data.synth import synthesize_case
from tumorseg.dicom.config import ClassifyConfig, RegisterConfig, StudiesConfig
from tumorseg.dicom.heads import synth_head
from tumorseg.dicom.prepare import register_rigid, rigid_matrix
from tumorseg.dicom.series import DicomInputError, dicom_folder, pick_series, read_series, scan
from tumorseg.dicom.study_synth import write_study

CFG = ClassifyConfig()
SEED = 9


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    case = synthesize_case(1, SynthConfig(spacing_mm=3.0, seed=SEED, tumour_free_fraction=0.0))
    out = tmp_path_factory.mktemp("studies")
    return write_study(case, synth_head(case, SEED), out, 1, StudiesConfig(), SEED, spacing_scale=2.5)


@pytest.fixture
def study(generated: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "study"
    shutil.copytree(generated, copy)
    return copy


def _truth(study_dir: Path) -> dict[str, Any]:
    return json.loads((study_dir.parent / "truth" / study_dir.name / "truth.json").read_text())


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _series_folder(study: Path, modality: str) -> Path:
    picked = pick_series(scan(study, CFG)[0])
    return picked[modality].images[0].path.parent


def _error(study: Path, modality: str | None = None) -> str:
    with pytest.raises(DicomInputError) as err:
        picked = pick_series(scan(study, CFG)[0])
        for m in (modality,) if modality else picked:
            read_series(picked[m])
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_the_four_true_series_are_picked_and_distractors_left_out(generated: Path) -> None:
    truth = _truth(generated)
    before = _digest(generated)
    studies = scan(generated, CFG)
    assert len(studies) == 1
    picked = pick_series(studies[0])
    true_uid = {s["modality"]: s["series_uid"] for s in truth["series"] if s["modality"] != "other"}
    assert {m: s.uid for m, s in picked.items()} == true_uid
    image, files = read_series(picked["t1ce"])
    assert image.GetDimension() == 3 and len(files) == image.GetSize()[2]
    assert _digest(generated) == before  # headers and pixels read, nothing written


def test_registration_recovers_the_true_transforms(generated: Path) -> None:
    """Rigid MI registration of T1 and FLAIR onto T1ce: mean error over the head well under 2 voxels
    of these coarse (2.5 mm) series."""
    truth = _truth(generated)
    head_to = {
        s["modality"]: np.asarray(s["head_to_scanner"]) for s in truth["series"] if s["modality"] != "other"
    }
    picked = pick_series(scan(generated, CFG)[0])
    fixed, _ = read_series(picked["t1ce"])
    size = np.asarray(fixed.GetSize())
    grid = np.stack(np.meshgrid(*[np.linspace(0.25, 0.75, 6) * (n - 1) for n in size], indexing="ij"), -1)
    points = np.array(
        [fixed.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in grid.reshape(-1, 3)]
    )
    for m in ("t1", "flair"):
        moving, _ = read_series(picked[m])
        estimated = rigid_matrix(register_rigid(fixed, moving, RegisterConfig()))
        true = head_to[m] @ np.linalg.inv(head_to["t1ce"])
        ones = np.c_[points, np.ones(len(points))].T
        error = np.linalg.norm((estimated @ ones)[:3] - (true @ ones)[:3], axis=0).mean()
        before = np.linalg.norm(ones[:3] - (true @ ones)[:3], axis=0).mean()
        assert error < 2.5, (m, error, before)
        assert error < before / 3


def test_a_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(DicomInputError, match="no DICOM files found"):
        scan(tmp_path, CFG)


def test_a_study_missing_flair_says_what_it_has(study: Path) -> None:
    shutil.rmtree(_series_folder(study, "flair"))
    message = _error(study)
    assert "no FLAIR series" in message and "T1ce: series" in message


def test_a_missing_slice_is_named(study: Path) -> None:
    folder = _series_folder(study, "t2")
    files = sorted(folder.iterdir())
    files[len(files) // 2].unlink()
    message = _error(study, "t2")
    assert "slice(s) missing" in message and "series" in message


def test_an_irregular_slice_spacing_is_named(study: Path) -> None:
    folder = _series_folder(study, "t1")
    files = sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    ds = pydicom.dcmread(files[-1])
    normal = np.cross(np.asarray(ds.ImageOrientationPatient[:3]), np.asarray(ds.ImageOrientationPatient[3:]))
    ds.ImagePositionPatient = [float(v) for v in np.asarray(ds.ImagePositionPatient) + 0.3 * normal]
    ds.save_as(files[-1])
    message = _error(study, "t1")
    assert "slice spacing varies" in message or "missing" in message


def test_a_file_that_is_not_an_image_in_a_series_is_named(study: Path) -> None:
    folder = _series_folder(study, "t1ce")
    ds = pydicom.dcmread(next(folder.iterdir()))
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(ds, keyword)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "IM9999.dcm")
    message = _error(study, "t1ce")
    assert "IM9999.dcm is not an image" in message and "series" in message


def test_pixel_data_no_decoder_reads_is_named(study: Path) -> None:
    folder = _series_folder(study, "flair")
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.203"  # HTJ2K, not decodable here
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 64])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    message = _error(study, "flair")
    assert "HTJ2K" in message and "cannot be decoded" in message and "series" in message


def test_a_zip_is_read_like_its_folder(generated: Path, tmp_path: Path) -> None:
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(generated.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(generated.parent))
    with dicom_folder(archive) as root:
        picked = pick_series(scan(root, CFG)[0])
        assert set(picked) == {"t1", "t1ce", "t2", "flair"}
    assert not root.exists()  # the unpacked copy is removed


def test_a_zip_member_pointing_outside_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../outside.dcm", b"x")
    with pytest.raises(DicomInputError, match="outside the archive"), dicom_folder(archive):
        pass
