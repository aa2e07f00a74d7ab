"""One case through preprocessing: RAS, target spacing, brain crop, z-score, and its geometry.

:func:`crop_and_normalise` (steps 3-4 and the geometry dict) is shared with the threaded reader
(:mod:`tumorseg.data.threaded_reader`), which resamples each modality as soon as it is decoded, so
both paths give the same bits.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tumorseg.config import PreprocessConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.grid import SourceGrid, crop_box, reorient, resize, resize_labels, shift_affine
from tumorseg.data.layouts import CaseFiles, CaseVolumes, spacing_from_affine
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

GEOMETRY_FORMAT = 1  # version of the geometry JSON; bump when its keys change so old outputs are rebuilt


@dataclass
class PreprocessedCase:
    """One case on the preprocessed grid.

    Attributes:
        image: ``(4, X, Y, Z)`` z-scored t1, t1ce, t2, flair (``storage_dtype``), 0 outside the brain.
        label: ``(X, Y, Z)`` uint8 canonical labels (zeros without a segmentation).
        brain: ``(X, Y, Z)`` bool, voxels non-zero in any modality.
        geometry: JSON-ready dict with everything :func:`~tumorseg.data.grid.restore_to_source` needs.
    """

    image: np.ndarray
    label: np.ndarray
    brain: np.ndarray
    geometry: dict[str, Any]

    @property
    def has_label(self) -> bool:
        return bool(self.geometry["has_label"])


def content_parameters(cfg: PreprocessConfig) -> dict[str, Any]:
    """The parameters that change the arrays' values (not ``workers``; the npz compression is checked apart)."""
    return cfg.model_dump(mode="json", exclude={"workers", "compress_npz"})


def ras_float32(volume: np.ndarray, grid: SourceGrid, *, case_id: str, modality: str) -> np.ndarray:
    """Step 1 for one modality: finite check (else :class:`DataError`), reorientation to RAS as float32.

    An RAS volume keeps its memory order, so a NIfTI's column-major volume is resampled without a copy.
    """
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        bad = int(np.count_nonzero(~np.isfinite(volume)))
        raise DataError(f"{case_id}: {modality} has {bad} NaN/inf voxels; fix or exclude the case")
    return reorient(volume, grid.to_ras, np.float32)


def resample_modality(
    volume: np.ndarray, grid: SourceGrid, cfg: PreprocessConfig, *, case_id: str, modality: str
) -> np.ndarray:
    """Steps 1-2 for one modality ``(X, Y, Z)`` on ``grid``'s source grid (any dtype and memory order):
    float32 on ``grid.resampled_shape``; :class:`DataError` on NaN/inf voxels."""
    ras = ras_float32(volume, grid, case_id=case_id, modality=modality)
    return resize(ras, grid.resampled_shape, cfg.image_interpolation_order)


def preprocess_case(volumes: CaseVolumes, cfg: PreprocessConfig) -> PreprocessedCase:
    """Reorient, resample, crop and z-score one case read by :func:`~tumorseg.data.layouts.read_case`
    (see :mod:`tumorseg.data.preprocess`); :class:`DataError` on non-finite voxels or no brain."""
    grid = SourceGrid.of(volumes.affine, volumes.image.shape[1:], cfg)
    resampled = np.stack(
        [
            resample_modality(volumes.image[channel], grid, cfg, case_id=volumes.case_id, modality=modality)
            for channel, modality in enumerate(CANONICAL_MODALITIES)
        ]
    )
    source = source_fields(volumes, volumes.orientation, volumes.spacing, volumes.sha256)
    return crop_and_normalise(resampled, grid, source, volumes.labels, cfg)


