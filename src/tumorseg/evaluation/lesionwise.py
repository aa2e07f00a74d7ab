"""Lesion-wise Dice and HD95, the ranking metrics of BraTS 2023 and 2024 (rules in ``docs/evaluation.md``).

Copies ``rachitsaluja/BraTS-2023-Metrics`` (``get_lesion_wise_score``) and ``BraTS-2024-Metrics``
@9a0ab9c (``metrics_GLI.py``, ``metrics_PED.py``), with exact shortcuts: a merged lesion's matches
come from its component of the dilated mask (the official code dilates it again, same result), and
everything runs in boxes grown by the dilation reach (:func:`_dilated_components`).
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
"""BraTS 2024 cross-tissue grouping by label set (PED's ``pediatric`` has none)."""


@dataclass(frozen=True)
class Lesion:
    """One (merged) reference lesion: ``counted`` above the minimum volume, ``matched``: labels of the
    predicted components (2024: lesions) matched to it, ``hd95`` in mm."""

    volume_mm3: float
    counted: bool
    matched: tuple[int, ...]
    dice: float
    hd95: float


@dataclass(frozen=True)
class LesionWiseResult:
    """Lesion-wise scores of one region of one case (BraTS ``Lesion_Wise_Score_*``, ``Num_TP/FN/FP``);
    ``n_ref``, ``n_tp`` and ``n_fn`` count only counted lesions, ``lesions`` holds every one."""

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
    """Match, score and sum (2023 steps 3-7) on labelled arrays of one shape: ``pred_cc`` prediction
    components ``1..n_pred``, ``lesion_cc`` reference lesions ``1..n_lesions``, ``extent_cc`` their
    disjoint dilated extents."""
    if n_pred == 0 and n_lesions == 0:
        return EMPTY_RESULT
    voxel_mm3 = float(np.prod([float(s) for s in spacing]))
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
        hd95 = penalty_mm if np.isinf(hd95) else float(hd95)
        lesions.append(Lesion(volume, volume > min_volume_mm3, matched, float(dice), hd95))

    counted = [lesion for lesion in lesions if lesion.counted]
    denominator = len(counted) + n_fp
    if denominator == 0:
        dice_score, hd95_score = 1.0, 0.0
    else:
        dice_score = sum(lesion.dice for lesion in counted) / denominator
        hd95_score = (sum(lesion.hd95 for lesion in counted) + n_fp * penalty_mm) / denominator
    n_tp = sum(1 for lesion in counted if lesion.matched)
    n_ref = len(counted)
    return LesionWiseResult(
        float(dice_score), float(hd95_score), n_ref, n_tp, n_ref - n_tp, n_fp, tuple(lesions)
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
    """Lesion-wise Dice and HD95 of one region by the BraTS 2023 rules; masks bool ``(H, W, D)``.

    Args:
        dilation_iterations: reference dilation that merges nearby lesions and matches predictions
            (official: 3 for gliomas; 0 disables it).
        min_volume_mm3: reference lesions at or below this volume are ignored (official: 50).
        penalty_mm: HD95 of a missed lesion or a false positive (official: 374).
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    # +1: a dilation reaching the box edge is clipped only where the image ends, as officially
    box = bounding_box(pred | ref, margin=dilation_iterations + 1)
    if box is None:
        return EMPTY_RESULT
    pred, ref = pred[box], ref[box]
    pred_cc, n_pred = ndimage.label(pred, structure=_structure(connectivity))
    merged = _MergedLesions.of(ref, dilation_iterations, dilation_connectivity, connectivity)
    lesion_cc, extent_cc = merged.paste(tuple(slice(0, n) for n in ref.shape))
    return _score(pred_cc, n_pred, lesion_cc, extent_cc, merged.n, spacing, min_volume_mm3, penalty_mm)


# ---------------------------------------------------------------- BraTS 2024
MAX_PIECES = 2000
"""Above this many components a mask is dilated as a whole, not cluster by cluster."""


def _dilated_components(
    mask: np.ndarray, dilation: int, dilation_connectivity: int, connectivity: int
) -> tuple[np.ndarray, int]:
    """Components of the mask's dilation, labelled ``1..n`` in no particular order.

    Components whose grown boxes come within a voxel are clustered, each cluster dilated in its own
    box: the result equals dilating the whole mask, at a cost that follows the clusters.
    """
    label_structure = _structure(connectivity)
    if dilation == 0:
        return ndimage.label(mask, structure=label_structure)
    dilation_structure = _structure(dilation_connectivity)

    def dilated_labels(piece: np.ndarray) -> tuple[np.ndarray, int]:
        dilated = ndimage.binary_dilation(piece, structure=dilation_structure, iterations=dilation)
        return ndimage.label(dilated, structure=label_structure)

    pieces, n_pieces = ndimage.label(mask, structure=label_structure)
    if n_pieces <= 1 or n_pieces > MAX_PIECES:
        return dilated_labels(mask)
    boxes = ndimage.find_objects(pieces)
    lo = np.array([[s.start for s in b] for b in boxes])
    hi = np.array([[s.stop for s in b] for b in boxes])
    reach = 2 * dilation  # per-axis gap (first voxel of one - end of the other) still possibly touching
    near = np.all((lo[:, None] - hi[None] <= reach) & (lo[None] - hi[:, None] <= reach), axis=2)
    n_clusters, cluster_of = connected_components(csr_matrix(near), directed=False)
    if n_clusters == 1:
        return dilated_labels(mask)
    out = np.zeros(mask.shape, dtype=np.int32)
    total = 0
    shape = np.array(mask.shape)
    for cluster in range(n_clusters):
        members = np.flatnonzero(cluster_of == cluster)
        c_lo = np.maximum(lo[members].min(axis=0) - dilation - 1, 0)
        c_hi = np.minimum(hi[members].max(axis=0) + dilation + 1, shape)
        box = tuple(slice(a, b) for a, b in zip(c_lo, c_hi, strict=True))
        labels, k = dilated_labels(np.isin(pieces[box], members + 1))
        found = labels > 0
        out[box][found] = labels[found] + total
        total += k
    return out, total


@dataclass
class _MergedLesions:
    """Lesions of one mask merged by dilation, inside ``box`` (the mask's box grown by the reach, in
    source coordinates; None: empty mask): ``lesions`` labels mask voxels ``1..n``, ``extents`` each
    lesion's dilated extent (None when not kept)."""

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

    def paste(self, box: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(lesions, extents) as arrays covering ``box`` of the source (extents all 0 when not kept)."""
        shape = tuple(s.stop - s.start for s in box)
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
    """``(m, 2)`` distinct (x lesion, y lesion) pairs that touch (``get_touching_labels``)."""
    if x.box is None or y.box is None or x.n == 0 or y.n == 0:
        return np.zeros((0, 2), dtype=np.int64)
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
    """``combine_lesions_*`` + ``reorder_labels_nifti``: per partner in turn, ``tissue`` groups whose
    lowest-numbered touching partner lesion is the same become one (no transitive closure, as
    officially; partners are the unmerged maps, so the official second pass is the first again)."""
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
    # renumber 1..n (the order changes no score)
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

    def grouped(side: str, rule: RegionRule) -> _MergedLesions:
        lesions = base[(side, rule.name)]
        if rule.name not in merges:
            return lesions
        partners = [base[(side, name)] for name in merges[rule.name]]
        return _group_across_tissues(lesions, partners, dilation_connectivity)

    penalty = convention.hd95_penalty_mm
    results: dict[str, LesionWiseResult] = {}
    for rule in convention.scored:
        pred_lesions, ref_lesions = grouped("pred", rule), grouped("ref", rule)
        boxes = [m.box for m in (pred_lesions, ref_lesions) if m.box is not None and m.n > 0]
        if not boxes:
            results[rule.name] = EMPTY_RESULT
            continue
        pred_cc, _ = pred_lesions.paste(_union_box(boxes))
        lesion_cc, extent_cc = ref_lesions.paste(_union_box(boxes))
        min_volume = rule.min_volume_mm3
        results[rule.name] = _score(
            pred_cc, pred_lesions.n, lesion_cc, extent_cc, ref_lesions.n, spacing, min_volume, penalty
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
    """Region name -> lesion-wise scores of one case by the convention's rules.

    ``pred``/``ref``: internal labels ``(H, W, D)`` in the NIfTI array's own axis order (the 2024
    grouping follows lesion numbering, i.e. C scan order); ``dilation_connectivity`` also decides
    "touching" in 2024 (official: 18 for both).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
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
        # C scan order, and so the lesion numbering, is the same in any box
        reach = max((rule.dilation for rule in convention.scored), default=0)
        codes = sorted({c for rule in convention.scored for c in rule.codes})
        box = bounding_box(np.isin(pred, codes) | np.isin(ref, codes), margin=reach + 1)
        if box is None:
            return {rule.name: EMPTY_RESULT for rule in convention.scored}
        return _brats2024(pred[box], ref[box], spacing, convention, dilation_connectivity, connectivity)
    raise ValueError(f"{convention.name}: unknown lesion-wise rules {convention.rules!r}")
