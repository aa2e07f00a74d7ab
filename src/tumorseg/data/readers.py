"""The formats tumorseg reads, behind one registry (as nnU-Net's ``reader_writer_registry``).

Volumes (3 spatial dimensions) come from BraTS, MSD, nnU-Net and MONAI folders (:mod:`tumorseg.data.layouts`),
images (2) from Figshare ``.mat`` slices and Kaggle yes/no folders (:mod:`tumorseg.data.planar`). Stages
ask here how many dimensions a folder, manifest or input has and pick their volume or image strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tumorseg.data.planar import (
    BITMAP_SUFFIXES,
    IMAGE_LAYOUTS,
    KAGGLE_CLASS_FOLDERS,
    MAT_SUFFIX,
    default_case_id,
)
from tumorseg.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

VOLUME = 3
IMAGE = 2

IMAGE_SUFFIXES: tuple[str, ...] = (MAT_SUFFIX, *BITMAP_SUFFIXES)
"""Files read as one 2-D image each (Figshare MATLAB slices, bitmaps)."""
VOLUME_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


@dataclass(frozen=True)
class PlanarFile:
    """One 2-D file: absolute path, ``figshare`` or ``kaggle``, a unique file-name-safe case id
    (``figshare-12``, ``kaggle-yes-Y1``)."""

    path: Path
    layout: str
    case_id: str


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_planar_files(src: Path) -> list[PlanarFile]:
    """The Figshare and Kaggle files under ``src`` by case id (none: a 3-D dataset or nothing): images
    directly in the ``yes``/``no`` sub-folders of a folder with both (any case), every other ``.mat``
    file at any depth; hidden files ignored."""
    src = Path(src).absolute()
    if not src.is_dir():
        return []
    kaggle_roots = []
    for folder in [src, *sorted(p for p in src.rglob("*") if p.is_dir() and _visible(p, src))]:
        names = {child.name.lower() for child in folder.iterdir() if child.is_dir()}
        if set(KAGGLE_CLASS_FOLDERS) <= names:
            kaggle_roots.append(folder)
    found: list[tuple[Path, str]] = []
    for root in kaggle_roots:
        for class_dir in sorted(
            p for p in root.iterdir() if p.is_dir() and p.name.lower() in KAGGLE_CLASS_FOLDERS
        ):
            found += [
                (p, "kaggle")
                for p in sorted(class_dir.iterdir())
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in BITMAP_SUFFIXES
            ]
    kaggle_dirs = [
        d for root in kaggle_roots for d in root.iterdir() if d.name.lower() in KAGGLE_CLASS_FOLDERS
    ]
    for path in sorted(src.rglob(f"*{MAT_SUFFIX}")) + sorted(src.rglob(f"*{MAT_SUFFIX.upper()}")):
        if path.is_file() and _visible(path, src) and not any(d in path.parents for d in kaggle_dirs):
            found.append((path, "figshare"))
    return _unique_ids(found)


def _unique_ids(found: list[tuple[Path, str]]) -> list[PlanarFile]:
    """Give every file its default case id; ids that collide get the extension, then a counter."""
    by_id: dict[str, list[tuple[Path, str]]] = {}
    for path, layout in found:
        by_id.setdefault(default_case_id(path), []).append((path, layout))
    files: list[PlanarFile] = []
    taken: set[str] = set()
    for case_id, items in sorted(by_id.items()):
        for path, layout in sorted(items):
            candidate = case_id if len(items) == 1 else f"{case_id}_{path.suffix.lstrip('.').lower()}"
            unique, n = candidate, 1
            while unique in taken:
                n += 1
                unique = f"{candidate}_{n}"
            taken.add(unique)
            files.append(PlanarFile(path=path, layout=layout, case_id=unique))
    return sorted(files, key=lambda f: f.case_id)


def manifest_dims(manifest: pd.DataFrame) -> int:
    """:data:`IMAGE` when every row of a manifest is an image layout, else :data:`VOLUME`."""
    if manifest.empty or "layout" not in manifest.columns:
        return VOLUME
    return IMAGE if bool(manifest["layout"].astype(str).isin(IMAGE_LAYOUTS).all()) else VOLUME


def folder_dims(folder: Path) -> int:
    """:data:`IMAGE` when a dataset folder holds Figshare or Kaggle files, else :data:`VOLUME`."""
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
    import pandas as pd

    header = pd.read_csv(path, dtype=str, nrows=0).columns
    return IMAGE if {"case_id", "npz", "geometry", "has_tumour"} <= set(header) else VOLUME
