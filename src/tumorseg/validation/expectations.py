"""The expectations a usable case must meet, and how each failure is told to a human.

Each :class:`CaseCheck` names a built-in Great Expectations expectation by class name (so this module
imports no GX and the rules unit-test in milliseconds) with its arguments on the :mod:`case table
<tumorseg.validation.case_table>`, a Data Docs note, and a function wording the failure for one case
(``"NaN or infinite voxels in flair"``). :func:`build_case_checks` lists them in the order their
reasons are reported: ingest, manifest, identity, per volume, geometry, content, duplicates. A
``critical`` check quarantines the cases it fails on; a ``warning`` one (duplicated scans) only flags
them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tumorseg.config import ValidateConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES, LABEL_CONVENTIONS
from tumorseg.data.manifest import FILE_KEYS, STATUS_OK
from tumorseg.validation.case_table import INGEST_REASON_COLUMN, INGEST_STATUS_COLUMN, REFERENCE_KEY
from tumorseg.validation.case_table import labels_outside_convention as _labels_outside

CASE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
"""Case ids become file names downstream: letters, digits, ``.``, ``_`` and ``-`` only."""

# GX expectation severities (``great_expectations.expectations.FailureSeverity`` values).
SEVERITY_CRITICAL = "critical"
SEVERITY_WARNING = "warning"

CaseRow = Mapping[str, Any]  # one row of the case table (column -> value)


@dataclass(frozen=True)
class CaseCheck:
    """One expectation on the case table and how to explain its failure for one case.

    Attributes:
        check_id: stable id (``"flair.finite"``), stored in the expectation's ``meta`` so results map
            back to the check; used in ``report.json``.
        expectation: class name in ``great_expectations.expectations``.
        note: why the check exists, shown under the expectation in Data Docs.
        ingest_decides: ingest itself quarantines cases failing this check, with a reason that already
            says why, so for those cases the failure is recorded but not worded a second time.
    """

    check_id: str
    expectation: str
    kwargs: dict[str, Any]
    note: str
    explain: Callable[[CaseRow], str] = field(compare=False)
    ingest_decides: bool = False
    severity: str = SEVERITY_CRITICAL

    @property
    def quarantines(self) -> bool:
        return self.severity == SEVERITY_CRITICAL


def _ingest_reason(row: CaseRow) -> str:
    reason = str(row.get(INGEST_REASON_COLUMN) or "").strip()
    status = row.get(INGEST_STATUS_COLUMN)
    return reason or f"ingest status {status!r} (expected {STATUS_OK!r})"


def _label_reason(row: CaseRow) -> str:
    convention = str(row["label_convention"])
    outside = _labels_outside(str(row["label_values"]), convention)
    allowed = "{" + ",".join(str(v) for v in sorted(LABEL_CONVENTIONS[convention].allowed_values)) + "}"
    reason = f"label values {outside} outside {convention} {allowed}"
    hint = _convention_hint(convention, outside)
    return f"{reason}; {hint}" if hint else reason


def _convention_hint(convention: str, outside: object) -> str:
    """What to set when the values fit another convention of the same files (a 2024 cavity, ...)."""
    found = list(outside) if isinstance(outside, list) else []
    if not found or any(float(v) != int(v) for v in found):
        return ""
    values = {int(v) for v in found} | set(LABEL_CONVENTIONS[convention].allowed_values)
    fits = [
        name
        for name, other in LABEL_CONVENTIONS.items()
        if name != convention and values <= other.allowed_values
    ]
    if convention.startswith("brats2023") and "brats2024-gli" in fits and 4 in values:
        return "a BraTS 2024 post-treatment resection cavity? set ingest.labels: brats2024-gli"
    return f"set ingest.labels to the files' convention ({', '.join(fits)})" if fits else ""


def _volume_checks(key: str, cfg: ValidateConfig) -> list[CaseCheck]:
    """Checks on one volume's statistics (file present, readable, finite, non-empty, aligned)."""
    checks = []
    if key in CANONICAL_MODALITIES:
        checks.append(
            CaseCheck(
                f"{key}.present",
                "ExpectColumnValuesToNotBeNull",
                {"column": f"path_{key}"},
                f"Every case needs its {key} file (the segmentation is optional: unlabelled case).",
                lambda row, key=key: f"{key} file missing",
                ingest_decides=True,
            )
        )
    checks += [
        CaseCheck(
            f"{key}.readable",
            "ExpectColumnValuesToBeInSet",
            {"column": f"{key}_readable", "value_set": [True]},
            f"nibabel must be able to load the {key} file (ingest records whether it could).",
            lambda row, key=key: f"{key} unreadable",
            ingest_decides=True,
        ),
        CaseCheck(
            f"{key}.finite",
            "ExpectColumnValuesToBeInSet",
            {"column": f"{key}_finite", "value_set": [True]},
            f"NaN or infinite voxels in {key} would poison normalisation and the loss.",
            lambda row, key=key: f"NaN or infinite voxels in {key}",
        ),
    ]
    if key in CANONICAL_MODALITIES:
        checks.append(
            CaseCheck(
                f"{key}.not_empty",
                "ExpectColumnValuesToBeBetween",
                {"column": f"{key}_nonzero_voxels", "min_value": 1},
                f"An all-zero {key} carries no image (a failed export or conversion).",
                lambda row, key=key: f"{key} is all zero",
            )
        )
    if key != REFERENCE_KEY:
        ref = REFERENCE_KEY
        checks += [
            CaseCheck(
                f"{key}.shape_matches_{ref}",
                "ExpectColumnPairValuesToBeEqual",
                {
                    "column_A": f"{ref}_shape",
                    "column_B": f"{key}_shape",
                    "ignore_row_if": "either_value_is_missing",
                },
                f"The channels and the label map are stacked voxel by voxel, so {key} must have {ref}'s shape.",
                lambda row, key=key, ref=ref: (
                    f"{key} shape {row[f'{key}_shape']} differs from {ref} {row[f'{ref}_shape']}"
                ),
                ingest_decides=True,
            ),
            CaseCheck(
                f"{key}.aligned_to_{ref}",
                "ExpectColumnValuesToBeBetween",
                {
                    "column": f"{key}_affine_max_diff_mm",
                    "min_value": 0.0,
                    "max_value": cfg.affine_tolerance_mm,
                },
                f"{key} must lie on {ref}'s voxel grid (largest affine difference, mm; "
                "params.yaml validate.affine_tolerance_mm).",
                lambda row, key=key, ref=ref: (
                    f"{key} affine differs from {ref} by {float(row[f'{key}_affine_max_diff_mm']):.3g} mm "
                    f"(validate.affine_tolerance_mm = {cfg.affine_tolerance_mm:g})"
                ),
            ),
        ]
    return checks


