"""Lesion-wise Dice / HD95 by the BraTS 2023 rules: matching, merging, misses, false positives, size threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from tumorseg.evaluation.lesionwise import lesion_wise_scores
from tumorseg.evaluation.metrics import distance_metrics, robust_hausdorff, surface_distances

PENALTY = 374.0
ONE_MM = (1.0, 1.0, 1.0)


def _box(mask: np.ndarray, lo: tuple[int, int, int], size: int | tuple[int, int, int]) -> None:
    sizes = (size,) * 3 if isinstance(size, int) else size
    mask[lo[0] : lo[0] + sizes[0], lo[1] : lo[1] + sizes[1], lo[2] : lo[2] + sizes[2]] = True


def test_matched_missed_false_positive_and_tiny_lesions() -> None:
    shape = (60, 60, 30)
    ref = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    _box(ref, (5, 5, 5), 6)  # lesion A, 216 voxels: predicted exactly
    _box(pred, (5, 5, 5), 6)
    _box(ref, (40, 5, 5), 5)  # lesion B, 125 voxels: missed
    _box(ref, (5, 40, 5), 3)  # tiny lesion C, 27 voxels <= 50: ignored
    _box(pred, (5, 40, 5), 2)  # ... and the prediction on it is neither scored nor a false positive
    _box(pred, (40, 40, 20), 4)  # false positive far from everything
    result = lesion_wise_scores(pred, ref, ONE_MM)
    assert (result.n_ref, result.n_tp, result.n_fn, result.n_fp) == (2, 1, 1, 1)
    # (1 + 0 + 0) / (2 lesions + 1 FP); HD95 (0 + penalty + penalty) / 3.
    assert result.dice == pytest.approx(1 / 3, abs=1e-12)
    assert result.hd95 == pytest.approx(2 * PENALTY / 3, abs=1e-9)
    assert sorted(lesion.counted for lesion in result.lesions) == [False, True, True]


@pytest.mark.parametrize(("gap", "expected_lesions"), [(6, 1), (7, 2)])
def test_lesions_whose_3_fold_dilations_touch_are_merged(gap: int, expected_lesions: int) -> None:
    # Three dilations with the 18-neighbour element grow each cube 3 voxels along x: a gap of 6
    # leaves the dilated cubes face to face (26-connected, merged), a gap of 7 keeps them apart.
    ref = np.zeros((50, 20, 20), dtype=bool)
    _box(ref, (5, 5, 5), 5)
    _box(ref, (10 + gap, 5, 5), 5)
    result = lesion_wise_scores(np.zeros_like(ref), ref, ONE_MM)
    assert len(result.lesions) == expected_lesions
    assert result.n_fn == expected_lesions
    assert result.dice == 0.0 and result.hd95 == PENALTY


def test_dilation_uses_the_18_neighbour_element() -> None:
    # Two cubes 5 empty voxels apart diagonally on all three axes. An 18-neighbour step changes at
    # most two coordinates, so three steps move a voxel by at most 6 in L1 norm: the two dilations
    # together cover at most 12 of the 3 x 5 = 15 needed, and the lesions stay separate. Three
    # 26-neighbour steps move 3 on every axis at once and merge them. The official code uses
    # generate_binary_structure(3, 2), the 18-neighbour element.
    ref = np.zeros((30, 30, 30), dtype=bool)
    _box(ref, (5, 5, 5), 4)
    _box(ref, (14, 14, 14), 4)
    assert len(lesion_wise_scores(np.zeros_like(ref), ref, ONE_MM).lesions) == 2
    merged = lesion_wise_scores(np.zeros_like(ref), ref, ONE_MM, dilation_connectivity=26)
    assert len(merged.lesions) == 1


def test_partial_overlap_lesion_scores_like_the_whole_image() -> None:
    shape = (30, 30, 30)
    ref = np.zeros(shape, dtype=bool)
    pred = np.zeros(shape, dtype=bool)
    _box(ref, (5, 5, 5), 8)
    _box(pred, (9, 5, 5), 8)  # half of it overlaps
    result = lesion_wise_scores(pred, ref, (1.0, 1.5, 2.0))
    assert result.dice == pytest.approx(0.5)
    assert result.hd95 == pytest.approx(
        distance_metrics(ref, pred, (1.0, 1.5, 2.0), PENALTY)["hd95"], abs=1e-12
    )
    assert (result.n_tp, result.n_fp) == (1, 0)


def test_prediction_near_but_not_on_a_lesion_is_matched_not_false_positive() -> None:
    ref = np.zeros((30, 20, 20), dtype=bool)
    pred = np.zeros_like(ref)
    _box(ref, (5, 5, 5), 5)
    _box(pred, (12, 5, 5), 3)  # 2 empty voxels between: inside the 3-voxel dilation
    result = lesion_wise_scores(pred, ref, ONE_MM)
    assert (result.n_tp, result.n_fn, result.n_fp) == (1, 0, 0)
    assert result.dice == 0.0
    assert 0.0 < result.hd95 < PENALTY


def test_one_component_spanning_two_lesions_matches_both() -> None:
    ref = np.zeros((40, 20, 20), dtype=bool)
    pred = np.zeros_like(ref)
    _box(ref, (2, 5, 5), 5)
    _box(ref, (20, 5, 5), 5)
    _box(pred, (2, 7, 7), (23, 2, 2))  # a bar through both
    result = lesion_wise_scores(pred, ref, ONE_MM)
    assert (result.n_ref, result.n_tp, result.n_fp) == (2, 2, 0)
    assert all(lesion.matched == (1,) for lesion in result.lesions)


def test_empty_cases() -> None:
    empty = np.zeros((20, 20, 20), dtype=bool)
    both = lesion_wise_scores(empty, empty, ONE_MM)
    assert (both.dice, both.hd95, both.n_fp) == (1.0, 0.0, 0)

    pred = empty.copy()
    _box(pred, (2, 2, 2), 3)
    _box(pred, (12, 12, 12), 3)
    only_pred = lesion_wise_scores(pred, empty, ONE_MM)
    assert (only_pred.dice, only_pred.hd95, only_pred.n_fp) == (0.0, PENALTY, 2)

    tiny = empty.copy()
    _box(tiny, (5, 5, 5), 2)  # 8 voxels: below the threshold, nothing to count -> 0 / 0
    assert (lesion_wise_scores(empty, tiny, ONE_MM).dice, lesion_wise_scores(empty, tiny, ONE_MM).hd95) == (
        1.0,
        0.0,
    )


def test_volume_threshold_is_in_cubic_millimetres_and_exclusive() -> None:
    ref = np.zeros((20, 20, 20), dtype=bool)
    _box(ref, (5, 5, 5), (5, 5, 2))  # 50 voxels
    no_pred = np.zeros_like(ref)
    assert lesion_wise_scores(no_pred, ref, ONE_MM).n_ref == 0  # 50 mm³ is not > 50
    assert lesion_wise_scores(no_pred, ref, (1.0, 1.0, 1.01)).n_ref == 1  # 50.5 mm³ counts
    small = np.zeros_like(ref)
    _box(small, (5, 5, 5), (7, 1, 1))  # 7 voxels: 56 mm³ at 2 mm, 7 mm³ at 1 mm
    assert lesion_wise_scores(no_pred, small, (2.0, 2.0, 2.0)).n_ref == 1
    assert lesion_wise_scores(no_pred, small, ONE_MM).n_ref == 0


def test_penalty_and_dilation_are_parameters() -> None:
    ref = np.zeros((30, 20, 20), dtype=bool)
    pred = np.zeros_like(ref)
    _box(ref, (5, 5, 5), 5)
    _box(pred, (12, 5, 5), 3)  # matched with 3 dilations, a false positive with 1
    one = lesion_wise_scores(pred, ref, ONE_MM, dilation_iterations=1, penalty_mm=100.0)
    assert (one.n_tp, one.n_fn, one.n_fp) == (0, 1, 1)
    assert one.hd95 == pytest.approx(100.0)


# ---------------------------------------------------------------- agreement with the official algorithm
def _official_lesion_wise(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], dil_factor: int, thresh: float
) -> tuple[float, float, int, int, int]:
    """``get_lesion_wise_score`` + ``get_lesion_wise_results`` of the official code, step by step.

    Literal: full-volume arrays, the per-component merge loop, a fresh dilation of every merged
    lesion, ``np.isin`` to collect matches, inf -> 374, the ``isnan`` fallbacks. Only ``cc3d`` is
    replaced by ``scipy.ndimage.label`` with the 26-neighbour element (the same partition), and
    HD95 by our surface distances (checked against the official definition in test_metrics.py).
    """
    sx, sy, sz = spacing
    struct = ndimage.generate_binary_structure(3, 2)
    gt_cc = ndimage.label(ref, structure=np.ones((3, 3, 3)))[0]
    pred_cc = ndimage.label(pred, structure=np.ones((3, 3, 3)))[0]
    gt_dil_cc = ndimage.label(
        ndimage.binary_dilation(ref, structure=struct, iterations=dil_factor), structure=np.ones((3, 3, 3))
    )[0]
    combined = np.zeros_like(gt_dil_cc)
    for comp in range(1, np.max(gt_dil_cc) + 1):
        part = (gt_dil_cc == comp).astype(gt_dil_cc.dtype) * gt_cc
        np.place(part, part > 0, comp)
        combined += part
    tp: list[int] = []
    pairs = []
    for comp in range(1, np.max(combined) + 1):
        gt_tmp = (combined == comp).astype(int)
        gt_tmp_dil = ndimage.binary_dilation(gt_tmp, structure=struct, iterations=dil_factor)
        volume = np.sum(gt_tmp) * sx * sy * sz
        hits = np.unique(pred_cc * gt_tmp_dil)
        hits = hits[hits != 0]
        tp.extend(hits.tolist())
        pred_tmp = np.isin(pred_cc, hits)
        dice = 2.0 * np.logical_and(pred_tmp, gt_tmp).sum() / (pred_tmp.sum() + gt_tmp.sum())
        hd = robust_hausdorff(surface_distances(gt_tmp.astype(bool), pred_tmp, spacing))
        pairs.append((len(hits), volume, dice, 374.0 if math.isinf(hd) else hd))
    fp = np.unique(pred_cc[np.isin(pred_cc, [*tp, 0], invert=True)])
    kept = [p for p in pairs if p[1] > thresh]
    denominator = len(kept) + len(fp)
    lesion_dice = sum(p[2] for p in kept) / denominator if denominator else math.nan
    lesion_hd = (sum(p[3] for p in kept) + len(fp) * 374.0) / denominator if denominator else math.nan
    n_tp = sum(1 for p in kept if p[0] > 0)
    return (
        1.0 if math.isnan(lesion_dice) else lesion_dice,
        0.0 if math.isnan(lesion_hd) else lesion_hd,
        n_tp,
        len(kept) - n_tp,
        len(fp),
    )


@pytest.mark.parametrize("seed", range(8))
def test_agrees_with_the_official_algorithm_on_random_masks(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shape = (28, 30, 24)
    spacing = tuple(float(s) for s in rng.choice([1.0, 2.0, 0.9375, 1.2], size=3))
    dil_factor = int(rng.choice([1, 3]))
    thresh = float(rng.choice([2.0, 50.0]))

    def blobs(level: float) -> np.ndarray:
        field = ndimage.gaussian_filter(rng.standard_normal(shape), rng.uniform(1.0, 2.0))
        return field > level * field.std()

    ref = blobs(rng.uniform(1.0, 2.0))
    pred = np.roll(ref, int(rng.integers(-3, 4)), axis=int(rng.integers(0, 3))) | blobs(2.2)
    expected = _official_lesion_wise(pred, ref, spacing, dil_factor, thresh)
    got = lesion_wise_scores(pred, ref, spacing, dilation_iterations=dil_factor, min_volume_mm3=thresh)
    assert got.dice == pytest.approx(expected[0], abs=1e-9)
    assert got.hd95 == pytest.approx(expected[1], abs=1e-9)
    assert (got.n_tp, got.n_fn, got.n_fp) == expected[2:]
    assert len(got.lesions) >= 1
