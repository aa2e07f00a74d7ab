"""The Great Expectations checks of a 2-D manifest (Figshare ``.mat`` slices, Kaggle images).

``tumorseg validate`` runs them instead of the 3-D checks when every manifest row has a 2-D layout;
runner, quarantine and reports are shared (:func:`tumorseg.validation.suite.validate_dataset`).
The typed table has per manifest row its identity and ingest columns, then statistics that are
``None`` where they do not apply (GX map expectations skip missing values): ``image_readable``,
``image_ndim``, ``height``, ``width``, ``image_finite``, ``image_range`` (max - min); where a mask is
stored ``image_shape``/``mask_shape`` (``HxW``) and ``mask_binary``; Figshare only ``mask_present``
and ``label_code``; ``tumour_pixels`` for a tumour case whose mask fits; ``manifest_problems``.
"""

from __future__ import annotations

import pandas as pd
from pydantic import Field, model_validator

from tumorseg.config import Section
from tumorseg.data.manifest import STATUS_OK
from tumorseg.data.planar import FIGSHARE_LABELS
from tumorseg.data.planar_ingest import PLANAR_MANIFEST_COLUMNS
from tumorseg.data.readers import IMAGE_LAYOUTS
from tumorseg.errors import DataError
from tumorseg.validation.case_table import (
    INGEST_REASON_COLUMN,
    INGEST_STATUS_COLUMN,
    cell_text,
    ingest_outcome,
    parse_bool,
    parse_float,
)
from tumorseg.validation.expectations import CaseCheck, identity_checks


class PlanarValidateConfig(Section):
    """``validate_2d:``: limits of the 2-D checks (the quarantine share is ``validate.max_invalid_fraction``).

    Attributes:
        min_side_px: smallest image side accepted (thumbnails carry too little detail).
        max_side_px: largest image side accepted (guards against mislabelled mosaics/scans).
        min_tumour_pixels: a slice labelled tumour needs at least this many mask pixels.
    """

    min_side_px: int = Field(64, ge=1)
    max_side_px: int = Field(4096, ge=1)
    min_tumour_pixels: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _sides_ordered(self) -> PlanarValidateConfig:
        if self.min_side_px > self.max_side_px:
            raise ValueError("min_side_px must not exceed max_side_px")
        return self


def derive_planar_row(raw: dict[str, str], manifest_row: int) -> dict[str, object]:
    """One typed row from one 2-D manifest row (see the module docstring)."""
    ingest_status, ingest_reason = ingest_outcome(raw)
    accepted = ingest_status == STATUS_OK
    problems: list[str] = []

    def typed(column: str, parser: object) -> object:
        value = parser(raw[column]) if raw[column] else None  # type: ignore[operator]
        if value is None and accepted:
            problems.append(f"{column}={raw[column]!r}")
        return value

    readable = typed("image_readable", parse_bool)
    usable = readable is True
    row: dict[str, object] = {
        "manifest_row": manifest_row,
        "case_id": raw["case_id"] or None,
        "patient_id": raw["patient_id"] or None,
        "layout": raw["layout"] or None,
        INGEST_STATUS_COLUMN: ingest_status,
        INGEST_REASON_COLUMN: ingest_reason,
        "image_readable": readable,
        "image_ndim": typed("image_ndim", parse_float) if usable else None,
    }
    two_d = usable and row["image_ndim"] == 2
    row["height"] = typed("height", parse_float) if two_d else None
    row["width"] = typed("width", parse_float) if two_d else None
    row["image_finite"] = typed("image_finite", parse_bool) if usable else None
    ranged = usable and row["image_finite"] is not None
    low = typed("image_min", parse_float) if ranged else None
    high = typed("image_max", parse_float) if ranged else None
    row["image_range"] = high - low if isinstance(low, float) and isinstance(high, float) else None  # type: ignore[operator]
    figshare = raw["layout"] == "figshare"
    has_mask_stored = figshare and usable and bool(raw["mask_shape"])
    row["image_shape"] = (raw["shape"] or None) if has_mask_stored else None
    row["mask_shape"] = raw["mask_shape"] if has_mask_stored else None
    row["mask_present"] = (parse_bool(raw["has_mask"]) is True) if figshare and usable else None
    row["mask_binary"] = (
        set(raw["mask_values"].split(";")) <= {"0", "1"} if has_mask_stored and raw["mask_values"] else None
    )
    row["label_code"] = typed("label", parse_float) if figshare and usable else None
    labelled_tumour = parse_bool(raw["has_tumour"]) is True
    mask_fits = has_mask_stored and raw["mask_shape"] == raw["shape"]
    row["tumour_pixels"] = typed("tumour_pixels", parse_float) if labelled_tumour and mask_fits else None
    row["manifest_problems"] = "; ".join(problems) or None
    return row


def derive_planar_case_table(manifest: pd.DataFrame, source: str = "manifest.csv") -> pd.DataFrame:
    """Typed per-case table of a 2-D manifest (one row per manifest row, same order); DataError
    when it lacks 2-D columns."""
    missing = [c for c in PLANAR_MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(
            f"{source}: 2-D manifest lacks columns {', '.join(missing[:5])}; re-run `tumorseg ingest`"
        )
    records = manifest.to_dict(orient="records")
    rows = [derive_planar_row({str(k): cell_text(v) for k, v in r.items()}, i) for i, r in enumerate(records)]
    return pd.DataFrame(rows)


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
