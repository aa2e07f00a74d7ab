"""``tumorseg preprocess``: reorient to RAS, resample, crop to the brain, z-score; and the exact inverse.

Forward (:func:`preprocess_case`), for a case read by :func:`~tumorseg.data.layouts.read_case`
(image ``(4, X, Y, Z)`` in t1, t1ce, t2, flair order, canonical labels ``(X, Y, Z)``):

1. **Reorient** to the closest RAS axis order with nibabel's orientation tools (axis flips and
   permutations only: no interpolation, exactly invertible).
2. **Resample** to ``target_spacing_mm``: the new shape is ``round(shape * spacing / target)`` and the
   grids share their outer voxel edges (``align_corners=False``, as nnU-Net does), so the field of
   view is kept and the actual spacing differs from the target by less than half a voxel over the
   whole extent. Images: trilinear (torch) or spline order 2/3 (scipy); labels: each label's
   indicator trilinearly then the largest (``label_resampling: onehot_linear``), or nearest neighbour.
   When the shape does not change the grid is the identity and nothing is interpolated, so the
   round trip is exact at equal spacing.
3. **Crop** to the bounding box of the brain (voxels non-zero in any modality) plus
   ``crop_margin_vox``.
4. **Z-score** every channel with the mean and standard deviation of the brain voxels; the
   background stays exactly 0.

Every number needed to undo this is stored in a geometry dict (JSON), and
:func:`restore_to_source` maps a label or probability map on the preprocessed grid back to the
source file's exact shape, orientation and affine.

Why not MONAI's ``Orientationd``/``Spacingd``/``CropForegroundd`` + ``Invertd``: their inverse lives in
a MetaTensor's in-memory ``applied_operations``; here the inverse must be applied in another process
(``tumorseg predict``, the serving API) from a small JSON file, and be exact.

Output of :func:`preprocess_dataset` (the contract with training)::

    OUT/cases/<case_id>.npz   image (4, X, Y, Z) storage_dtype, label (X, Y, Z) uint8 canonical,
                              brain (X, Y, Z) bool, loc_fg / loc_<code> (N, 3) uint16 patch-centre
                              samples (:func:`~tumorseg.data.case_store.sample_locations`);
                              uncompressed by default, so training memory-maps it
    OUT/cases/<case_id>.json  geometry (see :func:`preprocess_case`)
    OUT/index.csv             case_id, patient_id, label_convention, layout, npz, shape, tumour_voxels,
                              tumour_volume_ml, has_tumour, has_label, then, carried from the validated
                              manifest for ``tumorseg split`` (empty when it has none): subset, fold
                              (MONAI datalist) and duplicate_of (the case's duplicate group)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from tumorseg.config import PreprocessConfig
from tumorseg.data.case_store import save_case
from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.layouts import (
    FILE_KEYS,
    CaseFiles,
    CaseVolumes,
    case_from_manifest_row,
    label_counts,
    orientation_code,
    read_case,
    spacing_from_affine,
)
from tumorseg.data.manifest import STATUS_OK, atomic_write_text, read_manifest
from tumorseg.data.parallel import map_cases
from tumorseg.data.planar_ingest import is_planar_manifest
from tumorseg.errors import DataError

if TYPE_CHECKING:
    from tumorseg.data.planar import PlanarPreprocessConfig
    from tumorseg.data.planar_dataset import PlanarPreprocessSummary

log = logging.getLogger(__name__)

GEOMETRY_FORMAT = 1
"""Version of the geometry JSON; bump when its keys change so old outputs are rebuilt."""

INDEX_NAME = "index.csv"
CASES_FOLDER = "cases"
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
    "subset",
    "fold",
    "duplicate_of",
]
MANIFEST_CARRIED_COLUMNS: tuple[str, ...] = ("subset", "fold", "duplicate_of")
"""Manifest columns copied into ``index.csv`` as they are ("" when the manifest lacks them): the
datalist subset/fold (ingest) and the duplicate group (validate) that ``tumorseg split`` reads."""

_RAS = axcodes2ornt(("R", "A", "S"))


@dataclass
class PreprocessedCase:
    """One case on the preprocessed grid.

    Attributes:
        image: ``(4, X, Y, Z)`` z-scored channels (t1, t1ce, t2, flair), ``storage_dtype``, 0 outside the brain.
        label: ``(X, Y, Z)`` uint8 canonical labels (zeros when the case has no segmentation).
        brain: ``(X, Y, Z)`` bool, voxels non-zero in any modality.
        geometry: JSON-ready dict with everything :func:`restore_to_source` needs.
    """

    image: np.ndarray
    label: np.ndarray
    brain: np.ndarray
    geometry: dict[str, Any]

    @property
    def has_label(self) -> bool:
        return bool(self.geometry["has_label"])


@dataclass(frozen=True)
class PreprocessSummary:
    """What one preprocess run did.

    Attributes:
        out_dir: the output folder.
        cases: cases in ``index.csv``.
        processed: cases computed in this run.
        skipped: cases whose outputs were already up to date.
        removed: stale cases removed from ``cases/`` (no longer ok in the manifest).
        seconds: wall time.
        stored_bytes: size of the cases' ``.npz`` files (what training reads).
    """

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


# ---------------------------------------------------------------------------- grid operations
def _reorient(volume: np.ndarray, transform: np.ndarray, dtype: Any = None, order: str = "C") -> np.ndarray:
    """Apply a nibabel orientation transform to the spatial axes of ``(X, Y, Z)`` or ``(C, X, Y, Z)``.

    Already-RAS volumes come back as they are (no copy, memory layout kept; converted when ``dtype``
    asks for it). Flips and permutations are copied, converted to ``dtype`` in the same pass, into a
    C-contiguous array, or with ``order="K"`` one that keeps the source's memory order (for label
    maps, whose values do not depend on it; trilinear resampling sums in memory order, so images
    stay C-ordered here to give the same bits whatever the source's layout).
    """
    if np.array_equal(transform, _RAS):
        return volume if dtype is None else volume.astype(dtype, copy=False)
    if volume.ndim == 3:
        oriented = apply_orientation(volume, transform)
        return (
            _c_order_copy(oriented, dtype) if order == "C" else np.array(oriented, dtype=dtype, order=order)
        )
    moved = apply_orientation(np.moveaxis(volume, 0, -1), transform)
    return np.array(np.moveaxis(moved, -1, 0), dtype=dtype, order=order)


def _c_order_copy(view: np.ndarray, dtype: Any = None) -> np.ndarray:
    """``np.array(view, dtype, order="C")`` of a 3-D view, twice as fast when it is a transpose.

    A NIfTI volume stored as BraTS does (LPS, column-major) is, once flipped to RAS, contiguous
    along axis 0 while the C-ordered copy is contiguous along axis 2: one copy of the whole volume
    strides through memory for every voxel. Copying it one plane at a time along the axis that is
    contiguous in neither (axis 1 for BraTS), each plane a two-dimensional transpose that stays in
    cache, takes half the time, same values.
    """
    contiguous_axis = int(np.argmin([abs(stride) for stride in view.strides]))
    if contiguous_axis == 2 or view.flags.c_contiguous:
        return np.array(view, dtype=dtype, order="C")
    plane_axis = ({0, 1} - {contiguous_axis}).pop()
    out = np.empty(view.shape, dtype=view.dtype if dtype is None else dtype)
    index: list[Any] = [slice(None)] * 3
    for position in range(view.shape[plane_axis]):
        index[plane_axis] = position
        out[tuple(index)] = view[tuple(index)]
    return out


def _reversed_axes(ndim: int) -> tuple[int, ...]:
    """Axis order that reverses the last three (spatial) axes and keeps any leading ones."""
    return (*range(ndim - 3), ndim - 1, ndim - 2, ndim - 3)


def _reversed_contiguous(volume: np.ndarray) -> np.ndarray | None:
    """``volume`` with its spatial axes reversed, when that view is C-contiguous (a NIfTI's own layout).

    ``(C, X, Y, Z)`` with Fortran-ordered channels is ``(C, Z, Y, X)`` in C order: resampling that view
    avoids a transposing copy of the full-resolution volume.
    """
    view = np.transpose(volume, _reversed_axes(volume.ndim))
    return view if view.flags.c_contiguous and not volume.flags.c_contiguous else None


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source voxel of each output voxel when both grids share their outer edges (``nearest-exact``)."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)


def resize(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample the spatial axes of ``(X, Y, Z)`` or ``(C, X, Y, Z)`` to ``shape``, edges aligned.

    Output voxel ``j`` samples input position ``(j + 0.5) * n_in / n_out - 0.5`` (torch's
    ``align_corners=False``, scipy's ``grid_mode=True``); edges are extended, not zero-padded.

    Args:
        volume: array with the spatial axes last.
        shape: output spatial shape.
        order: 0 nearest (any dtype, values kept), 1 trilinear, 2-3 spline (float32 result).

    Returns:
        The resampled array; the input itself when the shape is unchanged (identity grid).
    """
    shape = tuple(int(n) for n in shape)
    spatial = volume.shape[-3:]
    if spatial == shape:
        return volume
    if order == 0:
        # One gather per axis, the last (fastest-varying) axis first: the final, largest gather then
        # copies whole slabs. Ten times faster than one fancy index over np.ix_ at 240x240x155.
        out = volume
        for axis in (2, 1, 0):
            if spatial[axis] != shape[axis]:
                out = np.take(out, _nearest_indices(spatial[axis], shape[axis]), axis=volume.ndim - 3 + axis)
        return out
    if order == 1:
        import torch

        reversed_view = _reversed_contiguous(volume) if volume.dtype == np.float32 else None
        if reversed_view is not None:  # resample (C, Z, Y, X), then view it as (C, X, Y, Z) again
            batch = torch.from_numpy(reversed_view).reshape(1, -1, *spatial[::-1])
            out = torch.nn.functional.interpolate(
                batch, size=shape[::-1], mode="trilinear", align_corners=False
            )
            reversed_out = out.reshape(*volume.shape[:-3], *shape[::-1]).numpy()
            return np.ascontiguousarray(np.transpose(reversed_out, np.argsort(_reversed_axes(volume.ndim))))
        batch = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).reshape(1, -1, *spatial)
        out = torch.nn.functional.interpolate(batch, size=shape, mode="trilinear", align_corners=False)
        return out.reshape(*volume.shape[:-3], *shape).numpy()
    from scipy import ndimage

    zoom = [n_out / n_in for n_in, n_out in zip(spatial, shape, strict=True)]
    channels = volume.reshape(-1, *spatial).astype(np.float32, copy=False)
    out = np.stack(
        [
            ndimage.zoom(c, zoom, output=np.float32, order=order, mode="nearest", grid_mode=True)
            for c in channels
        ]
    )
    return out.reshape(*volume.shape[:-3], *shape)


