"""Known-answer tests of the voxel and surface metrics, their empty-mask rules, and the summary statistics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from tumorseg.config import EvaluateConfig
from tumorseg.evaluation.evaluate import evaluate_case
from tumorseg.evaluation.metrics import (
    average_symmetric_surface_distance,
    bounding_box,
    confusion_counts,
    distance_metrics,
    overlap_metrics,
    robust_hausdorff,
    surface_distances,
)
from tumorseg.evaluation.summary import bootstrap_mean_ci, build_summary, describe, detection_summary


def _cube(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return mask


def _overlap(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    return overlap_metrics(confusion_counts(pred[None], ref[None]))[0]


# ---------------------------------------------------------------- overlap metrics
def test_shifted_cubes_have_hand_computed_overlap_metrics() -> None:
    shape = (30, 30, 30)
    ref = _cube(shape, (5, 5, 5), (15, 15, 15))  # 1000 voxels
    pred = _cube(shape, (10, 5, 5), (20, 15, 15))  # 1000 voxels, 500 shared
    m = _overlap(pred, ref)
    assert m["dice"] == pytest.approx(0.5, abs=1e-12)
    assert m["iou"] == pytest.approx(1 / 3, abs=1e-12)
    assert m["precision"] == pytest.approx(0.5, abs=1e-12)
    assert m["sensitivity"] == pytest.approx(0.5, abs=1e-12)
    # TN = 27000 - 1500 (union), FP = 500.
    assert m["specificity"] == pytest.approx(25500 / 26000, abs=1e-12)


def test_confusion_counts_include_voxels_outside_the_crop() -> None:
    shape = (40, 30, 20)
    ref = _cube(shape, (1, 1, 1), (4, 4, 4))
    pred = _cube(shape, (2, 2, 2), (6, 6, 6))
    tp, fp, tn, fn = confusion_counts(pred[None], ref[None])[0]
    assert (tp, fp, fn) == (8, 64 - 8, 27 - 8)
    assert tp + fp + tn + fn == 40 * 30 * 20


def test_confusion_counts_equal_monais_get_confusion_matrix() -> None:
    import torch
    from monai.metrics import get_confusion_matrix

    rng = np.random.default_rng(5)
    pred = rng.random((3, 12, 10, 8)) > 0.6
    ref = rng.random((3, 12, 10, 8)) > 0.5
    pred[2] = False  # one region with an empty prediction
    expected = get_confusion_matrix(
        torch.from_numpy(pred[None]).float(), torch.from_numpy(ref[None]).float()
    )[0]
    np.testing.assert_array_equal(confusion_counts(pred, ref), expected.numpy().astype(np.int64))


def test_precision_and_sensitivity_differ_when_masks_differ_in_size() -> None:
    shape = (20, 20, 20)
    ref = _cube(shape, (5, 5, 5), (9, 9, 9))  # 64
    pred = _cube(shape, (5, 5, 5), (13, 9, 9))  # 128, contains ref
    m = _overlap(pred, ref)
    assert m["precision"] == pytest.approx(0.5)
    assert m["sensitivity"] == pytest.approx(1.0)
    assert m["dice"] == pytest.approx(2 * 64 / 192)


# ---------------------------------------------------------------- empty masks
def test_both_empty_is_a_perfect_score() -> None:
    empty = np.zeros((10, 10, 10), dtype=bool)
    m = _overlap(empty, empty)
    assert m == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "sensitivity": 1.0, "specificity": 1.0}
    assert distance_metrics(empty, empty, (1.0, 1.0, 1.0), penalty_mm=374.0) == {"hd95": 0.0, "assd": 0.0}


@pytest.mark.parametrize("empty_side", ["pred", "ref"])
def test_one_empty_scores_zero_overlap_and_the_distance_penalty(empty_side: str) -> None:
    shape = (12, 12, 12)
    full = _cube(shape, (3, 3, 3), (8, 8, 8))
    empty = np.zeros(shape, dtype=bool)
    pred, ref = (empty, full) if empty_side == "pred" else (full, empty)
    m = _overlap(pred, ref)
    assert m["dice"] == 0.0
    assert m["iou"] == 0.0
    assert m["precision"] == 0.0
    assert m["sensitivity"] == 0.0
    assert m["specificity"] == pytest.approx(1.0 if empty_side == "pred" else (1728 - 125) / 1728)
    assert distance_metrics(ref, pred, (1.0, 2.0, 3.0), penalty_mm=123.5) == {"hd95": 123.5, "assd": 123.5}


def test_specificity_is_one_when_the_reference_fills_the_image() -> None:
    full = np.ones((4, 4, 4), dtype=bool)
    assert _overlap(full, full)["specificity"] == 1.0


# ---------------------------------------------------------------- surface distances
def test_parallel_plates_have_hand_computed_hd95_and_assd() -> None:
    # One-voxel-thick 30x30 plates 10 voxels apart along x. Surfels sit on voxel corners, so the
    # reference surfaces are at x = -0.5 and 0.5 and the predicted ones at 9.5 and 10.5 voxels:
    # every directed distance is 9 or 10 voxels, half the area each, x-spacing 2 mm.
    shape = (14, 34, 34)
    ref = _cube(shape, (1, 2, 2), (2, 32, 32))
    pred = _cube(shape, (11, 2, 2), (12, 32, 32))
    distances = surface_distances(ref, pred, (2.0, 1.0, 1.0))
    assert set(np.round(distances.ref_to_pred, 9)) == {18.0, 20.0}
    assert robust_hausdorff(distances) == pytest.approx(20.0, abs=1e-9)
    assert average_symmetric_surface_distance(distances) == pytest.approx(19.0, abs=1e-9)


def test_identical_masks_have_zero_distance() -> None:
    mask = _cube((15, 15, 15), (3, 4, 5), (10, 9, 12))
    assert distance_metrics(mask, mask, (1.2, 0.9, 3.0), penalty_mm=374.0) == {"hd95": 0.0, "assd": 0.0}


def _brute_force_hd95_assd(
    ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...]
) -> tuple[float, float]:
    """The official definition step by step, by another route than the code under test.

    Surfels and their areas from MONAI's subvoxel ``get_mask_edges`` (torch convolution, float32
    table), all pairwise distances with ``cdist``, then the official ``compute_robust_hausdorff``
    (area-weighted percentile) and an area-weighted symmetric mean.
    """
    import torch
    from monai.metrics.utils import get_mask_edges

    edges_pred, edges_ref, areas_pred, areas_ref = (
        x.numpy() for x in get_mask_edges(torch.from_numpy(pred), torch.from_numpy(ref), spacing=spacing)
    )
    scale = np.asarray(spacing, dtype=np.float64)
    pairwise = cdist(np.argwhere(edges_ref) * scale, np.argwhere(edges_pred) * scale)
    d_ref, d_pred = pairwise.min(axis=1), pairwise.min(axis=0)
    a_ref, a_pred = areas_ref[edges_ref].astype(np.float64), areas_pred[edges_pred].astype(np.float64)

    def weighted_percentile(d: np.ndarray, a: np.ndarray) -> float:
        order = np.lexsort((a, d))
        cumulative = np.cumsum(a[order]) / np.sum(a)
        return float(d[order][min(np.searchsorted(cumulative, 0.95), d.size - 1)])

    hd95 = max(weighted_percentile(d_ref, a_ref), weighted_percentile(d_pred, a_pred))
    assd = (np.sum(d_ref * a_ref) + np.sum(d_pred * a_pred)) / (a_ref.sum() + a_pred.sum())
    return hd95, float(assd)


@pytest.mark.parametrize("seed", range(6))
def test_hd95_and_assd_agree_with_the_official_definition_on_random_blobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (18, 20, 16)
    spacing = tuple(float(s) for s in rng.choice([0.8, 1.0, 1.5, 2.0, 3.0], size=3))
    ref = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.08
    pred = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.08
    expected_hd95, expected_assd = _brute_force_hd95_assd(ref, pred, spacing)
    got = distance_metrics(ref, pred, spacing, penalty_mm=374.0)
    assert got["hd95"] == pytest.approx(expected_hd95, abs=1e-6)
    assert got["assd"] == pytest.approx(expected_assd, abs=1e-6)


def test_hd95_follows_the_official_convention_not_monais_percentile() -> None:
    # MONAI's HausdorffDistanceMetric takes the unweighted percentile of voxel-centre edge
    # distances; on these masks it gives another number, which is why it is not used for HD95.
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(11)
    shape = (18, 20, 16)
    ref = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1
    pred = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > 0.1
    ours = distance_metrics(ref, pred, (1.0, 1.0, 1.0), penalty_mm=374.0)["hd95"]
    assert ours == pytest.approx(_brute_force_hd95_assd(ref, pred, (1.0, 1.0, 1.0))[0], abs=1e-6)
    monai_hd95 = float(
        compute_hausdorff_distance(
            pred[None, None].astype(np.float32),
            ref[None, None].astype(np.float32),
            include_background=True,
            percentile=95,
        )[0, 0]
    )
    assert abs(ours - monai_hd95) > 1e-3


def test_bounding_box_margin_is_clipped_to_the_array() -> None:
    mask = _cube((10, 10, 10), (0, 4, 8), (2, 6, 10))
    assert bounding_box(mask, margin=3) == (slice(0, 5), slice(1, 9), slice(5, 10))
    assert bounding_box(np.zeros((3, 3, 3), dtype=bool)) is None


# ---------------------------------------------------------------- evaluate_case on canonical arrays
def test_evaluate_case_scores_each_region_and_volumes_in_ml() -> None:
    shape = (24, 24, 24)
    ref = np.zeros(shape, dtype=np.uint8)
    ref[4:16, 4:16, 4:16] = 2  # oedema shell
    ref[7:13, 7:13, 7:13] = 3  # ET core, 216 voxels
    pred = ref.copy()
    pred[ref == 3] = 1  # ET predicted as necrosis: TC right, ET missed
    rows = evaluate_case(pred, ref, (2.0, 2.0, 2.0), EvaluateConfig(), case_id="c1")
    by_region = {row["region"]: row for row in rows}
    assert [row["region"] for row in rows] == ["WT", "TC", "ET"]
    assert by_region["WT"]["dice"] == 1.0 and by_region["TC"]["dice"] == 1.0
    assert by_region["ET"]["dice"] == 0.0
    assert by_region["ET"]["hd95"] == 374.0 and by_region["ET"]["lesion_hd95"] == 374.0
    assert by_region["ET"]["volume_ref_ml"] == pytest.approx(216 * 8 / 1000)
    assert by_region["ET"]["volume_pred_ml"] == 0.0
    assert by_region["WT"]["volume_ref_ml"] == pytest.approx(12**3 * 8 / 1000)
    assert by_region["ET"]["lesions_fn"] == 1 and by_region["ET"]["lesions_tp"] == 0
    assert all(row["case_id"] == "c1" for row in rows)


# ---------------------------------------------------------------- summary statistics
def test_bootstrap_ci_of_constant_values_is_the_value() -> None:
    indices = np.random.default_rng(0).integers(0, 5, size=(200, 5))
    assert bootstrap_mean_ci(np.full(5, 0.7), indices, 0.95) == pytest.approx((0.7, 0.7))


def test_describe_matches_numpy_and_ci_brackets_the_mean() -> None:
    values = np.array([0.1, 0.5, 0.9, 0.4, 0.7, 0.3])
    indices = np.random.default_rng(1).integers(0, values.size, size=(3000, values.size))
    stats = describe(values, indices, 0.9)
    assert stats["mean"] == pytest.approx(values.mean())
    assert stats["median"] == pytest.approx(np.median(values))
    assert stats["std"] == pytest.approx(values.std(ddof=1))
    means = values[indices].mean(axis=1)
    assert stats["ci_low"] == pytest.approx(np.quantile(means, 0.05))
    assert stats["ci_high"] == pytest.approx(np.quantile(means, 0.95))
    assert stats["ci_low"] < stats["mean"] < stats["ci_high"]


def _table(
    dice_by_case: dict[str, float], ref_wt: dict[str, float], pred_wt: dict[str, float]
) -> pd.DataFrame:
    rows = []
    for case_id, dice in dice_by_case.items():
        for region in ("WT", "TC", "ET"):
            rows.append(
                {
                    "case_id": case_id,
                    "region": region,
                    "dice": dice,
                    "hd95": 10 * (1 - dice),
                    "volume_ref_ml": ref_wt[case_id],
                    "volume_pred_ml": pred_wt[case_id],
                }
            )
    return pd.DataFrame(rows)


def test_detection_summary_counts_and_auc() -> None:
    # Positives (reference tumour): a, b, c; negatives: d, e.
    ref_wt = {"a": 30.0, "b": 12.0, "c": 5.0, "d": 0.0, "e": 0.0}
    pred_wt = {"a": 28.0, "b": 0.0, "c": 4.0, "d": 0.5, "e": 0.0}
    table = _table(dict.fromkeys(ref_wt, 0.5), ref_wt, pred_wt)
    result = detection_summary(table, min_volume_ml=0.0)
    assert (result["tp"], result["fn"], result["fp"], result["tn"]) == (2, 1, 1, 1)
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == pytest.approx(1 / 2)
    # Pairs (pos, neg) ranked correctly: a>d, a>e, c>d, c>e, b<d, b=e (0.5) -> 4.5 / 6.
    assert result["roc_auc"] == pytest.approx(4.5 / 6)
    assert detection_summary(table, min_volume_ml=1.0)["fp"] == 0


def test_detection_auc_is_absent_with_one_class() -> None:
    table = _table({"a": 0.9, "b": 0.8}, {"a": 3.0, "b": 4.0}, {"a": 3.0, "b": 0.0})
    result = detection_summary(table, 0.0)
    assert result["roc_auc"] is None and result["specificity"] is None
    assert result["sensitivity"] == 0.5


def test_summary_is_seeded_and_groups_by_tumour_type() -> None:
    dice = {"a": 0.9, "b": 0.2, "c": 0.6, "d": 0.8}
    table = _table(dice, dict.fromkeys(dice, 1.0), dict.fromkeys(dice, 1.0))
    kwargs = {"resamples": 500, "ci_level": 0.95, "detection_min_volume_ml": 0.0}
    first = build_summary(table, seed=3, **kwargs)
    assert first == build_summary(table, seed=3, **kwargs)
    assert (
        first["regions"]["WT"]["dice"]["ci_low"]
        != build_summary(table, seed=4, **kwargs)["regions"]["WT"]["dice"]["ci_low"]
    )
    assert first["regions"]["ET"]["dice"]["mean"] == pytest.approx(np.mean(list(dice.values())))
    typed = build_summary(table, seed=3, tumour_types={"a": "GBM", "b": "LGG", "c": "GBM"}, **kwargs)
    assert set(typed["per_tumour_type"]) == {"GBM", "LGG"}
    assert typed["per_tumour_type"]["GBM"]["n_cases"] == 2
    assert typed["per_tumour_type"]["GBM"]["regions"]["TC"]["dice"]["mean"] == pytest.approx(0.75)


def test_2d_overlap_figures_on_a_known_pair_and_the_empty_prediction_baseline() -> None:
    from tumorseg.evaluation.metrics import overlap_scores

    ref = np.zeros((10, 10), bool)
    ref[2:6, 2:6] = True  # 16 px
    pred = np.zeros((10, 10), bool)
    pred[4:8, 2:6] = True  # 16 px, 8 overlapping
    s = overlap_scores(pred, ref)
    assert s["iou"] == pytest.approx(8 / 24) and s["precision"] == 0.5 and s["recall"] == 0.5
    assert s["f1"] == 0.5 and s["specificity"] == pytest.approx(76 / 84)
    assert s["pixel_accuracy"] == pytest.approx(84 / 100) and s["pixel_accuracy_empty"] == pytest.approx(
        84 / 100
    )
    nothing = overlap_scores(np.zeros_like(ref), ref)
    assert nothing["recall"] == nothing["f1"] == nothing["iou"] == 0.0 and nothing["pixel_accuracy"] == 0.84
    both_empty = overlap_scores(np.zeros_like(ref), np.zeros_like(ref))
    assert set(both_empty.values()) == {1.0}
