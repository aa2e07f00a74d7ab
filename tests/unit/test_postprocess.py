"""Component confidence: the rule, its choice on validation, and both engines applying the stored value."""

from __future__ import annotations

import numpy as np
import pytest

from tumorseg.models.postprocess import (
    CaseComponents,
    choose_min_confidence,
    filter_components,
    min_component_voxels,
    model_min_confidence,
    resolve_min_confidence,
    whole_tumour_probability,
)


def two_blobs(sure: float = 0.95, unsure: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(12, 12, 12)`` with two separate tumour blobs and a tumour probability: ``sure`` over
    the first, ``unsure`` over the second."""
    labels = np.zeros((12, 12, 12), dtype=np.uint8)
    probability = np.zeros(labels.shape, dtype=np.float32)
    labels[1:4, 1:4, 1:4] = 2
    labels[2, 2, 2] = 3
    probability[1:4, 1:4, 1:4] = sure
    labels[7:10, 7:10, 7:10] = 2
    probability[7:10, 7:10, 7:10] = unsure
    return labels, probability


def test_components_below_the_threshold_are_dropped_whole() -> None:
    labels, probability = two_blobs()
    kept = filter_components(labels, probability, min_confidence=0.8)
    assert kept.dtype == np.uint8
    assert np.array_equal(kept[:6], labels[:6])  # the sure blob, its core label included
    assert not kept[6:].any()
    assert np.array_equal(filter_components(labels, probability, min_confidence=0.0), labels)
    assert np.array_equal(filter_components(labels, probability, min_confidence=0.55), labels)
    assert not filter_components(labels, probability, min_confidence=0.99).any()


def test_size_and_confidence_rules_apply_together() -> None:
    """A small sure blob goes by size, a large unsure one by confidence, a large sure one stays."""
    labels, probability = two_blobs()  # two 27-voxel blobs: sure, unsure
    labels[1:11, 9:11, 1:3] = 2  # a third, 40 voxels, sure
    probability[1:11, 9:11, 1:3] = 0.9
    both = filter_components(labels, probability, min_voxels=30, min_confidence=0.8)
    assert both[1:11, 9:11, 1:3].all() and not both[1:4, 1:4, 1:4].any() and not both[7:10, 7:10, 7:10].any()
    size_only = filter_components(labels, probability, min_voxels=30)
    assert (
        size_only[1:11, 9:11, 1:3].all()
        and not size_only[1:4, 1:4, 1:4].any()
        and not size_only[7:10, 7:10, 7:10].any()
    )
    assert np.array_equal(filter_components(labels, probability, min_voxels=26), labels)
    assert not filter_components(labels, probability, min_voxels=40).any()
    everywhere = np.ones((4, 4, 4), dtype=np.uint8)
    assert np.array_equal(filter_components(everywhere, min_voxels=1000), everywhere)  # as MONAI


def test_size_rule_in_voxels() -> None:
    assert min_component_voxels(0.0, (2.0, 2.0, 2.0)) == 0
    assert min_component_voxels(64.0, (2.0, 2.0, 2.0)) == 8  # at most 8 voxels of 8 mm3 go
    assert min_component_voxels(65.0, (2.0, 2.0, 2.0)) == 9
    assert min_component_voxels(1000.0, (1.0, 1.0, 2.0)) == 500


def test_whole_tumour_probability_of_regions_and_of_label_softmax() -> None:
    regions = np.array([[0.9, 0.2], [0.7, 0.1], [0.3, 0.6]], dtype=np.float32)[:, :, None, None]
    assert whole_tumour_probability(regions, "regions")[:, 0, 0].tolist() == pytest.approx([0.9, 0.6])
    softmax = np.array([[0.2, 0.9], [0.5, 0.05], [0.3, 0.05]], dtype=np.float32)[:, :, None, None]
    assert whole_tumour_probability(softmax, "labels")[:, 0, 0].tolist() == pytest.approx([0.8, 0.1])


def case(
    case_id: str, means: list[float], predicted: list[float], overlap: list[float], reference: float
) -> CaseComponents:
    """One region (R = 1): components with these means, predicted voxels and voxels in the reference."""
    return CaseComponents(
        case_id,
        np.array(means, dtype=np.float64),
        np.array(predicted, dtype=np.float64)[:, None],
        np.array(overlap, dtype=np.float64)[:, None],
        np.array([reference], dtype=np.float64),
    )


def test_case_dice_follows_the_kept_components() -> None:
    one = case("a", [0.95, 0.7], [100, 20], [90, 0], 100)
    assert one.dice(0.0)[0] == pytest.approx(2 * 90 / 220)
    assert one.dice(0.8)[0] == pytest.approx(2 * 90 / 200)
    assert one.dice(0.99)[0] == 0.0
    empty = case("b", [0.75], [30], [0], 0)
    assert empty.dice(0.5)[0] == 0.0 and empty.dice(0.8)[0] == 1.0  # nothing and nothing: 1


def test_the_choice_is_the_middle_of_the_best_interval() -> None:
    cases = [
        case("tumour", [0.95, 0.7], [100, 20], [90, 0], 100),
        case("healthy", [0.75], [30], [0], 0),
        case("faint", [0.9], [50], [45], 50),
    ]
    choice = choose_min_confidence(cases)
    assert choice.interval == pytest.approx((0.75, 0.9))
    assert choice.min_confidence == pytest.approx(0.825)
    assert choice.dice_mean_with > choice.dice_mean_without
    assert choice.dice_mean_with == pytest.approx(np.mean([c.dice(0.825).mean() for c in cases]))
    record = choice.to_dict()
    assert record["min_component_confidence"] == pytest.approx(0.825)
    assert record["chosen_on"] == "validation split (3 cases)"
    assert "0.825" in choice.one_line()


def test_nothing_is_dropped_when_no_threshold_helps() -> None:
    cases = [case("tumour", [0.95, 0.7], [100, 20], [90, 18], 110), case("none", [], [], [], 0)]
    choice = choose_min_confidence(cases)
    assert choice.min_confidence == 0.0
    assert choice.dice_mean_with == choice.dice_mean_without
    assert "every component kept" in choice.one_line()
    with pytest.raises(ValueError, match="no validation cases"):
        choose_min_confidence([])


def test_best_neighbouring_intervals_make_one_range_and_separate_ones_go_to_the_lower() -> None:
    # a component with no voxels in the scored region changes nothing: (0.6, 0.8] and (0.8, 0.9] are one range
    merged = choose_min_confidence([case("a", [0.9, 0.6, 0.8], [100, 10, 0], [100, 0, 0], 100)])
    assert merged.interval == pytest.approx((0.6, 0.9))
    assert merged.min_confidence == pytest.approx(0.75)
    # (0.6, 0.7] and (0.8, 1] both score 2/3, with (0.7, 0.8] between them: the lower range wins
    cases = [
        case("free", [0.6], [10], [0], 0),
        case("tumour", [0.7], [100], [100], 100),
        case("free too", [0.8], [10], [0], 0),
    ]
    separate = choose_min_confidence(cases)
    assert separate.interval == pytest.approx((0.6, 0.7))
    assert separate.min_confidence == pytest.approx(0.65)
    assert separate.dice_mean_with == pytest.approx(2 / 3)


def test_the_stored_threshold_and_its_override() -> None:
    assert model_min_confidence({}) == 0.0
    assert model_min_confidence({"postprocess": {"min_component_confidence": 0.82}}) == 0.82
    assert resolve_min_confidence(None, {"postprocess": {"min_component_confidence": 0.82}}) == 0.82
    assert resolve_min_confidence(0.0, {"postprocess": {"min_component_confidence": 0.82}}) == 0.0
    assert resolve_min_confidence(0.5, {}) == 0.5
