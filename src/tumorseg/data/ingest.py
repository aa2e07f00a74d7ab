"""``tumorseg ingest``: index a dataset folder into ``manifest.csv``, one row per case.

Every file is read once (hashed as read), never modified. Ingest quarantines only what nothing
downstream could look at (missing modality, undecodable file, wrong dimensionality, differing
shapes) and measures the rest for ``tumorseg validate``; rows of unchanged files are reused unread.
Volumes and images (one ``.mat`` or bitmap a case) differ only in an :class:`IngestPlan`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.config import IngestConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.layouts import (
    FILE_KEYS,
    CaseFiles,
    LoadedCase,
    discover_cases,
    label_counts,
    load_case,
    orientation_code,
    shape_text,
    spacing_from_affine,
)
from tumorseg.data.manifest import (
    IDENTITY_COLUMNS,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    STATUS_OK,
    STATUS_QUARANTINED,
    read_manifest,
    write_manifest,
)
from tumorseg.data.parallel import map_cases
from tumorseg.data.planar import (
    FIGSHARE_LABELS,
    IMAGE_LAYOUTS,
    KAGGLE_CLASS_FOLDERS,
    RawPlanar,
    channels_of,
    load_planar_raw,
    to_grayscale,
)
from tumorseg.data.readers import PlanarFile, find_planar_files
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

DATALIST_COLUMNS: list[str] = ["subset", "fold"]
CONTENT_DIGEST_COLUMNS: list[str] = [f"content_sha256_{key}" for key in CANONICAL_MODALITIES]
INGEST_COLUMNS: list[str] = [*MANIFEST_COLUMNS, *DATALIST_COLUMNS, *CONTENT_DIGEST_COLUMNS]

LABEL_CONVENTION_2D: dict[str, str] = {"figshare": "tumour-mask", "kaggle": "yes-no"}
PLANAR_MANIFEST_COLUMNS: list[str] = [
    *IDENTITY_COLUMNS,
    *[
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
    ],
]
"""Columns of a 2-D manifest; ``has_mask``: a reference mask is known (Figshare ``tumorMask``, or a
Kaggle ``no`` image, all background)."""


def ingest(src: Path, out_dir: Path, cfg: IngestConfig) -> IngestSummary:
    """Index the dataset under ``src`` (a layout of :mod:`tumorseg.data.layouts`, or 2-D files) into
    ``out_dir/manifest.csv``; a DataError when ``src`` matches no layout, is empty, mixes layouts, or
    holds ``out_dir``."""
    start = time.perf_counter()
    src, out_dir = Path(src).absolute(), Path(out_dir).absolute()
    if out_dir == src or src in out_dir.parents:
        raise DataError(f"--out {out_dir} is inside the source dataset {src}; write the manifest elsewhere")
    files = find_planar_files(src) if cfg.layout == "auto" else []
    plan = _image_plan(files) if files else _volume_plan(src, cfg)
    return write_incrementally(plan, _previous_rows(out_dir, plan), out_dir, cfg.workers, start)


@dataclass(frozen=True)
class IngestPlan:
    """The volume or image strategy of ingest: the ``items`` found (each with a ``case_id``), their
    cheap ``fingerprint`` (sizes, mtimes), whether a previous row is ``reusable`` for one, how to
    ``read`` one into its row (in a worker process: module-level), how to ``refresh`` a reused row
    (datalist subset and fold). A previous image manifest needs image layouts and is judged silently.
    """

    items: Sequence[Any]
    fingerprint: Callable[[Any], str]
    reusable: Callable[[dict[str, str], Any, str], bool]
    read: Callable[[Any, str], dict[str, str]]
    columns: list[str]
    layout: str
    refresh: Callable[[dict[str, str], Any], dict[str, str]] | None = None
    images: bool = False


def _volume_plan(src: Path, cfg: IngestConfig) -> IngestPlan:
    cases = discover_cases(src, None if cfg.layout == "auto" else cfg.layout, labels=cfg.labels)
    read = partial(read_manifest_row, chunk_bytes=cfg.hash_chunk_mb << 20)
    return IngestPlan(
        cases, case_fingerprint, _reusable, read, INGEST_COLUMNS, cases[0].layout, _refresh_discovery
    )


def _image_plan(files: list[PlanarFile]) -> IngestPlan:
    return IngestPlan(
        files,
        lambda item: _file_fingerprint(item.path),
        lambda old, item, fingerprint: old["path"] == str(item.path) and old["fingerprint"] == fingerprint,
        planar_manifest_row,
        PLANAR_MANIFEST_COLUMNS,
        "+".join(sorted({item.layout for item in files}, key=IMAGE_LAYOUTS.index)),
        images=True,
    )


def read_manifest_row(case: CaseFiles, fingerprint: str, *, chunk_bytes: int) -> dict[str, str]:
    """Read every file of one case once and return its manifest row (runs in a worker process)."""
    return manifest_row(load_case(case, chunk_bytes=chunk_bytes), fingerprint)


# ---------------------------------------------------------------------------- incremental reuse
INGEST_STATUS_COLUMN = "ingest_status"
INGEST_REASON_COLUMN = "ingest_reason"
"""Columns validation adds to keep ingest's own verdict; preferred when a validated manifest is reused."""


