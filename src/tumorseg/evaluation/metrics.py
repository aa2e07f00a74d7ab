"""Voxel-overlap and surface-distance metrics of one binary region, as the BraTS 2023 evaluator computes them.

Masks are bool ``(H, W, D)``, spacing the NIfTI zooms, so distances are in mm. Surfaces follow the
official code (``rachitsaluja/BraTS-2023-Metrics``, ``surface_distance/metrics.py``, DeepMind's
``surface-distance``): corner surfels weighted by their marching-cubes area, HD95 the
**area-weighted** 95th percentile. MONAI's ``HausdorffDistanceMetric`` takes an unweighted
percentile of voxel-centre distances, other numbers, so it is not used. The empty-mask rules and
the HD95 penalty are tabulated in ``docs/evaluation.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
from scipy.spatial import cKDTree

HD_PERCENTILE = 95.0
"""The robust Hausdorff percentile of BraTS (``compute_robust_hausdorff(surface_distances, 95)``)."""

OVERLAP_METRICS: tuple[str, ...] = ("dice", "iou", "precision", "sensitivity", "specificity")

# MONAI compute_confusion_matrix_metric names
_MONAI_METRIC_NAMES: dict[str, str] = {
    "dice": "f1 score",
    "iou": "threat score",
    "precision": "precision",
    "sensitivity": "sensitivity",
    "specificity": "specificity",
}

# 2x2x2 neighbourhood code weights: the official correlation kernel (MONAI's ENCODING_KERNEL[3])
_CODE_WEIGHTS = np.array([[[128, 64], [32, 16]], [[8, 4], [2, 1]]], dtype=np.uint8)


@dataclass(frozen=True)
class SurfaceDistances:
    """Directed distances between two masks' surfaces: ``ref_to_pred`` ``(N_ref,)`` mm from each
    reference surfel to the predicted surface, ascending (ties by area, as the official sort; ``inf`` to
    an empty mask), ``ref_areas`` their mm², and the same from the predicted side."""

    ref_to_pred: np.ndarray
    ref_areas: np.ndarray
    pred_to_ref: np.ndarray
    pred_areas: np.ndarray


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every true voxel, grown by ``margin`` (clipped); None if empty."""
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
    """Area in mm² of the surface patch of each of the 256 neighbourhood codes, in float64 from MONAI's
    private normals table (its public one is float32, which moves weighted percentiles on boundaries)."""
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
    """uint8 ``(h + 1, w + 1, d + 1)`` 2x2x2 code of every corner of a bool ``(h, w, d)`` mask (0 outside,
    255 inside, else surface), as the official ``ndimage.correlate`` of the zero-padded crop."""
    padded = np.pad(mask.astype(np.uint8), 1)
    n0, n1, n2 = (s + 1 for s in mask.shape)
    codes = np.zeros((n0, n1, n2), dtype=np.uint8)
    for a, b, c in product((0, 1), repeat=3):
        codes += padded[a : a + n0, b : b + n1, c : c + n2] * _CODE_WEIGHTS[a, b, c]
    return codes


