"""``tumorseg preprocess``: reorient to RAS, resample, crop to the brain, z-score; and the exact inverse.

One case's steps are in :mod:`tumorseg.data.preprocessed_case`, the grid operations and their inverse
in :mod:`tumorseg.data.grid`. Not MONAI's ``Invertd``: the inverse must run in another process
(``predict``, serving) from a small JSON.

Output of :func:`preprocess_dataset` (the contract with training)::

    OUT/cases/<case_id>.npz   image (4, X, Y, Z) storage_dtype, label (X, Y, Z) uint8 canonical,
                              brain (X, Y, Z) bool, loc_fg / loc_<code> (N, 3) uint16 patch-centre
                              samples; uncompressed by default, so training memory-maps it
    OUT/cases/<case_id>.json  geometry (see :func:`preprocess_case`)
    OUT/index.csv             :data:`INDEX_COLUMNS`; subset, fold and duplicate_of are carried from
                              the validated manifest for ``tumorseg split`` (empty when it has none)
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

import pandas as pd

from tumorseg.config import PreprocessConfig
from tumorseg.data.case_store import save_case
from tumorseg.data.grid import reorient as _reorient
from tumorseg.data.grid import resize, resize_labels, restore_to_source, restored_label_counts
from tumorseg.data.layouts import FILE_KEYS, case_from_manifest_row
from tumorseg.data.manifest import STATUS_OK, atomic_write_text, read_manifest
from tumorseg.data.parallel import map_cases
from tumorseg.data.preprocessed_case import (
    GEOMETRY_FORMAT,
    PreprocessedCase,
    content_parameters,
    preprocess_case,
)
from tumorseg.data.readers import IMAGE, manifest_dims
from tumorseg.data.threaded_reader import DecodedCase, decode_case, read_preprocessed
from tumorseg.errors import DataError

if TYPE_CHECKING:
    from tumorseg.data.planar import PlanarPreprocessConfig
    from tumorseg.data.planar_dataset import PlanarPreprocessSummary

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

log = logging.getLogger(__name__)

INDEX_NAME = "index.csv"
CASES_FOLDER = "cases"
MANIFEST_CARRIED_COLUMNS: tuple[str, ...] = ("subset", "fold", "duplicate_of")
INDEX_COLUMNS: list[str] = [
    "case_id",
    "patient_id",
    "label_convention",
    "layout",
    "npz",
    "shape",
    "tumour_voxels",
    "tumour_volume_ml",
    "has_tumour",
    "has_label",
    *MANIFEST_CARRIED_COLUMNS,
]


@dataclass(frozen=True)
class PreprocessSummary:
    """What one preprocess run did: ``processed`` cases computed, ``skipped`` up to date, ``removed``
    stale (no longer ok), ``stored_bytes`` of the cases' ``.npz`` files (what training reads)."""

    out_dir: Path
    cases: int
    processed: int
    skipped: int
    removed: int
    seconds: float
    stored_bytes: int = 0

    def one_line(self) -> str:
        per_case = self.stored_bytes / max(self.cases, 1) / 2**20
        return (
            f"preprocessed {self.cases} cases -> {self.out_dir / INDEX_NAME}: {self.processed} computed, "
            f"{self.skipped} up to date, {self.removed} stale removed in {self.seconds:.1f} s; "
            f"{self.stored_bytes / 2**20:.1f} MiB stored ({per_case:.2f} MiB per case)"
        )


# ---------------------------------------------------------------------------- dataset
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


def preprocess_dataset(
    src_dir: Path, out_dir: Path, cfg: PreprocessConfig, planar_cfg: PlanarPreprocessConfig | None = None
) -> PreprocessSummary | PlanarPreprocessSummary:
    """Preprocess every case with status ``ok`` in ``src_dir/manifest.csv`` into ``out_dir``.

    A case is skipped when its JSON records the same source sha256 values and parameters; files of
    cases no longer ok are removed; every file is written to a temporary name and renamed. Cases run
    in ``cfg.workers`` processes; the outputs do not depend on the worker count.

    Args:
        planar_cfg: the ``preprocess_2d`` section (defaults when None), used instead of ``cfg`` for a
            2-D manifest (:mod:`tumorseg.data.planar_dataset`).

    Raises:
        DataError: no ok case; a source file changed since ingest; a case that cannot be read.
    """
    begin = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir)
    if manifest_dims(manifest) == IMAGE:
        from tumorseg.data.planar import PlanarPreprocessConfig
        from tumorseg.data.planar_dataset import preprocess_planar_dataset

        return preprocess_planar_dataset(src_dir, out_dir, planar_cfg or PlanarPreprocessConfig())
    needed = ["case_dir", *(f"{kind}_{key}" for kind in ("path", "sha256") for key in FILE_KEYS)]
    missing = [column for column in needed if column not in manifest.columns]
    if missing:
        raise DataError(f"{src_dir}/manifest.csv lacks columns {missing[:3]}; run `tumorseg ingest` again")
    rows = [r for r in manifest.to_dict(orient="records") if r["status"] == STATUS_OK]
    if not rows:
        raise DataError(f"{src_dir}: no case has status ok in manifest.csv; read its reason column")
    cases_dir = out_dir / CASES_FOLDER
    cases_dir.mkdir(parents=True, exist_ok=True)

    index: list[dict[str, str]] = []
    processed = stored_bytes = 0
    work = partial(preprocess_one, cases_dir=cases_dir, cfg=cfg)
    ordered = sorted(rows, key=lambda r: r["case_id"])
    results = map_cases(work, ordered, workers=cfg.workers, what="preprocess")
    for row, (geometry, computed) in zip(ordered, results, strict=True):
        index.append(_index_row(geometry, row))
        processed += computed
        stored_bytes += (cases_dir / f"{geometry['case_id']}.npz").stat().st_size
    removed = _remove_stale(cases_dir, {row["case_id"] for row in index})
    atomic_write_text(out_dir / INDEX_NAME, pd.DataFrame(index, columns=INDEX_COLUMNS).to_csv(index=False))
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