def identity_checks(ingest_note: str) -> list[CaseCheck]:
    """The checks the 3-D and the 2-D case tables both start with (ingest verdict, manifest values,
    ``case_id``), worded alike; ``ingest_note`` is the Data Docs note of ``ingest.accepted``."""
    return [
        CaseCheck(
            "ingest.accepted",
            "ExpectColumnValuesToBeInSet",
            {"column": INGEST_STATUS_COLUMN, "value_set": [STATUS_OK]},
            ingest_note,
            _ingest_reason,
        ),
        CaseCheck(
            "manifest.complete",
            "ExpectColumnValuesToBeNull",
            {"column": "manifest_problems"},
            "Statistics validation needs must be present and parseable; re-run ingest if not.",
            lambda row: f"manifest fields without a usable value: {row['manifest_problems']}",
        ),
        CaseCheck(
            "case_id.present",
            "ExpectColumnValuesToNotBeNull",
            {"column": "case_id"},
            "Every case needs an id.",
            lambda row: "empty case_id",
        ),
        CaseCheck(
            "case_id.unique",
            "ExpectColumnValuesToBeUnique",
            {"column": "case_id"},
            "Case ids name output files and split entries, so they must be unique.",
            lambda row: f"case id {row['case_id']!r} appears more than once in the manifest",
        ),
        CaseCheck(
            "case_id.safe_name",
            "ExpectColumnValuesToMatchRegex",
            {"column": "case_id", "regex": CASE_ID_PATTERN},
            "Case ids become file names: letters, digits, '.', '_' and '-' only.",
            lambda row: (
                f"case id {row['case_id']!r} has characters other than letters, digits, '.', '_', '-'"
            ),
        ),
    ]


