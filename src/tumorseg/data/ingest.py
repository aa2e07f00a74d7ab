"""``tumorseg ingest``: index a dataset folder into ``manifest.csv``, one row per case.

Ingest reads every file of every case once (hashing the bytes as they are read, see
:func:`~tumorseg.data.layouts.read_nifti`) and records what it finds; it never modifies, moves or
deletes anything under the source folder, and refuses to write its manifest inside it.

What ingest decides, and what it leaves to validation
-----------------------------------------------------
Ingest quarantines (``status=quarantined`` with a ``reason``) only the cases it cannot turn into a
consistent four-channel volume, because nothing downstream could even look at them:

- a modality file is missing (``missing modality file BraTS2021_00003_t1ce.nii.gz``);
- a file (modality or segmentation) cannot be decoded: truncated gzip, corrupt gzip, not NIfTI,
  unreadable header;
- a file has the wrong dimensionality (3-D per BraTS file, 4-D with 4 channels for MSD);
- the shapes of the modalities and segmentation differ (``shapes differ: t1 240x240x155 vs flair ...``).

Everything else is *measured*, not judged, and written as statistics that the Great Expectations
suite (``tumorseg validate``) turns into quarantine decisions with its own, configurable limits:
non-finite voxels (``<key>_finite``), empty modalities (``<key>_nonzero_voxels``), label values
outside the convention (``label_values``), voxel spacing (``spacing``), affine disagreement between
files (``<key>_affine_max_diff_mm``) and too little brain (``brain_voxels``). A case without a
segmentation is not an error here: it is an unlabelled case (``path_seg`` empty).

Statistics of a file are filled as far as it could be read: a missing file leaves its columns empty,
an undecodable one has ``<key>_readable=False`` (and its sha256), a decoded one has all of them.

Columns ingest adds to the manifest
-----------------------------------
Besides :data:`~tumorseg.data.manifest.MANIFEST_COLUMNS` ingest writes (:data:`INGEST_COLUMNS`):

- ``subset``, ``fold``: where a MONAI datalist puts the case (``training``/``validation``/``testing``
  and the fold number, from :class:`~tumorseg.data.layouts.CaseFiles`); empty for other layouts and
  for cases the datalist gives no subset/fold. ``tumorseg split`` with ``split.method: datalist``
  reads them.
- ``content_sha256_<mod>`` (t1, t1ce, t2, flair): sha256 of the *decoded* volume
  (:func:`content_digest`): its shape and its voxel values (scaling ``scl_slope``/``scl_inter``
  applied) in NIfTI order, as int16 where the values are integers that fit, else as float32. The
  same scan saved as ``.nii`` or ``.nii.gz``, with another gzip level, another header (description,
  affine, qform/sform codes) or another on-disk dtype holding the same values has the same digest,
  where the file ``sha256_<mod>`` differs. Empty when the volume could not be decoded.
  ``tumorseg validate`` uses both digests to flag one scan stored under several case ids
  (``duplicate_of``). It is computed from the arrays ingest decodes anyway (no second read): about
  10 ms per 240x240x155 int16 volume and 20 ms per float32 one (sha256 with SHA-NI), so some 40 ms
  (int16) to 85 ms (float32) per case, next to about 300 ms to read and decode it.

Incremental runs
----------------
The previous ``manifest.csv`` in the output folder is the cache: a case whose ``fingerprint`` (size
and modification time of every file) and file paths are unchanged keeps its row without a single
byte being read; new or changed cases are read; cases no longer in the source are dropped. The
manifest is replaced atomically. What discovery decides without reading an image (``patient_id``,
``label_convention``, ``subset``, ``fold``) is taken afresh for reused rows too: editing a datalist or
``ingest.labels`` changes no file. A previous manifest without every column of
:data:`INGEST_COLUMNS` is from an older ingest: every case is read.
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
"""MONAI datalist membership of a case (empty when the layout has no datalist)."""
CONTENT_DIGEST_COLUMNS: list[str] = [f"content_sha256_{key}" for key in CANONICAL_MODALITIES]
"""sha256 of each decoded modality (:func:`content_digest`), whatever file format stores it."""
INGEST_COLUMNS: list[str] = [*MANIFEST_COLUMNS, *DATALIST_COLUMNS, *CONTENT_DIGEST_COLUMNS]
"""Columns of the 3-D manifest ingest writes: the shared ones, then the datalist and content digests."""


def ingest(src: Path, out_dir: Path, cfg: IngestConfig) -> IngestSummary:
    """Index the dataset under ``src`` into ``out_dir/manifest.csv``.

    Args:
        src: dataset folder (any supported layout, see :mod:`tumorseg.data.layouts`).
        out_dir: where ``manifest.csv`` goes; must not be inside ``src``.
        cfg: the ``ingest`` section of params.yaml.

    Returns:
        Counts of what was read, reused, quarantined and dropped.

    Raises:
        DataError: ``src`` matches no layout / is empty / mixes layouts, or ``out_dir`` is inside ``src``.
    """
    start = time.perf_counter()
    src = Path(src).absolute()
    out_dir = Path(out_dir).absolute()
    if out_dir == src or src in out_dir.parents:
        raise DataError(f"--out {out_dir} is inside the source dataset {src}; write the manifest elsewhere")
    if cfg.layout == "auto" and folder_dims(src) == IMAGE:
        from tumorseg.data.planar_ingest import ingest_planar  # images: one file a case

        return ingest_planar(src, out_dir, cfg)

    cases = _discover(src, cfg)
    layout = cases[0].layout
    chunk_bytes = cfg.hash_chunk_mb << 20
    return write_incrementally(
        cases,
        _previous_rows(out_dir),
        out_dir,
        fingerprint=case_fingerprint,
        reusable=_reusable,
        read=partial(read_manifest_row, chunk_bytes=chunk_bytes),
        columns=INGEST_COLUMNS,
        layout=layout,
        workers=cfg.workers,
        start=start,
        refresh=_refresh_discovery,
    )


def _discover(src: Path, cfg: IngestConfig) -> list[CaseFiles]:
    """:func:`~tumorseg.data.layouts.discover_cases` with the configured layout and label convention."""
    return discover_cases(src, None if cfg.layout == "auto" else cfg.layout, labels=cfg.labels)


def read_manifest_row(case: CaseFiles, fingerprint: str, *, chunk_bytes: int) -> dict[str, str]:
    """Read every file of one case once and return its manifest row (runs in a worker process)."""
    return manifest_row(load_case(case, chunk_bytes=chunk_bytes), fingerprint)


# ---------------------------------------------------------------------------- incremental reuse
def case_fingerprint(case: CaseFiles) -> str:
    """Size and modification time (ns) of every file of a case: ``t1=SIZE@MTIME;...;seg=-``.

    Cheap (one ``stat`` per file) and changes whenever a file is rewritten, replaced, added or
    removed; the paths themselves are compared separately (:func:`_reusable`).
    """
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
    """What case discovery decides without reading an image, as manifest text: the patient, the label
    convention (``ingest.labels``, ``dataset.json``) and the datalist ``subset``/``fold`` (empty
    when the layout has no datalist)."""
    return {
        "patient_id": case.patient_id,
        "label_convention": case.label_convention,
        "subset": case.subset or "",
        "fold": "" if case.fold is None else str(int(case.fold)),
    }


def _refresh_discovery(row: dict[str, str], case: CaseFiles) -> dict[str, str]:
    """A reused row with what discovery says now: editing the datalist or ``ingest.labels`` changes
    no image, and none of the statistics depend on it (label values are in source codes)."""
    return {**row, **_discovery_fields(case)}


# ---------------------------------------------------------------------------- one row
def _path_text(path: Path | None) -> str:
    return str(Path(path).absolute()) if path is not None else ""


def _bool_text(value: bool) -> str:
    return "True" if value else "False"


def manifest_row(loaded: LoadedCase, fingerprint: str) -> dict[str, str]:
    """One manifest row (all text) from a case decoded by :func:`~tumorseg.data.layouts.load_case`.

    See :mod:`tumorseg.data.manifest` for the columns and this module's docstring for what
    makes ``status`` quarantined here.
    """
    case = loaded.case
    row = dict.fromkeys(INGEST_COLUMNS, "")
    row.update(_discovery_fields(case))
    row.update(
        case_id=case.case_id,
        patient_id=case.patient_id,
        layout=case.layout,
        label_convention=case.label_convention,
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
        row[f"{key}_readable"] = _bool_text(key in loaded.files)
        if key not in loaded.files:
            continue
        nifti = loaded.files[key]
        volume = loaded.volumes.get(key, nifti.data)
        row[f"{key}_finite"] = _bool_text(_all_finite(volume))
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
    """sha256 of a decoded volume's shape and voxel values, independent of how the file stores them.

    Hashed: ``"<shape>;"`` (``"240x240x155;"``), then the volume in blocks of whole slices along its
    last axis (as many as fill 4 MiB as float32; the blocks depend on the shape only), each block as
    ``b"i2"`` + its values as little-endian int16 when every value is an integer in int16 range,
    else ``b"f4"`` + its values as little-endian float32; voxels in NIfTI order (first axis fastest).

    Which form a block takes depends on its values only, so the same values give the same digest
    whatever the file: ``.nii`` or ``.nii.gz``, gzip level, header, or an on-disk dtype (int16,
    uint8, float32, float64, scaled) that holds them. Integer data (most scanner exports) hashes
    half the bytes of float32 and needs no conversion; blocks are small, so no full-size copy is made.
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
    """``content_sha256_<mod>`` of every decoded modality (in this process: ingest runs cases in
    ``ingest.workers`` processes already, so threads here would only compete with them)."""
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
    """Largest distance (mm) between where two affines put the same voxel.

    Both affines are applied to the 8 corner voxels of ``shape``; affines are linear, so the largest
    displacement over the whole volume is at a corner. 0 means the files share one voxel grid.
    """
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
