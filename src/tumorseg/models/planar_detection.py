"""Tumour/no-tumour detection: two candidate detectors chosen on validation, metrics with patient-level CIs.

``classifier`` is the CNN's tumour probability; ``area_rule`` Platt-scales ``log(1 + predicted tumour
area)``. Choice and threshold are fixed on validation; CIs resample **patients**, never images.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

CANDIDATES: tuple[str, ...] = ("classifier", "area_rule")
DETECTION_METRICS: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "auc")


@dataclass
class DetectorRule:
    """A chosen detector: "tumour" when its probability >= ``threshold``; ``area_rule`` is ``p =
    sigmoid(area_coef * log1p(area_px) + area_intercept)``; ``validation``: ``{method: {auc, ...}}``."""

    method: str
    threshold: float
    area_coef: float = 0.0
    area_intercept: float = 0.0
    validation: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def probability(self, classifier_probability: np.ndarray, area_px: np.ndarray) -> np.ndarray:
        """Tumour probability ``(N,)`` of images with these classifier probabilities and predicted areas."""
        if self.method == "classifier":
            return np.asarray(classifier_probability, dtype=np.float64)
        z = self.area_coef * np.log1p(np.asarray(area_px, dtype=np.float64)) + self.area_intercept
        return 1.0 / (1.0 + np.exp(-z))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorRule:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def area_calibration(area_px: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Logistic fit ``P(tumour) = sigmoid(a * log1p(area) + b)`` (L2, C=1); a fit with ``a <= 0`` (more
    tumour, less likely) or one class only gets the default steep rule (above ~20 px is "tumour")."""
    default = (4.0, -4.0 * math.log1p(20.0))
    truth = np.asarray(truth).astype(bool)
    x = np.log1p(np.asarray(area_px, dtype=np.float64)).reshape(-1, 1)
    if truth.all() or not truth.any():
        return default
    from sklearn.linear_model import LogisticRegression

    fit = LogisticRegression(C=1.0).fit(x, truth)
    coef, intercept = float(fit.coef_[0, 0]), float(fit.intercept_[0])
    return (coef, intercept) if coef > 0 else default


def youden_threshold(probability: np.ndarray, truth: np.ndarray) -> float:
    """The cut maximising Youden's J (0.5 if undefined), halfway to the next lower score: ``roc_curve``'s
    cut sits on the edge of the gap between the classes and overfits a small validation split."""
    truth = np.asarray(truth).astype(bool)
    if truth.all() or not truth.any():
        return 0.5
    from sklearn.metrics import roc_curve

    probability = np.asarray(probability, dtype=np.float64)
    fpr, tpr, thresholds = roc_curve(truth, probability)
    best = int(np.argmax(tpr - fpr))
    cut = float(min(thresholds[best], probability.max()))
    below = probability[probability < cut]
    if below.size:
        cut = (cut + float(below.max())) / 2.0
    return float(min(max(cut, 1e-6), 1.0))


def accuracy_threshold(probability: np.ndarray, truth: np.ndarray) -> float:
    """The cut maximising accuracy (0.5 if one class only), halfway between the scores it separates, the
    lowest such cut on ties. Youden's J weighs the classes equally, so a validation split with a handful
    of tumour-free images sets the cut above all of them, at whatever cost in missed tumours."""
    truth = np.asarray(truth).astype(bool)
    if truth.all() or not truth.any():
        return 0.5
    probability = np.asarray(probability, dtype=np.float64)
    scores = np.unique(probability)
    cuts = np.concatenate([[scores[0] / 2.0], (scores[:-1] + scores[1:]) / 2.0, [(scores[-1] + 1.0) / 2.0]])
    accuracy = [np.mean((probability >= cut) == truth) for cut in cuts]
    return float(min(max(cuts[int(np.argmax(accuracy))], 1e-6), 1.0))


