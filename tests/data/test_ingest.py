"""``tumorseg ingest``: the manifest, quarantine reasons, statistics, incremental runs, source safety."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.util
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tumorseg.cli import main
from tumorseg.config import IngestConfig
from tumorseg.data import ingest as ingest_module
from tumorseg.data.ingest import INGEST_COLUMNS, affine_max_diff_mm, content_digest, ingest
from tumorseg.data.manifest import MANIFEST_COLUMNS, read_manifest
from tumorseg.errors import DataError

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def _load_fixtures():
    path = Path(__file__).resolve().parents[1] / "fixtures_nifti.py"
    spec = importlib.util.spec_from_file_location("fixtures_nifti", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fx = _load_fixtures()
AFFINE = fx.ras_affine((2.0, 2.0, 2.0))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Two good cases (one LPS, one tumour-free) and one case for each kind of damage."""
    root = tmp_path / "raw"
    fx.write_brats_case(root, "BraTS2021_00001")
    fx.write_brats_case(root, "BraTS2021_00002", orientation="LPS", seed=1)
    fx.write_brats_case(root, "BraTS2021_00010", tumour_radius=0, seed=2)
    images, labels = fx.phantom()

    folder = fx.write_brats_case(root, "BraTS2021_00003")
    (folder / "BraTS2021_00003_t1ce.nii.gz").unlink()
    folder = fx.write_brats_case(root, "BraTS2021_00004")
    fx.truncate(folder / "BraTS2021_00004_flair.nii.gz")
    folder = fx.write_brats_case(root, "BraTS2021_00005")
    (folder / "BraTS2021_00005_t2.nii.gz").write_bytes(gzip.compress(b"<html>404 not found</html>"))
    folder = fx.write_brats_case(root, "BraTS2021_00006")
    fx.save(images["flair"][:, :, :18], AFFINE, folder / "BraTS2021_00006_flair.nii.gz", np.int16)

    folder = fx.write_brats_case(root, "BraTS2021_00007")
    nan_t1 = images["t1"].copy()
    nan_t1[3, 4, 5] = np.nan
    fx.save(nan_t1, AFFINE, folder / "BraTS2021_00007_t1.nii.gz", np.float32)
    folder = fx.write_brats_case(root, "BraTS2021_00008")
    fx.save(np.zeros_like(images["t2"]), AFFINE, folder / "BraTS2021_00008_t2.nii.gz", np.int16)
    folder = fx.write_brats_case(root, "BraTS2021_00009")
    bad = np.where(labels == 3, 4, labels).astype(np.uint8)
    bad[1, 1, 1] = 3  # 3 is not a BraTS 2021 label
    fx.save(bad, AFFINE, folder / "BraTS2021_00009_seg.nii.gz", np.uint8)
    return root


def _rows(out: Path) -> dict[str, dict[str, str]]:
    return {row["case_id"]: row for row in read_manifest(out).to_dict(orient="records")}


