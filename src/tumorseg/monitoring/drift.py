"""Drift of incoming scans against the data a model was trained on.

A *reference profile* summarises the training cases of a registered model, one feature vector per
case: per modality the 1st, 50th and 99th intensity percentile inside the brain (the voxels any
modality has non-zero; BraTS-style data are skull-stripped, so that is the brain), the brain volume
and its share of the field of view, the smallest and largest voxel size, the field of view, and the
stored orientation; plus the predicted tumour volumes of the held-out test cases. It is stored with
the model (pyfunc artifact ``drift_profile``).

A case is *outside the reference* when a numeric feature lies beyond the training range by more than
``monitor.tolerance`` of that range (the range counting as at least ``min_relative_span`` of the
median), or when its orientation never occurred in training. The rule is a per-case one on purpose: a
single scan arriving at the API has no distribution to test. Over a folder of predictions
``tumorseg monitor`` adds two-sample Kolmogorov-Smirnov tests per feature (:mod:`scipy.stats`,
already a dependency; see :mod:`tumorseg.monitoring.monitor`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.data.conventions import CANONICAL_MODALITIES

log = logging.getLogger(__name__)

PROFILE_ARTIFACT = "drift_profile"
"""Key of the profile among a registered pyfunc's artifacts."""
PROFILE_FILE = "drift_profile.json"
DRIFT_FILE = "drift.json"
"""What ``tumorseg predict`` writes beside its predictions: the reference and every case's check."""
PROFILE_FORMAT = 1
PERCENTILES = (1, 50, 99)
MAX_PERCENTILE_VOXELS = 500_000
"""Percentiles on a regular subsample beyond this many brain voxels: a 1 mm BraTS case (about 1.5 M) is
read at every 2nd voxel per axis, a third of the time of all of them, its percentiles moving by at most
0.63 % on the 12 independent cases (decision record 0033); a 2 mm training case is read whole. A
profile built from 1 mm data before the limit was lowered took every voxel: the same 0.63 %."""


VOLUME, IMAGE = "3d", "2d"
GRID_FEATURES = frozenset(
    {"spacing_min_mm", "spacing_max_mm", "fov_min_mm", "fov_max_mm", "brain_fraction", "orientation"}
)
"""Volume features preprocessing makes like training's (resampled to the model's voxel size, cropped to
the brain, so the brain's share of the field of view goes too, reoriented): a case flagged only by
these looks to the network like a training case."""
PLANAR_FEATURES = [
    "intensity_p01",
    "intensity_p50",
    "intensity_p99",
    "foreground_fraction",
    "height",
    "width",
    "edge_strength",
]
"""A 2-D image's features: percentiles of its non-zero pixels, their share, the image size, and the mean
gradient magnitude inside relative to the median (an image resampled to more pixels has weaker edges
per pixel: the file stores no pixel size to compare)."""


def feature_names(kind: str = VOLUME) -> list[str]:
    """The numeric features of a volume (``3d``) or an image (``2d``), in a fixed order."""
    if kind == IMAGE:
        return list(PLANAR_FEATURES)
    names = [f"{m}_p{p:02d}" for m in CANONICAL_MODALITIES for p in PERCENTILES]
    return [
        *names,
        "brain_volume_ml",
        "brain_fraction",
        "spacing_min_mm",
        "spacing_max_mm",
        "fov_min_mm",
        "fov_max_mm",
    ]


@dataclass
class CaseFeatures:
    """One case's numeric ``values`` (by :func:`feature_names`) and its ``category``: a volume's stored
    orientation (``RAS``...), an image's storage (``mat``: Figshare's int16 scale, ``image``: 8-bit)."""

    case_id: str
    values: dict[str, float]
    category: str

    def to_dict(self) -> dict[str, Any]:
        return {"case_id": self.case_id, "category": self.category, "values": self.values}


