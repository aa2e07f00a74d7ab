"""Grid geometry of preprocessing: reorientation, resampling, cropping, and their exact inverse.

:class:`SourceGrid` turns a source grid to RAS (flips and permutations only, exactly invertible) and
picks its grid at the target spacing (outer voxel edges shared, ``align_corners=False`` as nnU-Net);
:func:`restore_to_source` undoes it all from the geometry dict of :mod:`tumorseg.data.preprocessed_case`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from tumorseg.config import PreprocessConfig
from tumorseg.data.layouts import label_counts, spacing_from_affine

RAS = axcodes2ornt(("R", "A", "S"))  # the axis order of every preprocessed grid


# ---------------------------------------------------------------------------- reorientation
def reorient(volume: np.ndarray, transform: np.ndarray, dtype: Any = None, order: str = "C") -> np.ndarray:
    """Apply a nibabel orientation transform to the spatial axes of ``(X, Y, Z)`` or ``(C, X, Y, Z)``.

    An identity returns the volume itself (as ``dtype``). Otherwise the copy is C-ordered, or keeps the
    source's memory order with ``order="K"``: only for label maps, as trilinear resampling sums in
    memory order and images must give the same bits whatever the layout.
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
    """``np.array(view, dtype, order="C")`` of a 3-D view, twice as fast for a transpose (a BraTS
    volume flipped to RAS): copied plane by plane along the axis contiguous in neither, in cache."""
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


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source voxel of each output voxel when both grids share their outer edges (``nearest-exact``)."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)


def resize(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample the spatial axes of ``(X, Y, Z)`` or ``(C, X, Y, Z)`` to ``shape``, edges aligned.

    Output voxel ``j`` samples input position ``(j + 0.5) * n_in / n_out - 0.5`` (torch's
    ``align_corners=False``), edges extended. ``order``: 0 nearest (dtype kept), 1 trilinear, 2-3
    spline (float32). An unchanged shape returns the input itself.
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
    """Nearest :func:`resize`: one gather per axis, fastest-varying first (10x faster than ``np.ix_``)."""
    spatial = volume.shape[-3:]
    out = volume
    for axis in (2, 1, 0):
        if spatial[axis] != shape[axis]:
            out = np.take(out, nearest_indices(spatial[axis], shape[axis]), axis=volume.ndim - 3 + axis)
    return out


def _resize_trilinear(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear :func:`resize` with torch, float32; a NIfTI's column-major ``(C, X, Y, Z)`` is
    resampled as the C-contiguous ``(C, Z, Y, X)`` it is, without a transposing copy."""
    import torch

    spatial = volume.shape[-3:]
    reversed_view = np.transpose(volume, _reversed_axes(volume.ndim))
    if volume.dtype == np.float32 and reversed_view.flags.c_contiguous and not volume.flags.c_contiguous:
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
        [ndimage.zoom(c, zoom, np.float32, order, mode="nearest", grid_mode=True) for c in channels]
    )
    return out.reshape(*volume.shape[:-3], *shape)


def resize_labels(labels: np.ndarray, shape: tuple[int, ...], method: str) -> np.ndarray:
    """Resample a label map ``(X, Y, Z)`` to ``shape``; values stay within those present.

    ``onehot_linear`` (nnU-Net) keeps the label whose indicator interpolates highest, ties to the lower
    label; ``nearest`` picks one source voxel, half a voxel off centre at even ratios.
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
    """``(start, stop)`` of a non-empty 3-D ``mask``'s bounding box plus ``margin``, clipped."""
    start, stop = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        start.append(max(0, int(hits[0]) - margin))
        stop.append(min(mask.shape[axis], int(hits[-1]) + 1 + margin))
    return start, stop


@dataclass(frozen=True)
class SourceGrid:
    """Steps 1-2 for a source grid: its turn to RAS (``to_ras``, nibabel) and the grid at the
    ``target`` spacing; from the reference header only, so each modality resamples once decoded."""

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
        shape = tuple(int(n) for n in shape)
        affine = np.asarray(affine, dtype=np.float64)
        to_ras = ornt_transform(io_orientation(affine), RAS)
        ras_shape = tuple(shape[int(axis)] for axis in np.argsort(to_ras[:, 0]))
        ras_affine = affine @ inv_ornt_aff(to_ras, shape)
        ras_spacing = spacing_from_affine(ras_affine)
        target = tuple(float(t) for t in cfg.target_spacing_mm)
        resampled = tuple(
            max(1, int(np.floor(n * s / t + 0.5)))
            for n, s, t in zip(ras_shape, ras_spacing, target, strict=True)
        )
        resampled_affine = grid_affine(ras_affine, ras_shape, resampled)
        return cls(shape, affine, to_ras, ras_shape, ras_affine, target, resampled, resampled_affine)

    def as_stored(self, ras: np.ndarray) -> np.ndarray:
        """A view of an RAS volume on this grid in the file's axis order and direction: voxel for voxel
        the volume as stored (no copy; what features of the file as stored read)."""
        return apply_orientation(ras, ornt_transform(RAS, io_orientation(self.affine)))


# ---------------------------------------------------------------------------- the inverse
def restore_to_source(volume: np.ndarray, geometry: dict[str, Any], *, is_label: bool) -> np.ndarray:
    """Map a volume on the preprocessed grid back onto the source file's grid (uncrop with zeros,
    resample, undo the reorientation): save it with ``geometry["source_affine"]``.

    ``volume``: a label map ``(X, Y, Z)`` (``is_label``: nearest, dtype kept) or scores ``(C, X, Y, Z)``
    / ``(X, Y, Z)`` (trilinear, float32) of ``geometry["preprocessed_shape"]``, else a ValueError.
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
    """Voxels of each code in ``restore_to_source(labels, geometry, is_label=True)``, exact, from the
    small grid: nearest restoration copies voxel ``(i, j, k)`` ``copies_x[i] * copies_y[j] * copies_z[k]``
    times, uncropping adds background only."""
    start, stop = geometry["crop_bbox"]["start"], geometry["crop_bbox"]["stop"]
    copies = [
        np.bincount(nearest_indices(n_in, n_out), minlength=n_in)[a:b]
        for n_in, n_out, a, b in zip(
            geometry["resampled_shape"], geometry["ras_shape"], start, stop, strict=True
        )
    ]
    weights = copies[0][:, None, None] * copies[1][None, :, None] * copies[2][None, None, :]
    return {code: int(weights[labels == code].sum()) for code in codes}
