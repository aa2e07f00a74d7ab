"""``tumorseg preprocess``: valid cases onto the network's grid, with what maps predictions back.

Volumes (:mod:`tumorseg.data.preprocessed_case`; the inverse, :mod:`tumorseg.data.grid`, runs in
another process from a small JSON, so not MONAI's ``Invertd``)::

    OUT/cases/<case_id>.npz   image (4, X, Y, Z), label (X, Y, Z) uint8, brain (X, Y, Z) bool,
                              loc_fg / loc_<code> (N, 3) uint16 patch centres; uncompressed: memory-mapped
    OUT/cases/<case_id>.json  geometry;  OUT/index.csv: :data:`INDEX_COLUMNS`

Images (:func:`~tumorseg.data.planar.preprocess_planar`)::

    OUT/<case_id>.npz     image float32 (S, S); mask uint8 (S, S) 0/1 where known (zeros for Kaggle
                          ``no``, absent for Kaggle ``yes``)
    OUT/manifest.csv      :data:`PREPROCESSED_COLUMNS`, ``geometry`` a PlanarGeometry JSON
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tumorseg.config import PlanarPreprocessConfig, PreprocessConfig
from tumorseg.data.case_store import save_case, write_npz
from tumorseg.data.grid import reorient as _reorient
from tumorseg.data.grid import resize, resize_labels, restore_to_source, restored_label_counts
from tumorseg.data.layouts import FILE_KEYS, case_from_manifest_row
from tumorseg.data.manifest import MANIFEST_NAME, STATUS_OK, atomic_output, atomic_write_text, read_manifest
from tumorseg.data.parallel import map_cases
from tumorseg.data.planar import apply_planar_geometry, preprocess_planar, read_planar
from tumorseg.data.preprocessed_case import (
    GEOMETRY_FORMAT,
    DecodedCase,
    PreprocessedCase,
    content_parameters,
    decode_case,
    preprocess_case,
    read_preprocessed,
)
from tumorseg.data.readers import IMAGE, manifest_dims
from tumorseg.errors import DataError

__all__ = [
    "INDEX_COLUMNS",
    "INDEX_NAME",
    "DecodedCase",
    "PreprocessedCase",
    "_reorient",
    "decode_case",
    "preprocess_case",
    "preprocess_dataset",
    "read_preprocessed",
    "resize",
    "resize_labels",
    "restore_to_source",
    "restored_label_counts",
]
"""The names imported from here, wherever they live (``_reorient``: the tests' name of ``grid.reorient``)."""


if TYPE_CHECKING:  # pandas is imported where a table is read or written: predict needs none
    import pandas as pd

log = logging.getLogger(__name__)

INDEX_NAME = "index.csv"
CASES_FOLDER = "cases"
MANIFEST_CARRIED_COLUMNS: tuple[str, ...] = ("subset", "fold", "duplicate_of")
INDEX_COLUMNS: list[str] = [
    *[
        "case_id",
        "patient_id",
        "label_convention",
        "layout",
        "npz",
        "shape",
        "tumour_voxels",
        "tumour_volume_ml",
        "has_tumour",
    ],
    "has_label",
    *MANIFEST_CARRIED_COLUMNS,
]
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
class PreprocessSummary:
    """What one run did: cases written (volumes: ``processed`` computed, ``skipped`` up to date;
    images: ``with_mask`` of them), stale cases ``removed``, ``stored_bytes`` of the volumes' npz files."""

    out_dir: Path
    cases: int
    processed: int
    skipped: int
    removed: int
    seconds: float
    stored_bytes: int = 0
    with_mask: int | None = None  # set for images

    def one_line(self) -> str:
        if self.with_mask is not None:
            return (
                f"preprocessed {self.cases} 2-D cases ({self.with_mask} with a mask) -> "
                f"{self.out_dir / MANIFEST_NAME}; {self.removed} stale removed, {self.seconds:.1f} s"
            )
        per_case = self.stored_bytes / max(self.cases, 1) / 2**20
        return (
            f"preprocessed {self.cases} cases -> {self.out_dir / INDEX_NAME}: {self.processed} computed, "
            f"{self.skipped} up to date, {self.removed} stale removed in {self.seconds:.1f} s; "
            f"{self.stored_bytes / 2**20:.1f} MiB stored ({per_case:.2f} MiB per case)"
        )


def preprocess_dataset(
    src_dir: Path, out_dir: Path, cfg: PreprocessConfig, planar_cfg: PlanarPreprocessConfig | None = None
) -> PreprocessSummary:
    """Preprocess every ok case of ``src_dir/manifest.csv`` into ``out_dir`` (atomic writes; outputs of
    cases no longer ok removed). Volumes run in ``cfg.workers`` processes, skipping cases whose JSON
    records the same sources and parameters; a 2-D manifest uses ``planar_cfg`` (``preprocess_2d``).
    A DataError for no ok case, a source changed since ingest, or a case that cannot be read.
    """
    begin = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir)
    if manifest_dims(manifest) == IMAGE:
        return _preprocess_images(src_dir, out_dir, manifest, planar_cfg or PlanarPreprocessConfig(), begin)
    needed = ["case_dir", *(f"{kind}_{key}" for kind in ("path", "sha256") for key in FILE_KEYS)]
    missing = [column for column in needed if column not in manifest.columns]
    if missing:
        raise DataError(f"{src_dir}/manifest.csv lacks columns {missing[:3]}; run `tumorseg ingest` again")
    ordered = _ok_rows(manifest, src_dir)
    cases_dir = out_dir / CASES_FOLDER
    cases_dir.mkdir(parents=True, exist_ok=True)
    index: list[dict[str, str]] = []
    processed = stored_bytes = 0
    work = partial(preprocess_one, cases_dir=cases_dir, cfg=cfg)
    results = map_cases(work, ordered, workers=cfg.workers, what="preprocess", setting="preprocess.workers")
    for row, (geometry, computed) in zip(ordered, results, strict=True):
        index.append(_index_row(geometry, row))
        processed += computed
        stored_bytes += (cases_dir / f"{geometry['case_id']}.npz").stat().st_size
    removed = _remove_stale(cases_dir, {row["case_id"] for row in index})
    _write_table(out_dir / INDEX_NAME, index, INDEX_COLUMNS)
    summary = PreprocessSummary(
        out_dir=out_dir,
        cases=len(index),
        processed=processed,
        skipped=len(index) - processed,
        removed=removed,
        seconds=time.perf_counter() - begin,
        stored_bytes=stored_bytes,
    )
    log.debug(summary.one_line())
    return summary


