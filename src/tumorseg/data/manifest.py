"""The dataset manifest: one row per case, written by ``ingest`` and updated by ``validate``.

``manifest.csv`` is the contract between ingest, validation and preprocessing. Paths are
absolute, as the source dataset stays where the user keeps it (it is never copied,
modified, moved or deleted). Multi-valued fields are ``;``-separated text so the
file stays readable in a spreadsheet and checkable by Great Expectations.

Columns (see :data:`MANIFEST_COLUMNS`):

- identity: ``case_id``, ``patient_id``, ``layout``, ``label_convention``
- status: ``status`` (``ok`` | ``quarantined``), ``reason`` (human-readable, empty when ok)
- files: ``case_dir``, ``path_<mod>`` / ``sha256_<mod>`` for t1, t1ce, t2, flair and seg.
  For MSD the four modality paths name the same 4-D file (channels in
  :data:`~tumorseg.data.conventions.MSD_CHANNEL_ORDER`).
- geometry (of the reference modality, T1): ``shape`` (``240x240x155``), ``spacing``
  (``1x1x1``, mm), ``orientation`` (nibabel axis codes, ``RAS``/``LPS``/...)
- content: ``modalities`` (present ones, ``t1;t1ce;t2;flair``), ``label_values`` (``0;1;2;4``,
  source convention), ``voxels_per_label`` (``0:8900000;1:2100;...``, source convention),
  ``tumour_voxels`` (non-zero labels), ``tumour_volume_ml``
- per-volume statistics used by validation: ``<mod>_readable``, ``<mod>_finite``,
  ``<mod>_nonzero_voxels``, ``<mod>_shape``, ``<mod>_affine_max_diff_mm`` (vs. T1)
  for each modality and seg; ``brain_voxels`` (voxels non-zero in any modality)
- incremental ingest: ``fingerprint`` (size and mtime of every file; unchanged -> row reused)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from tumorseg.data.conventions import CANONICAL_MODALITIES

FILE_KEYS: tuple[str, ...] = (*CANONICAL_MODALITIES, "seg")
"""Per-case files: the four modalities then the segmentation."""

STATUS_OK = "ok"
STATUS_QUARANTINED = "quarantined"

IDENTITY_COLUMNS = ["case_id", "patient_id", "layout", "label_convention", "status", "reason"]
FILE_COLUMNS = ["case_dir", *[f"path_{k}" for k in FILE_KEYS], *[f"sha256_{k}" for k in FILE_KEYS]]
CONTENT_COLUMNS = [
    "shape",
    "spacing",
    "orientation",
    "modalities",
    "label_values",
    "voxels_per_label",
    "tumour_voxels",
    "tumour_volume_ml",
    "brain_voxels",
]
STAT_COLUMNS = [
    f"{k}_{stat}"
    for k in FILE_KEYS
    for stat in ("readable", "finite", "nonzero_voxels", "shape", "affine_max_diff_mm")
]
MANIFEST_COLUMNS: list[str] = [
    *IDENTITY_COLUMNS,
    *FILE_COLUMNS,
    *CONTENT_COLUMNS,
    *STAT_COLUMNS,
    "fingerprint",
]

MANIFEST_NAME = "manifest.csv"


def read_manifest(folder_or_file: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` (from a folder or the file itself), all text columns as str."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / MANIFEST_NAME
    from tumorseg.errors import DataError

    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `tumorseg ingest` first")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in IDENTITY_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(f"{path}: not a tumorseg manifest (missing columns {missing})")
    return df


def write_manifest(df: pd.DataFrame, folder: str | Path) -> Path:
    """Write ``folder/manifest.csv`` atomically (temp file + rename), columns in canonical order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ordered = [c for c in MANIFEST_COLUMNS if c in df.columns] + [
        c for c in df.columns if c not in MANIFEST_COLUMNS
    ]
    target = folder / MANIFEST_NAME
    atomic_write_text(target, df[ordered].sort_values("case_id").to_csv(index=False))
    return target


@contextmanager
def atomic_output(path: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` to write; renamed onto ``path`` when the block ends without error.

    Readers see either the old file or the whole new one, never half; on any error the temporary
    file is removed and ``path`` is left as it was. The parent folder is created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text so that readers see either the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
