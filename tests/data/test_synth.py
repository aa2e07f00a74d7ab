"""The embedded synthetic dataset: layouts, determinism, anatomy, contrasts and tumour sub-regions.

Cases are generated at 3-4 mm (a fraction of a second each) except one 1 mm case that checks
the BraTS volume size.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorseg.cli import main as cli_main
from tumorseg.config import SynthConfig
from tumorseg.data.conventions import MSD_CHANNEL_ORDER, MSD_LABEL_NAMES, MSD_MODALITY_NAMES
from tumorseg.data.figures import plot_synthetic_cases
from tumorseg.data.synth import (
    SYNTH_META_NAME,
    SyntheticCase,
    case_id,
    synthesize_case,
    synthesize_dataset,
    write_case,
)
from tumorseg.errors import ConfigError, DataError

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def small(**overrides: object) -> SynthConfig:
    """A fast configuration: 4 mm, no tumour-free cases unless asked."""
    base: dict[str, object] = {
        "spacing_mm": 4.0,
        "cases": 2,
        "tumour_free_fraction": 0.0,
        "reoriented_fraction": 0.0,
    }
    base.update(overrides)
    return SynthConfig(**base)


@pytest.fixture(scope="module")
def necrotic_cases() -> list[SyntheticCase]:
    """Three tumour cases with necrosis at 3 mm, for contrast checks."""
    cfg = SynthConfig(
        spacing_mm=3.0, tumour_free_fraction=0.0, no_necrosis_fraction=0.0, reoriented_fraction=0.0
    )
    return [synthesize_case(i, cfg) for i in (1, 2, 3)]


@pytest.fixture(scope="module")
def cohort() -> tuple[SynthConfig, list[SyntheticCase]]:
    """Twenty 4 mm cases with 30 % tumour-free and half of the tumours without necrosis."""
    cfg = SynthConfig(
        spacing_mm=4.0, tumour_free_fraction=0.3, no_necrosis_fraction=0.5, reoriented_fraction=0.0
    )
    return cfg, [synthesize_case(i, cfg) for i in range(1, 21)]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _seg_values(path: Path) -> set[int]:
    return set(np.unique(np.asarray(nib.load(path).dataobj)).tolist())


# ---------------------------------------------------------------- determinism
def test_same_seed_same_arrays_and_other_seed_differs() -> None:
    cfg = small(seed=7)
    a, b = synthesize_case(2, cfg), synthesize_case(2, cfg)
    for m in a.images:
        assert np.array_equal(a.images[m], b.images[m])
    assert np.array_equal(a.labels, b.labels)
    c = synthesize_case(2, small(seed=8))
    assert not np.array_equal(a.images["t1"], c.images["t1"])


def test_case_k_does_not_depend_on_case_count_and_files_are_byte_identical(tmp_path: Path) -> None:
    synthesize_dataset(tmp_path / "two", small(cases=2))
    synthesize_dataset(tmp_path / "three", small(cases=3))
    for name in ("BraTS2021_00002_t1.nii.gz", "BraTS2021_00002_seg.nii.gz"):
        left = (tmp_path / "two" / "BraTS2021_00002" / name).read_bytes()
        right = (tmp_path / "three" / "BraTS2021_00002" / name).read_bytes()
        assert left == right, name


# ---------------------------------------------------------------- layouts
def test_brats2021_layout_names_and_labels(tmp_path: Path) -> None:
    ids = synthesize_dataset(tmp_path, small(layout="brats2021", no_necrosis_fraction=0.0))
    assert ids == ["BraTS2021_00001", "BraTS2021_00002"]
    expected = sorted(
        f"{cid}/{cid}_{suffix}.nii.gz" for cid in ids for suffix in ("t1", "t1ce", "t2", "flair", "seg")
    )
    assert _files(tmp_path) == sorted([*expected, SYNTH_META_NAME])
    values = set().union(*(_seg_values(tmp_path / cid / f"{cid}_seg.nii.gz") for cid in ids))
    assert values == {0, 1, 2, 4}
    img = nib.load(tmp_path / ids[0] / f"{ids[0]}_t1.nii.gz")
    assert img.get_data_dtype() == np.int16
    assert nib.load(tmp_path / ids[0] / f"{ids[0]}_seg.nii.gz").get_data_dtype() == np.uint8


def test_brats2023_layout_names_and_labels(tmp_path: Path) -> None:
    ids = synthesize_dataset(tmp_path, small(layout="brats2023", no_necrosis_fraction=0.0))
    assert ids == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    expected = sorted(
        f"{cid}/{cid}-{suffix}.nii.gz" for cid in ids for suffix in ("t1n", "t1c", "t2w", "t2f", "seg")
    )
    assert _files(tmp_path) == sorted([*expected, SYNTH_META_NAME])
    values = set().union(*(_seg_values(tmp_path / cid / f"{cid}-seg.nii.gz") for cid in ids))
    assert values == {0, 1, 2, 3}


def test_msd_layout_4d_channel_order_labels_and_dataset_json(tmp_path: Path) -> None:
    cfg = small(layout="msd", no_necrosis_fraction=0.0)
    ids = synthesize_dataset(tmp_path, cfg)
    assert ids == ["BRATS_001", "BRATS_002"]
    assert _files(tmp_path) == sorted(
        [
            "dataset.json",
            SYNTH_META_NAME,
            *(f"{d}/{cid}.nii.gz" for d in ("imagesTr", "labelsTr") for cid in ids),
        ]
    )
    image = nib.load(tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    case = synthesize_case(1, cfg)
    assert image.shape == (*case.shape, 4)
    data = np.asarray(image.dataobj)
    for channel, modality in enumerate(MSD_CHANNEL_ORDER):
        expected = np.clip(np.rint(case.images[modality]), 0, 32767)
        assert np.array_equal(data[..., channel], expected), modality
    labels = np.asarray(nib.load(tmp_path / "labelsTr" / "BRATS_001.nii.gz").dataobj)
    # MSD codes: 1 oedema, 2 non-enhancing/necrotic, 3 enhancing.
    assert np.array_equal(labels == 1, case.labels == 2)
    assert np.array_equal(labels == 2, case.labels == 1)
    assert np.array_equal(labels == 3, case.labels == 3)
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}

    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "4D"
    assert meta["modality"] == MSD_MODALITY_NAMES
    assert meta["labels"] == MSD_LABEL_NAMES
    assert meta["numTraining"] == 2 and meta["numTest"] == 0 and meta["test"] == []
    assert meta["training"] == [
        {"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"} for cid in ids
    ]
    assert {"name", "description"} <= set(meta)


def test_case_ids_follow_the_real_datasets() -> None:
    assert case_id("brats2021", 12) == "BraTS2021_00012"
    assert case_id("brats2023", 12) == "BraTS-GLI-00012-000"
    assert case_id("msd", 12) == "BRATS_012"
    with pytest.raises(ValueError, match="unknown layout"):
        case_id("nifti", 1)


# ---------------------------------------------------------------- writing safety
def test_rerun_keeps_unrelated_files_leaves_no_temp_and_skips_identical_files(tmp_path: Path) -> None:
    cfg = small(cases=1)
    (tmp_path / "notes.txt").write_text("mine")
    synthesize_dataset(tmp_path, cfg)
    case_dir = tmp_path / "BraTS2021_00001"
    (case_dir / "annotations.txt").write_text("also mine")
    t1 = case_dir / "BraTS2021_00001_t1.nii.gz"
    before = t1.stat().st_mtime_ns
    synthesize_dataset(tmp_path, cfg)
    assert t1.stat().st_mtime_ns == before  # identical content is not rewritten
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (case_dir / "annotations.txt").read_text() == "also mine"
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    synthesize_dataset(tmp_path, cfg.model_copy(update={"seed": 5}))  # new content replaces old
    assert t1.stat().st_mtime_ns != before
    meta = json.loads((tmp_path / SYNTH_META_NAME).read_text())
    assert meta["params"]["seed"] == 5
    assert meta["cases"][0]["case_id"] == "BraTS2021_00001"


def test_output_path_that_is_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    target = tmp_path / "raw"
    target.write_text("not a folder")
    with pytest.raises(DataError, match="not a folder"):
        synthesize_dataset(target, small())


def test_out_of_range_options_are_config_errors(tmp_path: Path) -> None:
    # The CLI applies options with model_copy(update=...), which does not validate.
    with pytest.raises(ConfigError, match="synth.spacing_mm"):
        synthesize_dataset(tmp_path, small().model_copy(update={"spacing_mm": 9.0}))
    with pytest.raises(ConfigError, match="synth.cases"):
        synthesize_dataset(tmp_path, small().model_copy(update={"cases": 0}))
    assert not any(tmp_path.iterdir())


def test_cli_synth_writes_the_requested_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "raw"
    rc = cli_main(
        ["synth", "--params", str(PARAMS), "--layout", "brats2023", "--cases", "1", "--seed", "3",
         "--spacing", "4", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert "wrote 1 brats2023 cases" in capsys.readouterr().out
    assert (out / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-t2f.nii.gz").is_file()


# ---------------------------------------------------------------- geometry
def test_one_mm_case_has_the_brats_shape_and_grid() -> None:
    case = synthesize_case(1, SynthConfig(spacing_mm=1.0, reoriented_fraction=0.0))
    assert case.shape == (240, 240, 155)
    assert all(v.shape == (240, 240, 155) and v.dtype == np.float32 for v in case.images.values())
    assert np.allclose(np.diag(case.affine)[:3], 1.0)
    # World box of the BraTS volumes: x -239..0, y 0..239, z 0..154 (RAS).
    corner = case.affine @ np.array([0, 0, 0, 1.0])
    far = case.affine @ np.array([239, 239, 154, 1.0])
    assert np.allclose(corner[:3], [-239.0, 0.0, 0.0]) and np.allclose(far[:3], [0.0, 239.0, 154.0])


@pytest.mark.parametrize("spacing", [2.0, 3.0])
def test_shape_follows_the_field_of_view(spacing: float) -> None:
    case = synthesize_case(1, SynthConfig(spacing_mm=spacing, reoriented_fraction=0.0))
    assert case.shape == tuple(round(f / spacing) for f in (240, 240, 155))
    assert case.spacing == (spacing, spacing, spacing)


def test_anisotropic_cases_have_a_thicker_slice_axis() -> None:
    cfg = small(anisotropic_fraction=1.0, spacing_mm=2.0)
    case = synthesize_case(1, cfg)
    sx, sy, sz = case.spacing
    assert sx == sy == 2.0 and 2.0 * sx <= sz <= 3.0 * sx
    assert case.shape == (120, 120, round(155 / sz))


def test_reoriented_case_reads_back_as_the_ras_case(tmp_path: Path) -> None:
    case = synthesize_case(1, small(reoriented_fraction=1.0))
    assert case.orientation in ("LPS", "LAS")
    stored = write_case(case, tmp_path / "stored", "brats2021")
    ras = write_case(case, tmp_path / "ras", "brats2021", orientation="RAS")
    for suffix in ("seg", "flair"):
        a = nib.load(stored / f"{stored.name}_{suffix}.nii.gz")
        b = nib.load(ras / f"{ras.name}_{suffix}.nii.gz")
        assert "".join(nib.aff2axcodes(a.affine)) == case.orientation
        assert "".join(nib.aff2axcodes(b.affine)) == "RAS"
        canonical = nib.as_closest_canonical(a)
        assert np.allclose(canonical.affine, b.affine)
        assert np.array_equal(np.asarray(canonical.dataobj), np.asarray(b.dataobj))
        assert not np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))  # really flipped on disk


# ---------------------------------------------------------------- anatomy and contrast
def _pure(case: SyntheticCase, tissue: str) -> np.ndarray:
    """Healthy voxels of one tissue (probability > 0.9, outside the tumour)."""
    return (case.tissue[tissue] > 0.9) & (case.labels == 0) & case.brain_mask


def test_healthy_tissue_contrasts_follow_the_sequences(necrotic_cases: list[SyntheticCase]) -> None:
    for case in necrotic_cases:
        mean = {
            (m, t): float(case.images[m][_pure(case, t)].mean())
            for m in case.images
            for t in ("gm", "wm", "csf")
        }
        assert mean["t1", "wm"] > mean["t1", "gm"] > mean["t1", "csf"], case.index
        assert mean["t1ce", "wm"] > mean["t1ce", "gm"] > mean["t1ce", "csf"], case.index
        assert mean["t2", "csf"] > mean["t2", "gm"] > mean["t2", "wm"], case.index
        assert mean["flair", "gm"] > mean["flair", "wm"] > mean["flair", "csf"], case.index


def test_tumour_subregions_have_their_appearance(necrotic_cases: list[SyntheticCase]) -> None:
    for case in necrotic_cases:
        ncr, ed, et = (case.labels == k for k in (1, 2, 3))
        assert ncr.any() and ed.any() and et.any(), case.index
        wm = _pure(case, "wm")
        flair, t1ce, t2 = case.images["flair"], case.images["t1ce"], case.images["t2"]
        assert flair[ed].mean() > 1.3 * flair[wm].mean(), case.index  # oedema bright on FLAIR
        assert t2[ed].mean() > 1.3 * t2[wm].mean(), case.index
        assert t1ce[et].mean() > 1.2 * t1ce[wm].mean(), case.index  # enhancing rim
        assert t1ce[et].mean() > 2.0 * t1ce[ncr].mean(), case.index  # dark necrotic core
        assert t2[ncr].mean() > t2[wm].mean(), case.index


def test_oedema_stays_out_of_csf_and_tumour_inside_the_brain(necrotic_cases: list[SyntheticCase]) -> None:
    for case in necrotic_cases:
        ed = case.labels == 2
        assert case.tissue["csf"][ed].max() < 0.5, case.index
        assert not (case.labels[~case.brain_mask]).any(), case.index
        for volume in case.images.values():
            assert np.isfinite(volume).all() and volume.min() >= 0.0
            assert not volume[~case.brain_mask].any()  # skull-stripped: background exactly 0


def test_tumour_free_and_necrosis_shares(cohort: tuple[SynthConfig, list[SyntheticCase]]) -> None:
    cfg, cases = cohort
    free = [c for c in cases if c.tumour_free]
    assert abs(len(free) - cfg.tumour_free_fraction * len(cases)) <= 2
    assert all(not c.labels.any() for c in free)
    tumours = [c for c in cases if not c.tumour_free]
    assert all((c.labels > 0).any() for c in tumours)
    without_ncr = [c for c in tumours if not c.has_necrosis]
    assert 2 <= len(without_ncr) <= len(tumours) - 2  # about half of the tumours
    assert all((c.labels == 3).any() for c in without_ncr)  # solid enhancing tumours


def test_cases_differ_in_anatomy_and_tumour(cohort: tuple[SynthConfig, list[SyntheticCase]]) -> None:
    _, cases = cohort
    brains = [c.brain_mask for c in cases[:4]]
    assert all(not np.array_equal(brains[0], other) for other in brains[1:])
    centres = {tuple(c.info["centre_mni_mm"]) for c in cases if not c.tumour_free}
    assert len(centres) == sum(not c.tumour_free for c in cases)
    volumes = [c.info["volume_ml"]["ED"] for c in cases if not c.tumour_free]
    assert max(volumes) > 2 * min(volumes)


# ---------------------------------------------------------------- figure
def test_plot_synthetic_cases_writes_a_png(tmp_path: Path) -> None:
    synthesize_dataset(tmp_path / "raw", small(cases=2))
    out = plot_synthetic_cases(tmp_path / "raw", tmp_path / "docs" / "cases.png", n_cases=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(DataError, match="no brats2021 case"):
        plot_synthetic_cases(tmp_path / "docs", tmp_path / "x.png")