def _ok_rows(manifest: pd.DataFrame, src_dir: Path) -> list[dict[str, Any]]:
    """The manifest rows with status ok, by case id (a DataError when there is none)."""
    rows = [r for r in manifest.to_dict(orient="records") if r["status"] == STATUS_OK]
    if not rows:
        raise DataError(f"{src_dir}: no case has status ok in manifest.csv; read its reason column")
    return sorted(rows, key=lambda r: r["case_id"])


def _write_table(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    import pandas as pd

    atomic_write_text(path, pd.DataFrame(rows, columns=columns).to_csv(index=False))


# ---------------------------------------------------------------------------- volumes
def _expected_sha256(row: dict[str, str]) -> dict[str, str]:
    return {key: row[f"sha256_{key}"] for key in FILE_KEYS if row.get(f"path_{key}")}


def _up_to_date(
    json_path: Path, npz_path: Path, sha256: dict[str, str], cfg: PreprocessConfig
) -> dict | None:
    """The stored geometry when outputs exist for the same source files and parameters, else None."""
    if not (json_path.is_file() and npz_path.is_file()):
        return None
    try:
        geometry = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if (
        geometry.get("format") != GEOMETRY_FORMAT
        or geometry.get("source_sha256") != sha256
        or geometry.get("preprocess") != content_parameters(cfg)
        or _is_compressed(npz_path) != cfg.compress_npz  # training memory-maps only stored members
    ):
        return None
    return geometry


def _is_compressed(npz_path: Path) -> bool | None:
    """Whether the ``.npz``'s members are deflated (None: not a readable zip, so not up to date)."""
    try:
        with zipfile.ZipFile(npz_path) as archive:
            return any(info.compress_type != zipfile.ZIP_STORED for info in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return None


def _index_row(geometry: dict[str, Any], manifest_row: dict[str, Any]) -> dict[str, str]:
    carried = {column: str(manifest_row.get(column) or "") for column in MANIFEST_CARRIED_COLUMNS}
    return {
        "case_id": geometry["case_id"],
        "patient_id": geometry["patient_id"],
        "label_convention": geometry["label_convention"],
        "layout": geometry["layout"],
        "npz": f"{CASES_FOLDER}/{geometry['case_id']}.npz",
        "shape": "x".join(str(n) for n in geometry["preprocessed_shape"]),
        "tumour_voxels": str(geometry["tumour_voxels"]),
        "tumour_volume_ml": f"{geometry['tumour_volume_ml']:g}",
        "has_tumour": str(geometry["has_label"] and geometry["tumour_voxels"] > 0),
        "has_label": str(geometry["has_label"]),
        **carried,
    }


def preprocess_one(
    row: dict[str, str], *, cases_dir: Path, cfg: PreprocessConfig
) -> tuple[dict[str, Any], bool]:
    """Preprocess one manifest row into ``cases_dir`` (in a worker process): its geometry, and whether
    it was computed (False: its outputs were up to date)."""
    case_id = row["case_id"]
    npz_path, json_path = cases_dir / f"{case_id}.npz", cases_dir / f"{case_id}.json"
    expected = _expected_sha256(row)
    geometry = _up_to_date(json_path, npz_path, expected, cfg)
    if geometry is not None:
        return geometry, False
    case = read_preprocessed(case_from_manifest_row(row), cfg)
    read = case.geometry["source_sha256"]
    changed = [key for key, digest in expected.items() if read.get(key) != digest]
    if changed:
        path = row[f"path_{changed[0]}"]
        raise DataError(
            f"{path}: changed since ingest (sha256 differs); run `tumorseg ingest` and validate again"
        )
    save_case(
        npz_path,
        image=case.image,
        label=case.label,
        brain=case.brain,
        max_locations=cfg.sample_locations,
        compress=cfg.compress_npz,
    )
    atomic_write_text(json_path, json.dumps(case.geometry, indent=1))
    log.debug("%s: %s -> %s", case_id, case.geometry["source_shape"], case.geometry["preprocessed_shape"])
    return case.geometry, True


def _remove_stale(cases_dir: Path, keep: set[str]) -> int:
    """Delete outputs of cases not in ``keep`` and temp files of interrupted runs; count removed cases."""
    removed: set[str] = set()
    for path in cases_dir.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        elif path.suffix in (".npz", ".json") and path.stem not in keep:
            path.unlink(missing_ok=True)
            removed.add(path.stem)
    return len(removed)


# ---------------------------------------------------------------------------- images
def _preprocess_images(
    src_dir: Path, out_dir: Path, manifest: pd.DataFrame, cfg: PlanarPreprocessConfig, begin: float
) -> PreprocessSummary:
    """The image strategy: every ok case into ``out_dir/<case_id>.npz`` (never into ``src_dir``),
    removing the npz files of cases an earlier run listed that are no longer ok."""
    if src_dir.absolute() == out_dir.absolute():
        raise DataError(f"--out {out_dir} is the validated folder itself; preprocess into another folder")
    rows = _ok_rows(manifest, src_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_cases(out_dir)
    table = [_preprocess_image(row, out_dir, cfg) for row in rows]
    removed = 0
    for case_id in previous - {r["case_id"] for r in table}:
        stale = out_dir / f"{case_id}.npz"
        if stale.is_file():
            stale.unlink()
            removed += 1
    _write_table(out_dir / MANIFEST_NAME, table, PREPROCESSED_COLUMNS)
    with_mask = sum(r["has_mask"] == "True" for r in table)
    seconds = time.perf_counter() - begin
    summary = PreprocessSummary(out_dir, len(table), len(table), 0, removed, seconds, with_mask=with_mask)
    log.debug(summary.one_line())
    return summary


def _preprocess_image(row: dict[str, str], out_dir: Path, cfg: PlanarPreprocessConfig) -> dict[str, str]:
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
        write_npz(fh, arrays)
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
    import pandas as pd

    try:
        previous = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return set()
    return set(previous["case_id"]) if {"case_id", "npz"} <= set(previous.columns) else set()
