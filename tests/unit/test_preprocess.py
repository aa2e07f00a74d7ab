"""Preprocessing (RAS, resampling, brain crop, z-score), its exact inverse, and the dataset stage."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tumorseg.config import IngestConfig, PreprocessConfig
from tumorseg.data import case_store
from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.ingest import ingest
from tumorseg.data.layouts import (
    CaseVolumes,
    discover_cases,
    orientation_code,
    read_case,
    spacing_from_affine,
)
from tumorseg.data.manifest import read_manifest, write_manifest
from tumorseg.data.preprocess import (
    INDEX_COLUMNS,
    _reorient,
    preprocess_case,
    preprocess_dataset,
    read_preprocessed,
    resize,
    resize_labels,
    restore_to_source,
    restored_label_counts,
)
from tumorseg.errors import DataError


def _load_fixtures():
    path = Path(__file__).resolve().parents[1] / "fixtures_nifti.py"
    spec = importlib.util.spec_from_file_location("fixtures_nifti", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fx = _load_fixtures()


def _volumes(
    shape: tuple[int, int, int] = (30, 34, 26),
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    orientation: str = "RAS",
    tumour_radius: float = 4.0,
    with_labels: bool = True,
) -> CaseVolumes:
    """A phantom case in memory, stored in ``orientation`` (as read_case would return it)."""
    images, labels = fx.phantom(shape, tumour_radius=tumour_radius)
    stored = [fx.oriented(images[m], spacing, orientation) for m in CANONICAL_MODALITIES]
    stored_labels, affine = fx.oriented(labels, spacing, orientation)
    return CaseVolumes(
        case_id="case",
        patient_id="patient",
        layout="brats2021",
        image=np.stack([s for s, _ in stored]).astype(np.float32),
        labels=stored_labels if with_labels else None,
        affine=affine,
        spacing=spacing_from_affine(affine),
        orientation=orientation_code(affine),
        label_convention="brats2021",
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _roundtrip(geometry: dict) -> dict:
    return json.loads(json.dumps(geometry))  # what predict reads back from the JSON file


# ---------------------------------------------------------------------------- one case
def test_output_arrays_brain_crop_and_zscore() -> None:
    volumes = _volumes()
    case = preprocess_case(volumes, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0), crop_margin_vox=2))
    assert case.image.dtype == np.float16 and case.image.shape[0] == 4
    assert case.label.dtype == np.uint8 and case.brain.dtype == bool
    assert case.image.shape[1:] == case.label.shape == case.brain.shape
    assert case.has_label
    # Cropped to the brain bounding box + 2 voxels: the margin planes hold no brain.
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        profile = case.brain.any(axis=other)
        assert not profile[:2].any() and not profile[-2:].any() and profile[2] and profile[-3]
    image = case.image.astype(np.float32)
    for channel in range(4):
        inside = image[channel][case.brain]
        assert inside.mean() == pytest.approx(0.0, abs=1e-2)
        assert inside.std() == pytest.approx(1.0, abs=1e-2)
        assert not image[channel][~case.brain].any()  # background exactly 0
    assert case.geometry["tumour_voxels"] == int(np.count_nonzero(volumes.labels))
    assert case.geometry["tumour_volume_ml"] == pytest.approx(
        np.count_nonzero(volumes.labels) * 8 / 1000, abs=1e-3
    )


def test_float16_storage_is_numpys_cast_of_the_float32_scores_bit_for_bit() -> None:
    """The float16 image is a torch copy of the float32 z-scores: the same bits as numpy's cast."""
    volumes = _volumes()
    rng = np.random.default_rng(0)
    # Wide-ranging values (tiny ones round to float16 subnormals; large ones are clipped first).
    volumes.image[volumes.image != 0] *= rng.lognormal(0.0, 4.0, np.count_nonzero(volumes.image))
    volumes.image[0, 15, 17, 13] = 1e9
    as16 = preprocess_case(volumes, PreprocessConfig(storage_dtype="float16"))
    as32 = preprocess_case(volumes, PreprocessConfig(storage_dtype="float32"))
    assert as32.image.dtype == np.float32 and as16.image.dtype == np.float16
    limit = np.finfo(np.float16).max
    expected = np.clip(as32.image, -limit, limit).astype(np.float16)
    assert np.array_equal(as16.image.view(np.uint16), expected.view(np.uint16))
    assert not (as16.image.view(np.uint16)[:, ~as16.brain]).any()  # background is +0.0, never -0.0
    assert as16.geometry["normalization"] == as32.geometry["normalization"]


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "LAS", "PIR"])
def test_round_trip_is_exact_at_equal_spacing(orientation: str) -> None:
    volumes = _volumes(orientation=orientation)
    case = preprocess_case(volumes, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0)))
    geometry = _roundtrip(case.geometry)
    assert geometry["source_orientation"] == orientation
    restored = restore_to_source(case.label, geometry, is_label=True)
    assert restored.shape == volumes.labels.shape and restored.dtype == np.uint8
    np.testing.assert_array_equal(restored, volumes.labels)
    np.testing.assert_allclose(np.array(geometry["source_affine"]), volumes.affine)
    # The image round trip is exact too, up to the z-score (inside the brain) and storage precision.
    image = restore_to_source(case.image.astype(np.float32), geometry, is_label=False)
    mean, std = geometry["normalization"]["mean"][0], geometry["normalization"]["std"][0]
    brain = volumes.image[0] != 0
    np.testing.assert_allclose((image[0] * std + mean)[brain], volumes.image[0][brain], rtol=2e-3, atol=0.5)


