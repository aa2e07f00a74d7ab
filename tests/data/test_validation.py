"""Data tests for `tumorseg validate`: real GX runs on manifests built here.

Each test writes a manifest with :func:`write_manifest` (as ingest would), runs the
validation, and checks which cases are quarantined and why, the reports, the CLI's
one-line failure and the split check.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tumorseg.cli import main
from tumorseg.config import ValidateConfig
from tumorseg.data.manifest import FILE_KEYS, MANIFEST_COLUMNS, read_manifest, write_manifest
from tumorseg.errors import DataError
from tumorseg.validation.expectations import build_case_checks
from tumorseg.validation.split_check import validate_split
from tumorseg.validation.suite import validate_dataset, validation_markdown


def _fake_digest(case_id: str, key: str) -> str:
    import hashlib

    return hashlib.sha256(f"{case_id}/{key}".encode()).hexdigest()


def good_row(case_id: str, patient_id: str | None = None, **overrides: str) -> dict[str, str]:
    """A manifest row as ingest writes it for a healthy 96x96x64, 2 mm BraTS 2021 case."""
    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(
        case_id=case_id,
        patient_id=patient_id or case_id,
        layout="brats2021",
        label_convention="brats2021",
        status="ok",
        case_dir=f"/data/raw/{case_id}",
        shape="96x96x64",
        spacing="2x2x2",
        orientation="RAS",
        modalities="t1;t1ce;t2;flair",
        label_values="0;1;2;4",
        voxels_per_label="0:580000;1:1200;2:6000;4:2000",
        tumour_voxels="9200",
        tumour_volume_ml="73.6",
        brain_voxels="230000",
    )
    for key in FILE_KEYS:
        row[f"path_{key}"] = f"/data/raw/{case_id}/{case_id}_{key}.nii.gz"
        row[f"sha256_{key}"] = _fake_digest(case_id, key)  # distinct scans: no duplicate flagged
        row[f"{key}_readable"] = "True"
        row[f"{key}_finite"] = "True"
        row[f"{key}_nonzero_voxels"] = "9200" if key == "seg" else "230000"
        row[f"{key}_shape"] = "96x96x64"
        row[f"{key}_affine_max_diff_mm"] = "0.0"
    row.update(overrides)
    return row


def unreadable(key: str, **overrides: str) -> dict[str, str]:
    """Overrides for a volume ingest could not read (statistics left empty)."""
    stats = {f"{key}_{s}": "" for s in ("finite", "nonzero_voxels", "shape", "affine_max_diff_mm")}
    return {f"{key}_readable": "False", **stats, **overrides}


BAD_CASES: dict[str, tuple[dict[str, str], list[str]]] = {
    # case id: (overrides, reason fragments expected in this order)
    "missing_flair": (
        {
            "path_flair": "",
            "sha256_flair": "",
            "modalities": "t1;t1ce;t2",
            **unreadable("flair", flair_readable=""),
        },
        ["flair file missing"],
    ),
    "truncated_t2": (
        {"status": "quarantined", "reason": "t2: cannot read (truncated gzip stream)", **unreadable("t2")},
        ["t2: cannot read (truncated gzip stream)"],
    ),
    "non_nifti_t1ce": (
        {"status": "quarantined", "reason": "t1ce: not a NIfTI file (bad header)", **unreadable("t1ce")},
        ["t1ce: not a NIfTI file (bad header)"],
    ),
    "ingest_missing_t1": (
        {
            "status": "quarantined",
            "reason": "missing modality file ingest_missing_t1_t1.nii.gz",
            "path_t1": "",
            "t1_readable": "",
            "spacing": "",
            "brain_voxels": "",
            **{f"{k}_affine_max_diff_mm": "" for k in FILE_KEYS},
        },
        ["missing modality file ingest_missing_t1_t1.nii.gz"],
    ),
    "ingest_shapes_and_nan": (
        {
            "status": "quarantined",
            "reason": "shapes differ: t1 96x96x64 vs t2 96x96x60",
            "t2_shape": "96x96x60",
            "t2_finite": "False",
            "brain_voxels": "",
        },
        ["shapes differ: t1 96x96x64 vs t2 96x96x60", "NaN or infinite voxels in t2"],
    ),
    "unreadable_seg": (unreadable("seg"), ["seg unreadable"]),
    "shape_differs": ({"flair_shape": "96x96x60"}, ["flair shape 96x96x60 differs from t1 96x96x64"]),
    "affine_differs": ({"t2_affine_max_diff_mm": "0.5"}, ["t2 affine differs from t1 by 0.5 mm"]),
    "nan_voxels": ({"flair_finite": "False"}, ["NaN or infinite voxels in flair"]),
    "all_zero_t1ce": ({"t1ce_nonzero_voxels": "0"}, ["t1ce is all zero"]),
    "bad_labels": ({"label_values": "0;1;2;5"}, ["label values [5] outside brats2021 {0,1,2,4}"]),
    "float_labels": ({"label_values": "0;0.5;1;2"}, ["label values [0.5] outside brats2021 {0,1,2,4}"]),
    "tiny_spacing": ({"spacing": "0.1x0.1x0.1"}, ["spacing 0.1x0.1x0.1 mm outside 0.3..7 mm"]),
    "tiny_brain": ({"brain_voxels": "10"}, ["only 10 brain voxels"]),
    "nan_and_labels": (
        {"flair_finite": "False", "label_values": "0;1;2;5"},
        ["NaN or infinite voxels in flair", "label values [5] outside brats2021 {0,1,2,4}"],
    ),
    "garbled_stat": ({"t2_finite": "maybe"}, ["manifest fields without a usable value: t2_finite='maybe'"]),
    "bad id": ({}, ["case id 'bad id' has characters other than letters"]),
}
GOOD_CASES = [f"BraTS2021_{i:05d}" for i in range(12)]
UNLABELLED = {  # no segmentation: an unlabelled case, which is valid
    "path_seg": "",
    "sha256_seg": "",
    "label_values": "",
    "voxels_per_label": "",
    "tumour_voxels": "",
    "tumour_volume_ml": "",
    **{f"seg_{s}": "" for s in ("readable", "finite", "nonzero_voxels", "shape", "affine_max_diff_mm")},
}


def write_cases(folder: Path, rows: list[dict[str, str]]) -> Path:
    write_manifest(pd.DataFrame(rows), folder)
    return folder


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory: pytest.TempPathFactory):
    """One validation of 12 good cases, every kind of bad case, and a duplicated case id."""
    src = tmp_path_factory.mktemp("ingested")
    rows = [good_row(c) for c in GOOD_CASES[:-1]] + [good_row(GOOD_CASES[-1], **UNLABELLED)]
    rows += [good_row(case, **overrides) for case, (overrides, _) in BAD_CASES.items()]
    rows += [good_row("dup_case", patient_id="p1"), good_row("dup_case", patient_id="p2")]
    write_cases(src, rows)
    out = tmp_path_factory.mktemp("validated")
    result = validate_dataset(src, out, ValidateConfig(max_invalid_fraction=0.9))
    return src, out, result, read_manifest(out)


@pytest.mark.parametrize("case_id", sorted(BAD_CASES))
def test_each_bad_case_is_quarantined_with_a_clear_reason(mixed_run, case_id: str) -> None:
    _, _, result, manifest = mixed_run
    row = manifest.set_index("case_id").loc[case_id]
    assert row["status"] == "quarantined"
    expected = BAD_CASES[case_id][1]
    fragments = row["reason"].split("; ")
    for text in expected:
        assert any(f.startswith(text) for f in fragments), (text, row["reason"])
    positions = [next(i for i, f in enumerate(fragments) if f.startswith(t)) for t in expected]
    assert positions == sorted(positions), "ingest's reason comes first, then the checks in order"
    assert result.quarantined[case_id] == row["reason"]


def test_what_ingest_already_explained_is_not_repeated(mixed_run) -> None:
    """Missing/undecodable files and shape mismatches are ingest's call; its reason stands alone."""
    _, _, result, manifest = mixed_run
    reasons = manifest.set_index("case_id")["reason"]
    assert reasons["truncated_t2"] == "t2: cannot read (truncated gzip stream)"
    assert reasons["ingest_missing_t1"] == "missing modality file ingest_missing_t1_t1.nii.gz"
    assert "t2 shape" not in reasons["ingest_shapes_and_nan"]
    failed = {c.case_id: c.failed_checks for c in result.cases}
    assert failed["truncated_t2"] == ["ingest.accepted", "t2.readable"], "still recorded per expectation"


