"""``tumorseg preprocess`` of a validated 2-D dataset (Figshare, Kaggle); the split is in :mod:`tumorseg.data.split`.

For every case with status ``ok``::

    OUT/<case_id>.npz     image float32 (S, S); mask uint8 (S, S) 0/1 where a reference mask is
                          known (Figshare tumorMask; all zero for a Kaggle ``no`` image), absent for
                          a Kaggle ``yes`` image (tumour, but not outlined)
    OUT/manifest.csv      :data:`PREPROCESSED_COLUMNS`; ``height``/``width`` are the source image's
                          and ``geometry`` the JSON of :class:`~tumorseg.data.planar.PlanarGeometry`,
                          so a prediction maps back with :func:`~tumorseg.data.planar.restore_planar_mask`
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tumorseg.data.manifest import MANIFEST_NAME, STATUS_OK, atomic_output, atomic_write_text, read_manifest
from tumorseg.data.planar import PlanarPreprocessConfig, apply_planar_geometry, preprocess_planar, read_planar
from tumorseg.data.readers import IMAGE, manifest_dims
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

PREPROCESSED_COLUMNS: list[str] = [
    "case_id",
    "patient_id",
    "source",
    "layout",
    "has_tumour",
    "tumour_type",
    "label",
    "has_mask",
    "height",
    "width",
    "path",
    "sha256",
    "status",
    "npz",
    "size",
    "tumour_pixels",
    "geometry",
]
"""Columns of the preprocessed 2-D ``manifest.csv`` (the contract with the 2-D models)."""


@dataclass(frozen=True)
class PlanarPreprocessSummary:
    """What one 2-D preprocess run did: cases written, ``with_mask`` of them, stale npz files ``removed``."""

    out_dir: Path
    cases: int
    with_mask: int
    removed: int
    seconds: float

    def one_line(self) -> str:
        return (
            f"preprocessed {self.cases} 2-D cases ({self.with_mask} with a mask) -> "
            f"{self.out_dir / MANIFEST_NAME}; {self.removed} stale removed, {self.seconds:.1f} s"
        )


def preprocess_planar_dataset(
    src_dir: Path, out_dir: Path, cfg: PlanarPreprocessConfig
) -> PlanarPreprocessSummary:
    """Preprocess every ok case of a validated 2-D ``manifest.csv`` into ``out_dir`` (not ``src_dir``),
    removing the npz files of cases a previous run wrote that are no longer ok.

    Raises:
        DataError: not a 2-D manifest, no ok case, a source file changed since ingest or unreadable.
    """
    begin = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if src_dir.absolute() == out_dir.absolute():
        raise DataError(f"--out {out_dir} is the validated folder itself; preprocess into another folder")
    manifest = read_manifest(src_dir)
    if manifest_dims(manifest) != IMAGE:
        raise DataError(f"{src_dir / MANIFEST_NAME}: not a 2-D (figshare/kaggle) manifest")
    rows = [r for r in manifest.to_dict(orient="records") if r["status"] == STATUS_OK]
    if not rows:
        raise DataError(f"{src_dir}: no case has status ok in manifest.csv; read its reason column")
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_cases(out_dir)
    table = [_preprocess_case(row, out_dir, cfg) for row in sorted(rows, key=lambda r: r["case_id"])]
    removed = 0
    for case_id in previous - {r["case_id"] for r in table}:
        stale = out_dir / f"{case_id}.npz"
        if stale.is_file():
            stale.unlink()
            removed += 1
    atomic_write_text(
        out_dir / MANIFEST_NAME, pd.DataFrame(table, columns=PREPROCESSED_COLUMNS).to_csv(index=False)
    )
    summary = PlanarPreprocessSummary(
        out_dir=out_dir,
        cases=len(table),
        with_mask=sum(r["has_mask"] == "True" for r in table),
        removed=removed,
        seconds=time.perf_counter() - begin,
    )
    log.debug(summary.one_line())
    return summary


def _preprocess_case(row: dict[str, str], out_dir: Path, cfg: PlanarPreprocessConfig) -> dict[str, str]:
    """Write one case's ``<case_id>.npz`` (atomically) and return its output manifest row."""
    path = Path(row["path"])
    image = read_planar(path)
    if row.get("sha256") and image.sha256 != row["sha256"]:
        raise DataError(
            f"{path}: changed since ingest (sha256 differs); run `tumorseg ingest` and validate again"
        )
    out, geometry = preprocess_planar(image.image, cfg)
    arrays = {"image": out}
    if image.mask is not None:
        arrays["mask"] = apply_planar_geometry(image.mask, geometry)
    elif row["has_tumour"] == "False":
        arrays["mask"] = np.zeros((cfg.size, cfg.size), dtype=np.uint8)  # known tumour-free
    with atomic_output(out_dir / f"{row['case_id']}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    return {
        "case_id": row["case_id"],
        "patient_id": row["patient_id"],
        "source": row["source"],
        "layout": row["layout"],
        "has_tumour": str(row["has_tumour"] == "True") if row["has_tumour"] else "",
        "tumour_type": row["tumour_type"],
        "label": row["label"],
        "has_mask": str("mask" in arrays),
        "height": str(geometry.height),
        "width": str(geometry.width),
        "path": str(path),
        "sha256": image.sha256,
        "status": STATUS_OK,
        "npz": f"{row['case_id']}.npz",
        "size": str(cfg.size),
        "tumour_pixels": str(int(arrays["mask"].sum())) if "mask" in arrays else "",
        "geometry": geometry.to_json(),
    }


def _previous_cases(out_dir: Path) -> set[str]:
    """Case ids an earlier run listed in ``out_dir/manifest.csv`` (only their npz files are removable)."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return set()
    try:
        previous = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return set()
    return set(previous["case_id"]) if {"case_id", "npz"} <= set(previous.columns) else set()
