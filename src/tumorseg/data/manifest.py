"""The dataset manifest ``manifest.csv``: one row per case, written by ``ingest``, updated by ``validate``.

The contract between ingest, validation and preprocessing. Paths are absolute (the source dataset is
never copied or modified); multi-valued fields are ``;``-separated text (``label_values`` ``0;1;2;4``,
``voxels_per_label`` ``0:8900000;1:2100``, source convention); shapes ``240x240x155``, spacing in mm.
Per-file statistics (``<key>_readable``, ``_finite``, ...) are for validation, ``fingerprint`` (size
and mtime of each file) lets ingest reuse a row.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.errors import disk_full, is_disk_full
from tumorseg.faults import write_point

if TYPE_CHECKING:
    import pandas as pd

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
MANIFEST_COLUMNS = [*IDENTITY_COLUMNS, *FILE_COLUMNS, *CONTENT_COLUMNS, *STAT_COLUMNS, "fingerprint"]

MANIFEST_NAME = "manifest.csv"


def read_manifest(folder_or_file: str | Path) -> pd.DataFrame:
    """Read ``manifest.csv`` (from a folder or the file itself), all text columns as str."""
    path = Path(folder_or_file)
    if path.is_dir():
        path = path / MANIFEST_NAME
    from tumorseg.errors import DataError

    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `tumorseg ingest` first")
    import pandas as pd

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
    """A temporary file beside ``path``, renamed onto it when the block ends without error (else
    removed): readers see the old file or the whole new one, never half. A full disk (ENOSPC, EDQUOT)
    becomes a one-line :class:`~tumorseg.errors.DataError` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        write_point(path)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):  # a full disk: one line naming the file, not a traceback
            raise disk_full(path) from None
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text so that readers see either the old file or the whole new one, never half."""
    with atomic_output(path) as tmp:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        tmp.write_text(text)
