"""Grid operations of preprocessing: reorientation, resampling, cropping, and their exact inverse.

Everything here is geometry on voxel grids, with no notion of a case, a label convention or a
file: :class:`SourceGrid` says how a source grid turns to RAS (axis flips and permutations only,
exactly invertible) and which grid at the target spacing it is resampled to (outer voxel edges
shared, ``align_corners=False`` as nnU-Net does); :func:`resize` / :func:`resize_labels` resample;
:func:`crop_box` finds the cropping box; :func:`restore_to_source` and
:func:`restored_label_counts` undo all of it from the geometry dict that
:func:`~tumorseg.data.preprocessed_case.crop_and_normalise` stores. One-case preprocessing
(:mod:`tumorseg.data.preprocessed_case`) composes these steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from tumorseg.config import PreprocessConfig
from tumorseg.data.layouts import label_counts, spacing_from_affine

RAS = axcodes2ornt(("R", "A", "S"))
"""nibabel orientation of the RAS axis order every preprocessed grid has."""


# ---------------------------------------------------------------------------- reorientation
def reorient(volume: np.ndarray, transform: np.ndarray, dtype: Any = None, order: str = "C") -> np.ndarray:
    """Apply a nibabel orientation transform to the spatial axes of ``(X, Y, Z)`` or ``(C, X, Y, Z)``.

    Already-RAS volumes come back as they are (no copy, memory layout kept; converted when ``dtype``
    asks for it). Flips and permutations are copied, converted to ``dtype`` in the same pass, into a
    C-contiguous array, or with ``order="K"`` one that keeps the source's memory order (for label
    maps, whose values do not depend on it; trilinear resampling sums in memory order, so images
    stay C-ordered here to give the same bits whatever the source's layout).
    """
    if np.array_equal(transform, RAS):
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


# ---------------------------------------------------------------------------- resampling
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


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
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
    if volume.shape[-3:] == shape:
        return volume
    if order == 0:
        return _resize_nearest(volume, shape)
    if order == 1:
        return _resize_trilinear(volume, shape)
    return _resize_spline(volume, shape, order)


def _resize_nearest(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour :func:`resize`: values and dtype kept.

    One gather per axis, the last (fastest-varying) axis first: the final, largest gather then
    copies whole slabs. Ten times faster than one fancy index over ``np.ix_`` at 240x240x155.
    """
    spatial = volume.shape[-3:]
    out = volume
    for axis in (2, 1, 0):
        if spatial[axis] != shape[axis]:
            out = np.take(out, nearest_indices(spatial[axis], shape[axis]), axis=volume.ndim - 3 + axis)
    return out


def _resize_trilinear(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear :func:`resize` with torch, float32; a NIfTI's column-major volume through its reversed view.

    Torch is imported on first use: it is slow to import.
    """
    import torch

    spatial = volume.shape[-3:]
    reversed_view = _reversed_contiguous(volume) if volume.dtype == np.float32 else None
    if reversed_view is not None:  # resample (C, Z, Y, X), then view it as (C, X, Y, Z) again
        batch = torch.from_numpy(reversed_view).reshape(1, -1, *spatial[::-1])
        out = torch.nn.functional.interpolate(batch, size=shape[::-1], mode="trilinear", align_corners=False)
        reversed_out = out.reshape(*volume.shape[:-3], *shape[::-1]).numpy()
        return np.ascontiguousarray(np.transpose(reversed_out, np.argsort(_reversed_axes(volume.ndim))))
    batch = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32)).reshape(1, -1, *spatial)
    out = torch.nn.functional.interpolate(batch, size=shape, mode="trilinear", align_corners=False)
    return out.reshape(*volume.shape[:-3], *shape).numpy()


def _resize_spline(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Spline (order 2-3) :func:`resize` with scipy, channel by channel, float32."""
    from scipy import ndimage

    spatial = volume.shape[-3:]
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


# ---------------------------------------------------------------------------- affines and boxes
def grid_affine(affine: np.ndarray, shape_in: tuple[int, ...], shape_out: tuple[int, ...]) -> np.ndarray:
    """Affine of the grid :func:`resize` produces from a grid with ``affine``."""
    scale = np.array([n_in / n_out for n_in, n_out in zip(shape_in, shape_out, strict=True)])
    voxel_map = np.eye(4)
    voxel_map[:3, :3] = np.diag(scale)
    voxel_map[:3, 3] = 0.5 * scale - 0.5
    return affine @ voxel_map


def shift_affine(affine: np.ndarray, start: tuple[int, ...]) -> np.ndarray:
    """Affine of the grid cropped from one with ``affine``, its first voxel at ``start``."""
    shift = np.eye(4)
    shift[:3, 3] = start
    return affine @ shift


def crop_box(mask: np.ndarray, margin: int) -> tuple[list[int], list[int]]:
    """``(start, stop)`` of the bounding box of a non-empty 3-D ``mask``, grown by ``margin`` voxels.

    The box is clipped to the grid, so a mask touching an edge gets no margin on that side.
    """
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        start.append(max(0, int(hits[0]) - margin))
        stop.append(min(mask.shape[axis], int(hits[-1]) + 1 + margin))
    return start, stop


@dataclass(frozen=True)
class SourceGrid:
    """Steps 1-2 for a source grid: how it turns to RAS and the target-spacing grid it is resampled to.

    It depends only on the reference modality's affine and shape, so every modality can be
    resampled with it on its own (:func:`~tumorseg.data.preprocessed_case.resample_modality`), as
    soon as its file is decoded.

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
        to_ras = ornt_transform(io_orientation(source_affine), RAS)
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
            resampled_affine=grid_affine(ras_affine, ras_shape, resampled_shape),
        )


# ---------------------------------------------------------------------------- the inverse
def restore_to_source(volume: np.ndarray, geometry: dict[str, Any], *, is_label: bool) -> np.ndarray:
    """Map a volume on the preprocessed grid back onto the source file's voxel grid.

    Uncrops with zeros, resamples back to the RAS source grid (nearest for labels, trilinear for
    probabilities), then undoes the reorientation. The result lines up voxel for voxel with the
    source NIfTI, so it can be saved with ``geometry["source_affine"]``.

    Args:
        volume: label map ``(X, Y, Z)`` (any integer dtype, kept) or probability/score map
            ``(C, X, Y, Z)`` (or ``(X, Y, Z)``), with ``(X, Y, Z) == geometry["preprocessed_shape"]``.
        geometry: the dict from :func:`~tumorseg.data.preprocessed_case.preprocess_case` (or its JSON file).
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
    from_ras = ornt_transform(RAS, io_orientation(np.asarray(geometry["source_affine"], dtype=np.float64)))
    restored = reorient(ras, from_ras, order="K" if is_label else "C")
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
        geometry: the dict from :func:`~tumorseg.data.preprocessed_case.preprocess_case`.
        codes: the label values to count.
    """
    start, stop = geometry["crop_bbox"]["start"], geometry["crop_bbox"]["stop"]
    copies = [
        np.bincount(nearest_indices(n_in, n_out), minlength=n_in)[a:b]
        for n_in, n_out, a, b in zip(
            geometry["resampled_shape"], geometry["ras_shape"], start, stop, strict=True
        )
    ]
    weights = copies[0][:, None, None] * copies[1][None, :, None] * copies[2][None, None, :]
    return {code: int(weights[labels == code].sum()) for code in codes}