@pytest.mark.parametrize("orientation", ["RAS", "LPS"])
def test_round_trip_1mm_2mm_1mm_keeps_the_tumour(orientation: str) -> None:
    volumes = _volumes(
        shape=(96, 100, 84), spacing=(1.0, 1.0, 1.0), orientation=orientation, tumour_radius=15
    )
    case = preprocess_case(volumes, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0)))
    geometry = _roundtrip(case.geometry)
    assert geometry["resampled_shape"] == [48, 50, 42]
    assert geometry["resampled_spacing_mm"] == pytest.approx([2.0, 2.0, 2.0])
    restored = restore_to_source(case.label, geometry, is_label=True)
    assert restored.shape == volumes.labels.shape
    for codes in ((1, 2, 3), (1, 3)):  # whole tumour, tumour core
        assert _dice(np.isin(restored, codes), np.isin(volumes.labels, codes)) > 0.95
    probabilities = np.stack([case.label == k for k in range(4)]).astype(np.float32)
    restored_prob = restore_to_source(probabilities, geometry, is_label=False)
    assert restored_prob.shape == (4, *volumes.labels.shape) and restored_prob.dtype == np.float32
    assert _dice(restored_prob.argmax(0) > 0, volumes.labels > 0) > 0.95


@pytest.mark.parametrize(
    ("shape", "spacing", "orientation"),
    [
        ((96, 100, 84), (1.0, 1.0, 1.0), "LPS"),
        ((61, 47, 39), (1.2, 0.9, 2.5), "PIR"),
        ((40, 40, 40), (2.0, 2.0, 2.0), "RAS"),
    ],
)
def test_restored_label_counts_equal_counting_the_restored_map(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], orientation: str
) -> None:
    """Counting on the small grid, weighted by each voxel's copies, gives the restored map's counts."""
    volumes = _volumes(shape=shape, spacing=spacing, orientation=orientation, tumour_radius=12)
    case = preprocess_case(volumes, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0)))
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, case.label.shape, dtype=np.uint8)  # every code everywhere, edges too
    restored = restore_to_source(labels, case.geometry, is_label=True)
    expected = {code: int(np.count_nonzero(restored == code)) for code in (0, 1, 2, 3)}
    counts = restored_label_counts(labels, case.geometry, (1, 2, 3))
    assert counts == {code: expected[code] for code in (1, 2, 3)}
    # Background outside the crop is added by restoration, never counted as a code.
    assert sum(counts.values()) + expected[0] == restored.size