def test_duplicate_case_ids_quarantine_every_copy(mixed_run) -> None:
    _, _, _, manifest = mixed_run
    copies = manifest[manifest["case_id"] == "dup_case"]
    assert len(copies) == 2
    assert set(copies["status"]) == {"quarantined"}
    assert all("appears more than once" in r for r in copies["reason"])


def test_valid_cases_stay_ok_and_ingest_verdict_is_kept(mixed_run) -> None:
    _, _, result, manifest = mixed_run
    good = manifest[manifest["case_id"].isin(GOOD_CASES)]
    assert len(good) == len(GOOD_CASES)
    assert set(good["status"]) == {"ok"} and set(good["reason"]) == {""}
    assert good.set_index("case_id").loc[GOOD_CASES[-1], "path_seg"] == "", "the unlabelled case is valid"
    assert result.n_valid == len(GOOD_CASES)
    assert result.n_quarantined == len(BAD_CASES) + 2
    truncated = manifest.set_index("case_id").loc["truncated_t2"]
    assert truncated["ingest_status"] == "quarantined"
    assert truncated["ingest_reason"] == "t2: cannot read (truncated gzip stream)"


def test_reports_are_written_and_self_contained(mixed_run) -> None:
    _, out, result, _ = mixed_run
    assert result.data_docs_index == out / "validation" / "data_docs" / "index.html"
    assert result.data_docs_index.is_file()
    assert (out / "validation" / "gx" / "great_expectations.yml").is_file()
    pages = list((out / "validation" / "data_docs" / "validations").rglob("*.html"))
    assert pages, "the validation result page is rendered"
    report = json.loads(result.report_path.read_text())
    assert report["counts"]["cases"] == result.n_cases
    assert report["counts"]["quarantined_by_ingest"] == 4
    by_check = {e["check"]: e for e in report["expectations"]}
    assert by_check["flair.finite"]["unexpected_case_ids"] == ["nan_and_labels", "nan_voxels"]
    assert by_check["flair.finite"]["success"] is False
    assert by_check["case_id.unique"]["unexpected_case_ids"] == ["dup_case", "dup_case"]
    assert by_check["t1.readable"]["success"] is True
    # Everything under validation/ is relative: no absolute path to this test's folders.
    for path in (out / "validation").rglob("*"):
        if path.suffix in {".json", ".yml", ".html"}:
            assert str(out) not in path.read_text(errors="ignore"), path
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def test_every_check_is_a_gx_expectation_that_ran(mixed_run) -> None:
    _, _, result, _ = mixed_run
    checks = build_case_checks(ValidateConfig())
    assert [c.check_id for c in result.checks] == [c.check_id for c in checks]
    assert all(o.expectation.startswith("expect_") for o in result.checks)
    assert len({c.check_id for c in checks}) == len(checks)