def source_fields(
    case: CaseFiles | CaseVolumes, orientation: str, spacing: Iterable[float], sha256: dict[str, str]
) -> dict[str, Any]:
    """The geometry entries that describe where a case came from (ids, convention, orientation, hashes)."""
    return {
        "case_id": case.case_id,
        "patient_id": case.patient_id,
        "layout": case.layout,
        "label_convention": case.label_convention,
        "source_orientation": orientation,
        "source_spacing_mm": [float(s) for s in spacing],
        "source_sha256": dict(sha256),
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
        source: the geometry entries of where the case came from (:func:`source_fields`).
        labels: canonical uint8 ``(X, Y, Z)`` on the source grid, or None.

    Raises:
        DataError: no brain (every modality zero everywhere).
    """
    case_id = source["case_id"]
    brain = _brain_mask(resampled, case_id)
    start, stop = crop_box(brain, cfg.crop_margin_vox)
    crop = tuple(slice(a, b) for a, b in zip(start, stop, strict=True))
    brain = brain[crop]
    normalised, means, stds = _zscore(
        resampled[(slice(None), *crop)], brain, np.dtype(cfg.storage_dtype), case_id
    )
    label, tumour_voxels = _cropped_labels(labels, grid, crop, brain.shape, cfg)
    voxel_ml = abs(float(np.linalg.det(grid.affine[:3, :3]))) / 1000.0  # one source voxel
    geometry = {
        "format": GEOMETRY_FORMAT,
        "case_id": case_id,
        "patient_id": source["patient_id"],
        "layout": source["layout"],
        "label_convention": source["label_convention"],
        "has_label": labels is not None,
        **_grid_fields(grid, source, start, stop, brain.shape),
        "normalization": {"channels": list(CANONICAL_MODALITIES), "mean": means, "std": stds},
        "image_interpolation_order": cfg.image_interpolation_order,
        "tumour_voxels": tumour_voxels,
        "tumour_volume_ml": round(tumour_voxels * voxel_ml, 4),
        "source_sha256": dict(source["source_sha256"]),
        "preprocess": content_parameters(cfg),
    }
    return PreprocessedCase(normalised, label, np.ascontiguousarray(brain), geometry)


def _brain_mask(resampled: np.ndarray, case_id: str) -> np.ndarray:
    """Step 3's mask: voxels non-zero in any channel of ``(C, x, y, z)``; :class:`DataError` if none."""
    brain = resampled[0] != 0
    for channel in resampled[1:]:
        brain |= channel != 0
    if not brain.any():
        raise DataError(f"{case_id}: every modality is zero everywhere; there is no brain to crop")
    return brain


def _zscore(
    cropped: np.ndarray, brain: np.ndarray, out_dtype: np.dtype, case_id: str
) -> tuple[np.ndarray, list[float], list[float]]:
    """Step 4: each channel z-scored on the brain voxels, the background exactly 0; means and stds.

    The float16 cast is a torch copy (imported on first use): numpy's round-to-nearest-even bit for
    bit, without its slow scalar loop.
    """
    import torch

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
    return normalised, means, stds


def _cropped_labels(
    labels: np.ndarray | None,
    grid: SourceGrid,
    crop: tuple[slice, ...],
    shape: tuple[int, ...],
    cfg: PreprocessConfig,
) -> tuple[np.ndarray, int]:
    """The source labels through steps 1-3 (zeros of ``shape`` without labels), and the tumour voxels
    counted on the source grid (so its volume does not depend on the resampling)."""
    if labels is None:
        return np.zeros(shape, dtype=np.uint8), 0
    ras_labels = reorient(np.asarray(labels, dtype=np.uint8), grid.to_ras)
    resampled = resize_labels(ras_labels, grid.resampled_shape, cfg.label_resampling)
    return np.ascontiguousarray(resampled[crop]), int(np.count_nonzero(labels))


def _grid_fields(
    grid: SourceGrid, source: dict[str, Any], start: list[int], stop: list[int], shape: tuple[int, ...]
) -> dict[str, Any]:
    """The geometry entries of every grid a case passes through, source to cropped (JSON-ready)."""
    return {
        "source_shape": list(grid.shape),
        "source_affine": _as_list(grid.affine),
        "source_orientation": source["source_orientation"],
        "source_spacing_mm": list(source["source_spacing_mm"]),
        "ras_shape": list(grid.ras_shape),
        "ras_affine": _as_list(grid.ras_affine),
        "target_spacing_mm": list(grid.target),
        "resampled_shape": list(grid.resampled_shape),
        "resampled_spacing_mm": list(spacing_from_affine(grid.resampled_affine)),
        "resampled_affine": _as_list(grid.resampled_affine),
        "crop_bbox": {"start": start, "stop": stop},
        "preprocessed_shape": list(shape),
        "preprocessed_affine": _as_list(shift_affine(grid.resampled_affine, tuple(start))),
    }


def _as_list(array: np.ndarray) -> list[Any]:
    return np.asarray(array, dtype=np.float64).tolist()
