"""Component confidence: whole-tumour components the network is unsure of, dropped by a threshold chosen on
validation and stored with the model.

A component's confidence is the mean whole-tumour probability over its voxels. On the default data the
false-positive blobs a network paints into tumour-free brains have mean probabilities of about 0.65-0.77,
the tumours it finds 0.87-0.97; a threshold between the two removes one without touching the other. As
nnU-Net decides its post-processing on cross-validation, the ``evaluate`` stage chooses the threshold on
the validation split (:func:`choose_min_confidence`) and stores it in the model's config
(``postprocess.min_component_confidence``), so every engine that serves the model applies the same rule;
``predict.min_component_confidence`` overrides it.

numpy and cc3d only: the ONNX predictor's cold start imports this without torch or scipy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

POSTPROCESS_KEY = "postprocess"
"""Section of a model's stored config with the settings chosen after training."""
CONFIDENCE_KEY = "min_component_confidence"


def model_min_confidence(config: dict[str, Any]) -> float:
    """The component-confidence threshold stored with a model (0: none chosen, keep every component)."""
    section = config.get(POSTPROCESS_KEY) or {}
    return float(section.get(CONFIDENCE_KEY, 0.0) or 0.0)


def resolve_min_confidence(override: float | None, config: dict[str, Any]) -> float:
    """``predict.min_component_confidence`` when set, else the model's own."""
    return float(override) if override is not None else model_min_confidence(config)


def whole_tumour_probability(probabilities: np.ndarray, output: str) -> np.ndarray:
    """Probability ``(X, Y, Z)`` that a voxel is tumour, from the network's ``(C, X, Y, Z)`` probabilities:
    the largest region probability (the sigmoid regions are not forced to nest, so an inner region may
    be the surer one) or 1 - background (label softmax)."""
    if output == "regions":
        return probabilities.max(axis=0)
    return 1.0 - probabilities[0]


