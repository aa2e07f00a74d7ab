"""Does the drift check work on this model's profile? Held-out test cases as they are (every flag is a
false alarm) and the same cases as another scanner or site would deliver them:

- ``intensity_scale``: stored on a 10x larger scale (another reconstruction or DICOM rescale);
- ``coarser``: every voxel twice as large (resampled, trilinear);
- ``not_skull_stripped``: scalp and skull around the brain and noise in the air;
- ``orientation``: stored sagittal (array axes permuted, the affine with them).

2-D images: ``intensity_scale`` (10x) and ``resolution`` (twice the pixels per side, another
scanner matrix or export). The evaluate stage records the rates in ``metrics.json`` under ``drift``
(``drift_false_alarm_rate``, ``drift_detected_<change>``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tumorseg.monitoring.drift import CaseFeatures, DriftMonitor, image_features, planar_features


def intensity_scale(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return image * np.float32(10.0), affine


def coarser(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    out = np.stack([ndimage.zoom(channel, 0.5, order=1, prefilter=False) for channel in image])
    scaled = affine.copy()
    scaled[:3, :3] = affine[:3, :3] * (np.asarray(image.shape[1:]) / np.asarray(out.shape[1:]))
    return out, scaled


def not_skull_stripped(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scalp and skull (a bright 3 mm layer outside a dark 3 mm one) around the brain, noise outside."""
    from scipy import ndimage

    from tumorseg.data.layouts import spacing_from_affine

    brain = np.any(image != 0, axis=0)
    distance = ndimage.distance_transform_edt(~brain, sampling=spacing_from_affine(affine))
    rng = np.random.default_rng(0)
    out = image.copy()
    for channel in range(image.shape[0]):
        inside = image[channel][brain]
        level = float(np.percentile(inside, 50)) if inside.size else 1.0
        noise = np.abs(rng.normal(0.0, 0.03 * level, brain.shape)).astype(np.float32)
        layer = out[channel]
        layer[~brain] = noise[~brain]
        layer[(distance > 0) & (distance <= 3)] += np.float32(0.2 * level)  # bone: dark
        layer[(distance > 3) & (distance <= 6)] += np.float32(1.3 * level)  # scalp and fat: bright
    return out, affine


def orientation(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The array stored with its axes rotated (x, y, z) -> (y, z, x), the affine following."""
    order = (1, 2, 0)
    out = np.ascontiguousarray(np.transpose(image, (0, *(a + 1 for a in order))))
    moved = affine.copy()
    moved[:, :3] = affine[:, list(order)]
    return out, moved


CHANGES: dict[str, Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "intensity_scale": intensity_scale,
    "coarser": coarser,
    "not_skull_stripped": not_skull_stripped,
    "orientation": orientation,
}


def scanner_change_metrics(monitor: DriftMonitor, cases: list[Any]) -> dict[str, Any]:
    """``drift_false_alarm_rate`` on ``cases`` (planned held-out cases) and ``drift_detected_<change>``
    on each changed copy, with ``drift_cases`` and the false alarms' reasons (``drift_false_alarms``)."""
    from tumorseg.data.layouts import read_case

    flagged = {name: 0 for name in CHANGES}
    false_alarms: dict[str, list[str]] = {}
    for case in cases:
        volumes = read_case(case)
        found = monitor.check(
            image_features(case.case_id, volumes.image, volumes.affine, volumes.orientation)
        )
        if found.flagged:
            false_alarms[case.case_id] = found.outside
        for name, change in CHANGES.items():
            image, affine = change(volumes.image, volumes.affine)
            features: CaseFeatures = image_features(case.case_id, image, affine)
            flagged[name] += int(monitor.check(features).flagged)
    n = max(len(cases), 1)
    return {
        "drift_cases": len(cases),
        "drift_false_alarm_rate": len(false_alarms) / n,
        **{f"drift_detected_{name}": count / n for name, count in flagged.items()},
        "drift_false_alarms": false_alarms,
    }


def _planar_resolution(image: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.zoom(np.asarray(image, dtype=np.float32), 2.0, order=1, prefilter=False)


PLANAR_CHANGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "intensity_scale": lambda image: np.asarray(image, dtype=np.float32) * np.float32(10.0),
    "resolution": _planar_resolution,
}


def planar_change_metrics(monitor: DriftMonitor, paths: list[Any]) -> dict[str, Any]:
    """:func:`scanner_change_metrics` for 2-D images (``paths``: the held-out images' files), with the
    detection rates also per storage (``drift_detected_<change>_<mat|image>``): 8-bit images come in
    any size, so a resampled one is often inside the training spread, a resampled ``.mat`` never."""
    from tumorseg.data.planar import read_planar

    flagged: dict[str, int] = {}
    counts: dict[str, int] = {}
    false_alarms: dict[str, list[str]] = {}
    for path in paths:
        read = read_planar(path)
        found = monitor.check(planar_features(read.case_id, read.image, read.fmt))
        category = found.features.category
        counts[category] = counts.get(category, 0) + 1
        if found.flagged:
            false_alarms[read.case_id] = found.outside
        for name, change in PLANAR_CHANGES.items():
            hit = int(monitor.check(planar_features(read.case_id, change(read.image), read.fmt)).flagged)
            for key in (name, f"{name}_{category}"):
                flagged[key] = flagged.get(key, 0) + hit
    n = max(len(paths), 1)
    rates = {}
    for key, count in sorted(flagged.items()):
        category = key.rsplit("_", 1)[-1]
        total = counts[category] if key not in PLANAR_CHANGES and category in counts else n
        rates[f"drift_detected_{key}"] = count / total
    return {
        "drift_cases": len(paths),
        "drift_false_alarm_rate": len(false_alarms) / n,
        **rates,
        "drift_false_alarms": false_alarms,
    }
