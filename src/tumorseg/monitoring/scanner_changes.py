"""Does the drift check work on this model's profile? Held-out test cases as they are (every flag is a
false alarm) and the same cases as another scanner or site would deliver them:

- ``intensity_scale``: stored on a 10x larger scale (another reconstruction or DICOM rescale);
- ``coarser``: every voxel twice as large (resampled, trilinear);
- ``not_skull_stripped``: scalp and skull around the brain and noise in the air;
- ``orientation``: stored sagittal (array axes permuted, the affine with them).

The evaluate stage records the rates in ``metrics.json`` (``drift_false_alarm_rate``,
``drift_detected_<change>``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from tumorseg.monitoring.drift import CaseFeatures, DriftMonitor, image_features


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
