"""Voxel-overlap and surface-distance metrics of one binary region, as the BraTS 2023 evaluator computes them.

Every metric here compares a predicted mask with a reference mask of one region (WT, TC or ET) of
one case. Masks are bool arrays of shape ``(H, W, D)``; spacing is the voxel size in mm along
those three axes (the NIfTI header zooms), so every distance is in millimetres.

Surfaces follow the official BraTS 2023 code (``rachitsaluja/BraTS-2023-Metrics``,
``brats_2023_metrics/surface_distance/metrics.py``, itself DeepMind's ``surface-distance``):
surface elements ("surfels") sit on the corners of the voxel grid, each weighted by the area of
the marching-cubes surface patch its 2x2x2 neighbourhood code stands for, and the robust
Hausdorff distance is the **area-weighted** 95th percentile of each directed distance set, the
larger of the two directions. MONAI's ``HausdorffDistanceMetric(percentile=95)`` differs: it takes
the unweighted percentile of distances between voxel-centre edge voxels, which gives other numbers
on the same masks, so it is not used for HD95. The area table is MONAI's port of DeepMind's table.

Rules for empty and undefined cases (also tabulated in ``docs/evaluation.md``):

=============  ==========================  ==========================  ============================
metric         both masks empty            reference empty only        prediction empty only
=============  ==========================  ==========================  ============================
dice           1                           0                           0
iou            1                           0                           0
precision      1 (official code: 0)        0                           0
sensitivity    1 (as official)             0 (as official)             0
specificity    TN / (TN + FP); 1 when the reference covers the whole image (official: 0)
hd95           0 (as official)             penalty (official: 374 mm)  penalty
assd           0                           penalty                     penalty
=============  ==========================  ==========================  ============================

The penalty is the convention's ``hd95_penalty_mm`` (tumorseg/data/label_sets.yaml). The official code writes ``inf`` and
then replaces it with 374 (``results_df.replace(np.inf, 374)``); 373.13 mm, the diagonal of a
240x240x155 1-mm BraTS volume, is the value nnU-Net's BraTS helpers use instead.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

HD_PERCENTILE = 95.0
"""The robust Hausdorff percentile of BraTS (``compute_robust_hausdorff(surface_distances, 95)``)."""

OVERLAP_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "sensitivity", "specificity")

# MONAI's compute_confusion_matrix_metric names for each overlap metric.
_MONAI_METRIC_NAMES: dict[str, str] = {
    "dice": "f1 score",
    "iou": "threat score",
    "precision": "precision",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}

# 2x2x2 neighbourhood code weights: DeepMind's / the BraTS code's correlation kernel, which is also
# MONAI's ENCODING_KERNEL[3]; voxel (a, b, c) of the neighbourhood contributes bit _CODE_WEIGHTS[a, b, c].
_CODE_WEIGHTS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed distances between the surfaces of a reference and a predicted mask.

    Attributes:
        ref_to_pred: ``(N_ref,)`` float64, mm from each reference surfel to the predicted surface,
            sorted ascending (ties by area, as the official code sorts ``(distance, area)`` pairs).
        ref_areas: ``(N_ref,)`` surfel areas in mm², same order.
        pred_to_ref: ``(N_pred,)`` mm from each predicted surfel to the reference surface, sorted.
        pred_areas: ``(N_pred,)`` surfel areas in mm², same order.

    A mask without a surface (empty) has no surfels, and every distance *to* it is ``inf``.
    """

    ref_to_pred: np.ndarray
    ref_areas: np.ndarray
    pred_to_ref: np.ndarray
    pred_areas: np.ndarray


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every true voxel, grown by ``margin`` and clipped to the array.

    Args:
        mask: bool array of any dimensionality.
        margin: voxels added on each side.

    Returns:
        One slice per axis, or None for an empty mask.
    """
    box: list[slice] = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=others))
        if hits.size == 0:
            return None
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)


@functools.lru_cache(maxsize=32)
def _surfel_area_table(spacing: tuple[float, float, float]) -> np.ndarray:
    """Area in mm² of the surface patch of each of the 256 neighbourhood codes, for a voxel spacing.

    The normals come from MONAI's port of DeepMind's marching-cubes table (a private helper: the
    public ``create_table_neighbour_code_to_surface_area`` computes in float32, and the official
    code computes these areas in float64, which matters where a weighted percentile falls exactly
    on a boundary). The loop mirrors ``compute_surface_distances`` of the official code term by term.
    """
    from monai.metrics.utils import _get_neighbour_code_to_normals_table

    normals = _get_neighbour_code_to_normals_table().double().numpy()  # (256, 4, 3), zero-padded rows
    sx, sy, sz = spacing
    table = np.zeros(256)
    for code in range(256):
        total = 0.0
        for normal in normals[code]:
            scaled = np.array([normal[0] * sy * sz, normal[1] * sx * sz, normal[2] * sx * sy])
            total += np.linalg.norm(scaled)
        table[code] = total
    return table


def _neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """2x2x2 neighbourhood code of every voxel corner of a mask.

    Args:
        mask: bool ``(h, w, d)``.

    Returns:
        uint8 ``(h + 1, w + 1, d + 1)``: corner ``(i, j, k)`` sits between voxels ``i - 1`` and ``i``
        (and likewise on the other axes); code 0 is outside, 255 inside, anything else is surface.
        Equal to the official ``ndimage.correlate(cropmask, kernel, mode="constant")`` on the
        zero-padded crop, and to MONAI's subvoxel ``conv3d`` with ``ENCODING_KERNEL[3]``.
    """
    padded = np.pad(mask.astype(np.uint8), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                codes += padded[a : a + n0, b : b + n1, c : c + n2] * _CODE_WEIGHTS[a, b, c]
    return codes


def surface_distances(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> SurfaceDistances:
    """Surfels of both masks and their distances to the other surface, as the official BraTS code.

    Both masks are first cropped to their union bounding box (the official code does the same).

    Args:
        ref: reference mask, bool ``(H, W, D)``.
        pred: predicted mask, bool ``(H, W, D)``.
        spacing: voxel size in mm along the three axes.

    Returns:
        The two sorted directed distance sets with their surfel areas (see :class:`SurfaceDistances`).
    """
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    if ref.shape != pred.shape:
        raise ValueError(f"mask shapes differ: {ref.shape} vs {pred.shape}")
    spacing_mm = tuple(float(s) for s in spacing)
    empty = np.array([])
    box = bounding_box(ref | pred)
    if box is None:
        return SurfaceDistances(empty, empty, empty, empty)

    codes_ref = _neighbour_codes(ref[box])
    codes_pred = _neighbour_codes(pred[box])
    border_ref = (codes_ref != 0) & (codes_ref != 255)
    border_pred = (codes_pred != 0) & (codes_pred != 255)

    def nearest_distance(from_border: np.ndarray, to_border: np.ndarray) -> np.ndarray:
        # Exact Euclidean distance (mm) from each surfel of `from_border` to the nearest surfel of
        # `to_border`, inf when the latter has none. The official code reads it off a dense distance
        # transform of the crop; a KD-tree over the surfel coordinates gives the same distances
        # (as MONAI does on CPU) without a transform of the whole box, which is seconds on a 1-mm
        # volume when false positives spread the box over the brain.
        if not to_border.any():
            return np.full(int(np.count_nonzero(from_border)), np.inf)
        scale = np.asarray(spacing_mm)
        tree = cKDTree(np.argwhere(to_border) * scale)
        return tree.query(np.argwhere(from_border) * scale, k=1)[0]

    areas = _surfel_area_table(spacing_mm)  # type: ignore[arg-type]
    ref_to_pred = nearest_distance(border_ref, border_pred)
    pred_to_ref = nearest_distance(border_pred, border_ref)
    ref_areas = areas[codes_ref[border_ref]]
    pred_areas = areas[codes_pred[border_pred]]
    order_ref = np.lexsort((ref_areas, ref_to_pred))
    order_pred = np.lexsort((pred_areas, pred_to_ref))
    return SurfaceDistances(
        ref_to_pred[order_ref], ref_areas[order_ref], pred_to_ref[order_pred], pred_areas[order_pred]
    )


def _weighted_percentile(sorted_distances: np.ndarray, areas: np.ndarray, percent: float) -> float:
    # Official compute_robust_hausdorff: first surfel whose cumulative area share reaches percent/100.
    if sorted_distances.size == 0:
        return float("inf")
    cumulative = np.cumsum(areas) / np.sum(areas)
    index = int(np.searchsorted(cumulative, percent / 100.0))
    return float(sorted_distances[min(index, sorted_distances.size - 1)])


def robust_hausdorff(distances: SurfaceDistances, percent: float = HD_PERCENTILE) -> float:
    """Area-weighted percentile Hausdorff distance (mm), the larger of the two directions.

    Returns ``inf`` when either surface is missing (one mask empty) and 0 when both are: callers
    apply the documented rules (:func:`distance_metrics`).
    """
    if distances.ref_to_pred.size == 0 and distances.pred_to_ref.size == 0:
        return 0.0
    return max(
        _weighted_percentile(distances.ref_to_pred, distances.ref_areas, percent),
        _weighted_percentile(distances.pred_to_ref, distances.pred_areas, percent),
    )


def average_symmetric_surface_distance(distances: SurfaceDistances) -> float:
    """Average symmetric surface distance (mm): the area-weighted mean over the surfels of both surfaces.

    ``sum(a_i d_i) / sum(a_i)`` over reference and predicted surfels together, the symmetric form
    of the official ``compute_average_surface_distance`` (which returns the two directed means).
    Returns ``inf`` when one surface is missing, 0 when both are.
    """
    if distances.ref_to_pred.size == 0 and distances.pred_to_ref.size == 0:
        return 0.0
    if distances.ref_to_pred.size == 0 or distances.pred_to_ref.size == 0:
        return float("inf")
    weighted = np.sum(distances.ref_to_pred * distances.ref_areas) + np.sum(
        distances.pred_to_ref * distances.pred_areas
    )
    return float(weighted / (np.sum(distances.ref_areas) + np.sum(distances.pred_areas)))


def confusion_counts(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Voxel TP, FP, TN, FN of each region, in MONAI's ``get_confusion_matrix`` order.

    Counted on bool arrays with numpy rather than with ``get_confusion_matrix`` itself, which
    converts the volumes to float tensors first (about 1.5 s for a 1-mm BraTS case against a few
    ms here); the tests check both agree. The ratios are still MONAI's (:func:`overlap_metrics`).

    Args:
        pred: bool ``(R, H, W, D)``, one predicted mask per region.
        ref: bool ``(R, H, W, D)``, the reference masks.

    Returns:
        int64 ``(R, 4)``: tp, fp, tn, fn per region.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    total = int(np.prod(ref.shape[1:]))
    counts = np.zeros((ref.shape[0], 4), dtype=np.int64)
    for r in range(ref.shape[0]):
        tp = np.count_nonzero(pred[r] & ref[r])
        fp = np.count_nonzero(pred[r]) - tp
        fn = np.count_nonzero(ref[r]) - tp
        counts[r] = (tp, fp, total - tp - fp - fn, fn)
    return counts


def overlap_metrics(counts: np.ndarray) -> list[dict[str, float]]:
    """Dice, IoU, precision, sensitivity and specificity from confusion counts, empty cases resolved.

    MONAI's ``compute_confusion_matrix_metric`` returns NaN wherever a denominator is zero; those
    cells are replaced by the rules of the module docstring.

    Args:
        counts: ``(R, 4)`` tp, fp, tn, fn per region (:func:`confusion_counts`).

    Returns:
        One dict per region with the five metrics as floats.
    """
    import torch
    from monai.metrics import compute_confusion_matrix_metric

    matrix = torch.as_tensor(np.asarray(counts, dtype=np.float64))
    values = {
        name: compute_confusion_matrix_metric(monai_name, matrix).numpy()
        for name, monai_name in _MONAI_METRIC_NAMES.items()
    }
    rows: list[dict[str, float]] = []
    for r, (tp, fp, _tn, fn) in enumerate(np.asarray(counts)):
        ref_empty = tp + fn == 0
        pred_empty = tp + fp == 0
        row = {name: float(values[name][r]) for name in OVERLAP_METRICS}
        if ref_empty and pred_empty:
            row.update(dice=1.0, iou=1.0, precision=1.0, sensitivity=1.0)
        elif pred_empty:
            row["precision"] = 0.0
        elif ref_empty:
            row["sensitivity"] = 0.0
        if np.isnan(row["specificity"]):  # no reference-negative voxel at all
            row["specificity"] = 1.0
        rows.append(row)
    return rows


def distance_metrics(
    ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], penalty_mm: float
) -> dict[str, float]:
    """HD95 and ASSD (mm) of one region with the empty-mask rules applied.

    Args:
        ref: bool ``(H, W, D)``.
        pred: bool ``(H, W, D)``.
        spacing: voxel size in mm.
        penalty_mm: value for a missing surface (one mask empty).

    Returns:
        ``{"hd95": ..., "assd": ...}``, finite.
    """
    distances = surface_distances(ref, pred, spacing)
    hd95 = robust_hausdorff(distances)
    assd = average_symmetric_surface_distance(distances)
    return {
        "hd95": penalty_mm if np.isinf(hd95) else hd95,
        "assd": penalty_mm if np.isinf(assd) else assd,
    }
