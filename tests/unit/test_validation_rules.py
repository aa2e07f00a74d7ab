"""Unit tests of the validation rules: case-table derivation, checks, reasons, result logic.

No Great Expectations run here (tests/data/test_validation.py does that); these pin the
pure-Python parts so that a failure points at the rule, not at GX.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from tumorseg.config import ValidateConfig
from tumorseg.data.manifest import FILE_KEYS, MANIFEST_COLUMNS
from tumorseg.errors import DataError
from tumorseg.validation.case_table import (
    derive_case_row,
    derive_case_table,
    labels_outside_convention,
    parse_bool,
    parse_label_values,
    parse_shape,
    parse_spacing,
)
from tumorseg.validation.expectations import CASE_ID_PATTERN, build_case_checks, join_reasons
from tumorseg.validation.report import CaseVerdict, CheckOutcome, ValidationResult, validation_markdown


def manifest_row(**overrides: str) -> dict[str, str]:
    """A healthy manifest row (all text, as read_manifest gives it)."""
    row = dict.fromkeys(MANIFEST_COLUMNS, "")
    row.update(
        case_id="c1",
        patient_id="p1",
        layout="brats2021",
        label_convention="brats2021",
        status="ok",
        spacing="1x1x1.5",
        label_values="0;1;2;4",
        brain_voxels="5000",
    )
    for key in FILE_KEYS:
        row.update(
            {
                f"path_{key}": f"/d/c1_{key}.nii.gz",
                f"{key}_readable": "True",
                f"{key}_finite": "True",
                f"{key}_nonzero_voxels": "5000",
                f"{key}_shape": "10x10x10",
                f"{key}_affine_max_diff_mm": "0",
            }
        )
    row.update(overrides)
    return row


@pytest.mark.parametrize(
    ("text", "value"),
    [("True", True), ("false", False), ("1", True), ("0", False), ("", None), ("maybe", None)],
)
def test_parse_bool(text: str, value: bool | None) -> None:
    assert parse_bool(text) is value


def test_parsers_normalise_or_reject() -> None:
    assert parse_shape("240 x 240 x155") == "240x240x155"
    assert parse_shape("240x240x") is None
    assert parse_spacing("1x1x1.5") == (1.0, 1.0, 1.5)
    assert parse_spacing("1xnanx1") is None and parse_spacing("") is None
    assert parse_label_values("4;0;2;1;2") == [0, 1, 2, 4]
    assert parse_label_values("0;a") is None and parse_label_values("") is None
    assert parse_label_values("0;0.5;1.0") == [0, 0.5, 1], "a fractional label survives, to be rejected"
    assert labels_outside_convention("0;0.5;1", "brats2021") == [0.5]
    assert labels_outside_convention("0;1;2;3;5", "brats2021") == [3, 5]
    assert labels_outside_convention("0;1;2;3", "brats2023") == []


def test_healthy_row_derives_typed_values() -> None:
    row = derive_case_row(manifest_row(), 7)
    assert row["manifest_row"] == 7
    assert row["t1_readable"] is True and row["flair_finite"] is True
    assert (row["spacing_min_mm"], row["spacing_max_mm"]) == (1.0, 1.5)
    assert row["labels_in_convention"] is True
    assert row["brain_voxels"] == 5000.0
    assert row["t1_affine_max_diff_mm"] is None, "T1 is the reference, not compared with itself"
    assert row["flair_affine_max_diff_mm"] == 0.0
    assert row["manifest_problems"] is None


def test_unreadable_volume_hides_its_statistics() -> None:
    """An unreadable FLAIR is reported once (unreadable), not again as non-finite or misshapen."""
    row = derive_case_row(manifest_row(flair_readable="False", flair_finite="", flair_shape=""), 0)
    assert row["flair_readable"] is False
    assert row["flair_finite"] is None and row["flair_shape"] is None and row["flair_nonzero_voxels"] is None
    assert row["brain_voxels"] is None, "brain size needs all four modalities"
    assert row["manifest_problems"] is None


def test_missing_file_has_no_readability() -> None:
    row = derive_case_row(manifest_row(path_t2="", t2_readable=""), 0)
    assert row["path_t2"] is None and row["t2_readable"] is None


def test_unlabelled_case_has_no_label_check() -> None:
    row = derive_case_row(
        manifest_row(path_seg="", seg_readable="", seg_finite="", seg_shape="", label_values=""), 0
    )
    assert row["labels_in_convention"] is None and row["seg_shape"] is None
    assert row["manifest_problems"] is None


def test_unreadable_t1_hides_spacing_and_affine_comparisons() -> None:
    row = derive_case_row(manifest_row(t1_readable="False", spacing=""), 0)
    assert row["spacing_min_mm"] is None
    assert row["t2_affine_max_diff_mm"] is None
    assert row["t2_finite"] is True, "other volumes are still checked"


def test_unparseable_statistics_are_problems_only_for_cases_ingest_accepted() -> None:
    accepted = derive_case_row(manifest_row(t2_finite="maybe", spacing="1x?x1"), 0)
    assert accepted["manifest_problems"] == "t2_finite='maybe'; spacing='1x?x1'"
    assert accepted["t2_finite"] is None
    rejected = derive_case_row(manifest_row(status="quarantined", reason="bad", t2_finite="", spacing=""), 0)
    assert rejected["manifest_problems"] is None


def test_label_check_needs_a_readable_seg_and_a_known_convention() -> None:
    assert derive_case_row(manifest_row(label_values="0;1;2;3"), 0)["labels_in_convention"] is False
    assert derive_case_row(manifest_row(label_convention="other"), 0)["labels_in_convention"] is None
    assert derive_case_row(manifest_row(seg_readable="False"), 0)["labels_in_convention"] is None


def test_ingest_verdict_columns_take_precedence_over_status() -> None:
    """A validated manifest carries ingest's verdict; re-validation starts from it."""
    row = derive_case_row(
        manifest_row(
            status="quarantined", reason="spacing 9x9x9 mm outside", ingest_status="ok", ingest_reason=""
        ),
        0,
    )
    assert (row["ingest_status"], row["ingest_reason"]) == ("ok", "")
    row = derive_case_row(manifest_row(status="quarantined", reason="t1: truncated"), 0)
    assert (row["ingest_status"], row["ingest_reason"]) == ("quarantined", "t1: truncated")


