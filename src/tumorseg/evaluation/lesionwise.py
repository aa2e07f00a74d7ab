"""Lesion-wise Dice and HD95, the ranking metrics of BraTS 2023.

Follows the official code step by step (``rachitsaluja/BraTS-2023-Metrics``,
``brats_2023_metrics/surface_distance/brats_metrics.py``: ``get_lesion_wise_score`` and
``get_lesion_wise_results``; ``eval.py`` in older commits), for one region of one case:

1. Connected components of the reference and of the prediction, 26-connected
   (``cc3d.connected_components(..., connectivity=26)``).
2. The reference mask is dilated ``dilation_iterations`` times (official: 3 for BraTS-GLI, SSA and
   PED, 1 for MEN and MET) with ``scipy.ndimage.generate_binary_structure(3, 2)``, the 18-neighbour
   3x3x3 cross-and-edges element; reference components whose dilations touch are merged into one
   lesion (``get_gt_seg_combined_by_dilation``). The reference voxels themselves are not changed.
3. A predicted component is matched to a reference lesion when it overlaps that lesion's dilated
   extent. It may match several lesions; all components matched to a lesion are scored together
   against it (Dice, and HD95 from the area-weighted surface distances of :mod:`.metrics`).
4. A reference lesion with no matched component scores Dice 0 and HD95 = penalty (``inf``
   replaced by 374 in the official code).
5. Predicted components matched to no lesion (including lesions too small to count) are false
   positives: each adds a 0 to the Dice sum and the penalty to the HD95 sum.
6. Reference lesions of volume <= ``min_volume_mm3`` (official: 50 mm³; ``gt_lesion_vol`` is
   voxels x the product of the zooms) are left out of the sums and counts; predictions matched to
   them are not false positives either.
7. Lesion-wise score = sum over counted lesions / (counted lesions + false positives); with
   nothing to count (0 / 0) Dice is 1 and HD95 is 0, as the official ``isnan`` fallbacks.

One shortcut, exact by construction: the official code dilates each merged lesion again to find
its predicted matches; that dilation equals the lesion's connected component of the dilated
reference (dilation distributes over union, and each merged lesion is by definition one such
component), so the dilated components are reused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from tumorseg.evaluation.metrics import bounding_box, robust_hausdorff, surface_distances

CONNECTIVITY_RANK: dict[int, int] = {6: 1, 18: 2, 26: 3}
"""Neighbourhood size -> ``generate_binary_structure(3, rank)`` rank."""


@dataclass(frozen=True)
class Lesion:
    """One (merged) reference lesion and its score.

    Attributes:
        volume_mm3: reference lesion volume.
        counted: False when the lesion is at or below the minimum volume and left out.
        matched: labels of the predicted components matched to it (empty: missed).
        dice: Dice of the lesion against its matched components.
        hd95: HD95 in mm (the penalty when missed).
    """

    volume_mm3: float
    counted: bool
    matched: tuple[int, ...]
    dice: float
    hd95: float


@dataclass(frozen=True)
class LesionWiseResult:
    """Lesion-wise scores of one region of one case.

    Attributes:
        dice: lesion-wise Dice (BraTS ``Lesion_Wise_Score_Dice``).
        hd95: lesion-wise HD95 in mm (``Lesion_Wise_Score_HD95``).
        n_ref: counted reference lesions.
        n_tp: counted reference lesions with at least one matched component (``Num_TP``).
        n_fn: counted reference lesions without one (``Num_FN``).
        n_fp: predicted components matched to no reference lesion (``Num_FP``).
        lesions: every reference lesion, counted or not.
    """

    dice: float
    hd95: float
    n_ref: int
    n_tp: int
    n_fn: int
    n_fp: int
    lesions: tuple[Lesion, ...] = field(default=())


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(
        slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0]))
    )


def lesion_wise_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    *,
    dilation_iterations: int = 3,
    dilation_connectivity: int = 18,
    connectivity: int = 26,
    min_volume_mm3: float = 50.0,
    penalty_mm: float = 374.0,
) -> LesionWiseResult:
    """Lesion-wise Dice and HD95 of one region, by the BraTS 2023 rules (module docstring).

    Args:
        pred: predicted mask, bool ``(H, W, D)``.
        ref: reference mask, bool ``(H, W, D)``.
        spacing: voxel size in mm.
        dilation_iterations: reference dilation used to merge nearby lesions and to match
            predictions (official: 3 for gliomas; 0 disables it).
        dilation_connectivity: neighbourhood of the dilation element (official: 18).
        connectivity: neighbourhood of the connected components (official: 26).
        min_volume_mm3: reference lesions at or below this volume are ignored (official: 50).
        penalty_mm: HD95 of a missed lesion or a false positive (official: 374).

    Returns:
        The scores, counts and per-lesion details.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    # Work inside the union box grown by the dilation reach (+1 so a dilation that reaches the
    # box edge is still one clipped only where the image itself ends, as in the official code).
    box = bounding_box(pred | ref, margin=dilation_iterations + 1)
    if box is None:
        return LesionWiseResult(dice=1.0, hd95=0.0, n_ref=0, n_tp=0, n_fn=0, n_fp=0)
    pred, ref = pred[box], ref[box]
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    label_structure = ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])

    pred_cc, n_pred = ndimage.label(pred, structure=label_structure)
    # Dilate and label the reference inside its own box grown by the dilation reach: exact for the
    # same reason as above, and much smaller than the union box when false positives spread it.
    extent_cc = np.zeros(ref.shape, dtype=np.int32)
    n_lesions = 0
    ref_box = bounding_box(ref, margin=dilation_iterations + 1)
    if ref_box is not None:
        ref_extent = ref[ref_box]
        if dilation_iterations > 0:
            dilation_structure = ndimage.generate_binary_structure(
                3, CONNECTIVITY_RANK[dilation_connectivity]
            )
            ref_extent = ndimage.binary_dilation(
                ref_extent, structure=dilation_structure, iterations=dilation_iterations
            )
        extent_cc[ref_box], n_lesions = ndimage.label(ref_extent, structure=label_structure)
    lesion_cc = np.where(ref, extent_cc, 0)  # merged reference lesions, labelled 1..n_lesions

    # Which predicted components touch which lesion's dilated extent, in one pass.
    touching = (extent_cc > 0) & (pred_cc > 0)
    pairs = np.unique(extent_cc[touching].astype(np.int64) * (n_pred + 1) + pred_cc[touching])
    matched_by_lesion: dict[int, list[int]] = {k: [] for k in range(1, n_lesions + 1)}
    for code in pairs.tolist():
        matched_by_lesion[code // (n_pred + 1)].append(code % (n_pred + 1))
    matched_any = {c for comps in matched_by_lesion.values() for c in comps}
    n_fp = n_pred - len(matched_any)

    lesion_boxes = ndimage.find_objects(extent_cc)
    pred_boxes = ndimage.find_objects(pred_cc)
    lesion_volumes = np.bincount(lesion_cc[ref], minlength=n_lesions + 1)[1:] * voxel_mm3

    lesions: list[Lesion] = []
    for k in range(1, n_lesions + 1):
        matched = tuple(matched_by_lesion[k])
        volume = float(lesion_volumes[k - 1])
        sub = _union_box([lesion_boxes[k - 1], *(pred_boxes[c - 1] for c in matched)])
        gt_k = lesion_cc[sub] == k
        pred_k = np.isin(pred_cc[sub], matched) if matched else np.zeros_like(gt_k)
        dice = 2.0 * np.count_nonzero(gt_k & pred_k) / (np.count_nonzero(gt_k) + np.count_nonzero(pred_k))
        hd95 = robust_hausdorff(surface_distances(gt_k, pred_k, spacing)) if matched else float("inf")
        lesions.append(
            Lesion(
                volume_mm3=volume,
                counted=volume > min_volume_mm3,
                matched=matched,
                dice=float(dice),
                hd95=penalty_mm if np.isinf(hd95) else float(hd95),
            )
        )

    counted = [lesion for lesion in lesions if lesion.counted]
    denominator = len(counted) + n_fp
    if denominator == 0:
        dice_score, hd95_score = 1.0, 0.0
    else:
        dice_score = sum(lesion.dice for lesion in counted) / denominator
        hd95_score = (sum(lesion.hd95 for lesion in counted) + n_fp * penalty_mm) / denominator
    n_tp = sum(1 for lesion in counted if lesion.matched)
    return LesionWiseResult(
        dice=float(dice_score),
        hd95=float(hd95_score),
        n_ref=len(counted),
        n_tp=n_tp,
        n_fn=len(counted) - n_tp,
        n_fp=n_fp,
        lesions=tuple(lesions),
    )