def _components(tumour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(component ids, voxels per id)`` of the 26-connected components of boolean ``tumour`` (cc3d:
    connected-components-3d, 20 ms to import against scipy.ndimage's 120 ms of a cold start)."""
    import cc3d

    components = cc3d.connected_components(tumour, connectivity=26)
    return components, np.bincount(components.ravel())


def _means(components: np.ndarray, counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each component id."""
    sums = np.bincount(components.ravel(), weights=values.ravel().astype(np.float64), minlength=counts.size)
    return sums / np.maximum(counts, 1)


def tumour_components(labels: np.ndarray, tumour_probability: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(component ids (X, Y, Z), mean tumour probability per id)`` of the 26-connected components of
    ``labels > 0``; id 0 is the background (its mean is meaningless)."""
    components, counts = _components(labels > 0)
    return components, _means(components, counts, tumour_probability)


def min_component_voxels(min_volume_mm3: float, spacing_mm: tuple[float, ...]) -> float:
    """The size rule in voxels: components of at most ``ceil(min_volume_mm3 / voxel volume)`` voxels are
    small, as MONAI's ``RemoveSmallObjects`` (by measure) decides with scikit-image 0.26 (MONAI passes the
    size positionally, which scikit-image now reads as its inclusive ``max_size``)."""
    if min_volume_mm3 <= 0:
        return 0.0
    return float(np.ceil(min_volume_mm3 / np.prod(np.array(spacing_mm, dtype=np.float64))))


def filter_components(
    labels: np.ndarray,
    tumour_probability: np.ndarray | None = None,
    *,
    min_voxels: float = 0.0,
    min_confidence: float = 0.0,
) -> np.ndarray:
    """``labels`` ``(X, Y, Z)`` with every 26-connected tumour component zeroed that is small (at most
    ``min_voxels`` voxels, :func:`min_component_voxels`) or unsure (mean ``tumour_probability`` below
    ``min_confidence``). Both rules read one labelling; with neither set, or no tumour, ``labels`` is
    returned as it is. An all-tumour volume keeps its one component under the size rule, as MONAI does."""
    tumour = labels > 0
    size_rule = min_voxels > 0 and not tumour.all()
    confidence_rule = min_confidence > 0 and tumour_probability is not None
    if not (size_rule or confidence_rule) or not tumour.any():
        return labels
    components, counts = _components(tumour)
    keep = np.ones(counts.size, dtype=bool)
    if size_rule:
        keep &= counts > min_voxels
    if confidence_rule:
        keep &= _means(components, counts, tumour_probability) >= min_confidence
    keep[0] = False
    if keep[1:].all():
        return labels
    return labels * keep[components].astype(labels.dtype)


@dataclass
class CaseComponents:
    """What the choice needs of one validation case: per predicted component its mean probability and, per
    region, its voxels predicted in the region and those also in the reference; the reference sizes."""

    case_id: str
    means: np.ndarray  # (K,)
    predicted: np.ndarray  # (K, R)
    overlap: np.ndarray  # (K, R)
    reference: np.ndarray  # (R,)

    @classmethod
    def of(
        cls,
        case_id: str,
        labels: np.ndarray,
        tumour_probability: np.ndarray,
        pred_regions: np.ndarray,
        ref_regions: np.ndarray,
    ) -> CaseComponents:
        """From the predicted ``labels`` ``(X, Y, Z)``, the tumour probability and boolean region masks
        ``(R, X, Y, Z)`` of the prediction and the reference."""
        components, means = tumour_components(labels, tumour_probability)
        flat = components.ravel()
        n = means.size
        predicted = np.stack(
            [np.bincount(flat, weights=r.ravel(), minlength=n) for r in pred_regions], axis=1
        )
        overlap = np.stack(
            [
                np.bincount(flat, weights=(p & t).ravel(), minlength=n)
                for p, t in zip(pred_regions, ref_regions, strict=True)
            ],
            axis=1,
        )
        reference = ref_regions.reshape(len(ref_regions), -1).sum(axis=1).astype(np.float64)
        return cls(case_id, means[1:], predicted[1:], overlap[1:], reference)

    def dice(self, min_confidence: float) -> np.ndarray:
        """Dice per region ``(R,)`` with components below ``min_confidence`` dropped (empty and empty: 1)."""
        kept = self.means >= min_confidence
        predicted = self.predicted[kept].sum(axis=0)
        overlap = self.overlap[kept].sum(axis=0)
        denominator = predicted + self.reference
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denominator > 0, 2 * overlap / denominator, 1.0)


@dataclass
class ConfidenceChoice:
    """The chosen threshold and the validation mean Dice (over cases, of each case's mean over regions)
    without it and with it; ``interval``: the range of thresholds that all score best (the choice is
    its middle)."""

    min_confidence: float
    n_cases: int
    dice_mean_without: float
    dice_mean_with: float
    interval: tuple[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            CONFIDENCE_KEY: round(self.min_confidence, 6),
            "chosen_on": f"validation split ({self.n_cases} cases)",
            "val_dice_mean_without": round(self.dice_mean_without, 6),
            "val_dice_mean_with": round(self.dice_mean_with, 6),
            "best_interval": [round(v, 6) for v in self.interval],
        }

    def one_line(self) -> str:
        if self.min_confidence <= 0:
            return (
                f"component confidence: no threshold improves the {self.n_cases} validation cases "
                f"(mean Dice {self.dice_mean_without:.3f}); every component kept"
            )
        return (
            f"component confidence: tumour components with mean probability below {self.min_confidence:.3f} "
            f"dropped (validation, {self.n_cases} cases: mean Dice {self.dice_mean_without:.3f} -> "
            f"{self.dice_mean_with:.3f}; every threshold in ({self.interval[0]:.3f}, {self.interval[1]:.3f}] "
            "scores the same)"
        )


def choose_min_confidence(cases: list[CaseComponents], tolerance: float = 1e-9) -> ConfidenceChoice:
    """The threshold that maximises the validation mean Dice, in the middle of the best range.

    The score changes only at the components' mean probabilities, so the candidates are the intervals
    between consecutive means: (0, m1], (m1, m2], ... (mk, 1]. Neighbouring intervals that score the
    best make one range (a component that changes no Dice does not split it); of separate best ranges
    the lowest wins (drop as little as possible), and one that starts at 0 keeps everything and gives 0.
    The range's middle keeps as far from the validation false positives below as from the true
    components above.
    """
    if not cases:
        raise ValueError("no validation cases to choose a component-confidence threshold on")
    edges = np.unique(np.concatenate([[0.0], *[case.means for case in cases], [1.0]]))
    edges = edges[(edges >= 0) & (edges <= 1)]

    def score(threshold: float) -> float:
        return float(np.mean([case.dice(threshold).mean() for case in cases]))

    # an interval (lo, hi] is represented by any threshold inside it: just above lo
    scores = [score(float(np.nextafter(lo, 1.0))) for lo in edges[:-1]]
    without = score(0.0)
    best = max(scores)
    first = next(i for i, value in enumerate(scores) if value >= best - tolerance)
    last = first
    while last + 1 < len(scores) and scores[last + 1] >= best - tolerance:
        last += 1
    lo, hi = float(edges[first]), float(edges[last + 1])
    if first == 0 or best <= without + tolerance:
        return ConfidenceChoice(0.0, len(cases), without, without, (0.0, hi))
    return ConfidenceChoice((lo + hi) / 2, len(cases), without, best, (lo, hi))