def point_metrics(truth: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Accuracy, sensitivity, specificity (None without positives/negatives), ROC AUC (None: one class)."""
    truth = np.asarray(truth).astype(bool)
    probability = np.asarray(probability, dtype=np.float64)
    called = probability >= threshold
    tp = int(np.sum(truth & called))
    tn = int(np.sum(~truth & ~called))
    positives, negatives = int(truth.sum()), int((~truth).sum())
    auc = None
    if positives and negatives:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(truth, probability))
    return {
        "accuracy": (tp + tn) / truth.size if truth.size else None,
        "sensitivity": tp / positives if positives else None,
        "specificity": tn / negatives if negatives else None,
        "auc": auc,
    }


def choose_detector(
    truth: np.ndarray,
    classifier_probability: np.ndarray,
    area_px: np.ndarray,
    *,
    method: str = "auto",
    selection_metric: str = "auc",
    threshold_rule: str = "youden",
    fixed_threshold: float = 0.5,
) -> DetectorRule:
    """Fit both candidates on validation images ``(N,)``; keep the better, or the one ``method`` names.

    ``selection_metric`` ``auc`` breaks ties by accuracy, ``accuracy`` by AUC.
    """
    coef, intercept = area_calibration(area_px, truth)
    candidates: dict[str, DetectorRule] = {}
    scores: dict[str, dict[str, float | None]] = {}
    for name in CANDIDATES:
        rule = DetectorRule(name, 0.5, coef, intercept)
        probability = rule.probability(classifier_probability, area_px)
        rules = {"youden": youden_threshold, "accuracy": accuracy_threshold}
        rule.threshold = (
            rules[threshold_rule](probability, truth) if threshold_rule in rules else fixed_threshold
        )
        candidates[name] = rule
        scores[name] = {**point_metrics(truth, probability, rule.threshold), "threshold": rule.threshold}

    def rank(name: str) -> tuple[float, float, int]:
        s = scores[name]
        auc = s["auc"] if s["auc"] is not None else -1.0
        acc = s["accuracy"] if s["accuracy"] is not None else -1.0
        first, second = (auc, acc) if selection_metric == "auc" else (acc, auc)
        return (first, second, -CANDIDATES.index(name))  # a full tie keeps the classifier

    rule = candidates[max(CANDIDATES, key=rank) if method == "auto" else method]
    rule.validation = {name: dict(s) for name, s in scores.items()}
    return rule


def patient_bootstrap_indices(patient_ids: np.ndarray, resamples: int, seed: int) -> list[np.ndarray]:
    """Image indices of each bootstrap resample: patients drawn with replacement, all their images kept."""
    patients, inverse = np.unique(np.asarray(patient_ids).astype(str), return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(patients))]
    draws = np.random.default_rng(seed).integers(0, len(patients), size=(resamples, len(patients)))
    return [np.concatenate([members[p] for p in row]) for row in draws]


def binary_detection_metrics(
    truth: np.ndarray,
    probability: np.ndarray,
    threshold: float,
    patient_ids: np.ndarray,
    *,
    resamples: int,
    ci_level: float,
    seed: int,
) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity, AUC with a patient-level percentile-bootstrap CI: ``{metric:
    {"value", "ci_low", "ci_high"}, "n_images", "n_patients", "positives", "negatives", "threshold"}``;
    an undefined metric is None, its CI over the resamples where it is defined."""
    truth = np.asarray(truth).astype(bool)
    probability = np.asarray(probability, dtype=np.float64)
    point = point_metrics(truth, probability, threshold)
    samples: dict[str, list[float]] = {m: [] for m in DETECTION_METRICS}
    for idx in patient_bootstrap_indices(patient_ids, resamples, seed):
        for metric, value in point_metrics(truth[idx], probability[idx], threshold).items():
            if value is not None:
                samples[metric].append(value)
    alpha = (1.0 - ci_level) / 2.0
    out: dict[str, Any] = {
        "n_images": int(truth.size),
        "n_patients": int(len(np.unique(np.asarray(patient_ids).astype(str)))),
        "positives": int(truth.sum()),
        "negatives": int((~truth).sum()),
        "threshold": float(threshold),
    }
    for metric in DETECTION_METRICS:
        values = np.asarray(samples[metric])
        low, high = np.quantile(values, [alpha, 1 - alpha]).tolist() if values.size else (None, None)
        out[metric] = {"value": point[metric], "ci_low": low, "ci_high": high}
    return out
