"""``tumorseg ingest`` of 2-D data: Figshare ``.mat`` slices and Kaggle ``yes``/``no`` image folders.

Under the folder given to ingest, every folder with both a ``yes`` and a ``no`` sub-folder (any case)
is a Kaggle root, whose images directly inside ``yes``/``no`` are cases; every other ``.mat`` file,
at any depth, is a Figshare slice; hidden files are ignored. As for 3-D data, ingest quarantines only
what it cannot decode and measures the rest for ``tumorseg validate``. ``has_mask`` means a reference
mask is known: a Figshare ``tumorMask``, or a Kaggle ``no`` image (all background). Rows of files
whose size and mtime are unchanged are reused unread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tumorseg.config import IngestConfig
from tumorseg.data.incremental import (
    IngestSummary,
    number_text,
    rows_with_ingest_verdict,
    write_incrementally,
)
from tumorseg.data.layouts import shape_text
from tumorseg.data.manifest import (
    IDENTITY_COLUMNS,
    MANIFEST_NAME,
    STATUS_OK,
    STATUS_QUARANTINED,
    read_manifest,
)
from tumorseg.data.planar import (
    BITMAP_SUFFIXES,
    FIGSHARE_LABELS,
    IMAGE_LAYOUTS,
    KAGGLE_CLASS_FOLDERS,
    MAT_SUFFIX,
    RawPlanar,
    channels_of,
    default_case_id,
    load_planar_raw,
    to_grayscale,
)
from tumorseg.errors import DataError

LABEL_CONVENTION_2D: dict[str, str] = {"figshare": "tumour-mask", "kaggle": "yes-no"}

PLANAR_MANIFEST_COLUMNS: list[str] = [
    *IDENTITY_COLUMNS,
    "source",
    "path",
    "sha256",
    "format",
    "has_tumour",
    "tumour_type",
    "label",
    "has_mask",
    "height",
    "width",
    "channels",
    "shape",
    "image_readable",
    "image_ndim",
    "image_dtype",
    "image_finite",
    "image_min",
    "image_max",
    "mask_shape",
    "mask_values",
    "tumour_pixels",
    "fingerprint",
]


@dataclass(frozen=True)
class PlanarFile:
    """One 2-D file found by :func:`find_planar_files`: absolute path, ``figshare`` or ``kaggle``, and
    a unique, file-name-safe case id (``figshare-12``, ``kaggle-yes-Y1``)."""

    path: Path
    layout: str
    case_id: str


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def find_planar_files(src: Path) -> list[PlanarFile]:
    """The Figshare and Kaggle files under ``src``, sorted by case id (none: a 3-D dataset or nothing)."""
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


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}@{stat.st_mtime_ns}"


def planar_manifest_row(item: PlanarFile, fingerprint: str) -> dict[str, str]:
    """One manifest row (all text) for a 2-D file: read it once, measure it, judge only decodability."""
    path = item.path
    row = dict.fromkeys(PLANAR_MANIFEST_COLUMNS, "")
    row.update(
        case_id=item.case_id,
        patient_id=item.case_id,
        layout=item.layout,
        label_convention=LABEL_CONVENTION_2D[item.layout],
        status=STATUS_OK,
        source=item.layout,
        path=str(path),
        fingerprint=fingerprint,
    )
    if item.layout == "kaggle":
        has_tumour = KAGGLE_CLASS_FOLDERS[path.parent.name.lower()]
        row.update(has_tumour=str(has_tumour), has_mask=str(not has_tumour))
    try:
        raw = load_planar_raw(path)
    except DataError as exc:
        row.update(
            status=STATUS_QUARANTINED, reason=str(exc).removeprefix(f"{path}: "), image_readable="False"
        )
        return row
    row.update(sha256=raw.sha256, format=raw.fmt, image_readable="True", image_dtype=raw.image.dtype.name)
    row.update(_image_statistics(raw.image, is_image_file=item.layout == "kaggle"))
    if item.layout == "figshare":
        row.update(_figshare_fields(raw))
    return row


def _image_statistics(image: np.ndarray, is_image_file: bool) -> dict[str, str]:
    """Shape, channels and finite range of a stored image (a bitmap's channels are not a dimension)."""
    spatial = image.shape[:2] if (is_image_file and image.ndim == 3) else image.shape
    stats = {
        "image_ndim": str(len(spatial)),
        "shape": shape_text(spatial),
        "channels": str(channels_of(image) if is_image_file else 1),
    }
    if len(spatial) >= 2:
        stats.update(height=str(spatial[0]), width=str(spatial[1]))
    if image.size and image.dtype.kind in "biuf":
        gray = to_grayscale(image) if is_image_file else image.astype(np.float64)
        stats["image_finite"] = str(bool(np.isfinite(gray).all()))
        values = gray[np.isfinite(gray)]
        if values.size:
            stats.update(
                image_min=number_text(float(values.min())), image_max=number_text(float(values.max()))
            )
    elif image.size:
        stats["image_finite"] = "False"  # text or object arrays are no image
    return stats


def _figshare_fields(raw: RawPlanar) -> dict[str, str]:
    """Patient, label and mask statistics of a Figshare slice, as stored (validation judges them)."""
    fields = {"has_mask": str(raw.mask is not None)}
    if raw.pid is not None:
        fields["patient_id"] = raw.pid.strip()
    if raw.label is not None:
        fields["label"] = number_text(raw.label)
        fields["has_tumour"] = "True"
        fields["tumour_type"] = (
            FIGSHARE_LABELS.get(int(raw.label), "") if float(raw.label).is_integer() else ""
        )
    if raw.mask is not None:
        mask = np.asarray(raw.mask)
        values = np.unique(mask) if mask.size else np.array([])
        fields.update(
            mask_shape=shape_text(mask.shape),
            mask_values=";".join(number_text(float(v)) for v in values[:20]),
            tumour_pixels=str(int(np.count_nonzero(mask))),
        )
    return fields


def ingest_planar(
    src: Path, out_dir: Path, cfg: IngestConfig, files: list[PlanarFile] | None = None
) -> IngestSummary:
    """Index the 2-D files under ``src`` (``files``: found again when None) into ``out_dir/manifest.csv``.

    The caller checks that ``out_dir`` is not inside ``src``; no 2-D file under ``src`` is a DataError.
    """
    start = time.perf_counter()
    src, out_dir = Path(src).absolute(), Path(out_dir).absolute()
    files = find_planar_files(src) if files is None else files
    if not files:
        raise DataError(f"{src}: no Figshare .mat file and no Kaggle yes/ + no/ image folder found")
    layouts = sorted({item.layout for item in files}, key=IMAGE_LAYOUTS.index)
    return write_incrementally(
        files,
        _previous_rows(out_dir),
        out_dir,
        fingerprint=lambda item: _fingerprint(item.path),
        reusable=lambda old, item, fingerprint: (
            old["path"] == str(item.path) and old["fingerprint"] == fingerprint
        ),
        read=planar_manifest_row,
        columns=PLANAR_MANIFEST_COLUMNS,
        layout="+".join(layouts),
        workers=cfg.workers,
        start=start,
    )


def _previous_rows(out_dir: Path) -> dict[str, dict[str, str]]:
    """Rows of a previous 2-D manifest by case id, with ingest's own verdict (not validation's)."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return {}
    try:
        df = read_manifest(out_dir)
    except (DataError, ValueError, OSError):
        return {}
    has_columns = all(c in df.columns for c in PLANAR_MANIFEST_COLUMNS)
    if not has_columns or df.empty or not df["layout"].isin(IMAGE_LAYOUTS).all():
        return {}
    return rows_with_ingest_verdict(df, PLANAR_MANIFEST_COLUMNS)