def test_preprocessed_affine_keeps_world_positions() -> None:
    volumes = _volumes(spacing=(1.2, 0.9, 2.5), orientation="PIR")
    case = preprocess_case(volumes, PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0)))
    affine = np.array(case.geometry["preprocessed_affine"])
    assert orientation_code(affine) == "RAS"

    def centroid(mask: np.ndarray, aff: np.ndarray) -> np.ndarray:
        return (aff @ np.r_[np.argwhere(mask).mean(axis=0), 1.0])[:3]

    np.testing.assert_allclose(
        centroid(case.label == 3, affine), centroid(volumes.labels == 3, volumes.affine), atol=0.5
    )
    np.testing.assert_allclose(case.geometry["resampled_spacing_mm"], [2.0, 2.0, 2.0], atol=0.15)


def test_unlabelled_case_gets_zero_labels() -> None:
    case = preprocess_case(_volumes(with_labels=False), PreprocessConfig())
    assert not case.has_label and not case.label.any() and case.geometry["tumour_voxels"] == 0


def test_nan_and_empty_images_are_one_line_errors() -> None:
    volumes = _volumes()
    volumes.image[1, 3, 3, 3] = np.nan
    with pytest.raises(DataError, match=r"case: t1ce has 1 NaN/inf voxels"):
        preprocess_case(volumes, PreprocessConfig())
    volumes.image[:] = 0
    with pytest.raises(DataError, match="no brain"):
        preprocess_case(volumes, PreprocessConfig())


def test_restore_rejects_a_volume_of_the_wrong_shape() -> None:
    case = preprocess_case(_volumes(), PreprocessConfig())
    with pytest.raises(ValueError, match="expected"):
        restore_to_source(case.label[:-1], case.geometry, is_label=True)


def test_resize_matches_scipy_grid_mode_and_labels_keep_their_values() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    volume = rng.normal(size=(2, 11, 9, 7)).astype(np.float32)
    ours = resize(volume, (6, 13, 4), order=1)
    zoom = [6 / 11, 13 / 9, 4 / 7]
    reference = np.stack([ndimage.zoom(c, zoom, order=1, mode="nearest", grid_mode=True) for c in volume])
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    labels = rng.choice([0, 1, 2, 3], size=(11, 9, 7)).astype(np.uint8)
    for method in ("onehot_linear", "nearest"):
        out = resize_labels(labels, (6, 13, 4), method)
        assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1, 2, 3}
    # 2x majority: a 2x2x2 block of label 2 with one voxel of 1 stays 2.
    block = np.full((2, 2, 2), 2, np.uint8)
    block[0, 0, 0] = 1
    assert resize_labels(block, (1, 1, 1), "onehot_linear")[0, 0, 0] == 2


def test_resize_and_preprocess_give_the_same_result_for_nifti_ordered_channels() -> None:
    """read_case hands over Fortran-ordered channels (NIfTI's layout); the result must not depend on it."""
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(4, 11, 9, 7)).astype(np.float32)
    fortran = np.moveaxis(np.asfortranarray(np.moveaxis(volume, 0, -1)), -1, 0)
    assert not fortran.flags.c_contiguous and np.array_equal(fortran, volume)
    resized = resize(fortran, (6, 13, 4), order=1)
    assert resized.flags.c_contiguous
    np.testing.assert_allclose(resized, resize(volume, (6, 13, 4), order=1), atol=1e-6)

    case = _volumes(spacing=(1.0, 1.0, 1.0))
    fortran_case = CaseVolumes(
        **{**case.__dict__, "image": np.moveaxis(np.asfortranarray(np.moveaxis(case.image, 0, -1)), -1, 0)}
    )
    cfg = PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0))
    a, b = preprocess_case(case, cfg), preprocess_case(fortran_case, cfg)
    np.testing.assert_allclose(b.image, a.image, atol=1e-5)
    norm_a, norm_b = a.geometry.pop("normalization"), b.geometry.pop("normalization")
    assert a.geometry == b.geometry
    # float32 sums in another memory order differ in the last bits only
    np.testing.assert_allclose(norm_b["mean"], norm_a["mean"], rtol=1e-6)
    np.testing.assert_allclose(norm_b["std"], norm_a["std"], rtol=1e-6)


