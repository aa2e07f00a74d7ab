"""Generated DICOM studies: readable series with the geometry written, the truth that scores them,
distractors, contrast tags, deterministic UIDs and atomic writes (small cases, coarse series)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tumorseg.config import SynthConfig
from tumorseg.data.synth import SyntheticCase, synthesize_case
from tumorseg.dicom import study_synth
from tumorseg.dicom.config import ClassifyConfig, StudiesConfig
from tumorseg.dicom.heads import Head, synth_head
from tumorseg.dicom.study_synth import SeriesTruth, read_truth, synth_studies, write_study

SCALE = 2.5  # series spacing x 2.5: 3-D series at 2.5 mm, 2-D slices of 7.5-12.5 mm
SEED = 5


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    return synthesize_case(1, SynthConfig(spacing_mm=3.0, seed=11, tumour_free_fraction=0.0))


@pytest.fixture(scope="module")
def head(case: SyntheticCase) -> Head:
    return synth_head(case, seed=SEED)


@pytest.fixture(scope="module")
def study(case: SyntheticCase, head: Head, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("studies")
    return write_study(case, head, out, 1, StudiesConfig(), SEED, spacing_scale=SCALE)


@pytest.fixture(scope="module")
def truth(study: Path) -> tuple[dict[str, Any], list[SeriesTruth]]:
    return read_truth(study)


def _files(study: Path, series: SeriesTruth) -> list[Path]:
    return sorted((study / series.folder).glob("*.dcm"))


def _read_series(folder: Path) -> Any:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    (series_id,) = reader.GetGDCMSeriesIDs(str(folder))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series_id))
    return reader.Execute()


def _by_modality(series: list[SeriesTruth]) -> dict[str, SeriesTruth]:
    return {s.modality: s for s in series if s.modality != "other"}


def _head_image(head: Head, modality: str) -> Any:
    """The head as a SimpleITK image in its LPS world (the case's RAS world, x and y negated)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(head.images[modality].transpose(2, 1, 0).copy())
    spacing = np.abs(np.diag(head.affine)[:3])
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in study_synth.LPS_FROM_RAS[:3, :3] @ head.affine[:3, 3]])
    image.SetDirection([-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0])
    return image