def build_case_checks(cfg: ValidateConfig) -> list[CaseCheck]:
    """All checks for the case table in reporting order, thresholds from params.yaml ``validate:``."""
    lo, hi = cfg.spacing_min_mm, cfg.spacing_max_mm

    def spacing_reason(row: CaseRow) -> str:
        return (
            f"spacing {row['spacing']} mm outside {lo:g}..{hi:g} mm (validate.spacing_min_mm/spacing_max_mm)"
        )

    checks = [
        *identity_checks("Cases ingest could not index stay quarantined with ingest's reason."),
        CaseCheck(
            "patient_id.present",
            "ExpectColumnValuesToNotBeNull",
            {"column": "patient_id"},
            "The split keeps all cases of a patient together, so each case needs its patient.",
            lambda row: "empty patient_id",
        ),
        CaseCheck(
            "label_convention.known",
            "ExpectColumnValuesToBeInSet",
            {"column": "label_convention", "value_set": sorted(LABEL_CONVENTIONS)},
            "Labels are mapped to canonical codes through a known convention.",
            lambda row: f"unknown label convention {row['label_convention']!r}",
        ),
    ]
    for key in FILE_KEYS:
        checks += _volume_checks(key, cfg)
    checks += [
        CaseCheck(
            f"spacing.{end}_in_range",
            "ExpectColumnValuesToBeBetween",
            {"column": f"spacing_{end}_mm", "min_value": lo, "max_value": hi},
            f"{side} voxel side (mm) in the sane range (params.yaml validate.spacing_min_mm/spacing_max_mm).",
            spacing_reason,
        )
        for end, side in (("min", "Smallest"), ("max", "Largest"))
    ]
    checks += [
        CaseCheck(
            "labels.in_convention",
            "ExpectColumnValuesToBeInSet",
            {"column": "labels_in_convention", "value_set": [True]},
            "Every label value must belong to the case's label convention (e.g. brats2021 {0,1,2,4}).",
            _label_reason,
        ),
        CaseCheck(
            "brain.min_voxels",
            "ExpectColumnValuesToBeBetween",
            {"column": "brain_voxels", "min_value": cfg.min_brain_voxels},
            "Voxels non-zero in any modality (params.yaml validate.min_brain_voxels).",
            lambda row: (
                f"only {float(row['brain_voxels']):.0f} brain voxels "
                f"(validate.min_brain_voxels = {cfg.min_brain_voxels})"
            ),
        ),
        CaseCheck(
            "scan.not_duplicated",
            "ExpectColumnValuesToBeNull",
            {"column": "duplicate_of"},
            "Warning only: one scan stored under several case ids (identical file, or the same decoded "
            "volume re-saved) stays valid, is flagged in duplicate_of, and the split keeps its group on one side.",
            lambda row: str(row.get("duplicate_evidence") or f"duplicate of {row['duplicate_of']}"),
            severity=SEVERITY_WARNING,
        ),
    ]
    return checks


def join_reasons(*reasons: str) -> str:
    """Join reason fragments with ``"; "``, dropping empty and repeated ones, order kept.

    A reason may itself be a ``"; "``-joined list (ingest's, or an earlier run's), so
    joining is idempotent: validating a validated manifest again gives the same text.
    """
    seen: list[str] = []
    for reason in reasons:
        for fragment in (reason or "").split("; "):
            fragment = fragment.strip()
            if fragment and fragment not in seen:
                seen.append(fragment)
    return "; ".join(seen)