def test_nearest_resize_equals_one_fancy_index_in_either_memory_order() -> None:
    """The per-axis gathers pick exactly the voxels of the textbook np.ix_ index (nearest-exact)."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, size=(13, 17, 11)).astype(np.uint8)
    for shape in ((26, 34, 22), (7, 9, 30), (13, 5, 11)):
        index = np.ix_(
            *(
                np.minimum(np.floor((np.arange(o) + 0.5) * i / o).astype(int), i - 1)
                for i, o in zip(labels.shape, shape, strict=True)
            )
        )
        expected = labels[index]
        assert np.array_equal(resize(labels, shape, order=0), expected)
        assert np.array_equal(resize(np.asfortranarray(labels), shape, order=0), expected)
        channels = np.stack([labels, labels[::-1]])
        assert np.array_equal(resize(channels, shape, order=0)[1], labels[::-1][index])


@pytest.mark.parametrize(
    ("layout", "orientation", "image_dtype", "order"),
    [
        ("brats2021", "RAS", np.int16, 1),
        ("brats2021", "LPS", np.int16, 1),
        ("brats2023", "LIA", np.float32, 1),
        ("brats2021", "LPS", np.int16, 0),
        ("brats2021", "RAS", np.float32, 3),
    ],
)
def test_reading_and_preprocessing_per_modality_gives_the_same_bits(
    tmp_path: Path, layout: str, orientation: str, image_dtype: type, order: int
) -> None:
    """read_preprocessed (a thread per file, no full-resolution float image) == preprocess_case(read_case)."""
    fx.write_brats_case(
        tmp_path,
        "BraTS2021_00001" if layout == "brats2021" else "BraTS-GLI-00001-000",
        layout=layout,
        orientation=orientation,
        spacing=(1.0, 1.2, 1.0),
        shape=(31, 27, 23),
        image_dtype=image_dtype,
    )
    (case,) = discover_cases(tmp_path)
    cfg = PreprocessConfig(target_spacing_mm=(2.0, 2.0, 2.0), image_interpolation_order=order)
    for labels in (True, False):
        expected = preprocess_case(read_case(case) if labels else read_case(_without_seg(case)), cfg)
        fused = read_preprocessed(case, cfg, labels=labels)
        assert np.array_equal(fused.image, expected.image)
        assert np.array_equal(fused.label, expected.label) and np.array_equal(fused.brain, expected.brain)
        assert fused.geometry == expected.geometry
        assert fused.has_label is labels


def _without_seg(case):
    return case.__class__(**{**case.__dict__, "paths": {**case.paths, "seg": None}})


def test_reading_and_preprocessing_reports_bad_files_as_read_case_does(tmp_path: Path) -> None:
    good = fx.write_brats_case(tmp_path / "a", "BraTS2021_00001")
    cfg = PreprocessConfig()
    (good / "BraTS2021_00001_t2.nii.gz").write_bytes(b"\x1f\x8b broken")
    (case,) = discover_cases(tmp_path / "a")
    with pytest.raises(DataError, match="BraTS2021_00001_t2.nii.gz") as fused:
        read_preprocessed(case, cfg)
    with pytest.raises(DataError) as plain:
        read_case(case)
    assert str(fused.value) == str(plain.value)

    other = fx.write_brats_case(tmp_path / "b", "BraTS2021_00002")
    fx.write_brats_case(tmp_path / "c", "BraTS2021_00002", shape=(20, 28, 20))
    (tmp_path / "c" / "BraTS2021_00002" / "BraTS2021_00002_flair.nii.gz").replace(
        other / "BraTS2021_00002_flair.nii.gz"
    )
    (case,) = discover_cases(tmp_path / "b")
    with pytest.raises(DataError, match="shapes differ"):
        read_preprocessed(case, cfg)


def test_msd_images_take_the_read_case_path_with_the_same_result(tmp_path: Path) -> None:
    """One 4-D file holds the four modalities: nothing to overlap, read_case reads it."""
    fx.write_msd_dataset(tmp_path / "Task01_BrainTumour", ["BRATS_001"], orientation="LPS")
    cfg = PreprocessConfig()
    for case in discover_cases(tmp_path / "Task01_BrainTumour"):
        a, b = read_preprocessed(case, cfg), preprocess_case(read_case(case), cfg)
        assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
        assert a.geometry == b.geometry


# ---------------------------------------------------------------------------- dataset stage
@pytest.fixture
def ingested(tmp_path: Path) -> tuple[Path, Path]:
    """An ingested dataset: 3 good cases (one LPS at 1 mm, one unlabelled) and one quarantined case."""
    raw = tmp_path / "raw"
    fx.write_brats_case(raw, "BraTS2021_00001")
    fx.write_brats_case(
        raw, "BraTS2021_00002", orientation="LPS", spacing=(1.0, 1.0, 1.0), shape=(40, 44, 36)
    )
    fx.write_brats_case(raw, "BraTS2021_00003", with_seg=False)
    broken = fx.write_brats_case(raw, "BraTS2021_00004")
    (broken / "BraTS2021_00004_t2.nii.gz").unlink()
    ingest(raw, tmp_path / "ingested", IngestConfig())
    return raw, tmp_path / "ingested"


def test_dataset_outputs_follow_the_contract(ingested: tuple[Path, Path], tmp_path: Path) -> None:
    raw, manifest_dir = ingested
    before = fx.snapshot(raw)
    out = tmp_path / "pre"
    summary = preprocess_dataset(manifest_dir, out, PreprocessConfig(workers=2))
    assert (summary.cases, summary.processed, summary.skipped) == (3, 3, 0)
    assert fx.snapshot(raw) == before

    index = pd.read_csv(out / "index.csv", dtype=str, keep_default_na=False)
    assert list(index.columns) == INDEX_COLUMNS
    assert list(index["case_id"]) == ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"]
    assert list(index["has_label"]) == ["True", "True", "False"]
    assert list(index["has_tumour"]) == ["True", "True", "False"]
    assert set(index["subset"]) == set(index["fold"]) == set(index["duplicate_of"]) == {""}
    for row in index.to_dict(orient="records"):
        with np.load(out / row["npz"]) as npz:
            codes = {f"loc_{c}" for c in np.unique(npz["label"])}
            assert set(npz.files) == {"image", "label", "brain", "loc_fg", "loc_0"} | codes
            image, label, brain = npz["image"], npz["label"], npz["brain"]
            locations = {key: npz[key] for key in npz.files if key.startswith("loc_")}
        assert image.dtype == np.float16 and label.dtype == np.uint8 and brain.dtype == bool
        # patch-centre samples: voxels of their label (loc_0: brain background), at most sample_locations
        for key, coords in locations.items():
            assert coords.dtype == np.uint16 and coords.shape[1] == 3 and len(coords) <= 10000
            values = label[tuple(coords.T)]
            if key == "loc_fg":
                assert len(coords) == min(np.count_nonzero(label), 10000) and (values > 0).all()
            elif key == "loc_0":
                assert (values == 0).all() and brain[tuple(coords.T)].all()
            else:
                assert (values == int(key[4:])).all()
        assert image.shape == (4, *label.shape) and label.shape == brain.shape
        assert row["shape"] == "x".join(map(str, label.shape))
        geometry = json.loads((out / "cases" / f"{row['case_id']}.json").read_text())
        for key in (
            "source_shape",
            "source_affine",
            "source_orientation",
            "ras_shape",
            "resampled_shape",
            "target_spacing_mm",
            "crop_bbox",
            "label_convention",
            "layout",
            "case_id",
            "patient_id",
        ):
            assert key in geometry
        if geometry["source_spacing_mm"] == [2.0, 2.0, 2.0]:  # same grid: the crop keeps every tumour voxel
            assert int(row["tumour_voxels"]) == int(np.count_nonzero(label))
    lps = json.loads((out / "cases" / "BraTS2021_00002.json").read_text())
    assert lps["source_orientation"] == "LPS" and lps["source_shape"] == [40, 44, 36]
    manifest = read_manifest(manifest_dir).set_index("case_id")
    assert float(index.set_index("case_id").loc["BraTS2021_00002", "tumour_volume_ml"]) == pytest.approx(
        float(manifest.loc["BraTS2021_00002", "tumour_volume_ml"])
    )
    assert not list((out / "cases").glob(".*"))  # no temp files


def test_rerun_skips_up_to_date_cases_and_redoes_changed_ones(
    ingested: tuple[Path, Path], tmp_path: Path
) -> None:
    _, manifest_dir = ingested
    out = tmp_path / "pre"
    preprocess_dataset(manifest_dir, out, PreprocessConfig())
    stamp = (out / "cases" / "BraTS2021_00001.npz").stat().st_mtime_ns
    again = preprocess_dataset(manifest_dir, out, PreprocessConfig())
    assert (again.processed, again.skipped) == (0, 3)
    assert (out / "cases" / "BraTS2021_00001.npz").stat().st_mtime_ns == stamp
    # Workers do not change the content: still up to date.
    assert preprocess_dataset(manifest_dir, out, PreprocessConfig(workers=1)).processed == 0
    # The storage format does: training memory-maps stored (uncompressed) members only, so switching
    # compress_npz rewrites every case, both ways.
    assert preprocess_dataset(manifest_dir, out, PreprocessConfig(compress_npz=True)).processed == 3
    assert preprocess_dataset(manifest_dir, out, PreprocessConfig(compress_npz=False)).processed == 3
    assert preprocess_dataset(manifest_dir, out, PreprocessConfig()).processed == 0

    changed = preprocess_dataset(manifest_dir, out, PreprocessConfig(crop_margin_vox=3))
    assert changed.processed == 3

    # A case that validation quarantines afterwards disappears from the outputs.
    manifest = read_manifest(manifest_dir)
    manifest.loc[manifest["case_id"] == "BraTS2021_00003", "status"] = "quarantined"
    write_manifest(manifest, manifest_dir)
    pruned = preprocess_dataset(manifest_dir, out, PreprocessConfig(crop_margin_vox=3))
    assert (pruned.cases, pruned.processed, pruned.removed) == (2, 0, 1)
    assert not (out / "cases" / "BraTS2021_00003.npz").exists()


def test_a_source_file_changed_after_ingest_is_an_error(ingested: tuple[Path, Path], tmp_path: Path) -> None:
    raw, manifest_dir = ingested
    images, _ = fx.phantom(seed=5)
    fx.save(
        images["t1"],
        fx.ras_affine(),
        raw / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz",
        np.int16,
    )
    with pytest.raises(DataError, match=r"BraTS2021_00001_t1.nii.gz: changed since ingest"):
        preprocess_dataset(manifest_dir, tmp_path / "pre", PreprocessConfig(workers=1))


def test_an_interrupted_write_leaves_no_half_file(
    ingested: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, manifest_dir = ingested
    out = tmp_path / "pre"

    def dies_half_way(fh, arrays, **kwargs) -> None:
        fh.write(b"PK\x03\x04 half an archive")
        raise KeyboardInterrupt

    monkeypatch.setattr(case_store, "write_npz", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        preprocess_dataset(manifest_dir, out, PreprocessConfig(workers=1))
    monkeypatch.undo()
    assert list((out / "cases").iterdir()) == []
    assert not (out / "index.csv").exists()
    assert preprocess_dataset(manifest_dir, out, PreprocessConfig()).processed == 3


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_nothing_half_written(
    ingested: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    _, manifest_dir = ingested
    out = tmp_path / "pre"
    assert preprocess_dataset(manifest_dir, out, PreprocessConfig(workers=1)).processed == 3
    before = {p.name: p.read_bytes() for p in (out / "cases").iterdir()}
    index = (out / "index.csv").read_bytes()

    def disk_fills_up(fh, arrays, **kwargs) -> None:
        fh.write(b"PK\x03\x04 the first blocks")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(case_store, "write_npz", disk_fills_up)
    with pytest.raises(DataError) as caught:  # a rerun with other settings rewrites every case
        preprocess_dataset(manifest_dir, out, PreprocessConfig(workers=1, crop_margin_vox=3))
    message = str(caught.value)
    assert "\n" not in message and "no space left on the device" in message
    assert message.startswith(str(out / "cases")) and ".npz" in message.split(":")[0]
    # the cases and index of the run before are there, whole; no temporary file is left
    assert {p.name: p.read_bytes() for p in (out / "cases").iterdir()} == before
    assert (out / "index.csv").read_bytes() == index
    assert not [p for p in out.rglob(".*") if p.is_file()]


def test_a_manifest_from_elsewhere_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "manifest.csv").write_text(
        "case_id,patient_id,layout,label_convention,status,reason\na,a,msd,msd,ok,\n"
    )
    with pytest.raises(DataError, match="lacks columns"):
        preprocess_dataset(tmp_path, tmp_path / "pre", PreprocessConfig())


def test_no_ok_case_is_an_error(ingested: tuple[Path, Path], tmp_path: Path) -> None:
    _, manifest_dir = ingested
    manifest = read_manifest(manifest_dir)
    manifest["status"] = "quarantined"
    write_manifest(manifest, manifest_dir)
    with pytest.raises(DataError, match="no case has status ok"):
        preprocess_dataset(manifest_dir, tmp_path / "pre", PreprocessConfig())


@pytest.mark.parametrize("codes", ["LPS", "LAS", "PIR", "SLP", "IPL", "ARS"])
@pytest.mark.parametrize("memory_order", ["F", "C"])
def test_reorientation_copies_the_same_values_into_c_order(codes: str, memory_order: str) -> None:
    """The plane-by-plane copy of a reoriented volume is numpy's C-ordered copy, value for value."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

    volume = np.random.default_rng(0).integers(-3000, 3000, (24, 20, 15)).astype(np.int16)
    volume = np.asarray(volume, order=memory_order)
    transform = ornt_transform(axcodes2ornt(tuple(codes)), axcodes2ornt(("R", "A", "S")))
    expected = np.array(apply_orientation(volume, transform), dtype=np.float32, order="C")
    reoriented = _reorient(volume, transform, np.float32)
    assert reoriented.flags.c_contiguous and reoriented.dtype == np.float32
    assert np.array_equal(reoriented, expected)
    assert np.array_equal(_reorient(volume, transform), expected.astype(np.int16))


