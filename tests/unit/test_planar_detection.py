"""Detector choice on validation, detection metrics with patient-level CIs, 2-D segmentation scores."""

from __future__ import annotations

import numpy as np
import pytest

from tumorseg.evaluation.metrics import segmentation_scores
from tumorseg.evaluation.summary import patient_mean_ci
from tumorseg.models.planar_detection import (
    binary_detection_metrics,
    choose_detector,
    patient_bootstrap_indices,
    point_metrics,
    youden_threshold,
)


def _validation(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.array([True] * 20 + [False] * 20)
    informative = np.where(truth, rng.uniform(0.6, 1.0, 40), rng.uniform(0.0, 0.4, 40))
    noise = rng.uniform(0, 1, 40)
    return truth, informative, noise


def test_area_rule_chosen_when_the_segmentation_separates_better() -> None:
    truth, informative, noise = _validation()
    areas = np.where(truth, 300.0, 0.0) + informative  # tumour images: large predicted areas
    rule = choose_detector(truth, noise, areas)
    assert rule.method == "area_rule"
    assert rule.validation["area_rule"]["auc"] == pytest.approx(1.0)
    assert rule.validation["classifier"]["auc"] < 0.9
    probability = rule.probability(noise, areas)
    assert point_metrics(truth, probability, rule.threshold)["accuracy"] == pytest.approx(1.0)


def test_classifier_chosen_when_it_separates_better() -> None:
    truth, informative, noise = _validation()
    rule = choose_detector(truth, informative, noise * 100)
    assert rule.method == "classifier"
    assert point_metrics(truth, informative, rule.threshold)["accuracy"] == pytest.approx(1.0)
    assert np.array_equal(rule.probability(informative, noise), informative)


def test_forced_method_and_fixed_threshold() -> None:
    truth, informative, noise = _validation()
    rule = choose_detector(
        truth, informative, noise, method="area_rule", threshold_rule="fixed", fixed_threshold=0.3
    )
    assert (rule.method, rule.threshold) == ("area_rule", 0.3)


def test_youden_threshold_separates_classes() -> None:
    truth = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    threshold = youden_threshold(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), truth)
    assert threshold == pytest.approx(0.5)  # the middle of the gap between the classes
    assert youden_threshold(np.array([0.2, 0.9]), np.array([True, True])) == 0.5


def test_point_metrics_counts() -> None:
    truth = np.array([1, 1, 1, 0, 0], dtype=bool)
    probability = np.array([0.9, 0.8, 0.2, 0.1, 0.7])
    m = point_metrics(truth, probability, 0.5)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(5 / 6)
    only_positive = point_metrics(truth[:3], probability[:3], 0.5)
    assert only_positive["specificity"] is None and only_positive["auc"] is None


def test_bootstrap_resamples_patients_not_images() -> None:
    patients = np.array(["a", "a", "a", "b", "c"])
    for idx in patient_bootstrap_indices(patients, 50, seed=1):
        drawn = patients[idx]
        # a patient's three images always come together
        assert np.sum(drawn == "a") % 3 == 0


def test_detection_metrics_have_cis_around_the_value() -> None:
    rng = np.random.default_rng(3)
    truth = np.array([True] * 30 + [False] * 30)
    probability = np.clip(truth * 0.5 + rng.normal(0.25, 0.25, 60), 0, 1)
    patients = np.array([f"p{i // 2}" for i in range(60)])
    out = binary_detection_metrics(truth, probability, 0.5, patients, resamples=300, ci_level=0.95, seed=0)
    assert (out["n_images"], out["n_patients"], out["positives"], out["negatives"]) == (60, 30, 30, 30)
    for metric in ("accuracy", "sensitivity", "specificity", "auc"):
        value = out[metric]
        assert value["ci_low"] <= value["value"] <= value["ci_high"], metric
        assert value["ci_high"] - value["ci_low"] > 0, metric


def test_patient_mean_ci_empty_and_constant() -> None:
    assert patient_mean_ci(np.array([]), np.array([]), resamples=100, ci_level=0.95, seed=0)["value"] is None
    const = patient_mean_ci(np.ones(4), np.array(["a", "a", "b", "c"]), resamples=100, ci_level=0.95, seed=0)
    assert const["value"] == const["ci_low"] == const["ci_high"] == 1.0
    assert const["n_patients"] == 3


def test_segmentation_scores_rules_and_distance() -> None:
    empty = np.zeros((32, 32), dtype=np.uint8)
    square = empty.copy()
    square[8:16, 8:16] = 1
    shifted = np.roll(square, 3, axis=1)
    assert segmentation_scores(empty, empty, 99.0) == (1.0, 0.0)
    assert segmentation_scores(square, empty, 99.0) == (0.0, 99.0)
    assert segmentation_scores(empty, square, 99.0) == (0.0, 99.0)
    assert segmentation_scores(square, square, 99.0) == (1.0, 0.0)
    dice, hd95 = segmentation_scores(shifted, square, 99.0)
    assert dice == pytest.approx(2 * 40 / 128)
    assert hd95 == pytest.approx(3.0)


def test_area_rule_never_means_smaller_area_more_tumour() -> None:
    """Validation where false positives are larger than tumours: the rule keeps a positive slope, loses on AUC."""
    truth, informative, _ = _validation()
    areas = np.where(truth, 50.0, 5000.0)
    rule = choose_detector(truth, informative, areas)
    assert rule.method == "classifier"
    assert rule.area_coef > 0
    assert rule.validation["area_rule"]["auc"] == pytest.approx(0.0)


def test_accuracy_threshold_trades_the_few_negatives_for_the_many_positives() -> None:
    from tumorseg.models.planar_detection import accuracy_threshold, point_metrics, youden_threshold

    # 8 tumour images, 2 tumour-free; one tumour-free image scores above three tumours
    probability = np.array([0.05, 0.6, 0.3, 0.4, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99])
    truth = np.array([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], dtype=bool)
    cut = accuracy_threshold(probability, truth)
    assert 0.05 < cut < 0.3
    assert point_metrics(truth, probability, cut)["accuracy"] == 0.9
    youden = youden_threshold(probability, truth)
    assert point_metrics(truth, probability, youden)["accuracy"] < 0.9  # balanced, not accurate
    assert accuracy_threshold(probability, np.ones(10, dtype=bool)) == 0.5
