"""The per-case table that the Great Expectations suite checks (3-D or 2-D manifest rows).

Each all-text manifest row becomes typed values plus helper columns where no built-in expectation can
look across fields. A value that does not apply is ``None``, which GX map expectations skip (an
unreadable volume is reported once, as unreadable). Helpers: ``manifest_row`` (the key back from GX's
unexpected rows: ``case_id`` may be duplicated or empty), ``ingest_status``/``ingest_reason``
(validating a validated manifest starts from ingest's verdict), ``manifest_problems``
(``"flair_finite='maybe'"``), ``duplicate_of``/``duplicate_evidence`` (:mod:`tumorseg.validation.duplicates`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pandas as pd

from tumorseg.data.conventions import CANONICAL_MODALITIES, LABEL_CONVENTIONS
from tumorseg.data.manifest import FILE_KEYS, IDENTITY_COLUMNS, STATUS_OK
from tumorseg.errors import DataError
from tumorseg.validation.cells import cell_text, parse_bool, parse_float
from tumorseg.validation.duplicates import DUPLICATE_COLUMN, duplicate_explanation, find_duplicate_groups

REFERENCE_KEY = "t1"
"""Volume the others are compared with (ingest's reference; without a readable T1 they are skipped)."""

REQUIRED_COLUMNS: tuple[str, ...] = (
    *IDENTITY_COLUMNS,
    *(f"path_{k}" for k in FILE_KEYS),
    "spacing",
    "label_values",
    "brain_voxels",
    *(
        f"{k}_{stat}"
        for k in FILE_KEYS
        for stat in ("readable", "finite", "nonzero_voxels", "shape", "affine_max_diff_mm")
    ),
)
"""Manifest columns validation reads (a manifest without them is from an older ingest)."""

INGEST_STATUS_COLUMN = "ingest_status"
INGEST_REASON_COLUMN = "ingest_reason"

_DIMS = re.compile(r"^\s*\d+(\s*x\s*\d+)*\s*$")


def parse_shape(text: str) -> str | None:
    """Normalise ``"240 x 240 x155"`` to ``"240x240x155"``; None if not a ``x``-joined list of ints."""
    if not _DIMS.match(text):
        return None
    return "x".join(part.strip() for part in text.split("x"))


def _finite_numbers(text: str, separator: str) -> list[float] | None:
    """The ``separator``-joined finite numbers of ``text``; None when empty or any is not one."""
    values = [parse_float(p) for p in text.split(separator)] if text.strip() else []
    if not values or any(v is None for v in values):
        return None
    return [v for v in values if v is not None]


def parse_spacing(text: str) -> tuple[float, ...] | None:
    """``"1x1x1.5"`` -> ``(1.0, 1.0, 1.5)``; None when any side is not a finite number."""
    values = _finite_numbers(text, "x")
    return None if values is None else tuple(values)


def parse_label_values(text: str) -> list[float] | None:
    """``"0;1;2;4"`` -> ``[0, 1, 2, 4]`` (a fractional label stays a float, which no convention allows);
    None when empty or not ``;``-separated finite numbers."""
    values = _finite_numbers(text, ";")
    return None if values is None else sorted({int(v) if float(v).is_integer() else v for v in values})


def labels_outside_convention(label_values: str, convention: str) -> list[float]:
    """Label values of a case that its convention does not allow (empty when all allowed)."""
    values = parse_label_values(label_values) or []
    allowed = LABEL_CONVENTIONS[convention].allowed_values
    return [v for v in values if v not in allowed]


def check_manifest_columns(manifest: pd.DataFrame, source: str) -> None:
    """A one-line DataError when the manifest lacks columns validation reads."""
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"{source}: manifest lacks columns {shown}; re-run `tumorseg ingest` to rebuild it")


def ingest_outcome(raw: dict[str, str]) -> tuple[str, str]:
    """``(status, reason)`` as ingest wrote them: a validated manifest keeps them in
    ``ingest_status``/``ingest_reason`` (its ``status``/``reason`` are validation's verdict)."""
    if raw.get(INGEST_STATUS_COLUMN):
        return raw[INGEST_STATUS_COLUMN], raw.get(INGEST_REASON_COLUMN, "")
    return raw["status"], raw["reason"]


def _typed_parser(
    raw: dict[str, str], accepted: bool, problems: list[str]
) -> Callable[[str, Callable[[str], object]], object]:
    """``typed(column, parser)``: a statistic the case needs, parsed; a case ingest accepted whose
    value is unusable gets ``column='text'`` in ``problems``."""

    def typed(column: str, parser: Callable[[str], object]) -> object:
        value = parser(raw[column]) if raw[column] else None
        if value is None and accepted:
            problems.append(f"{column}={raw[column]!r}")
        return value

    return typed