@dataclass(frozen=True)
class IngestSummary:
    """What one ingest run did: rows ``ok`` and ``quarantined``; cases ``new``, ``changed`` (both read),
    ``reused`` (no file read) and ``removed`` (gone from the source) since the previous manifest."""

    manifest: Path
    layout: str
    cases: int
    ok: int
    quarantined: int
    new: int
    changed: int
    reused: int
    removed: int
    seconds: float

    def one_line(self) -> str:
        return (
            f"ingested {self.cases} {self.layout} cases -> {self.manifest}: {self.ok} ok, "
            f"{self.quarantined} quarantined ({self.new} new, {self.changed} changed, {self.reused} reused, "
            f"{self.removed} removed) in {self.seconds:.1f} s"
        )


def write_incrementally(
    plan: IngestPlan, previous: dict[str, dict[str, str]], out_dir: Path, workers: int, start: float
) -> IngestSummary:
    """Reuse the ``previous`` rows of unchanged cases, read the rest, write ``out_dir/manifest.csv``."""
    rows: dict[str, dict[str, str]] = {}
    to_read: list[tuple[Any, str]] = []
    new = changed = 0
    for item in plan.items:
        item_fingerprint = plan.fingerprint(item)
        old = previous.get(item.case_id)
        if old is not None and plan.reusable(old, item, item_fingerprint):
            rows[item.case_id] = plan.refresh(old, item) if plan.refresh is not None else old
        else:
            to_read.append((item, item_fingerprint))
            new += old is None
            changed += old is not None
    reused = len(rows)

    for row in map_cases(
        partial(_read_pair, plan.read), to_read, workers=workers, what="ingest", setting="ingest.workers"
    ):
        if row["status"] == STATUS_QUARANTINED:
            log.warning("quarantined %s: %s", row["case_id"], row["reason"])
        rows[row["case_id"]] = row

    current = {item.case_id for item in plan.items}
    removed = sum(1 for case_id in previous if case_id not in current)
    manifest = write_manifest(pd.DataFrame(list(rows.values()), columns=list(plan.columns)), out_dir)
    quarantined = sum(1 for row in rows.values() if row["status"] == STATUS_QUARANTINED)
    summary = IngestSummary(
        manifest=manifest,
        layout=plan.layout,
        cases=len(rows),
        ok=len(rows) - quarantined,
        quarantined=quarantined,
        new=new,
        changed=changed,
        reused=reused,
        removed=removed,
        seconds=time.perf_counter() - start,
    )
    log.debug(summary.one_line())
    return summary


def _read_pair(read: Callable[[Any, str], dict[str, str]], pair: tuple[Any, str]) -> dict[str, str]:
    return read(*pair)


def _previous_rows(out_dir: Path, plan: IngestPlan) -> dict[str, dict[str, str]]:
    """The previous manifest's rows (all text, ``plan.columns`` only) by case id, with ingest's own
    verdict where validation kept it; none when there is no manifest or it has another schema."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return {}
    try:
        df = read_manifest(out_dir)
    except (DataError, ValueError, OSError) as exc:
        if not plan.images:
            log.warning("ignoring the previous manifest in %s (%s); reading every case", out_dir, exc)
        return {}
    if any(column not in df.columns for column in plan.columns):
        if not plan.images:
            log.info("previous manifest in %s has another schema; reading every case", out_dir)
        return {}
    if plan.images and not df["layout"].isin(IMAGE_LAYOUTS).all():
        return {}
    rows: dict[str, dict[str, str]] = {}
    for record in df.to_dict(orient="records"):
        row = {column: str(record[column]) for column in plan.columns}
        if record.get(INGEST_STATUS_COLUMN):
            row["status"] = str(record[INGEST_STATUS_COLUMN])
            row["reason"] = str(record.get(INGEST_REASON_COLUMN, ""))
        rows[row["case_id"]] = row
    return rows


def number_text(value: float) -> str:
    """Integers without a decimal point, other values with 6 significant digits."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6g}"


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}@{stat.st_mtime_ns}"