def test_index_carries_the_datalist_and_duplicate_columns_of_the_manifest(
    ingested: tuple[Path, Path], tmp_path: Path
) -> None:
    """subset/fold (ingest) and duplicate_of (validate) reach index.csv for `tumorseg split`."""
    _, manifest_dir = ingested
    manifest = read_manifest(manifest_dir)
    manifest["subset"] = ["training", "validation", "testing", "training"]
    manifest["fold"] = ["1", "", "", "0"]
    manifest["duplicate_of"] = ["BraTS2021_00001", "BraTS2021_00001", "", ""]
    manifest.to_csv(manifest_dir / "manifest.csv", index=False)
    preprocess_dataset(manifest_dir, tmp_path / "pre", PreprocessConfig(workers=1))
    index = pd.read_csv(tmp_path / "pre" / "index.csv", dtype=str, keep_default_na=False).set_index("case_id")
    assert index["subset"].to_dict() == {
        "BraTS2021_00001": "training",
        "BraTS2021_00002": "validation",
        "BraTS2021_00003": "testing",
    }
    assert index["fold"].tolist() == ["1", "", ""]
    assert index["duplicate_of"].tolist() == ["BraTS2021_00001", "BraTS2021_00001", ""]

    # A manifest without the columns (an older ingest, a 2-D-style table) leaves them empty.
    manifest.drop(columns=["subset", "fold", "duplicate_of"]).to_csv(
        manifest_dir / "manifest.csv", index=False
    )
    preprocess_dataset(manifest_dir, tmp_path / "pre", PreprocessConfig(workers=1))
    index = pd.read_csv(tmp_path / "pre" / "index.csv", dtype=str, keep_default_na=False)
    assert set(index["subset"]) == set(index["fold"]) == set(index["duplicate_of"]) == {""}