def derive_case_row(raw: dict[str, str], manifest_row: int) -> dict[str, object]:
    """One typed case-table row from one 3-D manifest row (all text)."""
    ingest_status, ingest_reason = ingest_outcome(raw)
    problems: list[str] = []
    typed = _typed_parser(raw, ingest_status == STATUS_OK, problems)

    row: dict[str, object] = {
        "manifest_row": manifest_row,
        "case_id": raw["case_id"] or None,
        "patient_id": raw["patient_id"] or None,
        "layout": raw["layout"] or None,
        "label_convention": raw["label_convention"] or None,
        INGEST_STATUS_COLUMN: ingest_status,
        INGEST_REASON_COLUMN: ingest_reason,
        "spacing": raw["spacing"],
        "label_values": raw["label_values"],
    }
    readable: dict[str, bool] = {}
    for key in FILE_KEYS:
        present = bool(raw[f"path_{key}"])
        row[f"path_{key}"] = raw[f"path_{key}"] or None
        is_readable = typed(f"{key}_readable", parse_bool) if present else None
        row[f"{key}_readable"] = is_readable
        readable[key] = is_readable is True
    for key in FILE_KEYS:
        usable = readable[key]
        row[f"{key}_finite"] = typed(f"{key}_finite", parse_bool) if usable else None
        row[f"{key}_nonzero_voxels"] = typed(f"{key}_nonzero_voxels", parse_float) if usable else None
        row[f"{key}_shape"] = typed(f"{key}_shape", parse_shape) if usable else None
        compared = usable and readable[REFERENCE_KEY] and key != REFERENCE_KEY
        row[f"{key}_affine_max_diff_mm"] = (
            typed(f"{key}_affine_max_diff_mm", parse_float) if compared else None
        )

    spacing = typed("spacing", parse_spacing) if readable[REFERENCE_KEY] else None
    row["spacing_min_mm"] = min(spacing) if spacing else None
    row["spacing_max_mm"] = max(spacing) if spacing else None

    convention = raw["label_convention"]
    labels = typed("label_values", parse_label_values) if readable["seg"] else None
    row["labels_in_convention"] = (
        not labels_outside_convention(raw["label_values"], convention)
        if labels is not None and convention in LABEL_CONVENTIONS
        else None
    )
    all_modalities = all(readable[m] for m in CANONICAL_MODALITIES)
    row["brain_voxels"] = typed("brain_voxels", parse_float) if all_modalities else None
    row["manifest_problems"] = "; ".join(problems) or None
    return row


def derive_case_table(manifest: pd.DataFrame, source: str = "manifest.csv") -> pd.DataFrame:
    """Typed table of a 3-D manifest (a row per manifest row, same order); a DataError naming
    ``source`` when columns validation reads are missing."""
    check_manifest_columns(manifest, source)
    rows = [
        derive_case_row({str(k): cell_text(v) for k, v in record.items()}, index)
        for index, record in enumerate(manifest.to_dict(orient="records"))
    ]
    if not rows:
        empty = dict.fromkeys(REQUIRED_COLUMNS, "")
        return pd.DataFrame(columns=[*derive_case_row(empty, 0), DUPLICATE_COLUMN, "duplicate_evidence"])
    groups = find_duplicate_groups(manifest)
    first = {case_id: group.first for group in groups for case_id in group.case_ids}
    for row in rows:
        case_id = row["case_id"]
        row[DUPLICATE_COLUMN] = first.get(case_id) if isinstance(case_id, str) else None
        row["duplicate_evidence"] = duplicate_explanation(case_id, groups) if row[DUPLICATE_COLUMN] else None
    return pd.DataFrame(rows)


def derive_planar_row(raw: dict[str, str], manifest_row: int) -> dict[str, object]:
    """One typed row from one 2-D manifest row: identity and ingest columns, then statistics that are
    None where they do not apply (GX map expectations skip them): ``image_readable``, ``image_ndim``,
    ``height``, ``width``, ``image_finite``, ``image_range`` (max - min); where a mask is stored
    ``image_shape``/``mask_shape`` and ``mask_binary``; Figshare only ``mask_present`` and
    ``label_code``; ``tumour_pixels`` for a tumour case whose mask fits; ``manifest_problems``."""
    ingest_status, ingest_reason = ingest_outcome(raw)
    problems: list[str] = []
    typed = _typed_parser(raw, ingest_status == STATUS_OK, problems)

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
    from tumorseg.data.ingest import PLANAR_MANIFEST_COLUMNS

    missing = [c for c in PLANAR_MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise DataError(
            f"{source}: 2-D manifest lacks columns {', '.join(missing[:5])}; re-run `tumorseg ingest`"
        )
    records = manifest.to_dict(orient="records")
    rows = [derive_planar_row({str(k): cell_text(v) for k, v in r.items()}, i) for i, r in enumerate(records)]
    return pd.DataFrame(rows)