def case_fingerprint(case: CaseFiles) -> str:
    """Size and modification time (ns) of every file of a case: ``t1=SIZE@MTIME;...;seg=-``."""
    parts = []
    for key in FILE_KEYS:
        path = case.paths.get(key)
        try:
            parts.append(f"{key}={_file_fingerprint(path)}" if path is not None else f"{key}=-")
        except OSError:
            parts.append(f"{key}=-")
    return ";".join(parts)


def _reusable(row: dict[str, str], case: CaseFiles, fingerprint: str) -> bool:
    if row["fingerprint"] != fingerprint or row["layout"] != case.layout:
        return False
    return all(row[f"path_{key}"] == _path_text(case.paths.get(key)) for key in FILE_KEYS)


def _discovery_fields(case: CaseFiles) -> dict[str, str]:
    """What case discovery decides without reading an image, as manifest text (no statistic depends on
    it: labels are counted in source codes, so a reused row is refreshed with it)."""
    return {
        "patient_id": case.patient_id,
        "label_convention": case.label_convention,
        "subset": case.subset or "",
        "fold": "" if case.fold is None else str(int(case.fold)),
    }


def _refresh_discovery(row: dict[str, str], case: CaseFiles) -> dict[str, str]:
    return {**row, **_discovery_fields(case)}


# ---------------------------------------------------------------------------- one row
def _path_text(path: Path | None) -> str:
    return str(Path(path).absolute()) if path is not None else ""


def manifest_row(loaded: LoadedCase, fingerprint: str) -> dict[str, str]:
    """One manifest row (all text) from a case decoded by :func:`~tumorseg.data.layouts.load_case`."""
    case = loaded.case
    row = dict.fromkeys(INGEST_COLUMNS, "")
    row.update(_discovery_fields(case))
    row.update(
        case_id=case.case_id,
        layout=case.layout,
        status=STATUS_QUARANTINED if loaded.problems else STATUS_OK,
        reason="; ".join(loaded.problems),
        case_dir=_path_text(case.case_dir),
        modalities=";".join(key for key in CANONICAL_MODALITIES if case.paths.get(key) is not None),
        fingerprint=fingerprint,
    )
    for key in FILE_KEYS:
        row[f"path_{key}"] = _path_text(case.paths.get(key))
        row[f"sha256_{key}"] = loaded.sha256.get(key, "")

    reference_key = loaded.reference_key
    reference = loaded.files[reference_key] if reference_key is not None else None
    if reference is not None and reference_key is not None:
        row["shape"] = shape_text(loaded.volumes[reference_key].shape)
        row["spacing"] = "x".join(number_text(round(s, 6)) for s in spacing_from_affine(reference.affine))
        row["orientation"] = orientation_code(reference.affine)

    for key in FILE_KEYS:
        if case.paths.get(key) is None:
            continue
        row[f"{key}_readable"] = str(key in loaded.files)
        if key not in loaded.files:
            continue
        nifti = loaded.files[key]
        volume = loaded.volumes.get(key, nifti.data)
        row[f"{key}_finite"] = str(_all_finite(volume))
        row[f"{key}_nonzero_voxels"] = str(int(np.count_nonzero(volume)))
        row[f"{key}_shape"] = shape_text(volume.shape)
        if reference is not None:
            row[f"{key}_affine_max_diff_mm"] = number_text(
                affine_max_diff_mm(nifti.affine, reference.affine, volume.shape[:3])
            )

    if all(key in loaded.volumes for key in CANONICAL_MODALITIES) and not _shapes_differ(loaded):
        brain = np.zeros(loaded.volumes["t1"].shape, dtype=bool)
        for key in CANONICAL_MODALITIES:
            brain |= loaded.volumes[key] != 0
        row["brain_voxels"] = str(int(np.count_nonzero(brain)))

    if "seg" in loaded.volumes:
        row.update(_label_statistics(loaded.volumes["seg"], loaded.files["seg"].affine))
    row.update(_content_digests(loaded))
    return row


