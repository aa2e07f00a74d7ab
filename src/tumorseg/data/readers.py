"""The formats tumorseg reads, behind one registry (as nnU-Net's ``reader_writer_registry``).

Volumes (3 spatial dimensions) come from BraTS, MSD, nnU-Net and MONAI folders
(:mod:`tumorseg.data.layouts`), images (2) from Figshare ``.mat`` slices and Kaggle yes/no folders
(:mod:`tumorseg.data.planar`). Stages ask here how many dimensions a folder, manifest or input has
and pick their volume or image strategy by it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tumorseg.data.planar import BITMAP_SUFFIXES, IMAGE_LAYOUTS, MAT_SUFFIX
from tumorseg.errors import DataError

VOLUME = 3
IMAGE = 2

IMAGE_SUFFIXES: tuple[str, ...] = (MAT_SUFFIX, *BITMAP_SUFFIXES)
"""Files read as one 2-D image each (Figshare MATLAB slices, bitmaps)."""
VOLUME_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


def manifest_dims(manifest: pd.DataFrame) -> int:
    """:data:`IMAGE` when every row of a manifest is an image layout, else :data:`VOLUME`."""
    if manifest.empty or "layout" not in manifest.columns:
        return VOLUME
    return IMAGE if bool(manifest["layout"].astype(str).isin(IMAGE_LAYOUTS).all()) else VOLUME


def folder_dims(folder: Path) -> int:
    """:data:`IMAGE` when a dataset folder holds Figshare or Kaggle files, else :data:`VOLUME`."""
    from tumorseg.data.planar_ingest import find_planar_files

    return IMAGE if find_planar_files(Path(folder)) else VOLUME


def name_dims(name: str) -> int:
    """Spatial dimensions of one file, by its name (case-insensitive)."""
    return IMAGE if name.lower().endswith(IMAGE_SUFFIXES) else VOLUME


def input_dims(path: str | Path) -> int:
    """Spatial dimensions of a ``predict`` input: a file (existing or not) by its name; a folder is
    :data:`IMAGE` when it holds image files and no NIfTI."""
    path = Path(path)
    if path.is_file() or not path.exists():
        return name_dims(path.name)
    if not path.is_dir():
        return VOLUME
    files = [p for p in path.rglob("*") if p.is_file()]
    if any(p.name.endswith(VOLUME_SUFFIXES) for p in files):
        return VOLUME
    return IMAGE if any(name_dims(p.name) == IMAGE for p in files) else VOLUME


def image_inputs(path: str | Path) -> list[Path]:
    """The image files ``path`` names (itself, or every one under a folder, sorted); a DataError if none."""
    path = Path(path)
    if path.is_file():
        if name_dims(path.name) != IMAGE:
            raise DataError(f"{path}: not a .mat or image file ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    found = sorted(p for p in path.rglob("*") if p.is_file() and name_dims(p.name) == IMAGE)
    if not found:
        raise DataError(f"{path}: no .mat or image files in this folder")
    return found


def preprocessed_dims(folder: Path) -> int:
    """:data:`IMAGE` for a preprocessed image dataset (``manifest.csv`` with ``npz`` and ``geometry``
    columns), else :data:`VOLUME` (``index.csv`` and ``cases/``)."""
    path = Path(folder) / "manifest.csv"
    if not path.is_file():
        return VOLUME
    header = pd.read_csv(path, dtype=str, nrows=0).columns
    return IMAGE if {"case_id", "npz", "geometry", "has_tumour"} <= set(header) else VOLUME