def image_features(
    case_id: str,
    image: np.ndarray | Sequence[np.ndarray],
    affine: np.ndarray,
    orientation: str | None = None,
) -> CaseFeatures:
    """Features of a ``(4, X, Y, Z)`` image, or its four ``(X, Y, Z)`` channels, in
    ``CANONICAL_MODALITIES`` order and as stored."""
    from tumorseg.data.layouts import orientation_code, spacing_from_affine

    channels = list(image)
    spacing = np.asarray(spacing_from_affine(affine), dtype=np.float64)
    shape = np.asarray(channels[0].shape, dtype=np.float64)
    brain = channels[0] != 0
    for channel in channels[1:]:
        brain |= channel != 0
    n_brain = int(np.count_nonzero(brain))
    values: dict[str, float] = {}
    step = max(1, math.ceil((n_brain / MAX_PERCENTILE_VOXELS) ** (1 / 3))) if n_brain else 1
    sub_brain = brain[::step, ::step, ::step]
    for channel, modality in zip(channels, CANONICAL_MODALITIES, strict=True):
        inside = channel[::step, ::step, ::step][sub_brain]
        found = np.percentile(inside, PERCENTILES) if inside.size else [0.0] * len(PERCENTILES)
        for p, value in zip(PERCENTILES, found, strict=True):
            values[f"{modality}_p{p:02d}"] = float(value)
    values["brain_volume_ml"] = n_brain * float(np.prod(spacing)) / 1000.0
    values["brain_fraction"] = n_brain / float(np.prod(shape))
    values["spacing_min_mm"] = float(spacing.min())
    values["spacing_max_mm"] = float(spacing.max())
    fov = shape * spacing
    values["fov_min_mm"] = float(fov.min())
    values["fov_max_mm"] = float(fov.max())
    return CaseFeatures(case_id, values, orientation or orientation_code(affine))


def planar_features(case_id: str, image: np.ndarray, fmt: str = "") -> CaseFeatures:
    """Features of one 2-D image as read (grayscale, its own intensity scale); ``fmt`` is the reader's
    format (``mat-v5``, ``png``...): ``.mat`` images are compared with ``.mat`` training images only."""
    image = np.asarray(image, dtype=np.float64)
    inside = image[image != 0]
    found = np.percentile(inside, PERCENTILES) if inside.size else [0.0] * len(PERCENTILES)
    values = {f"intensity_p{p:02d}": float(v) for p, v in zip(PERCENTILES, found, strict=True)}
    values["foreground_fraction"] = inside.size / max(image.size, 1)
    values["height"], values["width"] = float(image.shape[0]), float(image.shape[1])
    if inside.size and values["intensity_p50"] > 0 and min(image.shape) >= 2:
        rows, cols = np.gradient(image)
        values["edge_strength"] = float(np.hypot(rows, cols)[image != 0].mean() / values["intensity_p50"])
    else:
        values["edge_strength"] = 0.0
    return CaseFeatures(case_id, values, "mat" if fmt.startswith("mat") else "image")


def case_features(case: Any) -> CaseFeatures:
    """Features of a planned case (:class:`~tumorseg.data.layouts.CaseFiles`), read from its
    modality files (never its segmentation)."""
    from tumorseg.models.predictor import read_volumes

    volumes, _ = read_volumes(case)
    return volume_features(case.case_id, volumes)


def volume_features(case_id: str, volumes: Any) -> CaseFeatures:
    """Features of a case's modalities already in memory (:class:`~tumorseg.models.predictor.CaseVolumes`)."""
    return image_features(case_id, volumes.image, volumes.affine, volumes.orientation)


def decoded_features(case_id: str, decoded: Any) -> CaseFeatures:
    """Features of a case the predictor has decoded (:class:`~tumorseg.data.preprocessed_case.DecodedCase`,
    before it is resampled): the same values as :func:`case_features` without reading the files again."""
    if decoded.volumes is not None:
        return volume_features(case_id, decoded.volumes)
    grid = decoded.grid
    channels = [grid.as_stored(decoded.channels[modality]) for modality in CANONICAL_MODALITIES]
    return image_features(case_id, channels, grid.affine)


def component_threshold(check: DriftCheck | None) -> float | None:
    """A checked case's component-confidence threshold: 0 (small components dropped, none for low
    confidence) when the training profile flags it by more than its grid, because the model's threshold
    was chosen on cases like the training ones (decision record 0030); else None (the model's)."""
    return 0.0 if check is not None and check.flagged_after_preprocessing else None


