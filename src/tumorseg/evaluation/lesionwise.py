"""Lesion-wise Dice and HD95, the ranking metrics of BraTS 2023 and BraTS 2024.

Two rule sets, chosen by a convention's ``rules`` (:mod:`tumorseg.data.conventions`);
:func:`case_lesion_wise` scores every region of a case by its convention,
:func:`lesion_wise_scores` scores one binary region by the 2023 rules.

**BraTS 2023** (``rachitsaluja/BraTS-2023-Metrics``,
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

**BraTS 2024** (``rachitsaluja/BraTS-2024-Metrics`` at ``9a0ab9c``, the commit the 2024 scorer
pins: ``metrics_GLI.py`` and ``metrics_PED.py``), per region, with the region's own dilation and
threshold (``label_sets.yaml``; GLI: dilation 5 for NETC and RC, 3 otherwise, the code's "SFNH"
spelling leaving SNFH at 3; threshold 10 for ET, 20 otherwise; PED: 5 and 10 everywhere):

1. ``save_tmp_files``: reference *and* prediction are merged by dilation alike (2023 step 2;
   ``get_GTseg_combinedByDilation``, ``get_Predseg_combinedByDilation``): a lesion is the set of
   mask voxels inside one 26-connected component of the dilated mask, numbered as cc3d numbers
   that component: by its first voxel in memory order, which is C order (scipy's dilation
   returns a C-ordered array) of the NIfTI data array. Only step 3 depends on the numbering.
2. Merged prediction lesions of ``voxel count <= threshold`` are deleted
   (``np.unique(..., return_counts=True)``; the count is in voxels, the reference threshold
   (2023 step 6) in mm³: the same number, the same test at BraTS's 1 mm isotropic spacing).
3. GLI only, NETC, SNFH, ET and RC (WT and TC skip it; PED has no such step): lesions of one tissue
   are grouped through the lesions of other tissues they touch (``combine_lesions_tissues`` ->
   ``combine_lesions_NETC`` / ``_ET`` / ``_RC`` / ``_SNFH``, then ``reorder_labels_nifti``).
   For each partner tissue in turn (NETC: ET, RC; ET: NETC, RC; RC: ET, NETC; SNFH: ET, RC,
   NETC), ``get_touching_labels`` lists the (lesion, partner lesion) pairs that touch (one
   18-neighbour dilation of either meets the other) and ``relabel_nifti_image`` gives every lesion
   the new label of the *lowest-numbered* partner lesion it touches, so lesions sharing that
   partner lesion become one (no transitive closure: A touching partners 1 and 2 and B touching
   only 2 stay apart). Partners are always the step-2 maps of the other tissues (the merged files
   are never read back as partners), so the official second pass of the loop repeats the first
   exactly and is done once here; the official ``len(touching_labels) > 1`` guard changes no
   grouping (one pair renames one lesion). Reference and prediction are grouped separately, each
   with its own maps.
4. Scoring as 2023 steps 3-7 on these lesions (``get_LesionWiseScores``,
   ``get_LesionWiseResults``): a reference lesion's dilated extent (the region's dilation) finds
   the prediction lesions it overlaps; false positives are counted per prediction lesion (after
   steps 1-3), not per component; reference lesions of volume <= threshold mm³ are not counted;
   the penalty is 337 mm for GLI (``replace(np.inf, 337)``) and 374 for PED.

The official 2024 table's ``Legacy_Dice`` / ``Legacy_HD95`` are computed on these filtered maps;
tumorseg's plain Dice and HD95 (:mod:`.metrics`) stay on the raw masks, only the lesion-wise
scores and counts follow 2024.

Shortcuts, exact by construction: the official code dilates each merged lesion again to find
its predicted matches; that dilation equals the lesion's connected component of the dilated
reference (dilation distributes over union, and each merged lesion is by definition one such
component; a 2024 group is a union of them), so the dilated components are reused. Everything is
computed inside bounding boxes grown by the dilation reach; a mask's components whose grown boxes
are far apart are dilated each inside its own box (:func:`_dilated_components`), so scattered
false positives do not make every dilation span the whole volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import product

import numpy as np
from scipy import ndimage
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from tumorseg.data.conventions import LabelConvention, RegionRule
from tumorseg.evaluation.metrics import bounding_box, robust_hausdorff, surface_distances

CONNECTIVITY_RANK: dict[int, int] = {6: 1, 18: 2, 26: 3}
"""Neighbourhood size -> ``generate_binary_structure(3, rank)`` rank."""

CROSS_TISSUE_MERGES: dict[str, dict[str, tuple[str, ...]]] = {
    # metrics_GLI.py @9a0ab9c, combine_lesions_tissues: tissue -> partner tissues, in call order.
    "glioma_post": {
        "NETC": ("ET", "RC"),  # combine_lesions_NETC
        "ET": ("NETC", "RC"),  # combine_lesions_ET
        "RC": ("ET", "NETC"),  # combine_lesions_RC
        "SNFH": ("ET", "RC", "NETC"),  # combine_lesions_SNFH
    },
}
"""BraTS 2024 cross-tissue lesion grouping, by label set; region names of the convention's
``scored``. Label sets not listed (PED's ``pediatric``) have none."""


@dataclass(frozen=True)
class Lesion:
    """One (merged) reference lesion and its score.

    Attributes:
        volume_mm3: reference lesion volume.
        counted: False when the lesion is at or below the minimum volume and left out.
        matched: labels of the predicted components (2024: prediction lesions) matched to it
            (empty: missed).
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
        n_fp: predicted components (2024: prediction lesions) matched to no reference lesion
            (``Num_FP``).
        lesions: every reference lesion, counted or not.
    """

    dice: float
    hd95: float
    n_ref: int
    n_tp: int
    n_fn: int
    n_fp: int
    lesions: tuple[Lesion, ...] = field(default=())


EMPTY_RESULT = LesionWiseResult(dice=1.0, hd95=0.0, n_ref=0, n_tp=0, n_fn=0, n_fp=0)
"""Nothing to count on either side (0 / 0): Dice 1, HD95 0."""


def _structure(connectivity: int) -> np.ndarray:
    return ndimage.generate_binary_structure(3, CONNECTIVITY_RANK[connectivity])


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(
        slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0]))
    )