def surface_distances(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> SurfaceDistances:
    """Surfels of both bool ``(H, W, D)`` masks (cropped to their union box, as officially) and their
    distances to the other surface (mm)."""
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
        # The official code reads these off a distance transform of the crop; a KD-tree gives the
        # same distances without a transform of a box that false positives may spread over the brain.
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
    """Area-weighted percentile Hausdorff distance (mm), larger direction; ``inf`` if one mask is empty."""
    if distances.ref_to_pred.size == 0 and distances.pred_to_ref.size == 0:
        return 0.0
    return max(
        _weighted_percentile(distances.ref_to_pred, distances.ref_areas, percent),
        _weighted_percentile(distances.pred_to_ref, distances.pred_areas, percent),
    )


def average_symmetric_surface_distance(distances: SurfaceDistances) -> float:
    """Average symmetric surface distance (mm), ``sum(a_i d_i) / sum(a_i)`` over both surfaces' surfels
    (official ``compute_average_surface_distance``, symmetric); ``inf`` if one mask is empty."""
    if distances.ref_to_pred.size == 0 and distances.pred_to_ref.size == 0:
        return 0.0
    if distances.ref_to_pred.size == 0 or distances.pred_to_ref.size == 0:
        return float("inf")
    weighted = np.sum(distances.ref_to_pred * distances.ref_areas) + np.sum(
        distances.pred_to_ref * distances.pred_areas
    )
    return float(weighted / (np.sum(distances.ref_areas) + np.sum(distances.pred_areas)))


def confusion_counts(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """int64 ``(R, 4)`` voxel TP, FP, TN, FN of bool ``(R, H, W, D)`` masks, MONAI's order (numpy: MONAI's
    ``get_confusion_matrix`` makes float tensors first, far slower at 1 mm; tests check both agree)."""
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
    """The :data:`OVERLAP_METRICS` of each region from ``(R, 4)`` counts, by MONAI (its NaN where a
    denominator is zero follows the documented empty rules)."""
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
    """Finite ``{"hd95", "assd"}`` (mm) of one region; ``penalty_mm`` where one mask is empty."""
    distances = surface_distances(ref, pred, spacing)
    hd95 = robust_hausdorff(distances)
    assd = average_symmetric_surface_distance(distances)
    return {"hd95": penalty_mm if np.isinf(hd95) else hd95, "assd": penalty_mm if np.isinf(assd) else assd}


PLANAR_OVERLAP = ("iou", "precision", "recall", "specificity", "f1", "pixel_accuracy")
"""The per-image overlap figures of 2-D segmentation besides Dice and HD95 (seeds 003, 004 report them)."""


def overlap_scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """IoU (Jaccard), precision, recall (sensitivity), specificity, F1 and pixel accuracy of 2-D binary
    masks, plus ``pixel_accuracy_empty``: what a prediction of nothing would score. A ratio whose
    denominator is empty is 1 when the other mask is empty too and 0 otherwise (Dice's rule here, so
    tumour-free images count). F1 equals Dice for binary masks."""
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    tp = float(np.count_nonzero(pred & ref))
    fp = float(np.count_nonzero(pred & ~ref))
    fn = float(np.count_nonzero(~pred & ref))
    tn = float(pred.size) - tp - fp - fn

    def ratio(num: float, den: float, other_empty: bool) -> float:
        return num / den if den else (1.0 if other_empty else 0.0)

    precision = ratio(tp, tp + fp, not ref.any())
    recall = ratio(tp, tp + fn, not pred.any())
    return {
        "iou": ratio(tp, tp + fp + fn, True),
        "precision": precision,
        "recall": recall,
        "specificity": ratio(tn, tn + fp, True),
        "f1": ratio(2 * tp, 2 * tp + fp + fn, True),
        "pixel_accuracy": (tp + tn) / float(pred.size),
        "pixel_accuracy_empty": (tn + fp) / float(pred.size),
    }


def segmentation_scores(
    pred: np.ndarray, ref: np.ndarray, penalty: float | None = None
) -> tuple[float, float]:
    """Dice and HD95 (pixels, MONAI: 2-D sources carry no spacing) of 2-D binary masks; ``penalty``
    (default: the image diagonal) is HD95 when one mask is empty."""
    pred, ref = np.asarray(pred) > 0, np.asarray(ref) > 0
    if penalty is None:
        penalty = float(np.hypot(*pred.shape))
    if not pred.any() and not ref.any():
        return 1.0, 0.0
    if not pred.any() or not ref.any():
        return 0.0, float(penalty)
    import torch
    from monai.metrics import compute_hausdorff_distance

    dice = 2.0 * float(np.sum(pred & ref)) / float(pred.sum() + ref.sum())
    pred_t, ref_t = torch.as_tensor(pred[None, None]), torch.as_tensor(ref[None, None])
    hd95 = compute_hausdorff_distance(pred_t, ref_t, include_background=True, percentile=95)
    return dice, float(hd95.reshape(-1)[0])