def _resampled_head(head: Head, modality: str, reference: Any, head_to_scanner: np.ndarray) -> np.ndarray:
    """The head resampled by SimpleITK onto a series read back, through ``inv(head_to_scanner)``."""
    import SimpleITK as sitk

    inverse = np.linalg.inv(head_to_scanner)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in inverse[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in inverse[:3, 3]])
    moved = sitk.Resample(_head_image(head, modality), reference, transform, sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(moved)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_every_file_is_an_mr_image_with_file_meta(study: Path, truth: tuple[dict, list[SeriesTruth]]) -> None:
    import pydicom

    record, series = truth
    assert record["study_id"] == study.name == "STUDY_0001"
    files = sorted(study.rglob("*"))
    assert all(f.is_dir() or f.suffix == ".dcm" for f in files)
    folders = {s.folder for s in series}
    assert {f.name for f in study.iterdir()} == folders
    for s in series:
        paths = _files(study, s)
        assert len(paths) == s.geometry.get("slices", 3)
        for path in paths:
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.SOPClassUID == study_synth.MR_IMAGE_STORAGE and ds.Modality == "MR"
            assert ds.StudyInstanceUID == record["study_instance_uid"]
            assert ds.FrameOfReferenceUID == record["frame_of_reference_uid"]
            assert ds.SeriesInstanceUID == s.series_uid and int(ds.SeriesNumber) == s.series_number
            assert str(ds.PatientName) == "SYNTH^HEAD1" and ds.Manufacturer == record["manufacturer"]
            assert ds.SeriesDescription == s.description
            pixels = ds.pixel_array
            assert pixels.dtype == np.uint16 and pixels.shape == (ds.Rows, ds.Columns)
            assert pixels.max() <= 4095 and ds.BitsStored == 12


def test_simpleitk_reads_each_series_with_the_geometry_written(
    study: Path, truth: tuple[dict, list[SeriesTruth]]
) -> None:
    _, series = truth
    volumes = [s for s in series if s.weighting != "localizer"]
    assert len(volumes) >= 6
    for s in volumes:
        g = s.geometry
        image = _read_series(study / s.folder)
        assert image.GetSize() == (g["columns"], g["rows"], g["slices"]), s.description
        assert np.allclose(image.GetSpacing(), [*g["pixel_spacing"], g["spacing_between_slices"]], atol=1e-4)
        index_to_lps = np.asarray(g["index_to_lps"])
        assert np.allclose(image.GetOrigin(), index_to_lps[:3, 3], atol=1e-4)
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
        assert np.allclose(direction * np.asarray(image.GetSpacing()), index_to_lps[:3, :3], atol=1e-4)


def test_series_show_the_head_where_the_truth_says(
    study: Path, head: Head, truth: tuple[dict, list[SeriesTruth]]
) -> None:
    """SimpleITK resamples the head through each truth transform: it matches the series read back,
    and matches it better than the head left where it was."""
    _, series = truth
    main = _by_modality(series)
    for modality in ("t1ce", "t1", "flair", "t2"):
        s = main[modality]
        image = _read_series(study / s.folder)
        seen = _resampled_head(head, modality, image, s.head_to_scanner)
        got = _corr(np.asarray(__import__("SimpleITK").GetArrayFromImage(image), np.float32), seen)
        assert got > (0.93 if s.geometry["acquisition"] == "3D" else 0.8), (modality, got)
        moved = (
            np.abs(s.head_to_scanner[:3, :3] - np.eye(3)).max() > 0.02
            or np.linalg.norm(s.head_to_scanner[:3, 3]) > 4.0
        )
        if moved:
            unmoved = _resampled_head(head, modality, image, np.eye(4))
            raw = np.asarray(__import__("SimpleITK").GetArrayFromImage(image), np.float32)
            assert got > _corr(raw, unmoved) + 0.02, modality


def test_truth_segmentation_lands_on_the_tumour_in_t1ce_geometry(
    study: Path, case: SyntheticCase, truth: tuple[dict, list[SeriesTruth]]
) -> None:
    import nibabel as nib
    import SimpleITK as sitk

    record, series = truth
    t1ce = _by_modality(series)["t1ce"]
    tdir = study_synth.truth_dir(study)
    seg = nib.load(tdir / record["seg_t1ce"])
    brain = nib.load(tdir / record["brain_t1ce"])
    assert np.asarray(seg.dataobj).dtype == np.uint8
    assert np.allclose(seg.affine, np.asarray(t1ce.geometry["index_to_ras"]))
    assert np.allclose(brain.affine, seg.affine)
    image = sitk.GetArrayFromImage(_read_series(study / t1ce.folder)).transpose(2, 1, 0)  # (c, r, k)
    labels = np.asarray(seg.dataobj)
    mask = np.asarray(brain.dataobj) > 0
    assert labels.shape == image.shape == mask.shape
    assert set(np.unique(labels)) <= set(np.unique(case.labels))
    et = labels == case.code("ET")
    assert et.sum() > 5
    healthy = mask & (labels == 0)
    assert np.median(image[et]) > 1.3 * np.median(image[healthy])  # enhancing where the seg says
    background = np.median(image[~mask])
    assert np.percentile(image[mask], 5) > 2.0 * background
    # Label volumes carried over (within partial-volume differences at 2.5 mm).
    voxel_ml = np.prod(t1ce.geometry["pixel_spacing"] + [t1ce.geometry["spacing_between_slices"]]) / 1000.0
    case_ml = float((case.labels > 0).sum() * np.prod(case.spacing) / 1000.0)
    assert (labels > 0).sum() * voxel_ml == pytest.approx(case_ml, rel=0.2)
    nifti = tdir / record["nifti"]
    assert sorted(p.name for p in nifti.iterdir()) == sorted(
        f"{record['case_id']}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")
    )


def test_distractors_are_there_and_say_what_they_are(truth: tuple[dict, list[SeriesTruth]]) -> None:
    record, series = truth
    weightings = [s.weighting for s in series]
    for kind in ("localizer", "dwi", "adc"):
        assert weightings.count(kind) == 1, kind
    assert sorted(s.modality for s in series if s.modality != "other") == ["flair", "t1", "t1ce", "t2"]
    main = _by_modality(series)
    dups = [s for s in series if s.modality == "other" and s.weighting == "t1"]
    if main["t1"].geometry["acquisition"] == "3D":
        assert len(dups) == 1 and dups[0].geometry["acquisition"] == "2D"
        assert dups[0].geometry["slice_thickness"] >= 5.0 * SCALE
    patterns = ClassifyConfig().patterns["other"]
    for s in series:
        if s.weighting in ("localizer", "dwi", "adc"):
            assert any(re.search(p, s.description, re.IGNORECASE) for p in patterns), s.description
    dwi = next(s for s in series if s.weighting == "dwi")
    adc = next(s for s in series if s.weighting == "adc")
    assert np.array_equal(dwi.head_to_scanner, adc.head_to_scanner)  # ADC derived from the DWI


