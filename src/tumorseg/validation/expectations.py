"""The expectations a usable case must meet (3-D: :func:`build_case_checks`, 2-D: :func:`build_planar_checks`).

Each :class:`CaseCheck` names a built-in Great Expectations expectation by class name (this module
imports no GX, so the rules unit-test in milliseconds), its arguments on the case table, a Data Docs
note and a function wording the failure for one case; listed in the order reasons are reported. A
``critical`` check quarantines the cases it fails on, a ``warning`` one only flags them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tumorseg.config import PlanarValidateConfig, ValidateConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES, LABEL_CONVENTIONS
from tumorseg.data.manifest import FILE_KEYS, STATUS_OK
from tumorseg.data.planar import FIGSHARE_LABELS, IMAGE_LAYOUTS
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

    ``check_id`` (``"flair.finite"``) is stored in the expectation's ``meta`` to map results back;
    ``note`` shows in Data Docs. ``ingest_decides``: ingest quarantines such cases with its own reason,
    so the failure is recorded but not worded a second time.
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
    """Checks on one volume: present, readable, finite, non-empty, aligned."""
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
    """The checks both case tables start with (ingest verdict, manifest values, ``case_id``)."""
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
    """Join reason fragments with ``"; "``, dropping empty and repeated ones (also inside a joined
    reason, so validating a validated manifest again gives the same text)."""
    seen: list[str] = []
    for reason in reasons:
        for fragment in (reason or "").split("; "):
            fragment = fragment.strip()
            if fragment and fragment not in seen:
                seen.append(fragment)
    return "; ".join(seen)


def build_planar_checks(cfg: PlanarValidateConfig) -> list[CaseCheck]:
    """The 2-D checks in reporting order, limits from ``cfg`` (params.yaml ``validate_2d:``)."""
    lo, hi = cfg.min_side_px, cfg.max_side_px
    labels = sorted(FIGSHARE_LABELS)

    def side_check(column: str) -> CaseCheck:
        return CaseCheck(
            f"image.{column}_in_range",
            "ExpectColumnValuesToBeBetween",
            {"column": column, "min_value": lo, "max_value": hi},
            f"Image {column} in pixels within validate_2d.min_side_px..max_side_px.",
            lambda row: (
                f"image {column} {float(row[column]):.0f} px outside {lo}..{hi} (validate_2d.min_side_px/max_side_px)"
            ),
        )

    return [
        *identity_checks("Files ingest could not decode stay quarantined with ingest's reason."),
        CaseCheck(
            "patient_id.present",
            "ExpectColumnValuesToNotBeNull",
            {"column": "patient_id"},
            "The split keeps all slices of a patient (Figshare PID) together, so each needs its patient.",
            lambda row: "empty patient_id (Figshare PID)",
        ),
        CaseCheck(
            "layout.known",
            "ExpectColumnValuesToBeInSet",
            {"column": "layout", "value_set": list(IMAGE_LAYOUTS)},
            "2-D layouts: figshare (.mat slices) and kaggle (yes/no image folders).",
            lambda row: f"unknown 2-D layout {row['layout']!r}",
        ),
        CaseCheck(
            "image.readable",
            "ExpectColumnValuesToBeInSet",
            {"column": "image_readable", "value_set": [True]},
            "h5py/scipy (MATLAB) or Pillow (images) must decode the file (ingest records whether it could).",
            lambda row: "image unreadable",
            ingest_decides=True,
        ),
        CaseCheck(
            "image.two_dimensional",
            "ExpectColumnValuesToBeInSet",
            {"column": "image_ndim", "value_set": [2]},
            "A case is one 2-D slice (colour channels aside).",
            lambda row: f"image has {float(row['image_ndim']):.0f} dimensions, not one 2-D slice",
        ),
        CaseCheck(
            "image.finite",
            "ExpectColumnValuesToBeInSet",
            {"column": "image_finite", "value_set": [True]},
            "NaN or infinite pixels would poison normalisation and the loss.",
            lambda row: "NaN or infinite pixels in the image",
        ),
        CaseCheck(
            "image.not_constant",
            "ExpectColumnValuesToBeBetween",
            {"column": "image_range", "min_value": 0, "strict_min": True},
            "A constant image (all black, a failed export) carries no anatomy.",
            lambda row: "image is constant (max equals min)",
        ),
        side_check("height"),
        side_check("width"),
        CaseCheck(
            "mask.present",
            "ExpectColumnValuesToBeInSet",
            {"column": "mask_present", "value_set": [True]},
            "Every Figshare slice carries its cjdata.tumorMask.",
            lambda row: "Figshare file has no tumorMask",
        ),
        CaseCheck(
            "mask.shape_matches_image",
            "ExpectColumnPairValuesToBeEqual",
            {"column_A": "image_shape", "column_B": "mask_shape", "ignore_row_if": "either_value_is_missing"},
            "The mask is compared pixel by pixel with the image, so it must have the image's shape.",
            lambda row: f"tumorMask shape {row['mask_shape']} differs from image {row['image_shape']}",
        ),
        CaseCheck(
            "mask.binary",
            "ExpectColumnValuesToBeInSet",
            {"column": "mask_binary", "value_set": [True]},
            "tumorMask is a MATLAB logical: 0 and 1 only.",
            lambda row: "tumorMask has values other than 0 and 1",
        ),
        CaseCheck(
            "label.known",
            "ExpectColumnValuesToBeInSet",
            {"column": "label_code", "value_set": labels},
            "Figshare labels: 1 meningioma, 2 glioma, 3 pituitary.",
            lambda row: f"label {row['label_code']!r} is not 1, 2 or 3 (meningioma, glioma, pituitary)",
        ),
        CaseCheck(
            "mask.not_empty_when_tumour",
            "ExpectColumnValuesToBeBetween",
            {"column": "tumour_pixels", "min_value": cfg.min_tumour_pixels},
            "A slice labelled tumour must outline it (params.yaml validate_2d.min_tumour_pixels).",
            lambda row: (
                f"labelled tumour but only {float(row['tumour_pixels']):.0f} mask pixels "
                f"(validate_2d.min_tumour_pixels = {cfg.min_tumour_pixels})"
            ),
        ),
    ]
