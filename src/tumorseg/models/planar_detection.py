"""Tumour / no-tumour detection: the two candidate detectors, choosing one on validation, metrics with CIs.

Two detectors score every image:

- ``classifier``: the CNN's tumour probability (sigmoid of its tumour-present logit);
- ``area_rule``: the 2-D segmentation's predicted tumour area (pixels on the preprocessed grid),
  turned into a probability by a logistic fit of ``log(1 + area)`` on the validation split (Platt
  scaling, scikit-learn), so both detectors answer with a probability.

:func:`choose_detector` compares them on the **validation** split (``detect.selection_metric``: ROC
AUC, ties broken by accuracy, or accuracy) and fixes the decision threshold there
(``detect.threshold``: Youden's J, or a fixed probability). The test split is only scored, never
used to choose.

:func:`binary_detection_metrics` gives accuracy, sensitivity, specificity and ROC AUC with
percentile-bootstrap CIs in which **patients** are resampled (all of a patient's images together),
so images of one patient never count as independent evidence.
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
    """A chosen detector: how a probability is computed and where it is cut.

    Attributes:
        method: ``classifier`` or ``area_rule``.
        threshold: an image is "tumour" when its probability is at least this.
        area_coef, area_intercept: ``area_rule`` calibration, ``p = sigmoid(coef * log1p(area_px) + intercept)``.
        validation: validation metrics of every candidate (``{method: {auc, accuracy, threshold}}``).
    """

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
    """Logistic fit ``P(tumour) = sigmoid(a * log1p(area) + b)`` (scikit-learn, L2 C=1), with ``a > 0``.

    The rule means "more predicted tumour, more likely a tumour"; a fit that says otherwise (a
    segmentation whose false positives outgrow its true positives on validation) or that is
    undefined (one class only) gets the default steep rule instead (an area above ~20 px is "tumour"),
    and its validation AUC, taken on the area itself, shows how poor the rule is.
    """
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
    """The probability cut maximising sensitivity + specificity - 1 (Youden's J); 0.5 if undefined.

    scikit-learn's ``roc_curve`` gives the best cut as an observed score (the lowest one still
    called positive), which sits on the edge of the gap between the classes and overfits a small
    validation split; the cut returned is the middle of that gap: halfway to the next lower score.
    """
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


def point_metrics(truth: np.ndarray, probability: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Accuracy, sensitivity, specificity (None without positives / negatives) and ROC AUC (None with one class)."""
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
    """Fit both candidates on the validation images and keep the better (or the one ``method`` names).

    Args:
        truth: ``(N,)`` validation tumour labels.
        classifier_probability: ``(N,)`` the classifier's tumour probabilities.
        area_px: ``(N,)`` predicted tumour areas in pixels.
        method: ``auto``, ``classifier`` or ``area_rule``.
        selection_metric: ``auc`` (ties: accuracy) or ``accuracy`` (ties: auc).
        threshold_rule: ``youden`` or ``fixed``.
        fixed_threshold: the cut with ``threshold_rule="fixed"``.
    """
    coef, intercept = area_calibration(area_px, truth)
    candidates: dict[str, DetectorRule] = {}
    for name in CANDIDATES:
        rule = DetectorRule(name, 0.5, coef, intercept)
        probability = rule.probability(classifier_probability, area_px)
        rule.threshold = (
            youden_threshold(probability, truth) if threshold_rule == "youden" else fixed_threshold
        )
        candidates[name] = rule
    scores = {
        name: {
            **point_metrics(truth, rule.probability(classifier_probability, area_px), rule.threshold),
            "threshold": rule.threshold,
        }
        for name, rule in candidates.items()
    }

    def rank(name: str) -> tuple[float, float, int]:
        s = scores[name]
        auc = s["auc"] if s["auc"] is not None else -1.0
        acc = s["accuracy"] if s["accuracy"] is not None else -1.0
        first, second = (auc, acc) if selection_metric == "auc" else (acc, auc)
        return (first, second, -CANDIDATES.index(name))  # a full tie keeps the classifier

    chosen = max(CANDIDATES, key=rank) if method == "auto" else method
    rule = candidates[chosen]
    rule.validation = {name: {k: v for k, v in s.items()} for name, s in scores.items()}
    return rule


def patient_bootstrap_indices(patient_ids: np.ndarray, resamples: int, seed: int) -> list[np.ndarray]:
    """Image indices of each bootstrap resample: patients drawn with replacement, all their images kept."""
    patient_ids = np.asarray(patient_ids).astype(str)
    patients, inverse = np.unique(patient_ids, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(patients))]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(patients), size=(resamples, len(patients)))
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
    """Accuracy, sensitivity, specificity, AUC, each with a patient-level percentile-bootstrap CI.

    Returns:
        ``{metric: {"value", "ci_low", "ci_high"}, "n_images", "n_patients", "positives", "negatives",
        "threshold"}``; a metric undefined on the data (no negatives...) is None, and its CI is taken
        over the resamples where it is defined.
    """
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
        low, high = (
            (float(q) for q in np.quantile(values, [alpha, 1 - alpha])) if values.size else (None, None)
        )
        out[metric] = {"value": point[metric], "ci_low": low, "ci_high": high}
    return out