def resize_labels(labels: np.ndarray, shape: tuple[int, ...], method: str) -> np.ndarray:
    """Resample a label map ``(X, Y, Z)`` to ``shape``; values stay within those present.

    ``onehot_linear`` interpolates each label's indicator trilinearly and keeps the largest (ties go
    to the lower label), as nnU-Net does: at 2x downsampling it is the majority of the 2x2x2 source
    block, centred like the image grid. ``nearest`` picks one source voxel, which at even ratios
    lies half a source voxel off the image grid's sample centre.
    """
    shape = tuple(int(n) for n in shape)
    if labels.shape == shape:
        return labels
    if method == "nearest":
        return resize(labels, shape, order=0)
    # Indicators sum to 1 and interpolation is linear, so background's score is 1 - the others':
    # one interpolation fewer, and background (the lowest label) wins its ties.
    best_label = np.zeros(shape, dtype=labels.dtype)
    best_score = np.zeros(shape, dtype=np.float32)
    foreground = np.zeros(shape, dtype=np.float32)
    for value in label_counts(labels)[0].tolist():
        if value == 0:
            continue
        score = resize((labels == value).astype(np.float32), shape, order=1)
        foreground += score
        better = score > best_score
        best_label[better] = value
        best_score[better] = score[better]
    best_label[1.0 - foreground >= best_score] = 0
    return best_label