def test_markdown_summary_lists_failures(mixed_run) -> None:
    _, _, result, _ = mixed_run
    text = validation_markdown(result)
    assert text.startswith("## Data validation passed")
    assert "`flair.finite`" in text and "nan_voxels" in text
    assert "| bad_labels | label values [5] outside brats2021 {0,1,2,4} |" in text


def test_revalidating_in_place_is_idempotent_and_follows_new_params(tmp_path: Path) -> None:
    rows = [good_row(c) for c in GOOD_CASES[:4]] + [good_row("coarse", spacing="2x2x8")]
    write_cases(tmp_path, rows)
    first = validate_dataset(tmp_path, tmp_path, ValidateConfig())
    manifest_once = (tmp_path / "manifest.csv").read_text()
    report_once = first.report_path.read_text()
    assert first.quarantined == {
        "coarse": "spacing 2x2x8 mm outside 0.3..7 mm (validate.spacing_min_mm/spacing_max_mm)"
    }

    second = validate_dataset(tmp_path, tmp_path, ValidateConfig())
    assert (tmp_path / "manifest.csv").read_text() == manifest_once
    assert second.report_path.read_text() == report_once, "report.json is deterministic"

    relaxed = validate_dataset(tmp_path, tmp_path, ValidateConfig(spacing_max_mm=10.0))
    assert relaxed.quarantined == {}, "an earlier validation's quarantine is not sticky"
    assert set(read_manifest(tmp_path)["status"]) == {"ok"}


