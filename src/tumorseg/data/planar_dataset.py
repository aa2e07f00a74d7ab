"""``tumorseg preprocess`` and ``tumorseg split`` of a validated 2-D dataset (Figshare, Kaggle).

Preprocessing (:func:`preprocess_planar_dataset`) writes, for every case with status ``ok``::

    OUT/<case_id>.npz     image float32 (S, S) (params.yaml preprocess_2d), and
                          mask  uint8  (S, S) 0/1 where a reference mask is known: the Figshare
                          tumorMask, all zero for a tumour-free (Kaggle ``no``) image; no ``mask``
                          key for a Kaggle ``yes`` image (tumour, but not outlined)
    OUT/manifest.csv      case_id, patient_id, source, layout, has_tumour, tumour_type, label,
                          has_mask, height, width, path, sha256, status, npz, size, tumour_pixels,
                          geometry (JSON of :class:`~tumorseg.data.planar.PlanarGeometry`)

``height``/``width`` are the source image's, so a prediction maps back with
:func:`~tumorseg.data.planar.restore_planar_mask` and the ``geometry`` column. Each npz is written to
a temporary name and renamed; npz files of cases a previous run wrote that are no longer ok are
removed. A source file whose sha256 differs from the manifest's is an error (re-ingest).

The split (:func:`tumorseg.data.split.split_planar`) has the 3-D split's JSON format (:mod:`tumorseg.data.split`): whole
patients go to one split (Figshare: all slices of a ``PID``; Kaggle: one image = one patient),
stratified by ``source/tumour|tumour-free/tumour_type`` of each patient.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tumorseg.data.manifest import MANIFEST_NAME, STATUS_OK, atomic_write_text, read_manifest
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
    """What one 2-D preprocess run did.

    Attributes:
        out_dir: the output folder.
        cases: cases written (rows of the output manifest).
        with_mask: cases whose npz holds a ``mask``.
        removed: npz files of an earlier run removed (case no longer ok).
        seconds: wall time.
    """

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


def _atomic_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to a temp file in the same folder, then rename (never half a file)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def preprocess_planar_dataset(
    src_dir: Path, out_dir: Path, cfg: PlanarPreprocessConfig
) -> PlanarPreprocessSummary:
    """Preprocess every ok case of a validated 2-D ``manifest.csv`` into ``out_dir`` (see the module docstring).

    Args:
        src_dir: folder holding the validated 2-D ``manifest.csv``.
        out_dir: output folder (``<case_id>.npz`` + ``manifest.csv``); must differ from ``src_dir``.
        cfg: the ``preprocess_2d`` section.

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

    table = []
    for row in sorted(rows, key=lambda r: r["case_id"]):
        path = Path(row["path"])
        image = read_planar(path)
        if row.get("sha256") and image.sha256 != row["sha256"]:
            raise DataError(
                f"{path}: changed since ingest (sha256 differs); run `tumorseg ingest` and validate again"
            )
        out, geometry = preprocess_planar(image.image, cfg)
        has_tumour = row["has_tumour"] == "True"
        arrays = {"image": out}
        if image.mask is not None:
            arrays["mask"] = apply_planar_geometry(image.mask, geometry)
        elif row["has_tumour"] == "False":
            arrays["mask"] = np.zeros((cfg.size, cfg.size), dtype=np.uint8)  # known tumour-free
        _atomic_npz(out_dir / f"{row['case_id']}.npz", **arrays)
        table.append(
            {
                "case_id": row["case_id"],
                "patient_id": row["patient_id"],
                "source": row["source"],
                "layout": row["layout"],
                "has_tumour": str(has_tumour) if row["has_tumour"] else "",
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
        )
    keep = {r["case_id"] for r in table}
    removed = 0
    for case_id in previous - keep:
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


def _previous_cases(out_dir: Path) -> set[str]:
    """Case ids of the npz files an earlier run listed in ``out_dir/manifest.csv`` (only those are removable)."""
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return set()
    try:
        previous = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return set()
    return set(previous["case_id"]) if {"case_id", "npz"} <= set(previous.columns) else set()