_DIGEST_INT = np.dtype("<i2")
_DIGEST_FLOAT = np.dtype("<f4")
_DIGEST_BLOCK_BYTES = 4 << 20


def content_digest(volume: np.ndarray) -> str:
    """sha256 of a decoded volume's shape and values (``content_sha256_<mod>``), whatever the file, so
    ``validate`` finds one scan stored twice: ``"<shape>;"``, then per 4 MiB block of last-axis slices
    ``b"i2"`` + int16 values when all fit, else ``b"f4"`` + float32, little-endian, NIfTI order."""
    digest = hashlib.sha256(f"{shape_text(volume.shape)};".encode())
    if volume.ndim == 0:
        volume = volume.reshape(1)
    slice_voxels = int(np.prod(volume.shape[:-1]))
    per_block = max(1, _DIGEST_BLOCK_BYTES // max(1, _DIGEST_FLOAT.itemsize * slice_voxels))
    dtype = volume.dtype
    exact_int16 = dtype == _DIGEST_INT or dtype.kind == "b" or (dtype.kind in "iu" and dtype.itemsize == 1)
    for start in range(0, volume.shape[-1], per_block):
        block = volume[..., start : start + per_block]
        if exact_int16:
            small: np.ndarray | None = np.asarray(block, dtype=_DIGEST_INT, order="F")
        elif not _fits_int16(block[..., :1]):  # one slice that does not fit decides the block cheaply
            small = None
        else:
            with np.errstate(invalid="ignore", over="ignore"):  # NaN, inf, out of range: not equal below
                small = block.astype(_DIGEST_INT, order="F")
            if not np.array_equal(small, block):
                small = None
        if small is not None:
            digest.update(b"i2")
            digest.update(small.T)  # the transpose of a Fortran-ordered block is C-contiguous: no copy
        else:
            digest.update(b"f4")
            digest.update(np.asarray(block, dtype=_DIGEST_FLOAT, order="F").T)
    return digest.hexdigest()


def _fits_int16(values: np.ndarray) -> bool:
    """Whether every value is an integer in int16 range (NaN and infinities are not)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return bool(np.array_equal(values.astype(_DIGEST_INT), values))


def _content_digests(loaded: LoadedCase) -> dict[str, str]:
    """``content_sha256_<mod>`` of every decoded modality (no threads: cases already run in processes)."""
    return {
        f"content_sha256_{key}": content_digest(loaded.volumes[key])
        for key in CANONICAL_MODALITIES
        if key in loaded.volumes
    }


def _shapes_differ(loaded: LoadedCase) -> bool:
    return len({volume.shape for volume in loaded.volumes.values()}) > 1


def _all_finite(volume: np.ndarray) -> bool:
    if volume.dtype.kind not in "fc":
        return True
    return bool(np.isfinite(volume).all())


def affine_max_diff_mm(affine: np.ndarray, reference: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance (mm) between where two affines put the same voxel (at a corner: they are linear)."""
    extent = [max(int(n) - 1, 0) for n in shape[:3]]
    corners = np.array(
        [[i, j, k, 1.0] for i in (0, extent[0]) for j in (0, extent[1]) for k in (0, extent[2])]
    ).T
    return float(np.max(np.linalg.norm((affine @ corners - reference @ corners)[:3], axis=0)))


def _label_statistics(seg: np.ndarray, affine: np.ndarray) -> dict[str, str]:
    """``label_values``, ``voxels_per_label``, ``tumour_voxels``, ``tumour_volume_ml`` (source codes)."""
    values, counts = label_counts(seg)
    background = int(sum(c for v, c in zip(values, counts, strict=True) if v == 0))
    tumour_voxels = int(seg.size) - background
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    return {
        "label_values": ";".join(number_text(v) for v in values),
        "voxels_per_label": ";".join(
            f"{number_text(v)}:{int(c)}" for v, c in zip(values, counts, strict=True)
        ),
        "tumour_voxels": str(tumour_voxels),
        "tumour_volume_ml": number_text(round(tumour_voxels * voxel_ml, 4)),
    }


# ---------------------------------------------------------------------------- one image row
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