def _grid_affine(affine: np.ndarray, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> np.ndarray:
    """Affine of the grid :func:`resize` produces from a grid with ``affine``."""
    scale = np.array([n_in / n_out for n_in, n_out in zip(shape_in, shape_out, strict=True)])
    voxel_map = np.eye(4)
    voxel_map[:3, :3] = np.diag(scale)
    voxel_map[:3, 3] = 0.5 * scale - 0.5
    return affine @ voxel_map


def _shift_affine(affine: np.ndarray, start: tuple[int, ...]) -> np.ndarray:
    shift = np.eye(4)
    shift[:3, 3] = start
    return affine @ shift


def _as_list(array: np.ndarray) -> list[Any]:
    return np.asarray(array, dtype=np.float64).tolist()


# ---------------------------------------------------------------------------- one case
@dataclass(frozen=True)
class SourceGrid:
    """Steps 1-2 for a source grid: how it turns to RAS and the target-spacing grid it is resampled to.

    It depends only on the reference modality's affine and shape, so every modality can be
    resampled with it on its own (:func:`resample_modality`), as soon as its file is decoded.

    Attributes:
        shape, affine: the source voxel grid ``(X, Y, Z)`` and its voxel-to-world matrix.
        to_ras: nibabel orientation transform from the source axes to RAS.
        ras_shape, ras_affine: the grid after reorientation.
        target: ``target_spacing_mm``.
        resampled_shape, resampled_affine: the grid at the target spacing (same field of view).
    """

    shape: tuple[int, ...]
    affine: np.ndarray
    to_ras: np.ndarray
    ras_shape: tuple[int, ...]
    ras_affine: np.ndarray
    target: tuple[float, ...]
    resampled_shape: tuple[int, ...]
    resampled_affine: np.ndarray

    @classmethod
    def of(cls, affine: np.ndarray, shape: tuple[int, ...], cfg: PreprocessConfig) -> SourceGrid:
        source_shape = tuple(int(n) for n in shape)
        source_affine = np.asarray(affine, dtype=np.float64)
        to_ras = ornt_transform(io_orientation(source_affine), _RAS)
        ras_shape = tuple(source_shape[int(axis)] for axis in np.argsort(to_ras[:, 0]))
        ras_affine = source_affine @ inv_ornt_aff(to_ras, source_shape)
        ras_spacing = spacing_from_affine(ras_affine)
        target = tuple(float(t) for t in cfg.target_spacing_mm)
        resampled_shape = tuple(
            max(1, int(np.floor(n * s / t + 0.5)))
            for n, s, t in zip(ras_shape, ras_spacing, target, strict=True)
        )
        return cls(
            shape=source_shape,
            affine=source_affine,
            to_ras=to_ras,
            ras_shape=ras_shape,
            ras_affine=ras_affine,
            target=target,
            resampled_shape=resampled_shape,
            resampled_affine=_grid_affine(ras_affine, ras_shape, resampled_shape),
        )


def ras_float32(volume: np.ndarray, grid: SourceGrid, *, case_id: str, modality: str) -> np.ndarray:
    """Step 1 for one modality: finite check, then reorientation to RAS as float32 (one pass).

    An RAS volume keeps its memory order: a NIfTI's column-major volume is then resampled through
    its reversed, C-contiguous view without a copy (:func:`resize`).

    Raises:
        DataError: NaN/inf voxels.
    """
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        bad = int(np.count_nonzero(~np.isfinite(volume)))
        raise DataError(f"{case_id}: {modality} has {bad} NaN/inf voxels; fix or exclude the case")
    return _reorient(volume, grid.to_ras, np.float32)


def resample_modality(
    volume: np.ndarray, grid: SourceGrid, cfg: PreprocessConfig, *, case_id: str, modality: str
) -> np.ndarray:
    """Steps 1-2 for one modality: finite check, reorientation to RAS, resampling to the target spacing.

    Args:
        volume: ``(X, Y, Z)`` on ``grid``'s source grid, any numeric dtype, either memory order.
        grid: from :meth:`SourceGrid.of` (the reference modality's affine and shape).
        cfg: the ``preprocess`` section (``image_interpolation_order``).
        case_id, modality: for the error message.

    Returns:
        float32 ``grid.resampled_shape`` (the RAS volume itself, as float32, when the grid is unchanged).

    Raises:
        DataError: NaN/inf voxels.
    """
    ras = ras_float32(volume, grid, case_id=case_id, modality=modality)
    return resize(ras, grid.resampled_shape, cfg.image_interpolation_order)


def preprocess_case(volumes: CaseVolumes, cfg: PreprocessConfig) -> PreprocessedCase:
    """Reorient, resample, crop and z-score one case (see the module docstring).

    Args:
        volumes: the case in its source geometry; image ``(4, X, Y, Z)`` float32, labels canonical or None.
        cfg: the ``preprocess`` section of params.yaml.

    Returns:
        Image ``(4, x, y, z)``, label and brain ``(x, y, z)`` on the preprocessed grid, and the geometry
        (``source_shape``, ``source_affine``, ``source_orientation``, ``ras_shape``, ``ras_affine``,
        ``target_spacing_mm``, ``resampled_shape``, ``resampled_spacing_mm``, ``crop_bbox`` {start, stop},
        ``preprocessed_shape``, ``preprocessed_affine``, ``normalization``, tumour size, ids).

    Raises:
        DataError: non-finite voxels, or no brain (every modality zero everywhere).
    """
    grid = SourceGrid.of(volumes.affine, volumes.image.shape[1:], cfg)
    resampled = np.stack(
        [
            resample_modality(volumes.image[channel], grid, cfg, case_id=volumes.case_id, modality=modality)
            for channel, modality in enumerate(CANONICAL_MODALITIES)
        ]
    )
    return crop_and_normalise(resampled, grid, _source_fields(volumes), volumes.labels, cfg)


def _source_fields(volumes: CaseVolumes) -> dict[str, Any]:
    """The geometry entries that describe where a case came from (ids, convention, orientation, hashes)."""
    return {
        "case_id": volumes.case_id,
        "patient_id": volumes.patient_id,
        "layout": volumes.layout,
        "label_convention": volumes.label_convention,
        "source_orientation": volumes.orientation,
        "source_spacing_mm": [float(s) for s in volumes.spacing],
        "source_sha256": dict(volumes.sha256),
    }


def crop_and_normalise(
    resampled: np.ndarray,
    grid: SourceGrid,
    source: dict[str, Any],
    labels: np.ndarray | None,
    cfg: PreprocessConfig,
) -> PreprocessedCase:
    """Steps 3-4 on the resampled image, and the label map taken through steps 1-3; the geometry.

    Args:
        resampled: float32 ``(4, x, y, z)`` on ``grid.resampled_shape`` (:func:`resample_modality`).
        grid: the source grid.
        source: ``case_id``, ``patient_id``, ``layout``, ``label_convention``, ``source_orientation``,
            ``source_spacing_mm``, ``source_sha256``.
        labels: canonical uint8 ``(X, Y, Z)`` on the source grid, or None.
        cfg: the ``preprocess`` section.

    Raises:
        DataError: no brain (every modality zero everywhere).
    """
    case_id = source["case_id"]
    resampled_shape = grid.resampled_shape

    # 3. Brain bounding box + margin.
    brain = resampled[0] != 0
    for channel in resampled[1:]:
        brain |= channel != 0
    if not brain.any():
        raise DataError(f"{case_id}: every modality is zero everywhere; there is no brain to crop")
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(brain.any(axis=other))
        start.append(max(0, int(hits[0]) - cfg.crop_margin_vox))
        stop.append(min(resampled_shape[axis], int(hits[-1]) + 1 + cfg.crop_margin_vox))
    crop = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    brain = brain[crop]
    cropped = resampled[(slice(None), *crop)]

    # 4. Z-score on brain voxels; background stays exactly 0. Each channel's float32 scores are
    # zeroed outside the brain in place; storing them as float16 is a torch copy: the same
    # round-to-nearest-even as numpy's cast, bit for bit, without its slow scalar loop.
    import torch

    out_dtype = np.dtype(cfg.storage_dtype)
    normalised = np.empty(cropped.shape, dtype=out_dtype)
    outside = ~brain
    means, stds = [], []
    for channel, modality in enumerate(CANONICAL_MODALITIES):
        values = cropped[channel][brain]
        mean = float(values.mean(dtype=np.float64))
        std = float(values.std(dtype=np.float64))
        means.append(mean)
        stds.append(std)
        if std <= 1e-6 * max(abs(mean), 1.0):
            log.warning("%s: %s is constant inside the brain; its channel is left at 0", case_id, modality)
            normalised[channel] = 0
            continue
        scored = (cropped[channel] - np.float32(mean)) * np.float32(1.0 / std)
        if out_dtype == np.float16:
            limit = float(np.finfo(np.float16).max)
            np.clip(scored, -limit, limit, out=scored)
        np.copyto(scored, np.float32(0.0), where=outside)
        torch.from_numpy(normalised[channel]).copy_(torch.from_numpy(scored))

    has_label = labels is not None
    if has_label:
        ras_labels = _reorient(np.asarray(labels, dtype=np.uint8), grid.to_ras)
        label = np.ascontiguousarray(resize_labels(ras_labels, resampled_shape, cfg.label_resampling)[crop])
        tumour_voxels = int(np.count_nonzero(labels))
    else:
        label = np.zeros(brain.shape, dtype=np.uint8)
        tumour_voxels = 0
    voxel_ml = abs(float(np.linalg.det(grid.affine[:3, :3]))) / 1000.0

    geometry: dict[str, Any] = {
        "format": GEOMETRY_FORMAT,
        "case_id": case_id,
        "patient_id": source["patient_id"],
        "layout": source["layout"],
        "label_convention": source["label_convention"],
        "has_label": has_label,
        "source_shape": list(grid.shape),
        "source_affine": _as_list(grid.affine),
        "source_orientation": source["source_orientation"],
        "source_spacing_mm": list(source["source_spacing_mm"]),
        "ras_shape": list(grid.ras_shape),
        "ras_affine": _as_list(grid.ras_affine),
        "target_spacing_mm": list(grid.target),
        "resampled_shape": list(resampled_shape),
        "resampled_spacing_mm": list(spacing_from_affine(grid.resampled_affine)),
        "resampled_affine": _as_list(grid.resampled_affine),
        "crop_bbox": {"start": start, "stop": stop},
        "preprocessed_shape": list(brain.shape),
        "preprocessed_affine": _as_list(_shift_affine(grid.resampled_affine, tuple(start))),
        "normalization": {"channels": list(CANONICAL_MODALITIES), "mean": means, "std": stds},
        "image_interpolation_order": cfg.image_interpolation_order,
        "tumour_voxels": tumour_voxels,
        "tumour_volume_ml": round(tumour_voxels * voxel_ml, 4),
        "source_sha256": dict(source["source_sha256"]),
        "preprocess": _content_parameters(cfg),
    }
    return PreprocessedCase(
        image=normalised, label=label, brain=np.ascontiguousarray(brain), geometry=geometry
    )


@dataclass
class DecodedCase:
    """A case read from disk and reoriented, not yet resampled: what :func:`decode_case` returns.

    Decoding uses no torch, so it may run in any thread (e.g. reading the next case of a folder
    while the current one is inferred); :meth:`preprocess` resamples with torch and belongs in the
    thread that runs torch.

    Attributes:
        grid: the source grid (T1 header), or None when the case went through :func:`read_case`.
        channels: modality -> RAS float32 volume at full resolution.
        source: the geometry entries describing where the case came from.
        labels: canonical source labels, or None.
        volumes: the :func:`read_case` result for the cases the threaded path declines (else None).
    """

    grid: SourceGrid | None
    channels: dict[str, np.ndarray]
    source: dict[str, Any]
    labels: np.ndarray | None = None
    volumes: CaseVolumes | None = None

    def preprocess(self, cfg: PreprocessConfig) -> PreprocessedCase:
        """Resample the channels one by one (each full-resolution volume released once done), crop, z-score.

        Raises:
            DataError: NaN/inf voxels, or no brain.
        """
        if self.volumes is not None:
            return preprocess_case(self.volumes, cfg)
        assert self.grid is not None
        channels = []
        for modality in CANONICAL_MODALITIES:
            channels.append(
                resize(self.channels.pop(modality), self.grid.resampled_shape, cfg.image_interpolation_order)
            )
        return crop_and_normalise(np.stack(channels), self.grid, self.source, self.labels, cfg)


def decode_case(
    case: CaseFiles, cfg: PreprocessConfig, *, labels: bool = True, sha256: bool = True
) -> DecodedCase:
    """Read a case's files, each inflated, decoded, reoriented and converted to float32 in its own thread.

    No torch runs here (see :func:`read_preprocessed`). Cases this path does not take (an MSD 4-D
    image, a file that does not decode, a wrong dimensionality, shapes that differ) go through
    :func:`read_case`, which raises its one-line :class:`DataError` naming the file, or reads what
    this path declined.

    Args: as :func:`read_preprocessed`.

    Raises:
        DataError: missing/unreadable file, wrong dimensionality, differing shapes, label values
            outside the convention, NaN/inf voxels.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tumorseg.data.layouts import encode_labels, read_nifti, squeeze_trailing

    if not labels and case.has_seg:
        case = dataclasses.replace(case, paths={**case.paths, "seg": None})
    files = case.unique_files()

    def fallback() -> DecodedCase:
        return DecodedCase(None, {}, {}, volumes=read_case(case))

    if case.missing or case.layout == "msd" or any(len(keys) != 1 for keys in files.values()):
        return fallback()
    try:
        header = nib.load(str(case.paths["t1"])).header
        grid = SourceGrid.of(header.get_best_affine(), header.get_data_shape(), cfg)
    except Exception:  # noqa: BLE001 - read_case names the file and the problem
        return fallback()

    def decode(key: str) -> tuple[str, np.ndarray, str] | None:
        """``(key, RAS float32 channel or source labels, sha256)``; None when read_case must decide."""
        try:
            nifti = read_nifti(case.paths[key], sha256=sha256)
        except DataError:
            return None
        data = squeeze_trailing(nifti.data, 3)
        if data.shape != grid.shape or (key == "t1" and not np.array_equal(nifti.affine, grid.affine)):
            return None
        if key == "seg":
            return key, data, nifti.sha256
        return key, ras_float32(data, grid, case_id=case.case_id, modality=key), nifti.sha256

    keys = [keys[0] for keys in files.values()]
    with ThreadPoolExecutor(max_workers=len(keys), thread_name_prefix="tumorseg-read") as pool:
        results = list(pool.map(decode, keys))
    if any(result is None for result in results):
        return fallback()
    decoded = {key: array for key, array, _ in results}  # type: ignore[misc]
    digests = {key: digest for key, _, digest in results}  # type: ignore[misc]
    del results
    source_labels = None
    if "seg" in decoded:
        try:
            source_labels = encode_labels(decoded.pop("seg"), case.label_convention)
        except ValueError as exc:
            raise DataError(f"{case.case_id}: {case.paths['seg'].name}: {exc}") from None
    source = {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "layout": case.layout,
        "label_convention": case.label_convention,
        "source_orientation": orientation_code(grid.affine),
        "source_spacing_mm": [float(s) for s in spacing_from_affine(grid.affine)],
        "source_sha256": digests,
    }
    return DecodedCase(grid, decoded, source, source_labels)


def read_preprocessed(
    case: CaseFiles, cfg: PreprocessConfig, *, labels: bool = True, sha256: bool = True
) -> PreprocessedCase:
    """Read a case from disk and preprocess it, never holding its full-resolution float image.

    Same result as ``preprocess_case(read_case(case), cfg)``, from the same functions: each modality
    file is inflated, decoded, reoriented and converted to float32 in its own thread
    (:func:`decode_case`, with the grid of the T1 header; none of it holds the GIL for long), then
    this thread resamples the channels (:func:`resize`) one by one, releasing each full-resolution
    volume as soon as it is resampled (:meth:`DecodedCase.preprocess`). Torch runs in its own thread
    pool only: torch called from the reading threads would start an OpenMP team per thread, and
    those teams slow down the inference that follows, or, while other threads still inflate, the
    resampling itself.

    Args:
        case: the files.
        cfg: the ``preprocess`` section.
        labels: also read ``seg`` when the case has one (False: prediction, the image alone).
        sha256: hash the files (``source_sha256`` in the geometry; False leaves it empty: prediction
            keeps no provenance of its input).

    Raises:
        DataError: missing/unreadable file, wrong dimensionality, differing shapes, label values
            outside the convention, NaN/inf voxels, no brain.
    """
    return decode_case(case, cfg, labels=labels, sha256=sha256).preprocess(cfg)


def restore_to_source(volume: np.ndarray, geometry: dict[str, Any], *, is_label: bool) -> np.ndarray:
    """Map a volume on the preprocessed grid back onto the source file's voxel grid.

    Uncrops with zeros, resamples back to the RAS source grid (nearest for labels, trilinear for
    probabilities), then undoes the reorientation. The result lines up voxel for voxel with the
    source NIfTI, so it can be saved with ``geometry["source_affine"]``.

    Args:
        volume: label map ``(X, Y, Z)`` (any integer dtype, kept) or probability/score map
            ``(C, X, Y, Z)`` (or ``(X, Y, Z)``), with ``(X, Y, Z) == geometry["preprocessed_shape"]``.
        geometry: the dict from :func:`preprocess_case` (or its JSON file).
        is_label: nearest-neighbour resampling and dtype kept; else trilinear in float32.

    Returns:
        Array of spatial shape ``geometry["source_shape"]`` in the source orientation, with the
        leading channel axis kept.

    Raises:
        ValueError: the volume's spatial shape is not the preprocessed shape.
    """
    volume = np.asarray(volume)
    expected = tuple(geometry["preprocessed_shape"])
    if volume.ndim not in (3, 4) or tuple(volume.shape[-3:]) != expected:
        raise ValueError(f"volume has shape {volume.shape}; expected (..., {', '.join(map(str, expected))})")
    if not is_label:
        volume = volume.astype(np.float32, copy=False)
    start, stop = geometry["crop_bbox"]["start"], geometry["crop_bbox"]["stop"]
    full = np.zeros((*volume.shape[:-3], *geometry["resampled_shape"]), dtype=volume.dtype)
    full[(Ellipsis, *(slice(a, b) for a, b in zip(start, stop, strict=True)))] = volume
    if is_label:
        # Labels are restored in NIfTI's column-major order (through the reversed view), so writing
        # them needs no transposing copy; nearest-neighbour values do not depend on the order.
        ras = resize(full.T, tuple(geometry["ras_shape"])[::-1], order=0).T
    else:
        ras = resize(full, tuple(geometry["ras_shape"]), order=1)
    from_ras = ornt_transform(_RAS, io_orientation(np.asarray(geometry["source_affine"], dtype=np.float64)))
    restored = _reorient(ras, from_ras, order="K" if is_label else "C")
    if tuple(restored.shape[-3:]) != tuple(geometry["source_shape"]):
        raise ValueError(
            f"restored shape {restored.shape[-3:]} is not the source shape {geometry['source_shape']}"
        )
    return restored


def restored_label_counts(
    labels: np.ndarray, geometry: dict[str, Any], codes: tuple[int, ...]
) -> dict[int, int]:
    """Voxels of each code in ``restore_to_source(labels, geometry, is_label=True)``, without restoring.

    Nearest-neighbour restoration copies preprocessed voxel ``(i, j, k)`` to
    ``copies_x[i] * copies_y[j] * copies_z[k]`` source voxels (each axis's count of source voxels
    that pick it), uncropping adds only background and reorientation moves voxels without adding
    any: so the counts are exact, from the small grid (a tenth of the voxels at 2 mm).

    Args:
        labels: integer map ``(X, Y, Z)`` on ``geometry["preprocessed_shape"]``.
        geometry: the dict from :func:`preprocess_case`.
        codes: the label values to count.
    """
    start, stop = geometry["crop_bbox"]["start"], geometry["crop_bbox"]["stop"]
    copies = [
        np.bincount(_nearest_indices(n_in, n_out), minlength=n_in)[a:b]
        for n_in, n_out, a, b in zip(
            geometry["resampled_shape"], geometry["ras_shape"], start, stop, strict=True
        )
    ]
    weights = copies[0][:, None, None] * copies[1][None, :, None] * copies[2][None, None, :]
    return {code: int(weights[labels == code].sum()) for code in codes}


# ---------------------------------------------------------------------------- dataset
def _content_parameters(cfg: PreprocessConfig) -> dict[str, Any]:
    """The parameters that change the arrays' values (not ``workers``; the npz compression is checked apart)."""
    return cfg.model_dump(mode="json", exclude={"workers", "compress_npz"})


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
        or geometry.get("preprocess") != _content_parameters(cfg)
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

    A case is skipped when its npz and JSON exist and the JSON records the same source sha256 values
    and parameters. Files of cases that are no longer ok are removed from ``out_dir/cases``. Every
    file is written to a temporary name and renamed, so an interrupted run leaves no half file.
    Cases run in ``cfg.workers`` processes (:func:`~tumorseg.data.parallel.map_cases`), with
    progress on long runs; the outputs do not depend on the worker count.

    Args:
        src_dir: folder with the validated ``manifest.csv``.
        out_dir: output folder (``cases/``, ``index.csv``).
        cfg: the ``preprocess`` section of params.yaml.
        planar_cfg: the ``preprocess_2d`` section (defaults when None), used instead of ``cfg`` when the
            manifest is a 2-D one (Figshare/Kaggle): see :mod:`tumorseg.data.planar_dataset`.

    Raises:
        DataError: no ok case; a source file changed since ingest; a case that cannot be read.
    """
    begin = time.perf_counter()
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    manifest = read_manifest(src_dir)
    if is_planar_manifest(manifest):
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
    processed = skipped = 0
    stored_bytes = 0
    work = partial(preprocess_one, cases_dir=cases_dir, cfg=cfg)
    ordered = sorted(rows, key=lambda r: r["case_id"])
    results = map_cases(work, ordered, workers=cfg.workers, what="preprocess")
    for row, (geometry, computed) in zip(ordered, results, strict=True):
        index.append(_index_row(geometry, row))
        processed += computed
        skipped += not computed
        stored_bytes += (cases_dir / f"{geometry['case_id']}.npz").stat().st_size

    removed = _remove_stale(cases_dir, {row["case_id"] for row in index})
    atomic_write_text(out_dir / INDEX_NAME, pd.DataFrame(index, columns=INDEX_COLUMNS).to_csv(index=False))
    summary = PreprocessSummary(
        out_dir=out_dir,
        cases=len(index),
        processed=processed,
        skipped=skipped,
        removed=removed,
        seconds=time.perf_counter() - begin,
        stored_bytes=stored_bytes,
    )
    log.debug(summary.one_line())
    return summary


def preprocess_one(
    row: dict[str, str], *, cases_dir: Path, cfg: PreprocessConfig
) -> tuple[dict[str, Any], bool]:
    """Preprocess one manifest row into ``cases_dir`` (runs in a worker process).

    Returns:
        The case's geometry, and whether it was computed (False: its outputs were up to date).
    """
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