def _params(tmp_path: Path, max_invalid_fraction: float = 0.25) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(f"validate:\n  max_invalid_fraction: {max_invalid_fraction}\n")
    return str(path)


def _one_bad_in_five(tmp_path: Path) -> Path:
    rows = [good_row(c) for c in GOOD_CASES[:4]] + [good_row("broken", flair_finite="False")]
    return write_cases(tmp_path / "ingested", rows)


def test_cli_fails_with_one_line_above_the_threshold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _one_bad_in_five(tmp_path)
    out = tmp_path / "validated"
    code = main(
        [
            "validate",
            str(src),
            "--out",
            str(out),
            "--params",
            _params(tmp_path),
            "--max-invalid-fraction",
            "0.1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tumorseg validate: error: 1 of 5 cases (20.0%) failed validation")
    assert "validate.max_invalid_fraction = 0.1" in lines[0]
    assert "Traceback" not in captured.err
    # The reports and the manifest are written before failing, so the reason can be read.
    assert (out / "validation" / "data_docs" / "index.html").is_file()
    report = json.loads((out / "validation" / "report.json").read_text())
    assert report["passed"] is False
    assert read_manifest(out).set_index("case_id").loc["broken", "status"] == "quarantined"


def test_cli_passes_at_or_below_the_threshold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _one_bad_in_five(tmp_path)
    out = tmp_path / "validated"
    code = main(["validate", str(src), "--out", str(out), "--params", _params(tmp_path, 0.2)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().splitlines() == [
        f"validated 5 cases: 4 ok, 1 quarantined (20.0%, limit 20%); report: {out / 'validation/data_docs/index.html'}"
    ]
    assert set(read_manifest(out)["status"]) == {"ok", "quarantined"}


def test_no_valid_case_left_is_an_error(tmp_path: Path) -> None:
    rows = [good_row("a", flair_finite="False"), good_row("b", spacing="9x9x9")]
    write_cases(tmp_path, rows)
    with pytest.raises(DataError, match=r"no valid case left: all 2 cases .* are quarantined"):
        validate_dataset(tmp_path, tmp_path / "out", ValidateConfig(max_invalid_fraction=1.0))
    assert (tmp_path / "out" / "validation" / "report.json").is_file()
    # A caller publishing the result first (Prefect) gets it back and raises itself.
    result = validate_dataset(tmp_path, tmp_path / "out", ValidateConfig(), raise_on_failure=False)
    assert not result.passed and result.failure_message().startswith("no valid case left")
    assert "## Data validation FAILED" in validation_markdown(result)


def test_missing_or_old_manifest_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no manifest; run `tumorseg ingest` first"):
        validate_dataset(tmp_path, tmp_path, ValidateConfig())
    pd.DataFrame(
        [
            {
                k: good_row("a")[k]
                for k in ("case_id", "patient_id", "layout", "label_convention", "status", "reason")
            }
        ]
    ).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(DataError, match="manifest lacks columns path_t1"):
        validate_dataset(tmp_path, tmp_path, ValidateConfig())


def test_cli_output_has_no_progress_bars_or_gx_logs(tmp_path: Path) -> None:
    """The real console script, so logging is configured as users see it (not pytest's capture)."""
    src = _one_bad_in_five(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "tumorseg.cli", "validate", str(src), "--params", _params(tmp_path, 0.1)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------- split check
@pytest.fixture
def validated_manifest(tmp_path: Path) -> pd.DataFrame:
    rows = [good_row(f"c{i}", patient_id=f"p{i // 2}") for i in range(8)]
    rows[7].update(status="quarantined", reason="flair is all zero")
    return pd.DataFrame(rows)


def _split(tmp_path: Path, splits: dict[str, list[str]], name: str = "split.json") -> Path:
    """A split file in the format `tumorseg split` writes (its own patients lists left empty)."""
    from tumorseg.data.split import SPLITS, Split

    lists = {s: splits.get(s, []) for s in SPLITS}
    split = Split(
        seed=42, fractions={s: 1 / 3 for s in SPLITS}, patients={s: [] for s in SPLITS}, strata={}, **lists
    )
    path = tmp_path / name
    path.write_text(json.dumps(split.to_dict()))
    return path


def test_split_keeping_patients_together_passes(tmp_path: Path, validated_manifest: pd.DataFrame) -> None:
    path = _split(tmp_path, {"train": ["c0", "c1", "c2", "c3"], "val": ["c4", "c5"], "test": ["c6"]})
    check = validate_split(path, validated_manifest)
    assert check.cases == {"train": 4, "val": 2, "test": 1}
    assert check.patients == {"train": 2, "val": 1, "test": 1}
    assert check.one_line().startswith("split ok (no patient in two splits): train 4 cases/2 patients")


def test_split_with_a_patient_in_two_splits_is_an_error(
    tmp_path: Path, validated_manifest: pd.DataFrame
) -> None:
    path = _split(tmp_path, {"train": ["c0", "c2", "c3"], "test": ["c1"]})  # c0, c1 are both p0
    with pytest.raises(DataError, match=r"split.json: patient in more than one split: p0 in test and train"):
        validate_split(path, validated_manifest)


@pytest.mark.parametrize(
    ("splits", "message"),
    [
        ({"train": ["c0", "c1"], "val": ["c0", "c1"]}, "cases listed in more than one split: c0, c1"),
        ({"train": ["c0", "c1", "ghost"]}, "case not in the manifest: ghost"),
        ({"train": ["c6", "c7"]}, "case quarantined in the manifest: c7"),
    ],
)
def test_split_with_bad_cases_is_an_error(
    tmp_path: Path, validated_manifest: pd.DataFrame, splits: dict[str, list[str]], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        validate_split(_split(tmp_path, splits), validated_manifest)


def test_split_check_reads_the_manifest_folder_or_an_index_without_status(
    tmp_path: Path, validated_manifest: pd.DataFrame
) -> None:
    write_manifest(validated_manifest, tmp_path)
    path = _split(tmp_path, {"train": ["c0", "c1"], "test": ["c2"]})
    assert validate_split(path, tmp_path).cases == {"train": 2, "test": 1}
    index = validated_manifest[["case_id", "patient_id"]]  # like preprocess's index.csv
    assert validate_split(path, index).patients == {"train": 1, "test": 1}
    leaky = _split(tmp_path, {"train": ["c0", "c2"], "test": ["c1"]}, name="leaky.json")
    with pytest.raises(DataError, match="p0 in test and train"):
        validate_split(leaky, index)
    path.write_text("{not json")
    with pytest.raises(DataError, match="not a tumorseg split file"):
        validate_split(path, tmp_path)


# ---------------------------------------------------------------- with the real ingest
def _write_case(
    root: Path, case_id: str, *, seg: bool = True, labels: tuple[int, ...] = (0, 1, 2, 4)
) -> Path:
    """A tiny BraTS 2021 case: 16x16x12 voxels of 2 mm, a 14x14x10 'brain', a small lesion."""
    import nibabel as nib
    import numpy as np

    folder = root / case_id
    folder.mkdir(parents=True)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    brain = np.zeros((16, 16, 12), dtype=np.float32)
    brain[1:15, 1:15, 1:11] = 1.0
    for i, key in enumerate(("t1", "t1ce", "t2", "flair")):
        nib.save(nib.Nifti1Image(brain * (100.0 + 10 * i), affine), folder / f"{case_id}_{key}.nii.gz")
    if seg:
        label_map = np.zeros((16, 16, 12), dtype=np.uint8)
        for offset, value in enumerate(v for v in labels if v):
            label_map[6 + offset, 6:9, 5:7] = value
        nib.save(nib.Nifti1Image(label_map, affine), folder / f"{case_id}_seg.nii.gz")
    return folder


def test_ingest_then_validate_on_real_nifti_files(tmp_path: Path) -> None:
    import nibabel as nib
    import numpy as np

    from tumorseg.config import IngestConfig
    from tumorseg.data.ingest import ingest

    raw = tmp_path / "raw"
    for i in range(3):
        _write_case(raw, f"BraTS2021_0000{i}")
    _write_case(raw, "BraTS2021_00010", seg=False)
    _write_case(raw, "BraTS2021_00011", labels=(0, 1, 5))
    nan_case = _write_case(raw, "BraTS2021_00012")
    flair_path = nan_case / "BraTS2021_00012_flair.nii.gz"
    flair = nib.load(flair_path)
    data = np.asarray(flair.dataobj, dtype=np.float32).copy()
    data[5, 5, 5] = np.nan
    nib.save(nib.Nifti1Image(data, flair.affine), flair_path)
    truncated = _write_case(raw, "BraTS2021_00013") / "BraTS2021_00013_t2.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[:200])

    ingest(raw, tmp_path / "ingested", IngestConfig())
    result = validate_dataset(
        tmp_path / "ingested", tmp_path / "validated", ValidateConfig(max_invalid_fraction=0.5)
    )

    status = read_manifest(tmp_path / "validated").set_index("case_id")
    ok = {"BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00010"}
    assert set(status.index[status["status"] == "ok"]) == ok, status["reason"].to_dict()
    assert status.loc["BraTS2021_00011", "reason"] == "label values [5] outside brats2021 {0,1,2,4}"
    assert status.loc["BraTS2021_00012", "reason"] == "NaN or infinite voxels in flair"
    assert status.loc["BraTS2021_00013", "ingest_status"] == "quarantined"
    assert "BraTS2021_00013_t2.nii.gz" in status.loc["BraTS2021_00013", "reason"]
    assert result.n_quarantined == 3 and result.passed
    assert not list(raw.rglob("*validation*")), "the source dataset is untouched"


# ---------------------------------------------------------------- duplicated scans
def _digest_overrides(case_id: str, **shared: str) -> dict[str, str]:
    """Content digests for a row (distinct per case) with ``shared`` ones replacing them."""
    row = {
        f"content_sha256_{k}": _fake_digest(case_id, f"content-{k}") for k in ("t1", "t1ce", "t2", "flair")
    }
    return {**row, **shared}


@pytest.fixture(scope="module")
def duplicates_run(tmp_path_factory: pytest.TempPathFactory):
    """Cases linked by an identical file, by a decoded volume only, transitively, and look-alikes that are not."""
    same_t1 = _fake_digest("shared", "t1-file")
    rows = [
        # A = B: the same t1 file (any modality is enough).
        good_row("A", sha256_t1=same_t1, **_digest_overrides("A")),
        good_row("B", sha256_t1=same_t1, **_digest_overrides("B")),
        # C = D: re-saved flair (other file, same decoded volume), D's filed as t2.
        good_row("C", **_digest_overrides("C", content_sha256_flair="f" * 64)),
        good_row("D", **_digest_overrides("D", content_sha256_t2="f" * 64)),
        # I = J = K: I-J by a t1ce file, J-K by a t2 volume.
        good_row("I", sha256_t1ce="1" * 64, **_digest_overrides("I")),
        good_row("J", sha256_t1ce="1" * 64, **_digest_overrides("J", content_sha256_t2="2" * 64)),
        good_row("K", **_digest_overrides("K", content_sha256_t2="2" * 64)),
        # Not duplicates: the same segmentation, the same empty t2, the same unreadable file.
        good_row("S1", sha256_seg="3" * 64, **_digest_overrides("S1")),
        good_row("S2", sha256_seg="3" * 64, **_digest_overrides("S2")),
        good_row(
            "Z1",
            sha256_t2="4" * 64,
            t2_nonzero_voxels="0",
            **_digest_overrides("Z1", content_sha256_t2="5" * 64),
        ),
        good_row(
            "Z2",
            sha256_t2="4" * 64,
            t2_nonzero_voxels="0",
            **_digest_overrides("Z2", content_sha256_t2="5" * 64),
        ),
        good_row(
            "U1",
            **unreadable("flair", sha256_flair="6" * 64),
            **_digest_overrides("U1", content_sha256_flair=""),
        ),
        good_row(
            "U2",
            **unreadable("flair", sha256_flair="6" * 64),
            **_digest_overrides("U2", content_sha256_flair=""),
        ),
        *(good_row(f"ok{i}", **_digest_overrides(f"ok{i}")) for i in range(4)),
    ]
    src = write_cases(tmp_path_factory.mktemp("dup_ingested"), rows)
    out = tmp_path_factory.mktemp("dup_validated")
    return out, validate_dataset(src, out, ValidateConfig(max_invalid_fraction=0.5)), read_manifest(out)


def test_duplicated_scans_are_flagged_not_quarantined(duplicates_run) -> None:
    _, result, manifest = duplicates_run
    rows = manifest.set_index("case_id")
    expected = {"A": "A", "B": "A", "C": "C", "D": "C", "I": "I", "J": "I", "K": "I"}
    assert rows["duplicate_of"].to_dict() == {c: expected.get(c, "") for c in rows.index}
    assert set(rows.loc[list(expected), "status"]) == {"ok"} and set(rows.loc[list(expected), "reason"]) == {
        ""
    }
    assert set(rows.loc[["Z1", "Z2", "U1", "U2"], "status"]) == {"quarantined"}  # for their own faults
    assert result.passed
    verdicts = {c.case_id: c for c in result.cases}
    assert verdicts["B"].flagged_checks == ["scan.not_duplicated"] and verdicts["B"].failed_checks == []
    assert verdicts["ok0"].flagged_checks == []


def test_duplicates_are_a_warning_expectation_in_the_report_and_data_docs(duplicates_run) -> None:
    out, result, _ = duplicates_run
    report = json.loads(result.report_path.read_text())
    entry = next(e for e in report["expectations"] if e["check"] == "scan.not_duplicated")
    assert entry["severity"] == "warning" and entry["success"] is False
    assert entry["expectation"] == "expect_column_values_to_be_null"
    assert entry["unexpected_case_ids"] == ["A", "B", "C", "D", "I", "J", "K"]
    assert [g["case_ids"] for g in report["duplicates"]] == [["A", "B"], ["C", "D"], ["I", "J", "K"]]
    by_first = {g["first"]: g["evidence"] for g in report["duplicates"]}
    assert by_first["A"] == ["identical t1 file: A, B"]
    assert by_first["C"] == ["same decoded t2/flair volume: C flair, D t2"]
    assert by_first["I"] == ["identical t1ce file: I, J", "same decoded t2 volume: J, K"]
    critical = [e for e in report["expectations"] if e["check"] != "scan.not_duplicated"]
    assert all(e["severity"] == "critical" for e in critical)
    suite = json.loads(next((out / "validation" / "gx" / "expectations").glob("*.json")).read_text())
    severities = {e["meta"]["tumorseg_check"]: e.get("severity", "critical") for e in suite["expectations"]}
    assert severities["scan.not_duplicated"] == "warning" and severities["t1.readable"] == "critical"
    text = validation_markdown(result)
    assert "`scan.not_duplicated` (warning)" in text
    assert "### Duplicate scans" in text and "| I, J, K |" in text


def test_duplicates_are_one_log_warning_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        good_row("A", sha256_t2="7" * 64),
        good_row("B", sha256_t2="7" * 64),
        good_row("C"),
        good_row("D"),
    ]
    write_cases(tmp_path, rows)
    with caplog.at_level("WARNING", logger="tumorseg.validation.suite"):
        validate_dataset(tmp_path, tmp_path, ValidateConfig())
    lines = [r.getMessage() for r in caplog.records if r.name == "tumorseg.validation.suite"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "2 cases hold 1 scan stored under several case ids" in lines[0] and "A = B" in lines[0]
    # Validating again in place gives the same column (recomputed, not accumulated).
    once = (tmp_path / "manifest.csv").read_text()
    validate_dataset(tmp_path, tmp_path, ValidateConfig())
    assert (tmp_path / "manifest.csv").read_text() == once
    assert read_manifest(tmp_path)["duplicate_of"].tolist() == ["A", "A", "", ""]


def test_no_duplicates_no_warning_and_an_empty_column(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_cases(tmp_path, [good_row(c) for c in GOOD_CASES[:4]])
    with caplog.at_level("WARNING"):
        result = validate_dataset(tmp_path, tmp_path / "out", ValidateConfig())
    assert not [r for r in caplog.records if "several case ids" in r.getMessage()]
    assert set(read_manifest(tmp_path / "out")["duplicate_of"]) == {""}
    assert all(c.success for c in result.checks) and result.duplicates == []


def test_duplicates_on_real_files_copied_and_resaved(tmp_path: Path) -> None:
    """An identical copy and an uncompressed re-save under new case ids are flagged; other scans are not."""
    import importlib.util
    import shutil

    import nibabel as nib
    import numpy as np

    from tumorseg.config import IngestConfig
    from tumorseg.data.ingest import ingest

    spec = importlib.util.spec_from_file_location(
        "fx", Path(__file__).resolve().parents[1] / "fixtures_nifti.py"
    )
    fx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fx)
    raw = tmp_path / "raw"
    for i in range(1, 5):
        fx.write_brats_case(raw, f"BraTS2021_0000{i}", seed=i)
    original = raw / "BraTS2021_00001"
    copy = raw / "BraTS2021_00101"  # the same files under another id
    copy.mkdir()
    for path in original.iterdir():
        shutil.copyfile(path, copy / path.name.replace("00001", "00101"))
    resaved = raw / "BraTS2021_00102"  # every file re-saved as .nii (no gzip, float32)
    resaved.mkdir()
    for path in (raw / "BraTS2021_00002").iterdir():
        image = nib.load(path)
        data = np.asarray(image.dataobj)
        name = path.name.replace("00002", "00102").removesuffix(".gz")
        nib.save(
            nib.Nifti1Image(data if "seg" in name else data.astype(np.float32), image.affine), resaved / name
        )

    ingest(raw, tmp_path / "ingested", IngestConfig(workers=1))
    result = validate_dataset(tmp_path / "ingested", tmp_path / "validated", ValidateConfig())
    rows = read_manifest(tmp_path / "validated").set_index("case_id")
    assert set(rows["status"]) == {"ok"}
    assert rows["duplicate_of"].to_dict() == {
        "BraTS2021_00001": "BraTS2021_00001",
        "BraTS2021_00002": "BraTS2021_00002",
        "BraTS2021_00003": "",
        "BraTS2021_00004": "",
        "BraTS2021_00101": "BraTS2021_00001",
        "BraTS2021_00102": "BraTS2021_00002",
    }
    evidence = {g["first"]: g["evidence"] for g in result.duplicates}
    assert evidence["BraTS2021_00001"] == [
        "identical t1/t1ce/t2/flair files: BraTS2021_00001, BraTS2021_00101"
    ]
    assert evidence["BraTS2021_00002"] == [
        "same decoded t1/t1ce/t2/flair volumes: BraTS2021_00002, BraTS2021_00102"
    ]


def test_split_check_keeps_duplicated_scans_on_one_side(
    tmp_path: Path, validated_manifest: pd.DataFrame
) -> None:
    manifest = validated_manifest.assign(duplicate_of="")
    manifest.loc[manifest.case_id.isin(["c2", "c4"]), "duplicate_of"] = "c2"  # patients p1 and p2: one scan
    ok = _split(tmp_path, {"train": ["c0", "c1", "c2", "c3", "c4", "c5"], "test": ["c6"]})
    assert validate_split(ok, manifest).cases == {"train": 6, "test": 1}
    leaky = _split(tmp_path, {"train": ["c0", "c1", "c2", "c3"], "test": ["c4", "c5"]}, name="leaky.json")
    with pytest.raises(
        DataError,
        match=r"duplicated scans \(duplicate_of\) in more than one split: "
        r"c2 \(train\), c3 \(train\), c4 \(test\), c5 \(test\)",
    ):
        validate_split(leaky, manifest)