def test_case_table_keeps_manifest_order_and_rejects_old_manifests() -> None:
    table = derive_case_table(pd.DataFrame([manifest_row(case_id="b"), manifest_row(case_id="a")]))
    assert list(table["case_id"]) == ["b", "a"] and list(table["manifest_row"]) == [0, 1]
    old = pd.DataFrame(
        [
            {
                "case_id": "a",
                "patient_id": "a",
                "layout": "",
                "label_convention": "",
                "status": "ok",
                "reason": "",
            }
        ]
    )
    with pytest.raises(DataError, match="old.csv: manifest lacks columns path_t1, path_t1ce"):
        derive_case_table(old, source="old.csv")


def test_checks_take_thresholds_from_params() -> None:
    cfg = ValidateConfig(
        spacing_min_mm=0.5, spacing_max_mm=5.0, min_brain_voxels=123, affine_tolerance_mm=0.01
    )
    checks = {c.check_id: c for c in build_case_checks(cfg)}
    assert checks["spacing.min_in_range"].kwargs == {
        "column": "spacing_min_mm",
        "min_value": 0.5,
        "max_value": 5.0,
    }
    assert checks["brain.min_voxels"].kwargs["min_value"] == 123
    assert checks["flair.aligned_to_t1"].kwargs["max_value"] == 0.01
    assert checks["seg.shape_matches_t1"].expectation == "ExpectColumnPairValuesToBeEqual"
    assert "seg.not_empty" not in checks, "a tumour-free case has an all-zero label map"
    assert "t1.aligned_to_t1" not in checks
    assert "seg.present" not in checks, "a case without segmentation is unlabelled, not invalid"
    assert checks["flair.present"].ingest_decides and not checks["flair.finite"].ingest_decides
    assert len(checks) == len(build_case_checks(cfg)), "check ids are unique"