def try_check(monitor: DriftMonitor, read: Any, what: str) -> DriftCheck | None:
    """``monitor.check(read())``, or None with one warning when the features cannot be computed: the
    check is advice beside a prediction, never a reason to fail it."""
    try:
        return monitor.check(read())
    except Exception as exc:  # a prediction must not be lost to its drift check
        from tumorseg.errors import first_line

        log.warning("drift: %s not checked: %s: %s", what, type(exc).__name__, first_line(exc, 300))
        return None


@dataclass
class Band:
    """The accepted interval of one feature: the training range widened by the tolerance."""

    low: float
    high: float
    train_min: float
    train_max: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass
class Profile:
    """A model's reference: training features per case, test-set predicted volumes, provenance."""

    cases: list[CaseFeatures]
    predicted_volumes_ml: dict[str, list[float]] = field(default_factory=dict)
    source: str = ""
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    kind: str = VOLUME
    """``3d`` (volumes) or ``2d`` (images: bands per storage category, no predicted volumes)."""

    @property
    def features(self) -> list[str]:
        return feature_names(self.kind)

    def values(self, name: str, category: str | None = None) -> np.ndarray:
        """A feature over the training cases (of one ``category`` only, if given)."""
        cases = [c for c in self.cases if category is None or c.category == category]
        return np.asarray([c.values[name] for c in cases], dtype=np.float64)

    @property
    def categories(self) -> list[str]:
        return sorted({c.category for c in self.cases})

    def bands(
        self, tolerance: float, min_relative_span: float, category: str | None = None
    ) -> dict[str, Band]:
        """Each feature's accepted interval; for images, from the training images of ``category``."""
        out = {}
        for name in self.features:
            values = self.values(name, category if self.kind == IMAGE else None)
            low, high = float(values.min()), float(values.max())
            span = max(high - low, min_relative_span * abs(float(np.median(values))), 1e-9)
            out[name] = Band(low - tolerance * span, high + tolerance * span, low, high)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "kind": self.kind,
            "created": self.created,
            "source": self.source,
            "features": self.features,
            "categories": self.categories,
            "cases": [c.to_dict() for c in self.cases],
            "predicted_volumes_ml": self.predicted_volumes_ml,
        }

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Profile:
        from tumorseg.errors import DataError

        try:
            if data.get("format") != PROFILE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {PROFILE_FORMAT}")
            kind = str(data.get("kind", VOLUME))
            if kind not in (VOLUME, IMAGE):
                raise ValueError(f"kind {kind!r}")
            cases = [
                CaseFeatures(c["case_id"], {k: float(v) for k, v in c["values"].items()}, c["category"])
                for c in data["cases"]
            ]
            if not cases:
                raise ValueError("no cases")
            for case in cases:
                missing = set(feature_names(kind)) - set(case.values)
                if missing:
                    raise ValueError(f"case {case.case_id}: no {sorted(missing)[0]}")
            volumes = {
                k: [float(v) for v in vs] for k, vs in (data.get("predicted_volumes_ml") or {}).items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(
                f"{where}: not a drift profile ({exc}); re-register the model with monitor.enabled"
            ) from None
        return cls(cases, volumes, str(data.get("source", "")), str(data.get("created", "")), kind)

    @classmethod
    def read(cls, path: str | Path) -> Profile:
        from tumorseg.errors import DataError

        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the drift profile ({type(exc).__name__}: {exc})") from None
        return cls.from_dict(data, str(path))


def build_profile(
    cases: Iterable[Any],
    *,
    limit: int,
    source: str,
    predicted_volumes_ml: dict[str, list[float]] | None = None,
) -> Profile:
    """The profile of up to ``limit`` planned cases (evenly spaced by case id), read one at a time."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    if len(ordered) > limit:
        picks = np.linspace(0, len(ordered) - 1, limit).round().astype(int)
        ordered = [ordered[i] for i in sorted(set(picks.tolist()))]
    return Profile([case_features(c) for c in ordered], predicted_volumes_ml or {}, source)


@dataclass
class DriftCheck:
    """One case against a profile: ``reasons`` maps each feature out of its band to a sentence saying by
    how much (``orientation``/``file type`` for a category training never had), in the profile's order."""

    case_id: str
    reasons: dict[str, str]
    features: CaseFeatures
    volumes_ml: dict[str, float] | None = None

    @property
    def outside(self) -> list[str]:
        """One sentence per feature outside its band."""
        return list(self.reasons.values())

    @property
    def flagged(self) -> bool:
        return bool(self.outside)

    @property
    def flagged_after_preprocessing(self) -> bool:
        """Flagged by a feature preprocessing does not take away: anything but :data:`GRID_FEATURES` (voxel
        size, field of view and the brain's share of it, orientation)."""
        return any(name not in GRID_FEATURES for name in self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id,
            "flagged": self.flagged,
            "outside": self.outside,
            "flagged_after_preprocessing": self.flagged_after_preprocessing,
            "features": self.features.to_dict(),
            "volumes_ml": self.volumes_ml,
        }

    def summary(self) -> dict[str, Any]:
        """The ``drift`` field of an API answer."""
        return {
            "flagged": self.flagged,
            "flagged_after_preprocessing": self.flagged_after_preprocessing,
            "outside": self.outside,
        }


def check_case(
    features: CaseFeatures, profile: Profile, tolerance: float, min_relative_span: float
) -> DriftCheck:
    """Compare one case's features with the profile's bands (2-D: those of its storage category) and
    categories (an orientation, or an image storage, training never had)."""
    reasons: dict[str, str] = {}
    what = "orientation" if profile.kind == VOLUME else "file type"
    if features.category not in profile.categories:
        reasons[what] = f"{what} {features.category} not in training ({', '.join(profile.categories)})"
        if profile.kind == IMAGE:  # no images of this kind to compare with
            return DriftCheck(features.case_id, reasons, features)
    for name, band in profile.bands(tolerance, min_relative_span, features.category).items():
        value = features.values[name]
        if not (np.isfinite(value) and band.contains(value)):
            reasons[name] = (
                f"{name} {value:.4g} outside {band.low:.4g}..{band.high:.4g} "
                f"(training {band.train_min:.4g}..{band.train_max:.4g})"
            )
    return DriftCheck(features.case_id, reasons, features)


class DriftMonitor:
    """A model's profile with the thresholds of ``monitor:``: checks cases and counts them."""

    def __init__(self, profile: Profile, tolerance: float, min_relative_span: float) -> None:
        self.profile = profile
        self.tolerance = tolerance
        self.min_relative_span = min_relative_span
        self.checked = 0
        self.flagged = 0
        self._lock = threading.Lock()  # the API's pool threads share one monitor

    @classmethod
    def from_params(cls, profile: Profile, cfg: Any) -> DriftMonitor:
        return cls(profile, cfg.tolerance, cfg.min_relative_span)

    def check(self, features: CaseFeatures) -> DriftCheck:
        result = check_case(features, self.profile, self.tolerance, self.min_relative_span)
        with self._lock:
            self.checked += 1
            self.flagged += int(result.flagged)
        return result

    def counts(self) -> dict[str, int]:
        return {"checked": self.checked, "flagged": self.flagged}


def load_profile(artifacts: dict[str, Path] | None) -> Profile | None:
    """The profile among a model's artifacts (None: registered without one, or unreadable: then one
    warning, and the model still loads and serves without drift checks)."""
    if not artifacts or PROFILE_ARTIFACT not in artifacts:
        return None
    from tumorseg.errors import DataError

    try:
        return Profile.read(artifacts[PROFILE_ARTIFACT])
    except DataError as exc:
        log.warning("drift: not checked: %s", exc)
        return None


def write_drift_file(folder: Path, model: str, monitor: DriftMonitor, checks: list[DriftCheck]) -> Path:
    """``folder/drift.json``: the reference profile and every case's check, merged with the checks an
    earlier ``predict`` into the same folder recorded for other cases (atomically replaced)."""
    from tumorseg.data.manifest import atomic_write_text

    path = Path(folder) / DRIFT_FILE
    cases: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            if old.get("profile_sha256") == monitor.profile.sha256():
                cases = {c["case_id"]: c for c in old.get("cases", [])}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            cases = {}
    cases.update({c.case_id: c.to_dict() for c in checks})
    record = {
        "model": model,
        "profile_sha256": monitor.profile.sha256(),
        "tolerance": monitor.tolerance,
        "min_relative_span": monitor.min_relative_span,
        "reference": monitor.profile.to_dict(),
        "cases": [cases[k] for k in sorted(cases)],
    }
    atomic_write_text(path, json.dumps(record, indent=1, allow_nan=False) + "\n")
    return path