def test_contrast_agent_only_on_t1ce_and_timings_tell_the_weighting(
    study: Path, truth: tuple[dict, list[SeriesTruth]]
) -> None:
    import pydicom

    _, series = truth
    for s in series:
        for path in _files(study, s)[:2]:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            agent = str(ds.get("ContrastBolusAgent", ""))
            assert bool(agent) == (s.modality == "t1ce"), s.description
            if s.modality == "other":
                continue
            te, tr = float(ds.EchoTime), float(ds.RepetitionTime)
            ti = float(ds.get("InversionTime", 0) or 0)
            cfg = ClassifyConfig()
            if s.modality in ("t1", "t1ce"):
                assert te < cfg.t1_max_te_ms and ti < cfg.flair_min_ti_ms and tr < 2500
            elif s.modality == "t2":
                assert te > cfg.t2_min_te_ms and ti == 0
            else:
                assert te > cfg.t2_min_te_ms and ti >= cfg.flair_min_ti_ms
            assert ds.MRAcquisitionType == s.geometry["acquisition"]


def _classify(ds: Any, cfg: ClassifyConfig) -> str:
    """The documented rules of ``dicom.classify`` (patterns in order, contrast tags, timings)."""
    text = " ".join(str(ds.get(k, "")) for k in ("SeriesDescription", "ProtocolName", "SequenceName"))
    found = ""
    for modality in cfg.order:
        if any(re.search(p, text, re.IGNORECASE) for p in cfg.patterns[modality]):
            found = modality
            break
    te, ti = float(ds.EchoTime), float(ds.get("InversionTime", 0) or 0)
    if not found:
        if ti >= cfg.flair_min_ti_ms and te > cfg.t2_min_te_ms:
            found = "flair"
        elif te > cfg.t2_min_te_ms:
            found = "t2"
        elif te < cfg.t1_max_te_ms:
            found = "t1"
    if found == "t1" and any(str(ds.get(t, "")) for t in cfg.contrast_tags):
        found = "t1ce"
    return found


@pytest.mark.parametrize("index", [1, 2, 3, 4, 5, 6])
def test_descriptions_vary_and_main_series_are_classifiable(
    index: int, case: SyntheticCase, head: Head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Series plans and tags of several studies (pixels skipped): each main series is what the
    classification rules make of it, a few descriptions say nothing, never T1ce's."""
    import pydicom

    monkeypatch.setattr(study_synth, "_render_series", _tiny_render)
    monkeypatch.setattr(study_synth, "_labels_on", _tiny_labels)
    monkeypatch.setattr(study_synth, "write_case", lambda case, out, layout: Path(out) / "x")
    study = write_study(case, head, tmp_path, index, StudiesConfig(), SEED, spacing_scale=6.0)
    _, series = read_truth(study)
    cfg = ClassifyConfig()
    vague = [s for s in series if s.description in ("", "SE") or s.description.startswith("Series ")]
    assert len(vague) <= 1 and all(s.modality in ("t1", "t2", "flair") for s in vague)
    for s in series:
        ds = pydicom.dcmread(_files(study, s)[0], stop_before_pixels=True)
        if s.modality != "other":
            assert _classify(ds, cfg) == s.modality, (s.description, ds.ProtocolName, ds.SequenceName)


def _tiny_render(head: Head, plan: Any, grids: list, *args: Any) -> np.ndarray:
    return np.ones((sum(g.slices for g in grids), grids[0].rows, grids[0].columns), np.float32)


def _tiny_labels(case: SyntheticCase, head: Head, grid: Any, transform: np.ndarray) -> tuple:
    shape = (grid.columns, grid.rows, grid.slices)
    return np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)


def test_vague_descriptions_occur_in_about_one_study_in_three() -> None:
    cfg = StudiesConfig()
    vague = [
        any(p.vague for p in study_synth._plan_series(study_synth._study_rng(SEED, i), cfg))
        for i in range(1, 61)
    ]
    assert 0.15 < np.mean(vague) < 0.5