def test_failure_explanations_name_the_volume_and_values() -> None:
    cfg = ValidateConfig()
    checks = {c.check_id: c for c in build_case_checks(cfg)}
    row = derive_case_row(
        manifest_row(
            flair_shape="10x10x9", t2_affine_max_diff_mm="0.25", label_values="0;1;5", brain_voxels="12"
        ),
        0,
    )
    assert checks["flair.shape_matches_t1"].explain(row) == "flair shape 10x10x9 differs from t1 10x10x10"
    assert checks["t2.aligned_to_t1"].explain(row).startswith("t2 affine differs from t1 by 0.25 mm")
    assert checks["labels.in_convention"].explain(row) == "label values [5] outside brats2021 {0,1,2,4}"
    assert (
        checks["brain.min_voxels"].explain(row) == "only 12 brain voxels (validate.min_brain_voxels = 1000)"
    )
    assert (
        checks["ingest.accepted"]
        .explain({"ingest_status": "weird", "ingest_reason": ""})
        .startswith("ingest status 'weird'")
    )


@pytest.mark.parametrize(
    ("case_id", "safe"), [("BraTS-GLI-00001-000", True), ("BRATS_001", True), ("a b", False), ("../x", False)]
)
def test_case_id_pattern(case_id: str, safe: bool) -> None:
    assert bool(re.match(CASE_ID_PATTERN, case_id)) is safe


def test_join_reasons_is_ordered_and_idempotent() -> None:
    joined = join_reasons("t2: cannot read", "t2 unreadable", "", "t2 unreadable")
    assert joined == "t2: cannot read; t2 unreadable"
    assert join_reasons(joined, "t2 unreadable") == joined
    assert join_reasons("labels 0;1;5 odd") == "labels 0;1;5 odd", "only '; ' separates fragments"


def _result(statuses: list[str], max_invalid_fraction: float) -> ValidationResult:
    cases = [
        CaseVerdict(
            f"c{i}", s, "" if s == "ok" else "flair is all zero", [] if s == "ok" else ["flair.not_empty"]
        )
        for i, s in enumerate(statuses)
    ]
    bad = [c.case_id for c in cases if c.status != "ok"]
    checks = [
        CheckOutcome("flair.not_empty", "expect_column_values_to_be_between", {}, not bad, len(cases), bad),
        CheckOutcome("t1.readable", "expect_column_values_to_be_in_set", {}, True, len(cases), []),
    ]
    return ValidationResult(Path("out"), cases, checks, max_invalid_fraction)


def test_threshold_is_exceeded_only_strictly_above() -> None:
    at = _result(["ok", "ok", "ok", "quarantined"], 0.25)
    assert at.invalid_fraction == 0.25 and at.passed and at.failure_message() == ""
    above = _result(["ok", "ok", "quarantined", "quarantined"], 0.25)
    assert not above.passed
    assert above.failure_message().startswith(
        "2 of 4 cases (50.0%) failed validation, above validate.max_invalid_fraction"
    )
    none_left = _result(["quarantined"], 1.0)
    assert not none_left.passed and none_left.failure_message().startswith("no valid case left")
    assert "\n" not in above.failure_message()


def test_report_and_markdown_content() -> None:
    result = _result(["ok", "quarantined", "ok"], 0.5)
    report = result.to_report()
    assert report["counts"] == {
        "cases": 3,
        "valid": 2,
        "quarantined": 1,
        "quarantined_by_ingest": 0,
        "invalid_fraction": pytest.approx(1 / 3, abs=1e-6),
        "max_invalid_fraction": 0.5,
    }
    assert report["data_docs"] == "validation/data_docs/index.html"
    assert report["expectations"][0]["unexpected_case_ids"] == ["c1"]
    text = validation_markdown(result)
    assert "## Data validation passed" in text
    assert "Expectations: 1 of 2 met" in text
    assert "| c1 | flair is all zero |" in text
    assert "FAILED" in validation_markdown(_result(["quarantined"], 0.5))
