"""Lesion-wise Dice / HD95 by the BraTS 2023 rules: matching, merging, misses, false positives, size threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from tumorseg.data.conventions import get_convention
from tumorseg.evaluation.lesionwise import EMPTY_RESULT, case_lesion_wise, lesion_wise_scores
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


# ================================================================ BraTS 2024 (case_lesion_wise)
GLI = get_convention("brats2024-gli")
PED = get_convention("brats2024-ped")
GLI_PENALTY = 337.0


def test_2024_conventions_keep_the_official_codes() -> None:
    # The transcription below works on the official files' codes; internal codes equal them.
    for convention in (GLI, PED):
        assert all(source == internal for source, internal in convention.to_canonical.items())
    assert [r.name for r in GLI.scored] == ["WT", "TC", "NETC", "SNFH", "ET", "RC"]
    assert [r.name for r in PED.scored] == ["WT", "TC", "ET", "NETC", "CC", "ED"]


# ---------------------------------------------------------------- the official 2024 code, transcribed
# rachitsaluja/BraTS-2024-Metrics @ 9a0ab9c7d75f, metrics_GLI.py and metrics_PED.py, function by
# function. The temporary NIfTI files become entries of a dict: nib.load(...).get_fdata() gives a
# float64 array in Fortran order, nib.save stores the values. cc3d is emulated (scipy labels, then
# components renumbered by first voxel in the array's memory order, as cc3d numbers them), and
# surface_distance's HD95 is ours (checked against the official definition in test_metrics.py).
# Only the lesion-wise outputs are transcribed (no legacy Dice/HD95, sensitivity, specificity).
_STRUCT_18 = ndimage.generate_binary_structure(3, 2)


def _load(files: dict[str, np.ndarray], name: str) -> np.ndarray:
    return np.asfortranarray(files[name], dtype=np.float64)


def _cc3d(data: np.ndarray) -> np.ndarray:
    """``cc3d.connected_components(data, connectivity=26)`` of a binary image."""
    labels, n = ndimage.label(data != 0, structure=np.ones((3, 3, 3)))
    order = "F" if data.flags.f_contiguous and not data.flags.c_contiguous else "C"
    flat = labels.ravel(order=order)
    nonzero = np.flatnonzero(flat)
    _, first = np.unique(flat[nonzero], return_index=True)
    table = np.zeros(n + 1, dtype=np.int64)
    table[1 + np.argsort(first)] = np.arange(1, n + 1)
    return table[labels]


def _official_tissue_wise(mat: np.ndarray, tissue: str, challenge: str) -> np.ndarray:
    """``get_TissueWiseSeg``."""
    if challenge == "GLI":
        masks = {
            "WT": (mat >= 1) & (mat <= 3),
            "TC": (mat == 1) | (mat == 3),
            "NETC": mat == 1,
            "SNFH": mat == 2,
            "ET": mat == 3,
            "RC": mat == 4,
        }
    else:
        masks = {
            "WT": (mat >= 1) & (mat <= 4),
            "TC": (mat >= 1) & (mat <= 3),
            "ET": mat == 1,
            "NETC": mat == 2,
            "CC": mat == 3,
            "ED": mat == 4,
        }
    return masks[tissue].astype(float)


def _official_combined_by_dilation(dilated_cc: np.ndarray, label_cc: np.ndarray) -> np.ndarray:
    """``get_GTseg_combinedByDilation`` / ``get_Predseg_combinedByDilation`` (identical)."""
    combined = np.zeros_like(dilated_cc)
    for comp in range(np.max(dilated_cc)):
        comp += 1
        tmp = np.zeros_like(dilated_cc)
        tmp[dilated_cc == comp] = 1
        tmp = label_cc * tmp
        np.place(tmp, tmp > 0, comp)
        combined += tmp
    return combined


def _official_save_tmp_files(
    files: dict[str, np.ndarray], pred_mat: np.ndarray, gt_mat: np.ndarray, challenge: str, dil_factor: int
) -> None:
    tissues = (
        ["WT", "TC", "NETC", "SNFH", "ET", "RC"]
        if challenge == "GLI"
        else ["WT", "TC", "ET", "NETC", "CC", "ED"]
    )
    for t in tissues:
        files[f"pred_{t}"] = _official_tissue_wise(pred_mat, t, challenge)
        files[f"gt_{t}"] = _official_tissue_wise(gt_mat, t, challenge)
    for side in ("gt", "pred"):
        for t in tissues:
            if challenge == "GLI":
                lesion_volume_thresh = 10 if t == "ET" else 20
                dil_factor = 5 if t in ("SFNH", "NETC", "RC") else 3  # sic: "SFNH"
            else:
                lesion_volume_thresh = 10
            mat = _load(files, f"{side}_{t}")
            mat_cc = _cc3d(mat)
            mat_dilation = ndimage.binary_dilation(mat, structure=_STRUCT_18, iterations=dil_factor)
            mat_dilation_cc = _cc3d(mat_dilation)
            combined = _official_combined_by_dilation(mat_dilation_cc, mat_cc)
            if side == "pred":
                labels, counts = np.unique(combined, return_counts=True)
                labels_to_remove = labels[counts <= lesion_volume_thresh]
                mask = np.isin(combined, labels_to_remove, invert=True)
                combined = np.where(mask, combined, 0)
            suffix = "_cc_combined" if challenge == "PED" or t in ("WT", "TC") else "_cc"
            files[f"{side}_{t}{suffix}"] = combined


def _official_get_touching_labels(
    files: dict[str, np.ndarray], name1: str, name2: str
) -> set[tuple[float, float]]:
    data1 = _load(files, name1)
    data2 = _load(files, name2)
    labels1 = np.unique(data1)[1:]
    labels2 = np.unique(data2)[1:]
    touching_labels = set()
    # The official loop dilates both masks inside the inner loop; hoisted here, same values.
    dilated2 = {label2: ndimage.binary_dilation(data2 == label2, _STRUCT_18) for label2 in labels2}
    for label1 in labels1:
        mask1 = data1 == label1
        dilated_mask1 = ndimage.binary_dilation(mask1, _STRUCT_18)
        for label2 in labels2:
            mask2 = data2 == label2
            if np.any(dilated_mask1 & mask2) or np.any(dilated2[label2] & mask1):
                touching_labels.add((label1, label2))
    return touching_labels


def _official_relabel(files: dict[str, np.ndarray], tuples: set, source: str, output: str) -> None:
    """``relabel_nifti_image``."""
    img_data = _load(files, source)
    max_existing_label = int(np.max(img_data))
    label_mapping = {}
    current_label = max_existing_label + 1
    seen_common_values = {}
    for _original_label, common_value in sorted(tuples):
        if common_value not in seen_common_values:
            seen_common_values[common_value] = current_label
            current_label += 1
    for original_label, common_value in sorted(tuples):
        if original_label not in label_mapping:
            label_mapping[original_label] = seen_common_values[common_value]
    relabeled_data = np.copy(img_data)
    for original_label, new_label in label_mapping.items():
        relabeled_data[img_data == original_label] = new_label
    files[output] = relabeled_data.astype(np.int32)


def _official_reorder(files: dict[str, np.ndarray], name: str) -> None:
    """``reorder_labels_nifti`` (in place, as called)."""
    img_data = _load(files, name)
    unique_labels = np.unique(img_data)
    unique_labels.sort()
    if unique_labels[0] == 0:
        unique_labels = unique_labels[1:]
    start_label = int(np.max(img_data)) + 1
    temp_label_mapping = {label: i + start_label for i, label in enumerate(unique_labels)}
    temp_relabel_data = np.copy(img_data)
    for original_label, temp_label in temp_label_mapping.items():
        temp_relabel_data[img_data == original_label] = temp_label
    final_label_mapping = {t: i + 1 for i, t in enumerate(sorted(temp_label_mapping.values()))}
    final_relabel_data = np.copy(temp_relabel_data)
    for temp_label, final_label in final_label_mapping.items():
        final_relabel_data[temp_relabel_data == temp_label] = final_label
    files[name] = final_relabel_data.astype(np.int32)


def _official_combine(files: dict[str, np.ndarray], tissue_cc: str, partners_cc: list[str]) -> None:
    """``combine_lesions_NETC`` / ``_ET`` / ``_RC`` / ``_SNFH``: one body, partners in call order."""
    op_path = tissue_cc + "_combined"
    touching_labels = _official_get_touching_labels(files, tissue_cc, partners_cc[0])
    if len(touching_labels) > 1:
        _official_relabel(files, touching_labels, tissue_cc, op_path)
    else:
        files[op_path] = files[tissue_cc].copy()  # shutil.copy
    for partner in partners_cc[1:]:
        touching_labels = _official_get_touching_labels(files, op_path, partner)
        if len(touching_labels) > 1:
            _official_relabel(files, touching_labels, op_path, op_path)


def _official_combine_tissues(files: dict[str, np.ndarray], side: str) -> None:
    """``combine_lesions_tissues`` then the four ``reorder_labels_nifti`` calls."""
    netc, snfh, et, rc = (f"{side}_{t}_cc" for t in ("NETC", "SNFH", "ET", "RC"))
    for _ in range(2):
        _official_combine(files, netc, [et, rc])
        _official_combine(files, et, [netc, rc])
        _official_combine(files, rc, [et, netc])
        _official_combine(files, snfh, [et, rc, netc])
    for name in (et, netc, rc, snfh):
        _official_reorder(files, name + "_combined")


def _official_lesion_wise_scores(
    files: dict[str, np.ndarray],
    label_value: str,
    dil_factor: int,
    spacing: tuple[float, float, float],
    challenge: str,
) -> tuple[list, list, np.ndarray, list, list]:
    """``get_LesionWiseScores`` (lesion-wise part)."""
    if challenge == "GLI" and label_value in ("SFNH", "NETC", "RC"):  # sic
        dil_factor = 5
    pred_mat = _load(files, f"pred_{label_value}_cc_combined")
    gt_mat = _load(files, f"gt_{label_value}_cc_combined")
    sx, sy, sz = spacing
    gt_label_cc = gt_mat.astype(np.int32)
    pred_label_cc = pred_mat.astype(np.int32)
    gt_tp, tp, fn, metric_pairs = [], [], [], []
    for gtcomp in range(np.max(gt_label_cc)):
        gtcomp += 1
        gt_tmp = np.zeros_like(gt_label_cc)
        gt_tmp[gt_label_cc == gtcomp] = 1
        gt_tmp_dilation = ndimage.binary_dilation(gt_tmp, structure=_STRUCT_18, iterations=dil_factor)
        gt_vol = np.sum(gt_tmp > 0) * sx * sy * sz
        pred_tmp = np.copy(pred_label_cc)
        pred_tmp = pred_tmp * gt_tmp_dilation
        intersecting_cc = np.unique(pred_tmp)
        intersecting_cc = intersecting_cc[intersecting_cc != 0]
        for cc in intersecting_cc:
            tp.append(cc)
        pred_tmp = np.copy(pred_label_cc)
        pred_tmp[np.isin(pred_tmp, intersecting_cc, invert=True)] = 0
        pred_tmp[np.isin(pred_tmp, intersecting_cc)] = 1
        dice_score = (
            2.0 * np.logical_and(pred_tmp, gt_tmp).sum() / (pred_tmp.astype(bool).sum() + gt_tmp.sum())
        )
        hd = robust_hausdorff(surface_distances(gt_tmp.astype(bool), pred_tmp.astype(bool), spacing))
        metric_pairs.append((intersecting_cc, gtcomp, gt_vol, dice_score, hd))
        if len(intersecting_cc) > 0:
            gt_tp.append(gtcomp)
        else:
            fn.append(gtcomp)
    fp = np.unique(pred_label_cc[np.isin(pred_label_cc, [*tp, 0], invert=True)])
    return tp, fn, fp, gt_tp, metric_pairs


def _official_2024(
    pred_mat: np.ndarray, gt_mat: np.ndarray, spacing: tuple[float, float, float], challenge: str
) -> dict[str, tuple[float, float, int, int, int]]:
    """``get_LesionWiseResults``: region -> (lesion Dice, lesion HD95, Num_TP, Num_FP, Num_FN)."""
    if challenge == "GLI":
        dilation_factor, penalty = 3, 337.0
        label_values = ["WT", "TC", "NETC", "SNFH", "ET", "RC"]
    else:
        dilation_factor, penalty = 5, 374.0
        label_values = ["WT", "TC", "ET", "NETC", "CC", "ED"]
    files: dict[str, np.ndarray] = {}
    _official_save_tmp_files(
        files,
        np.asfortranarray(pred_mat, float),
        np.asfortranarray(gt_mat, float),
        challenge,
        dilation_factor,
    )
    if challenge == "GLI":
        _official_combine_tissues(files, "gt")
        _official_combine_tissues(files, "pred")
    results = {}
    for label in label_values:
        lesion_volume_thresh = (10 if label == "ET" else 20) if challenge == "GLI" else 10
        _tp, fn, fp, gt_tp, metric_pairs = _official_lesion_wise_scores(
            files, label, dilation_factor, spacing, challenge
        )
        fn_sub = sum(1 for p in metric_pairs if len(p[0]) == 0 and p[2] <= lesion_volume_thresh)
        gt_tp_sub = sum(1 for p in metric_pairs if len(p[0]) != 0 and p[2] <= lesion_volume_thresh)
        metric_pairs = [(p[0], p[1], p[2], p[3], penalty if math.isinf(p[4]) else p[4]) for p in metric_pairs]
        thresh = [p for p in metric_pairs if p[2] > lesion_volume_thresh]
        try:
            lesion_wise_dice = sum(p[3] for p in thresh) / (len(thresh) + len(fp))
        except ZeroDivisionError:
            lesion_wise_dice = math.nan
        try:
            lesion_wise_hd95 = (sum(p[4] for p in thresh) + len(fp) * penalty) / (len(thresh) + len(fp))
        except ZeroDivisionError:
            lesion_wise_hd95 = math.nan
        if math.isnan(lesion_wise_dice):
            lesion_wise_dice = 1
        if math.isnan(lesion_wise_hd95):
            lesion_wise_hd95 = 0
        results[label] = (
            lesion_wise_dice,
            lesion_wise_hd95,
            len(gt_tp) - gt_tp_sub,
            len(fp),
            len(fn) - fn_sub,
        )
    return results


def _assert_matches_official(pred: np.ndarray, ref: np.ndarray, spacing, convention) -> dict:
    challenge = "GLI" if convention is GLI else "PED"
    expected = _official_2024(pred, ref, spacing, challenge)
    got = case_lesion_wise(pred, ref, spacing, convention)
    assert list(got) == list(expected)
    for region, (dice, hd95, n_tp, n_fp, n_fn) in expected.items():
        result = got[region]
        assert result.dice == pytest.approx(dice, abs=1e-9), region
        assert result.hd95 == pytest.approx(hd95, abs=1e-9), region
        assert (result.n_tp, result.n_fp, result.n_fn) == (n_tp, n_fp, n_fn), region
    return got


# ---------------------------------------------------------------- hand-built 2024 cases
def _labels(
    shape: tuple[int, int, int], *boxes: tuple[int, tuple[int, int, int], tuple[int, int, int]]
) -> np.ndarray:
    """A label volume painted with (code, low corner, size) boxes, in order."""
    out = np.zeros(shape, dtype=np.uint8)
    for code, lo, size in boxes:
        out[lo[0] : lo[0] + size[0], lo[1] : lo[1] + size[1], lo[2] : lo[2] + size[2]] = code
    return out


NETC_GLI, SNFH_GLI, ET_GLI, RC_GLI = 1, 2, 3, 4


def test_2024_small_prediction_lesions_are_dropped_before_matching() -> None:
    ref = _labels((40, 40, 40), (ET_GLI, (5, 5, 5), (4, 4, 4)))
    tiny = _labels(
        (40, 40, 40), (ET_GLI, (5, 5, 5), (4, 4, 4)), (ET_GLI, (30, 30, 30), (2, 2, 2))
    )  # +8 voxels
    small = _labels(
        (40, 40, 40), (ET_GLI, (5, 5, 5), (4, 4, 4)), (ET_GLI, (30, 30, 30), (3, 2, 2))
    )  # +12 voxels
    got = _assert_matches_official(tiny, ref, ONE_MM, GLI)
    assert (got["ET"].dice, got["ET"].hd95, got["ET"].n_fp) == (1.0, 0.0, 0)  # 8 <= 10: gone
    # 12 voxels: above ET's threshold (10), a false positive there; at or below WT's and TC's (20).
    got = _assert_matches_official(small, ref, ONE_MM, GLI)
    assert (got["ET"].n_tp, got["ET"].n_fp) == (1, 1)
    assert got["ET"].dice == pytest.approx(0.5) and got["ET"].hd95 == pytest.approx(GLI_PENALTY / 2)
    assert (got["WT"].n_fp, got["TC"].n_fp, got["WT"].dice) == (0, 0, 1.0)
    # The 2023 rules count every component.
    assert lesion_wise_scores(small == ET_GLI, ref == ET_GLI, ONE_MM, min_volume_mm3=10).n_fp == 1
    # The prediction threshold counts voxels (the reference one mm³): 8 voxels of 8 mm³ still go.
    got = _assert_matches_official(tiny, ref, (2.0, 2.0, 2.0), GLI)
    assert (got["ET"].n_tp, got["ET"].n_fp) == (1, 0)


@pytest.mark.parametrize(("gap", "expected_fp"), [(6, 1), (7, 2)])
def test_2024_false_positives_are_counted_per_merged_prediction_lesion(gap: int, expected_fp: int) -> None:
    # Two 27-voxel ET components 6 voxels apart merge under ET's 3 dilations (one false positive),
    # 7 apart they do not; the 2023 rules would count two in both cases.
    ref = _labels((50, 30, 30), (ET_GLI, (5, 20, 5), (4, 4, 4)))
    pred = ref.copy()
    pred[5:8, 5:8, 5:8] = ET_GLI
    pred[8 + gap : 11 + gap, 5:8, 5:8] = ET_GLI
    got = _assert_matches_official(pred, ref, ONE_MM, GLI)
    assert (got["ET"].n_tp, got["ET"].n_fp) == (1, expected_fp)
    assert got["ET"].dice == pytest.approx(1 / (1 + expected_fp))


def test_2024_netc_lesions_touching_one_et_lesion_are_one_lesion() -> None:
    # Two NETC blocks 20 voxels apart (too far for NETC's 5 dilations to merge them) joined by an
    # ET bar that touches both: one NETC lesion in GLI. The prediction finds only one block.
    shape = (50, 16, 16)
    ref = _labels(
        shape,
        (NETC_GLI, (5, 5, 5), (5, 5, 5)),
        (ET_GLI, (10, 5, 5), (20, 5, 5)),
        (NETC_GLI, (30, 5, 5), (5, 5, 5)),
    )
    pred = _labels(shape, (NETC_GLI, (5, 5, 5), (5, 5, 5)), (ET_GLI, (10, 5, 5), (20, 5, 5)))
    got = _assert_matches_official(pred, ref, ONE_MM, GLI)
    netc = got["NETC"]
    assert (netc.n_ref, netc.n_tp, netc.n_fn, netc.n_fp) == (1, 1, 0, 0)
    assert netc.lesions[0].volume_mm3 == 250.0
    assert netc.dice == pytest.approx(2 * 125 / (250 + 125))
    # PED has no cross-tissue grouping: the same picture in PED codes keeps two NETC lesions.
    ped = {NETC_GLI: 2, ET_GLI: 1, 0: 0}
    to_ped = np.vectorize(ped.get)
    got = _assert_matches_official(to_ped(pred), to_ped(ref), ONE_MM, PED)
    assert (got["NETC"].n_ref, got["NETC"].n_tp, got["NETC"].n_fn) == (2, 1, 1)


@pytest.mark.parametrize("mirrored", [False, True])
def test_2024_grouping_follows_the_lowest_numbered_partner_lesion(mirrored: bool) -> None:
    # NETC block A touches ET lesions P (a bar that also touches NETC block B) and Q; B touches P
    # only. relabel_nifti_image gives each NETC lesion the label of its lowest-numbered touching
    # ET lesion, numbered as cc3d numbers scipy's C-ordered dilation: by first voxel in C order.
    # Q comes first in C order (first axis) but P in Fortran order (last axis): A joins Q and B
    # stays alone, two NETC lesions. Mirrored along the first axis, P comes first: A and B both
    # join P, one lesion. No transitive closure: unmirrored, A and B stay apart though both touch P.
    shape = (24, 32, 22)
    ref = _labels(
        shape,
        (NETC_GLI, (10, 0, 0), (5, 5, 20)),  # A
        (NETC_GLI, (10, 25, 0), (5, 5, 4)),  # B, 20 voxels from A along the second axis
        (ET_GLI, (15, 0, 0), (3, 30, 4)),  # P: touches A and B
        (ET_GLI, (7, 0, 16), (3, 5, 4)),  # Q: touches A, 12 voxels from P along the last axis
    )
    if mirrored:
        ref = np.ascontiguousarray(ref[::-1])
    got = _assert_matches_official(ref, ref, ONE_MM, GLI)
    assert got["NETC"].n_ref == (1 if mirrored else 2)
    assert got["ET"].n_ref == 1  # ET is grouped too: P and Q share NETC block A (lowest in both)


def test_2024_resection_cavity_is_not_tumour() -> None:
    cavity = _labels((30, 30, 30), (RC_GLI, (5, 5, 5), (6, 6, 6)))
    got = _assert_matches_official(cavity, cavity, ONE_MM, GLI)
    for region in ("WT", "TC", "NETC", "SNFH", "ET"):
        assert got[region] == EMPTY_RESULT
    assert (got["RC"].dice, got["RC"].hd95, got["RC"].n_tp) == (1.0, 0.0, 1)
    # Oedema predicted as cavity: a missed WT/SNFH lesion and a false RC lesion.
    oedema = _labels((30, 30, 30), (SNFH_GLI, (5, 5, 5), (6, 6, 6)))
    got = _assert_matches_official(cavity, oedema, ONE_MM, GLI)
    assert (got["WT"].n_fn, got["WT"].n_fp, got["WT"].hd95) == (1, 0, GLI_PENALTY)
    assert (got["SNFH"].n_fn, got["RC"].n_fp, got["RC"].dice, got["TC"].dice) == (1, 1, 0.0, 1.0)


@pytest.mark.parametrize("convention", [GLI, PED], ids=["gli", "ped"])
def test_2024_empty_cases(convention) -> None:
    empty = np.zeros((20, 20, 20), dtype=np.uint8)
    got = _assert_matches_official(empty, empty, ONE_MM, convention)
    assert list(got) == [r.name for r in convention.scored]
    assert all(result == EMPTY_RESULT for result in got.values())
    assert all(
        (r.dice, r.hd95, r.n_ref, r.n_tp, r.n_fp, r.n_fn) == (1.0, 0.0, 0, 0, 0, 0) for r in got.values()
    )
    pred = _labels((20, 20, 20), (1, (5, 5, 5), (4, 4, 4)))  # code 1 (NETC / ET) where nothing is
    got = _assert_matches_official(pred, empty, ONE_MM, convention)
    assert (got["WT"].dice, got["WT"].hd95, got["WT"].n_fp) == (0.0, convention.hd95_penalty_mm, 1)


@pytest.mark.parametrize("name", ["brats2023", "brats2023-met", "msd"])
def test_brats2023_conventions_score_each_region_mask_with_its_parameters(name: str) -> None:
    convention = get_convention(name)
    rng = np.random.default_rng(7)
    labels = _blobs(rng, (30, 30, 30), "GLI")
    ref = np.where(labels == 4, 2, labels)  # codes 1..3 only
    pred = np.roll(ref, 2, axis=1)
    pred[rng.random(ref.shape) < 0.002] = 3
    got = case_lesion_wise(pred, ref, (1.0, 1.2, 0.9), convention)
    assert list(got) == [r.name for r in convention.scored]
    for rule in convention.scored:
        expected = lesion_wise_scores(
            np.isin(pred, rule.codes),
            np.isin(ref, rule.codes),
            (1.0, 1.2, 0.9),
            dilation_iterations=rule.dilation,
            min_volume_mm3=rule.min_volume_mm3,
            penalty_mm=convention.hd95_penalty_mm,
        )
        assert got[rule.name] == expected


# ---------------------------------------------------------------- random multi-label cases
def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / field.std()


def _blobs(rng: np.random.Generator, shape: tuple[int, int, int], challenge: str) -> np.ndarray:
    """Nested tumour parts (outer part, core split in two), a separate cavity / cyst, speckles."""
    outer, core_a, core_b, extra = (2, 1, 3, 4) if challenge == "GLI" else (4, 2, 1, 3)
    tumour, split, other = (
        _smooth(rng, shape, rng.uniform(1.5, 2.5)),
        _smooth(rng, shape, 2.0),
        _smooth(rng, shape, 2.0),
    )
    out = np.zeros(shape, dtype=np.uint8)
    out[tumour > rng.uniform(0.8, 1.4)] = outer
    core = tumour > rng.uniform(1.5, 2.0)
    out[core] = np.where(split[core] > 0, core_b, core_a)
    out[(other > rng.uniform(1.8, 2.4)) & ((out == 0) | (rng.random() < 0.5))] = extra
    return out


def _chains(rng: np.random.Generator, shape: tuple[int, int, int], challenge: str) -> np.ndarray:
    """Tubes along the last axis whose core alternates between two parts, jittered, in a shell of
    a third part: one lesion of a part often touches two lesions of the other, a neighbour only one
    of them, which is where the official grouping depends on how lesions are numbered."""
    core_a, core_b, shell, extra = (1, 3, 2, 4) if challenge == "GLI" else (2, 1, 4, 3)
    out = np.zeros(shape, dtype=np.uint8)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = (int(rng.integers(5, n - 5)) for n in shape[:2])
        z, part = int(rng.integers(0, 6)), int(rng.integers(0, 2))
        while z < shape[2] - 4:
            length, (rx, ry) = int(rng.integers(7, 20)), rng.integers(1, 4, size=2)
            x, y = cx + int(rng.integers(-2, 3)), cy + int(rng.integers(-2, 3))
            out[max(x - rx, 0) : x + rx + 1, max(y - ry, 0) : y + ry + 1, z : z + length] = (core_a, core_b)[
                part
            ]
            part, z = 1 - part, z + length
    core = out > 0
    out[
        ndimage.binary_dilation(core, iterations=int(rng.integers(1, 3))) & ~core & (rng.random(shape) < 0.9)
    ] = shell
    other = _smooth(rng, shape, 1.5)
    out[(other > 2.3) & ((out == 0) | (rng.random() < 0.5))] = extra
    return out


def _random_case(
    rng: np.random.Generator, shape: tuple[int, int, int], challenge: str, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, reference): the reference with speckles; the prediction shifted, with parts
    relabelled and dropped, and lesions and speckles added."""
    make = _blobs if kind == "blobs" else _chains

    def speckled(labels: np.ndarray) -> np.ndarray:
        speckles = rng.random(shape) < 0.0015
        labels[speckles] = rng.integers(1, 5, size=int(speckles.sum()))
        return labels

    ref = speckled(make(rng, shape, challenge))
    pred = np.roll(ref, tuple(int(s) for s in rng.integers(-2, 3, size=3)), axis=(0, 1, 2))
    swap = (_smooth(rng, shape, 3.0) > 0.8) & (pred > 0)
    pred[swap] = rng.integers(1, 5, size=int(swap.sum()))
    pred[_smooth(rng, shape, 3.0) > 1.6] = 0
    extra = speckled(make(rng, shape, challenge))
    new = (pred == 0) & (extra > 0) & (_smooth(rng, shape, 2.5) > 0.8)
    pred[new] = extra[new]
    return pred, ref


RANDOM_CASES = [
    *(("GLI", "blobs", seed) for seed in range(6)),
    *(("PED", "blobs", seed) for seed in range(4)),
    *(("GLI", "chains", seed) for seed in range(6)),
    *(("PED", "chains", seed) for seed in range(3)),
]


def _case_inputs(challenge: str, kind: str, seed: int):
    rng = np.random.default_rng([2024, seed, challenge == "PED", kind == "chains"])
    spacing = (1.0, 1.0, 1.0) if seed % 3 else tuple(float(s) for s in rng.choice([0.8, 1.0, 1.5], size=3))
    shape = (32, 32, 32) if kind == "blobs" else (22, 22, 64)
    pred, ref = _random_case(rng, shape, challenge, kind)
    return pred, ref, spacing, GLI if challenge == "GLI" else PED


@pytest.mark.parametrize(("challenge", "kind", "seed"), RANDOM_CASES)
def test_2024_agrees_with_the_official_code_on_random_cases(challenge: str, kind: str, seed: int) -> None:
    pred, ref, spacing, convention = _case_inputs(challenge, kind, seed)
    _assert_matches_official(pred, ref, spacing, convention)