def test_uids_are_deterministic_per_seed(
    study: Path, case: SyntheticCase, head: Head, tmp_path: Path, truth: tuple[dict, list[SeriesTruth]]
) -> None:
    import pydicom

    record, series = truth
    again = write_study(case, head, tmp_path / "again", 1, StudiesConfig(), SEED, spacing_scale=SCALE)
    record2, series2 = read_truth(again)
    assert record2["study_instance_uid"] == record["study_instance_uid"]
    assert [s.series_uid for s in series2] == [s.series_uid for s in series]
    first = _files(study, series[-1])[3]
    ds1, ds2 = pydicom.dcmread(first), pydicom.dcmread(again / series[-1].folder / first.name)
    assert ds1.SOPInstanceUID == ds2.SOPInstanceUID
    assert np.array_equal(ds1.pixel_array, ds2.pixel_array)
    cfg = StudiesConfig(distractors=False)
    other = write_study(case, head, tmp_path / "other", 1, cfg, SEED + 1, spacing_scale=4.0)
    record3, series3 = read_truth(other)
    assert record3["study_instance_uid"] != record["study_instance_uid"]
    assert not {s.series_uid for s in series3} & {s.series_uid for s in series}
    assert len(series3) == 4 and all(s.modality != "other" for s in series3)


def test_a_failed_write_leaves_no_study_behind(
    case: SyntheticCase, head: Head, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = study_synth._write_series
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        original(*args, **kwargs)

    monkeypatch.setattr(study_synth, "_write_series", failing)
    cfg = StudiesConfig(distractors=False)
    with pytest.raises(OSError, match="No space"):
        write_study(case, head, tmp_path, 2, cfg, SEED, spacing_scale=4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truth"]
    assert list((tmp_path / "truth").iterdir()) == []
    # A complete study stays complete when rewriting it fails.
    monkeypatch.setattr(study_synth, "_write_series", original)
    done = write_study(case, head, tmp_path, 2, cfg, SEED, spacing_scale=4.0)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    calls["n"] = 0
    monkeypatch.setattr(study_synth, "_write_series", failing)
    with pytest.raises(OSError):
        write_study(case, head, tmp_path, 2, cfg, SEED, spacing_scale=4.0)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert study_synth.study_complete(tmp_path, 2) and done.is_dir()


def test_synth_studies_builds_each_study_once(
    case: SyntheticCase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tumorseg.params import as_params

    params = as_params({"dicom": {"studies": {"seed": 9, "distractors": False}}})
    asked: list[SynthConfig] = []

    def small_case(index: int, cfg: SynthConfig) -> SyntheticCase:
        asked.append(cfg)
        return case

    monkeypatch.setattr(study_synth, "synthesize_case", small_case)
    monkeypatch.setattr(study_synth, "write_study", functools.partial(write_study, spacing_scale=4.0))
    lines: list[str] = []
    paths = synth_studies(params, out=tmp_path, n=1, progress=lines.append)
    assert paths == [tmp_path / "STUDY_0001"] and study_synth.study_complete(tmp_path, 1)
    assert asked[0].spacing_mm == 1.0 and asked[0].seed == 9 and asked[0].layout == "brats2021"
    assert lines == []  # progress of studies written: done/total, rate, time left in the log
    again = synth_studies(params, out=tmp_path, n=1, progress=lines.append)
    assert again == paths and len(asked) == 1
    assert lines == ["dicom studies: 1/1 STUDY_0001 already complete"]


@pytest.mark.slow  # three BraTS-size studies at 1 mm: about a minute on 2 cores
def test_studies_written_by_worker_processes_equal_those_written_in_this_process(tmp_path: Path) -> None:
    import shutil

    import nibabel as nib

    from tumorseg.params import as_params

    params = as_params({"dicom": {"studies": {"seed": 9, "distractors": False}}})
    in_workers = synth_studies(params, out=tmp_path / "workers", n=2, progress=print, workers=2)
    here = tmp_path / "here"
    here.mkdir()
    # study 1 as the workers left it: only study 2 is written, in this process
    shutil.copytree(in_workers[0], here / in_workers[0].name)
    shutil.copytree(study_synth.truth_dir(in_workers[0]), study_synth.truth_dir(here / in_workers[0].name))
    in_process = synth_studies(params, out=here, n=2, progress=print, workers=1)
    assert [p.name for p in in_process] == [p.name for p in in_workers] == ["STUDY_0001", "STUDY_0002"]
    for root in (in_workers[1], study_synth.truth_dir(in_workers[1])):
        other = here / root.relative_to(tmp_path / "workers")
        files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
        for name in files:
            a, b = root / name, other / name
            if a.name.endswith(".nii.gz"):  # gzip stores a time: compare the images
                x, y = nib.load(a), nib.load(b)
                assert np.array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj)), name
                assert np.array_equal(x.affine, y.affine), name
            else:
                assert a.read_bytes() == b.read_bytes(), name