def _score(
    pred_cc: np.ndarray,
    n_pred: int,
    lesion_cc: np.ndarray,
    extent_cc: np.ndarray,
    n_lesions: int,
    spacing: Sequence[float],
    min_volume_mm3: float,
    penalty_mm: float,
) -> LesionWiseResult:
    """Match, score and sum (2023 steps 3-7) on labelled arrays of one shape.

    Args:
        pred_cc: prediction components / lesions, labelled ``1..n_pred`` (0 background).
        n_pred: their number.
        lesion_cc: reference lesion voxels, labelled ``1..n_lesions``.
        extent_cc: each lesion's dilated extent, same labels (extents are disjoint).
        n_lesions: their number.
        spacing: voxel size in mm.
        min_volume_mm3: reference lesions at or below it are not counted.
        penalty_mm: HD95 of a missed lesion or a false positive.
    """
    if n_pred == 0 and n_lesions == 0:
        return EMPTY_RESULT
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
    # Which predicted lesions touch which lesion's dilated extent, in one pass.
    touching = (extent_cc > 0) & (pred_cc > 0)
    pairs = np.unique(extent_cc[touching].astype(np.int64) * (n_pred + 1) + pred_cc[touching])
    matched_by_lesion: dict[int, list[int]] = {k: [] for k in range(1, n_lesions + 1)}
    for code in pairs.tolist():
        matched_by_lesion[code // (n_pred + 1)].append(code % (n_pred + 1))
    matched_any = {c for comps in matched_by_lesion.values() for c in comps}
    n_fp = n_pred - len(matched_any)

    lesion_boxes = ndimage.find_objects(extent_cc, max_label=n_lesions)
    pred_boxes = ndimage.find_objects(pred_cc, max_label=n_pred)
    lesion_volumes = np.bincount(lesion_cc.ravel(), minlength=n_lesions + 1)[1:] * voxel_mm3

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
        return EMPTY_RESULT
    pred, ref = pred[box], ref[box]
    pred_cc, n_pred = ndimage.label(pred, structure=_structure(connectivity))
    merged = _MergedLesions.of(ref, dilation_iterations, dilation_connectivity, connectivity)
    lesion_cc, extent_cc = merged.paste(ref.shape, tuple(slice(0, n) for n in ref.shape))
    return _score(pred_cc, n_pred, lesion_cc, extent_cc, merged.n, spacing, min_volume_mm3, penalty_mm)


# ---------------------------------------------------------------- BraTS 2024
MAX_PIECES = 2000
"""Above this many components a mask is dilated as a whole, not cluster by cluster."""


def _dilated_components(
    mask: np.ndarray, dilation: int, dilation_connectivity: int, connectivity: int
) -> tuple[np.ndarray, int]:
    """Components of the mask's dilation, labelled ``1..n`` in no particular order.

    Components of the mask whose boxes, grown by the dilation reach, come within one voxel of each
    other are clustered, and each cluster is dilated and labelled inside its own box: dilations of
    different clusters can neither overlap nor touch, so the result is that of dilating the whole
    mask, at a cost that follows the clusters, not the box of a mask with scattered components.
    """
    label_structure = _structure(connectivity)
    if dilation == 0:
        return ndimage.label(mask, structure=label_structure)
    dilation_structure = _structure(dilation_connectivity)
    pieces, n_pieces = ndimage.label(mask, structure=label_structure)
    if n_pieces <= 1 or n_pieces > MAX_PIECES:
        whole = ndimage.binary_dilation(mask, structure=dilation_structure, iterations=dilation)
        return ndimage.label(whole, structure=label_structure)
    boxes = ndimage.find_objects(pieces)
    lo = np.array([[s.start for s in b] for b in boxes])
    hi = np.array([[s.stop for s in b] for b in boxes])
    reach = 2 * dilation  # per-axis gap (first voxel of one - end of the other) still possibly touching
    near = np.all((lo[:, None] - hi[None] <= reach) & (lo[None] - hi[:, None] <= reach), axis=2)
    n_clusters, cluster_of = connected_components(csr_matrix(near), directed=False)
    if n_clusters == 1:
        whole = ndimage.binary_dilation(mask, structure=dilation_structure, iterations=dilation)
        return ndimage.label(whole, structure=label_structure)
    out = np.zeros(mask.shape, dtype=np.int32)
    total = 0
    shape = np.array(mask.shape)
    for cluster in range(n_clusters):
        members = np.flatnonzero(cluster_of == cluster)
        c_lo = np.maximum(lo[members].min(axis=0) - dilation - 1, 0)
        c_hi = np.minimum(hi[members].max(axis=0) + dilation + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(c_lo, c_hi, strict=True))
        piece = np.isin(pieces[box], members + 1)
        labels, k = ndimage.label(
            ndimage.binary_dilation(piece, structure=dilation_structure, iterations=dilation),
            structure=label_structure,
        )
        found = labels > 0
        out[box][found] = labels[found] + total
        total += k
    return out, total


@dataclass
class _MergedLesions:
    """Lesions of one mask merged by dilation, stored inside the mask's box grown by the reach.

    Attributes:
        box: the box, in the coordinates of the array the mask came from (None: empty mask).
        lesions: mask voxels labelled ``1..n`` by merged lesion (0 elsewhere), inside ``box``.
        extents: each lesion's dilated extent, same labels, inside ``box`` (None when not kept).
        n: number of lesions.
    """

    box: tuple[slice, ...] | None
    lesions: np.ndarray
    extents: np.ndarray | None
    n: int
    _voxels: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(
        cls,
        mask: np.ndarray,
        dilation: int,
        dilation_connectivity: int,
        connectivity: int,
        *,
        extents: bool = True,
    ) -> _MergedLesions:
        """Components of the dilated mask, numbered in C scan order of their first voxel (how cc3d
        numbers the C-ordered output of scipy's dilation); lesions = the mask voxels in each."""
        box = bounding_box(mask, margin=dilation + 1)
        if box is None:
            return cls(None, np.zeros((0, 0, 0), dtype=np.int32), None, 0)
        sub = mask[box]
        dilated, n = _dilated_components(sub, dilation, dilation_connectivity, connectivity)
        dilated = _in_scan_order(dilated, n)
        return cls(box, np.where(sub, dilated, 0), dilated if extents else None, n)

    def voxels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(N, 3)`` coordinates of the lesion voxels in the source array, and their labels."""
        if self._voxels is None:
            coords = np.argwhere(self.lesions)
            labels = self.lesions[tuple(coords.T)].astype(np.int64)
            if self.box is not None:
                coords += np.array([s.start for s in self.box])
            self._voxels = (coords, labels)
        return self._voxels

    def keep(self, kept: np.ndarray) -> _MergedLesions:
        """Only the lesions where ``kept[label]`` (index 0 unused), renumbered in order."""
        if kept[1:].all():
            return self
        new = np.zeros(self.n + 1, dtype=np.int32)
        new[1:][kept[1:]] = np.arange(1, int(np.count_nonzero(kept[1:])) + 1, dtype=np.int32)
        return self.relabel(new)

    def relabel(self, table: np.ndarray) -> _MergedLesions:
        """Lesion ``k`` becomes ``table[k]`` (0: deleted); the new labels must be ``1..max``."""
        if self.box is None or np.array_equal(table, np.arange(self.n + 1)):
            return self
        extents = None if self.extents is None else table[self.extents]
        return _MergedLesions(self.box, table[self.lesions], extents, int(table.max(initial=0)))

    def paste(self, shape: tuple[int, ...], box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(lesions, extents) as arrays of ``shape``, the sub-array ``box`` of the source (extents
        all 0 when not kept)."""
        lesions = np.zeros(shape, dtype=np.int32)
        extents = np.zeros(shape, dtype=np.int32)
        if self.box is not None and self.n > 0:
            target = tuple(
                slice(b.start - o.start, b.stop - o.start) for b, o in zip(self.box, box, strict=True)
            )
            lesions[target] = self.lesions
            if self.extents is not None:
                extents[target] = self.extents
        return lesions, extents


def _in_scan_order(labels: np.ndarray, n: int) -> np.ndarray:
    """Renumber ``1..n`` by each label's first voxel in C scan order (cc3d's numbering)."""
    if n < 2:
        return labels
    flat = labels.ravel()
    nonzero = np.flatnonzero(flat)
    _, first = np.unique(flat[nonzero], return_index=True)  # first position of label 1, 2, ...
    if np.all(first[1:] > first[:-1]):
        return labels
    table = np.zeros(n + 1, dtype=labels.dtype)
    table[1 + np.argsort(first, kind="stable")] = np.arange(1, n + 1, dtype=labels.dtype)
    return table[labels]


def _offsets(connectivity: int) -> np.ndarray:
    rank = CONNECTIVITY_RANK[connectivity]
    return np.array([d for d in product((-1, 0, 1), repeat=3) if 0 < sum(map(abs, d)) <= rank])


def _touching_pairs(x: _MergedLesions, y: _MergedLesions, connectivity: int) -> np.ndarray:
    """``(m, 2)`` distinct (x lesion, y lesion) pairs with a voxel of one a neighbour of a voxel of
    the other (``get_touching_labels``: one dilation of either meets the other)."""
    none = np.zeros((0, 2), dtype=np.int64)
    if x.box is None or y.box is None or x.n == 0 or y.n == 0:
        return none
    y_lo = np.array([s.start for s in y.box])
    y_shape = np.array(y.lesions.shape)
    coords, x_labels = x.voxels()
    near = np.all((coords >= y_lo - 1) & (coords <= y_lo + y_shape), axis=1)  # within a step of y's box
    coords, x_labels = coords[near] - y_lo, x_labels[near]
    codes: list[np.ndarray] = []
    for offset in _offsets(connectivity):
        moved = coords + offset
        inside = np.all((moved >= 0) & (moved < y_shape), axis=1)
        y_labels = y.lesions[tuple(moved[inside].T)].astype(np.int64)
        hit = y_labels > 0
        codes.append(x_labels[inside][hit] * (y.n + 1) + y_labels[hit])
    unique = np.unique(np.concatenate(codes))
    return np.stack([unique // (y.n + 1), unique % (y.n + 1)], axis=1)


def _group_across_tissues(
    tissue: _MergedLesions, partners: Sequence[_MergedLesions], connectivity: int
) -> _MergedLesions:
    """``combine_lesions_*`` + ``reorder_labels_nifti``: for each partner in turn, the groups of
    ``tissue`` whose lowest-numbered touching partner lesion is the same become one."""
    group = np.arange(tissue.n + 1)  # current group of each lesion
    for partner in partners:
        pairs = _touching_pairs(tissue, partner, connectivity)
        if len(pairs) == 0:
            continue
        lowest: dict[int, int] = {}  # group -> lowest touching partner lesion
        for lesion, other in pairs.tolist():
            g = int(group[lesion])
            lowest[g] = min(lowest.get(g, other), other)
        leader: dict[int, int] = {}  # partner lesion -> the group its touching groups join
        joined = {g: leader.setdefault(other, g) for g, other in sorted(lowest.items())}
        group = np.array([joined.get(int(g), int(g)) for g in group])
    # Renumber the groups 1..n (the order does not change any score).
    _, compact = np.unique(group, return_inverse=True)
    return tissue.relabel(compact.astype(np.int32))


def _brats2024(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    convention: LabelConvention,
    dilation_connectivity: int,
    connectivity: int,
) -> dict[str, LesionWiseResult]:
    rules = {rule.name: rule for rule in convention.scored}
    merges = CROSS_TISSUE_MERGES.get(convention.label_set.name, {})
    for tissue, partners in merges.items():
        missing = [name for name in (tissue, *partners) if name not in rules]
        if missing:
            raise ValueError(f"{convention.name}: cross-tissue grouping needs regions {', '.join(missing)}")

    def lesions_of(labels: np.ndarray, rule: RegionRule, is_pred: bool) -> _MergedLesions:
        merged = _MergedLesions.of(
            np.isin(labels, rule.codes),
            rule.dilation,
            dilation_connectivity,
            connectivity,
            extents=not is_pred,
        )
        if is_pred and merged.n:
            counts = np.bincount(merged.lesions.ravel(), minlength=merged.n + 1)
            merged = merged.keep(counts > rule.min_volume_mm3)  # voxels, as the official code
        return merged

    base = {
        (side, rule.name): lesions_of(labels, rule, side == "pred")
        for side, labels in (("pred", pred), ("ref", ref))
        for rule in convention.scored
    }
    results: dict[str, LesionWiseResult] = {}
    for rule in convention.scored:
        final = {}
        for side in ("pred", "ref"):
            lesions = base[(side, rule.name)]
            if rule.name in merges:
                partners = [base[(side, name)] for name in merges[rule.name]]
                lesions = _group_across_tissues(lesions, partners, dilation_connectivity)
            final[side] = lesions
        boxes = [m.box for m in final.values() if m.box is not None and m.n > 0]
        if not boxes:
            results[rule.name] = EMPTY_RESULT
            continue
        box = _union_box(boxes)
        shape = tuple(s.stop - s.start for s in box)
        pred_cc, _ = final["pred"].paste(shape, box)
        lesion_cc, extent_cc = final["ref"].paste(shape, box)
        results[rule.name] = _score(
            pred_cc,
            final["pred"].n,
            lesion_cc,
            extent_cc,
            final["ref"].n,
            spacing,
            rule.min_volume_mm3,
            convention.hd95_penalty_mm,
        )
    return results


def case_lesion_wise(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    convention: LabelConvention,
    *,
    dilation_connectivity: int = 18,
    connectivity: int = 26,
) -> dict[str, LesionWiseResult]:
    """Lesion-wise scores of every scored region of one case, by the convention's rules.

    Args:
        pred: predicted internal label volume, integer ``(H, W, D)`` in the convention's
            label-set codes, in the NIfTI data array's own axis order (as nibabel reads it): the
            2024 grouping can depend on how lesions are numbered, which follows the C scan order
            of that array as in the official code.
        ref: reference internal label volume, same shape and codes.
        spacing: voxel size in mm.
        convention: its ``scored`` regions (codes, dilation, threshold), ``rules`` (``brats2023``:
            :func:`lesion_wise_scores` on each region's mask; ``brats2024``: the 2024 algorithm of
            the module docstring, cross-tissue grouping per :data:`CROSS_TISSUE_MERGES`) and
            ``hd95_penalty_mm``.
        dilation_connectivity: neighbourhood of the dilation element, also the one that decides
            whether two lesions touch in 2024 (official: 18 for both).
        connectivity: neighbourhood of the connected components (official: 26).

    Returns:
        Region name -> result, in ``convention.scored`` order.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape or ref.ndim != 3:
        raise ValueError(f"expected two 3-D label arrays of one shape, got {pred.shape} and {ref.shape}")
    if convention.rules == "brats2023":
        return {
            rule.name: lesion_wise_scores(
                np.isin(pred, rule.codes),
                np.isin(ref, rule.codes),
                spacing,
                dilation_iterations=rule.dilation,
                dilation_connectivity=dilation_connectivity,
                connectivity=connectivity,
                min_volume_mm3=rule.min_volume_mm3,
                penalty_mm=convention.hd95_penalty_mm,
            )
            for rule in convention.scored
        }
    if convention.rules == "brats2024":
        # Crop to the labelled union box grown by the largest reach; C scan order, and so the
        # lesion numbering the grouping depends on, is the same in any box.
        reach = max((rule.dilation for rule in convention.scored), default=0)
        codes = sorted({c for rule in convention.scored for c in rule.codes})
        box = bounding_box(np.isin(pred, codes) | np.isin(ref, codes), margin=reach + 1)
        if box is None:
            return {rule.name: EMPTY_RESULT for rule in convention.scored}
        return _brats2024(pred[box], ref[box], spacing, convention, dilation_connectivity, connectivity)
    raise ValueError(f"{convention.name}: unknown lesion-wise rules {convention.rules!r}")