def test_manifest_has_every_column_and_the_right_values(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingested"
    summary = ingest(dataset, out, IngestConfig(workers=2))  # threads give the same rows
    manifest = read_manifest(out)
    assert list(manifest.columns) == INGEST_COLUMNS
    assert INGEST_COLUMNS[: len(MANIFEST_COLUMNS)] == MANIFEST_COLUMNS
    assert summary.cases == 10 and summary.new == 10 and summary.reused == 0
    assert "10 brats2021 cases" in summary.one_line() and "\n" not in summary.one_line()

    row = _rows(out)["BraTS2021_00002"]
    _, labels = fx.phantom(seed=1)
    brats = np.where(labels == 3, 4, labels)
    assert row["status"] == "ok" and row["reason"] == ""
    assert row["patient_id"] == "BraTS2021_00002" and row["layout"] == row["label_convention"] == "brats2021"
    assert row["shape"] == "24x28x20" and row["spacing"] == "2x2x2" and row["orientation"] == "LPS"
    assert row["modalities"] == "t1;t1ce;t2;flair"
    assert row["label_values"] == "0;1;2;4"
    expected_counts = ";".join(f"{v}:{np.count_nonzero(brats == v)}" for v in (0, 1, 2, 4))
    assert row["voxels_per_label"] == expected_counts
    tumour = int(np.count_nonzero(labels))
    assert row["tumour_voxels"] == str(tumour)
    assert float(row["tumour_volume_ml"]) == pytest.approx(tumour * 8 / 1000)
    images, _ = fx.phantom(seed=1)
    assert row["brain_voxels"] == str(
        int(np.count_nonzero(np.any([v != 0 for v in images.values()], axis=0)))
    )
    for key in ("t1", "t1ce", "t2", "flair", "seg"):
        path = Path(row[f"path_{key}"])
        assert path.is_absolute() and path.is_file()
        assert row[f"sha256_{key}"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert row[f"{key}_readable"] == "True" and row[f"{key}_finite"] == "True"
        assert row[f"{key}_shape"] == "24x28x20" and row[f"{key}_affine_max_diff_mm"] == "0"
        if key != "seg":
            assert row[f"content_sha256_{key}"] == content_digest(np.asarray(nib.load(path).dataobj))
    assert row["subset"] == "" and row["fold"] == ""  # not a MONAI datalist
    assert row["seg_nonzero_voxels"] == str(tumour)
    assert row["t1_nonzero_voxels"] == str(int(np.count_nonzero(images["t1"])))

    free = _rows(out)["BraTS2021_00010"]
    assert free["label_values"] == "0" and free["tumour_voxels"] == "0" and free["tumour_volume_ml"] == "0"


def test_unreadable_cases_are_quarantined_with_a_reason(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingested"
    summary = ingest(dataset, out, IngestConfig())
    rows = _rows(out)
    expected = {
        "BraTS2021_00003": "missing modality file BraTS2021_00003_t1ce.nii.gz",
        "BraTS2021_00004": "BraTS2021_00004_flair.nii.gz is truncated (gzip stream ended early)",
        "BraTS2021_00005": "BraTS2021_00005_t2.nii.gz is not a NIfTI file",
        "BraTS2021_00006": "shapes differ: t1 24x28x20 vs flair 24x28x18",
    }
    for case_id, reason in expected.items():
        assert rows[case_id]["status"] == "quarantined"
        assert reason in rows[case_id]["reason"] and "\n" not in rows[case_id]["reason"]
    assert summary.quarantined == 4 and summary.ok == 6

    # Statistics are filled as far as the files could be read.
    missing = rows["BraTS2021_00003"]
    assert missing["path_t1ce"] == "" and missing["t1ce_readable"] == "" and missing["sha256_t1ce"] == ""
    assert missing["t1_readable"] == "True" and missing["modalities"] == "t1;t2;flair"
    assert missing["brain_voxels"] == "" and missing["label_values"] == "0;1;2;4"
    truncated = rows["BraTS2021_00004"]
    assert truncated["flair_readable"] == "False" and truncated["flair_finite"] == ""
    assert len(truncated["sha256_flair"]) == 64  # the bytes that are there were hashed
    assert truncated["t1_finite"] == "True"
    assert rows["BraTS2021_00005"]["t2_readable"] == "False"
    assert (
        rows["BraTS2021_00006"]["flair_shape"] == "24x28x18" and rows["BraTS2021_00006"]["brain_voxels"] == ""
    )


def test_content_problems_are_recorded_for_validation_not_judged(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingested"
    ingest(dataset, out, IngestConfig())
    rows = _rows(out)
    nan_case, zero_case, label_case = (
        rows["BraTS2021_00007"],
        rows["BraTS2021_00008"],
        rows["BraTS2021_00009"],
    )
    assert nan_case["status"] == zero_case["status"] == label_case["status"] == "ok"
    assert nan_case["t1_finite"] == "False" and nan_case["t1ce_finite"] == "True"
    assert zero_case["t2_nonzero_voxels"] == "0" and zero_case["t2_finite"] == "True"
    assert label_case["label_values"] == "0;1;2;3;4"


def test_source_files_are_never_modified(dataset: Path, tmp_path: Path) -> None:
    before = fx.snapshot(dataset)
    ingest(dataset, tmp_path / "ingested", IngestConfig())
    ingest(dataset, tmp_path / "ingested", IngestConfig())
    assert fx.snapshot(dataset) == before
    assert not list(dataset.rglob("manifest.csv"))


def test_rerun_reads_nothing_and_picks_up_new_changed_and_removed_cases(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ingested"
    ingest(dataset, out, IngestConfig())
    first = (out / "manifest.csv").read_text()

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged case was read again")

    monkeypatch.setattr(ingest_module, "load_case", no_reading)
    summary = ingest(dataset, out, IngestConfig())
    assert (summary.new, summary.changed, summary.reused, summary.removed) == (0, 0, 10, 0)
    assert (out / "manifest.csv").read_text() == first
    monkeypatch.undo()

    # Replace a modality with different content, add a case, remove a case.
    images, _ = fx.phantom(seed=9)
    changed_file = dataset / "BraTS2021_00001" / "BraTS2021_00001_t1.nii.gz"
    fx.save(images["t1"], AFFINE, changed_file, np.int16)
    os.utime(changed_file, ns=(1, 1_000_000_000))
    fx.write_brats_case(dataset, "BraTS2021_00011")
    for path in (dataset / "BraTS2021_00010").iterdir():
        path.unlink()
    (dataset / "BraTS2021_00010").rmdir()

    summary = ingest(dataset, out, IngestConfig(workers=1))
    assert (summary.new, summary.changed, summary.reused, summary.removed) == (1, 1, 8, 1)
    rows = _rows(out)
    assert "BraTS2021_00010" not in rows and "BraTS2021_00011" in rows
    assert rows["BraTS2021_00001"]["sha256_t1"] == hashlib.sha256(changed_file.read_bytes()).hexdigest()
    assert not [p for p in out.iterdir() if p.name != "manifest.csv"]  # no temp files left


def test_a_manifest_validated_in_place_reuses_ingest_own_verdict(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "ingested"
    ingest(dataset, out, IngestConfig())
    manifest = read_manifest(out)
    manifest["ingest_status"], manifest["ingest_reason"] = manifest["status"], manifest["reason"]
    nan_row = manifest["case_id"] == "BraTS2021_00007"
    manifest.loc[nan_row, ["status", "reason"]] = ["quarantined", "t1 has NaN voxels"]
    manifest.to_csv(out / "manifest.csv", index=False)
    ingest(dataset, out, IngestConfig())
    row = _rows(out)["BraTS2021_00007"]
    assert row["status"] == "ok" and row["reason"] == ""
    assert "ingest_status" not in read_manifest(out).columns


def test_msd_and_brats2023_datasets_ingest(tmp_path: Path) -> None:
    fx.write_msd_dataset(tmp_path / "msd", ["BRATS_001", "BRATS_002"], test_ids=("BRATS_485",))
    summary = ingest(tmp_path / "msd", tmp_path / "out_msd", IngestConfig())
    rows = _rows(tmp_path / "out_msd")
    assert summary.layout == "msd" and summary.ok == 3
    first = rows["BRATS_001"]
    assert len({first[f"path_{m}"] for m in ("t1", "t1ce", "t2", "flair")}) == 1
    assert len({first[f"sha256_{m}"] for m in ("t1", "t1ce", "t2", "flair")}) == 1
    assert first["t1_shape"] == "24x28x20" and first["label_values"] == "0;1;2;3"
    assert rows["BRATS_485"]["path_seg"] == "" and rows["BRATS_485"]["seg_readable"] == ""

    for case_id in ("BraTS-GLI-00001-000", "BraTS-GLI-00001-001"):
        fx.write_brats_case(tmp_path / "b23", case_id, layout="brats2023")
    ingest(tmp_path / "b23", tmp_path / "out_b23", IngestConfig(layout="brats2023"))
    assert {r["patient_id"] for r in _rows(tmp_path / "out_b23").values()} == {"BraTS-GLI-00001"}


def test_validation_quarantines_what_ingest_only_measured(dataset: Path, tmp_path: Path) -> None:
    """The contract with ``tumorseg validate``: ingest's statistics are what its suite judges."""
    from tumorseg.config import ValidateConfig
    from tumorseg.validation.suite import validate_dataset

    ingest(dataset, tmp_path / "ingested", IngestConfig())
    validate_dataset(tmp_path / "ingested", tmp_path / "validated", ValidateConfig(), raise_on_failure=False)
    rows = _rows(tmp_path / "validated")
    ok = {case_id for case_id, row in rows.items() if row["status"] == "ok"}
    assert ok == {"BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00010"}
    assert "t1" in rows["BraTS2021_00007"]["reason"] and "NaN" in rows["BraTS2021_00007"]["reason"]
    assert "t2" in rows["BraTS2021_00008"]["reason"] and "zero" in rows["BraTS2021_00008"]["reason"]
    assert "label values [3]" in rows["BraTS2021_00009"]["reason"]
    assert "affine" not in " ".join(row["reason"] for row in rows.values())


def test_output_inside_the_source_is_refused(dataset: Path) -> None:
    with pytest.raises(DataError, match="inside the source dataset"):
        ingest(dataset, dataset / "manifest_here", IngestConfig())


def test_affine_max_diff_is_the_largest_corner_displacement() -> None:
    reference = np.diag([2.0, 2.0, 2.0, 1.0])
    shifted = reference.copy()
    shifted[0, 3] += 0.5
    assert affine_max_diff_mm(shifted, reference, (10, 10, 10)) == pytest.approx(0.5)
    scaled = np.diag([2.01, 2.0, 2.0, 1.0])
    assert affine_max_diff_mm(scaled, reference, (11, 10, 10)) == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["empty", "no_layout"])
def test_cli_prints_one_line_and_exits_2_for_unusable_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    if kind == "no_layout":
        (src / "notes.txt").write_text("hello")
    code = main(["ingest", str(src), "--out", str(tmp_path / "out"), "--params", str(PARAMS)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ("folder is empty" if kind == "empty" else "no known dataset layout") in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- content fingerprint, datalist
def test_content_digest_depends_on_values_and_shape_not_on_storage() -> None:
    images, _ = fx.phantom(seed=3)
    values = np.round(images["t1"])
    reference = content_digest(np.asfortranarray(values.astype(np.int16)))
    for stored in (
        values.astype(np.float32),  # C order
        np.asfortranarray(values.astype(np.float32)),
        np.asfortranarray(values.astype(np.float64)),
        values.astype(np.int32),
        np.where(values == 0, -0.0, values),  # -0.0 is 0
    ):
        assert content_digest(stored) == reference
    assert content_digest(np.asfortranarray(images["t1"])) != reference  # fractional values differ
    changed = values.copy()
    changed[5, 5, 5] += 1
    assert content_digest(changed) != reference
    assert content_digest(values.reshape(28, 24, 20)) != reference  # same voxels, other shape
    with_nan = images["t1"].copy()
    with_nan[1, 1, 1] = np.nan
    assert content_digest(with_nan) == content_digest(with_nan.astype(np.float64))
    assert len(reference) == 64 and content_digest(np.zeros((3, 4, 2), np.uint8)) != content_digest(
        np.zeros((3, 4, 3), np.uint8)
    )


def test_the_same_volume_stored_differently_has_one_content_digest(tmp_path: Path) -> None:
    """.nii vs .nii.gz, another gzip level, another header and dtype: other sha256, same content digest."""
    import gzip as gz

    root = tmp_path / "raw"
    original = fx.write_brats_case(root, "BraTS2021_00001")
    fx.write_brats_case(root, "BraTS2021_00002", seed=5)
    copy = root / "BraTS2021_00003"
    copy.mkdir()
    for key in ("t1ce", "t2", "seg"):
        src = original / f"BraTS2021_00001_{key}.nii.gz"
        (copy / f"BraTS2021_00003_{key}.nii.gz").write_bytes(src.read_bytes())  # identical files
    t1 = nib.load(original / "BraTS2021_00001_t1.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(t1.dataobj), t1.affine), copy / "BraTS2021_00003_t1.nii")  # .nii
    flair = nib.load(original / "BraTS2021_00001_flair.nii.gz")
    header = flair.header.copy()
    header["descrip"] = b"re-exported"
    image = nib.Nifti1Image(np.asarray(flair.dataobj).astype(np.float32), flair.affine, header)
    image.set_data_dtype(np.float32)
    (copy / "BraTS2021_00003_flair.nii.gz").write_bytes(gz.compress(image.to_bytes(), compresslevel=1))

    ingest(root, tmp_path / "out", IngestConfig(workers=1))
    rows = _rows(tmp_path / "out")
    first, third, second = rows["BraTS2021_00001"], rows["BraTS2021_00003"], rows["BraTS2021_00002"]
    assert third["status"] == "ok" and third["path_t1"].endswith("_t1.nii")
    for key in ("t1", "flair"):
        assert third[f"sha256_{key}"] != first[f"sha256_{key}"]
        assert third[f"content_sha256_{key}"] == first[f"content_sha256_{key}"]
    for key in ("t1ce", "t2"):
        assert third[f"sha256_{key}"] == first[f"sha256_{key}"]
        assert third[f"content_sha256_{key}"] == first[f"content_sha256_{key}"]
    for key in ("t1", "t1ce", "t2", "flair"):
        assert second[f"content_sha256_{key}"] != first[f"content_sha256_{key}"]
    assert len({first[f"content_sha256_{key}"] for key in ("t1", "t1ce", "t2", "flair")}) == 4


def test_undecodable_volumes_have_no_content_digest(dataset: Path, tmp_path: Path) -> None:
    ingest(dataset, tmp_path / "out", IngestConfig(workers=1))
    rows = _rows(tmp_path / "out")
    assert rows["BraTS2021_00004"]["content_sha256_flair"] == ""  # truncated
    assert rows["BraTS2021_00003"]["content_sha256_t1ce"] == ""  # missing
    assert len(rows["BraTS2021_00004"]["content_sha256_t1"]) == 64
    msd = fx.write_msd_dataset(tmp_path / "msd", ["BRATS_001"])
    ingest(msd, tmp_path / "out_msd", IngestConfig(workers=1))
    row = _rows(tmp_path / "out_msd")["BRATS_001"]
    digests = [row[f"content_sha256_{key}"] for key in ("t1", "t1ce", "t2", "flair")]
    assert len(set(digests)) == 4, "each MSD channel has its own digest"


def _with_datalist(assignments: dict[str, tuple[str, int | None]], convention: str = "brats2021"):
    """A discover_cases that gives cases a MONAI datalist subset and fold (as a datalist would)."""
    real = ingest_module.discover_cases

    def discover(src, layout=None, labels=None):
        cases = real(src, layout, labels=labels)
        return [
            dataclasses.replace(
                case,
                subset=assignments.get(case.case_id, ("", None))[0],
                fold=assignments.get(case.case_id, ("", None))[1],
                label_convention=convention,
            )
            for case in cases
        ]

    return discover


def test_datalist_subset_fold_and_convention_are_recorded_and_refreshed_without_reading(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setattr(
        ingest_module,
        "discover_cases",
        _with_datalist({"BraTS2021_00001": ("training", 0), "BraTS2021_00002": ("validation", None)}),
    )
    ingest(dataset, out, IngestConfig(workers=1))
    rows = _rows(out)
    assert (rows["BraTS2021_00001"]["subset"], rows["BraTS2021_00001"]["fold"]) == ("training", "0")
    assert (rows["BraTS2021_00002"]["subset"], rows["BraTS2021_00002"]["fold"]) == ("validation", "")
    assert (rows["BraTS2021_00010"]["subset"], rows["BraTS2021_00010"]["fold"]) == ("", "")

    # Editing the datalist (or the label convention) changes no image: rows are reused, with what
    # discovery says now.
    monkeypatch.setattr(
        ingest_module,
        "discover_cases",
        _with_datalist({"BraTS2021_00001": ("training", 3)}, convention="brats2024-gli"),
    )
    monkeypatch.setattr(ingest_module, "load_case", lambda *a, **k: pytest.fail("a case was read again"))
    summary = ingest(dataset, out, IngestConfig(workers=1))
    assert summary.reused == 10
    rows = _rows(out)
    assert rows["BraTS2021_00001"]["fold"] == "3" and rows["BraTS2021_00002"]["subset"] == ""
    assert {row["label_convention"] for row in rows.values()} == {"brats2024-gli"}


def test_labels_setting_reaches_case_discovery(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real = ingest_module.discover_cases

    def discover(src, layout=None, labels=None):
        seen.append(labels)
        return real(src, layout, labels=labels)

    monkeypatch.setattr(ingest_module, "discover_cases", discover)
    ingest(dataset, tmp_path / "out", IngestConfig(labels="brats2021", workers=1))
    assert seen == ["brats2021"]


def test_a_manifest_from_an_older_ingest_is_read_again(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    ingest(dataset, out, IngestConfig(workers=1))
    read_manifest(out)[MANIFEST_COLUMNS].to_csv(out / "manifest.csv", index=False)  # no digests
    summary = ingest(dataset, out, IngestConfig(workers=1))
    assert summary.reused == 0 and summary.new == 10  # another schema: nothing reused
    assert all(len(r["content_sha256_t1"]) == 64 for r in _rows(out).values() if r["t1_readable"] == "True")
