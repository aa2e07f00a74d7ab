"""``tumorseg ingest``: index a dataset folder into ``manifest.csv``, one row per case.

Every file is read once (hashed as read), never modified. Ingest quarantines only what nothing
downstream could look at (a missing modality, an undecodable file, a wrong dimensionality, shapes
that differ); everything else is measured and left to ``tumorseg validate``. A case whose files'
sizes, mtimes and paths are unchanged keeps its previous row unread, with what discovery decides
(patient, label convention, datalist ``subset``/``fold``) refreshed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from functools import partial
from pathlib import Path

import numpy as np

from tumorseg.config import IngestConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.incremental import (
    IngestSummary,
    number_text,
    rows_with_ingest_verdict,
    write_incrementally,
)
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
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    STATUS_OK,
    STATUS_QUARANTINED,
    read_manifest,
)
from tumorseg.data.readers import IMAGE, folder_dims
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

DATALIST_COLUMNS: list[str] = ["subset", "fold"]
CONTENT_DIGEST_COLUMNS: list[str] = [f"content_sha256_{key}" for key in CANONICAL_MODALITIES]
INGEST_COLUMNS: list[str] = [*MANIFEST_COLUMNS, *DATALIST_COLUMNS, *CONTENT_DIGEST_COLUMNS]


def ingest(src: Path, out_dir: Path, cfg: IngestConfig) -> IngestSummary:
    """Index the dataset under ``src`` (any layout of :mod:`tumorseg.data.layouts`) into ``out_dir/manifest.csv``.

    Raises:
        DataError: ``src`` matches no layout / is empty / mixes layouts, or ``out_dir`` is inside ``src``.
    """
    start = time.perf_counter()
    src, out_dir = Path(src).absolute(), Path(out_dir).absolute()
    if out_dir == src or src in out_dir.parents:
        raise DataError(f"--out {out_dir} is inside the source dataset {src}; write the manifest elsewhere")
    if cfg.layout == "auto" and folder_dims(src) == IMAGE:
        from tumorseg.data.planar_ingest import ingest_planar

        return ingest_planar(src, out_dir, cfg)

    cases = discover_cases(src, None if cfg.layout == "auto" else cfg.layout, labels=cfg.labels)
    return write_incrementally(
        cases,
        _previous_rows(out_dir),
        out_dir,
        fingerprint=case_fingerprint,
        reusable=_reusable,
        read=partial(read_manifest_row, chunk_bytes=cfg.hash_chunk_mb << 20),
        columns=INGEST_COLUMNS,
        layout=cases[0].layout,
        workers=cfg.workers,
        start=start,
        refresh=_refresh_discovery,
    )


def read_manifest_row(case: CaseFiles, fingerprint: str, *, chunk_bytes: int) -> dict[str, str]:
    """Read every file of one case once and return its manifest row (runs in a worker process)."""
    return manifest_row(load_case(case, chunk_bytes=chunk_bytes), fingerprint)


# ---------------------------------------------------------------------------- incremental reuse
def case_fingerprint(case: CaseFiles) -> str:
    """Size and modification time (ns) of every file of a case: ``t1=SIZE@MTIME;...;seg=-`` (one stat each)."""
    parts = []
    for key in FILE_KEYS:
        path = case.paths.get(key)
        try:
            stat = path.stat() if path is not None else None
        except OSError:
            stat = None
        parts.append(f"{key}={stat.st_size}@{stat.st_mtime_ns}" if stat is not None else f"{key}=-")
    return ";".join(parts)


def _previous_rows(out_dir: Path) -> dict[str, dict[str, str]]:
    """Rows of the previous manifest by case id; empty when there is none or it is from another schema."""
    if not (out_dir / MANIFEST_NAME).is_file():
        return {}
    try:
        df = read_manifest(out_dir)
    except (DataError, ValueError, OSError) as exc:
        log.warning("ignoring the previous manifest in %s (%s); reading every case", out_dir, exc)
        return {}
    if any(column not in df.columns for column in INGEST_COLUMNS):
        log.info("previous manifest in %s has another schema; reading every case", out_dir)
        return {}
    return rows_with_ingest_verdict(df, INGEST_COLUMNS)


def _reusable(row: dict[str, str], case: CaseFiles, fingerprint: str) -> bool:
    if row["fingerprint"] != fingerprint or row["layout"] != case.layout:
        return False
    return all(row[f"path_{key}"] == _path_text(case.paths.get(key)) for key in FILE_KEYS)


def _discovery_fields(case: CaseFiles) -> dict[str, str]:
    """What case discovery decides without reading an image, as manifest text."""
    return {
        "patient_id": case.patient_id,
        "label_convention": case.label_convention,
        "subset": case.subset or "",
        "fold": "" if case.fold is None else str(int(case.fold)),
    }


def _refresh_discovery(row: dict[str, str], case: CaseFiles) -> dict[str, str]:
    """A reused row with what discovery says now (no statistic depends on it: labels are in source codes)."""
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
    """sha256 of a decoded volume's shape and voxel values (``content_sha256_<mod>``), whatever the file.

    ``validate`` uses it to find one scan stored under several case ids, in any container, gzip level,
    header or on-disk dtype. Hashed: ``"<shape>;"``, then blocks of whole last-axis slices (4 MiB as
    float32), each ``b"i2"`` + little-endian int16 values when all are integers in int16 range, else
    ``b"f4"`` + float32 values, voxels in NIfTI order (first axis fastest).
    """
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
