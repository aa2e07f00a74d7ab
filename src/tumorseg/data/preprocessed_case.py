"""One case through preprocessing: RAS, target spacing, brain crop, z-score, and its geometry.

:func:`preprocess_case` takes a case read whole; the threaded reader (:func:`read_preprocessed`, used
by ``predict`` and ``preprocess``) decodes each file in its own thread and resamples each modality as
soon as it is decoded, never holding a case's full-resolution float image. Both share
:func:`crop_and_normalise`, so they give the same bits.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nibabel as nib
import numpy as np

from tumorseg.config import PreprocessConfig
from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.grid import SourceGrid, crop_box, reorient, resize, resize_labels, shift_affine
from tumorseg.data.layouts import (
    CaseFiles,
    CaseVolumes,
    encode_labels,
    orientation_code,
    read_case,
    read_nifti,
    spacing_from_affine,
    squeeze_trailing,
)
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

GEOMETRY_FORMAT = 1  # version of the geometry JSON; bump when its keys change so old outputs are rebuilt


@dataclass
class PreprocessedCase:
    """One case on the preprocessed grid: ``image`` ``(4, X, Y, Z)`` z-scored t1, t1ce, t2, flair (0
    outside the brain), canonical ``label`` uint8 and ``brain`` bool ``(X, Y, Z)``, and the JSON-ready
    ``geometry`` :func:`~tumorseg.data.grid.restore_to_source` needs."""

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
    """Steps 3-4 on float32 ``resampled`` ``(4, x, y, z)``, the canonical ``labels`` ``(X, Y, Z)`` (or
    None) taken through steps 1-3, and the geometry; a DataError when every modality is zero."""
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
    The float16 cast is a torch copy when torch is loaded (numpy's rounding bit for bit, without its
    slow scalar loop); the torch-free ONNX predict path casts with numpy, to the same values."""
    torch = sys.modules.get("torch")
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
        if torch is not None:
            torch.from_numpy(normalised[channel]).copy_(torch.from_numpy(scored))
        else:
            normalised[channel] = scored
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


# ---------------------------------------------------------------------------- the threaded reader
@dataclass
class DecodedCase:
    """A case read and reoriented, not yet resampled (no torch, so any thread may decode it):
    ``channels`` modality -> RAS float32 at full resolution on ``grid`` (T1 header), or, for the cases
    the threaded path declines, ``volumes`` from :func:`read_case` (``grid`` None)."""

    grid: SourceGrid | None
    channels: dict[str, np.ndarray]
    source: dict[str, Any]
    labels: np.ndarray | None = None
    volumes: CaseVolumes | None = None

    def preprocess(self, cfg: PreprocessConfig) -> PreprocessedCase:
        """Resample (torch: call it from the torch thread; each full-resolution channel is released once
        resampled), crop and z-score; :class:`DataError` on NaN/inf voxels or no brain."""
        if self.volumes is not None:
            return preprocess_case(self.volumes, cfg)
        assert self.grid is not None
        shape, order = self.grid.resampled_shape, cfg.image_interpolation_order
        channels = [resize(self.channels.pop(modality), shape, order) for modality in CANONICAL_MODALITIES]
        return crop_and_normalise(np.stack(channels), self.grid, self.source, self.labels, cfg)


def decode_case(
    case: CaseFiles, cfg: PreprocessConfig, *, labels: bool = True, sha256: bool = True
) -> DecodedCase:
    """Read a case's files, each decoded, reoriented and made float32 in its own thread. Cases this path
    does not take (MSD 4-D images, undecodable files, wrong dimensionality, differing shapes) go
    through :func:`read_case`, which reads them or raises its one-line DataError."""
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
    source = source_fields(case, orientation_code(grid.affine), spacing_from_affine(grid.affine), digests)
    return DecodedCase(grid, decoded, source, source_labels)


def read_preprocessed(
    case: CaseFiles, cfg: PreprocessConfig, *, labels: bool = True, sha256: bool = True
) -> PreprocessedCase:
    """Read a case and preprocess it, never holding its full-resolution float image.

    Decoding (:func:`decode_case`) and torch's resampling stay in separate threads: torch called from
    the reading threads would start an OpenMP team per thread, slowing resampling and inference.
    ``labels=False`` skips ``seg`` and ``sha256=False`` the hashes (prediction). DataError: a missing,
    unreadable or mis-shaped file, labels outside the convention, NaN/inf voxels, no brain.
    """
    return decode_case(case, cfg, labels=labels, sha256=sha256).preprocess(cfg)
