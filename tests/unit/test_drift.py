"""Drift monitoring: features, the per-case band rule, the folder report, and the shadow thread's priority."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from tumorseg.errors import DataError
from tumorseg.monitoring.config import MonitorConfig
from tumorseg.monitoring.drift import (
    DRIFT_FILE,
    DriftMonitor,
    Profile,
    component_threshold,
    feature_names,
    image_features,
    write_drift_file,
)
from tumorseg.monitoring.monitor import analyse, monitor_folder
from tumorseg.monitoring.scanner_changes import CHANGES

AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def head(seed: int, scale: float = 1.0, radius: float = 20.0) -> np.ndarray:
    """A (4, 48, 48, 40) skull-stripped "brain": a noisy ball, zero outside, one level per modality."""
    rng = np.random.default_rng(seed)
    grid = np.indices((48, 48, 40)).astype(np.float32)
    ball = ((grid - np.array([24, 24, 20])[:, None, None, None]) ** 2).sum(0) <= radius**2
    levels = np.array([300.0, 500.0, 700.0, 400.0]) * rng.uniform(0.9, 1.1)
    image = levels[:, None, None, None] * rng.uniform(0.8, 1.2, (4, 48, 48, 40)) * scale
    return np.where(ball, image, 0.0).astype(np.float32)


def profile_of(n: int = 12) -> Profile:
    return Profile(
        [image_features(f"train{i}", head(i), AFFINE) for i in range(n)], {"WT": [10.0, 20.0, 30.0]}
    )


def test_features_describe_intensity_brain_and_grid() -> None:
    f = image_features("a", head(0), AFFINE)
    assert list(f.values) == feature_names() and f.category == "RAS"
    assert f.values["t1_p01"] < f.values["t1_p50"] < f.values["t1_p99"]
    assert f.values["spacing_min_mm"] == f.values["spacing_max_mm"] == 2.0
    assert f.values["fov_max_mm"] == 96.0 and f.values["fov_min_mm"] == 80.0
    ball_ml = 4 / 3 * np.pi * 20**3 * 8 / 1000
    assert f.values["brain_volume_ml"] == pytest.approx(ball_ml, rel=0.02)


def test_a_case_outside_the_training_range_is_flagged_with_what_and_by_how_much() -> None:
    monitor = DriftMonitor.from_params(profile_of(), MonitorConfig())
    assert not monitor.check(image_features("same", head(50), AFFINE)).flagged
    scaled = monitor.check(image_features("scaled", head(51, scale=10), AFFINE))
    assert scaled.flagged and any(
        line.startswith("t1ce_p50 ") and "training" in line for line in scaled.outside
    )
    small = monitor.check(image_features("small", head(52, radius=12), AFFINE))
    assert any(line.startswith("brain_volume_ml ") for line in small.outside)
    # a feature that never varied (voxel size) still gets a band: 10 % of its median by default
    finer = monitor.check(image_features("finer", head(53), np.diag([1.9, 2.0, 2.0, 1.0])))
    assert not finer.flagged
    coarse = monitor.check(image_features("coarse", head(53), np.diag([2.5, 2.0, 2.0, 1.0])))
    assert any(line.startswith("spacing_max_mm 2.5 ") for line in coarse.outside)
    assert monitor.counts() == {"checked": 5, "flagged": 3}


def test_every_scanner_change_is_caught_and_keeps_the_world_geometry() -> None:
    monitor = DriftMonitor.from_params(profile_of(), MonitorConfig())
    image = head(60)
    for name, change in CHANGES.items():
        changed, affine = change(image, AFFINE)
        assert monitor.check(image_features(name, changed, affine)).flagged, name
    moved, affine = CHANGES["orientation"](image, AFFINE)
    i, j, k = 5, 17, 33
    # the same voxel value at the same world point after the axes were permuted
    world = AFFINE @ [i, j, k, 1]
    index = np.linalg.solve(affine, world)[:3].round().astype(int)
    assert moved[(2, *index)] == image[2, i, j, k]


def test_flags_of_the_grid_alone_do_not_count_after_preprocessing() -> None:
    """Voxel size, field of view and orientation are resampled, cropped and reoriented away: a case flagged
    by them alone looks like training to the network (the component-confidence gate reads this)."""
    monitor = DriftMonitor.from_params(profile_of(), MonitorConfig())
    image = head(61)
    grid_only = monitor.check(image_features("other grid", image, np.diag([2.5, 2.0, 1.6, 1.0])))  # same ml
    turned = monitor.check(image_features("turned", *CHANGES["orientation"](image, AFFINE)))
    padded = monitor.check(
        image_features("padded", np.pad(image, ((0, 0), (12, 12), (12, 12), (12, 12))), AFFINE)
    )
    assert {"fov_max_mm", "brain_fraction"} <= set(padded.reasons)  # cropped away
    for check in (grid_only, turned, padded):
        assert check.flagged and not check.flagged_after_preprocessing, check.outside
        assert check.to_dict()["flagged_after_preprocessing"] is False
        assert component_threshold(check) is None  # the model's threshold applies
    for name in ("intensity_scale", "not_skull_stripped"):
        check = monitor.check(image_features(name, *CHANGES[name](image, AFFINE)))
        assert check.flagged_after_preprocessing, name
        assert check.summary()["flagged_after_preprocessing"] is True
        assert component_threshold(check) == 0.0  # no component dropped for low confidence
    assert component_threshold(None) is None  # not checked: the model's threshold
    assert set(grid_only.reasons) <= {"spacing_min_mm", "spacing_max_mm", "fov_min_mm", "fov_max_mm"}
    assert next(iter(turned.reasons)) == "orientation"
    assert not monitor.check(image_features("same", head(62), AFFINE)).flagged_after_preprocessing


def test_the_profile_round_trips_and_a_broken_one_is_one_line(tmp_path: Path) -> None:
    profile = profile_of(4)
    again = Profile.from_dict(json.loads(json.dumps(profile.to_dict())), "x")
    assert again.sha256() == profile.sha256() and again.categories == ["RAS"]
    (tmp_path / "p.json").write_text('{"format": 1, "cases": [{"case_id": "a"}]}')
    with pytest.raises(DataError) as err:
        Profile.read(tmp_path / "p.json")
    assert str(err.value).startswith(f"{tmp_path / 'p.json'}: not a drift profile") and "\n" not in str(
        err.value
    )


def test_drift_json_keeps_earlier_cases_of_the_same_model_only(tmp_path: Path) -> None:
    monitor = DriftMonitor.from_params(profile_of(4), MonitorConfig())
    write_drift_file(tmp_path, "m", monitor, [monitor.check(image_features("a", head(1), AFFINE))])
    write_drift_file(tmp_path, "m", monitor, [monitor.check(image_features("b", head(2), AFFINE))])
    assert [c["case_id"] for c in json.loads((tmp_path / DRIFT_FILE).read_text())["cases"]] == ["a", "b"]
    other = DriftMonitor.from_params(profile_of(5), MonitorConfig())
    write_drift_file(tmp_path, "n", other, [other.check(image_features("c", head(3), AFFINE))])
    assert [c["case_id"] for c in json.loads((tmp_path / DRIFT_FILE).read_text())["cases"]] == ["c"]


def test_ks_tests_find_a_shifted_folder_and_leave_an_unchanged_one(tmp_path: Path) -> None:
    profile = profile_of(16)
    cfg = MonitorConfig(max_flagged_fraction=1.0)  # only the KS tests decide here
    monitor = DriftMonitor.from_params(profile, cfg)

    def records(scale: float) -> list[dict]:
        out = []
        for i in range(12):
            check = monitor.check(image_features(f"c{i}", head(100 + i, scale=scale), AFFINE))
            check.volumes_ml = {"WT": 20.0 + i}
            out.append(check.to_dict())
        return out

    same = analyse(profile, records(1.0), cfg, folder="f", model="m")
    assert not same.drifted and all(f.ks_pvalue is not None for f in same.features)
    shifted = analyse(
        profile, records(1.25), cfg, folder="f", model="m"
    )  # within the bands, not in the spread
    assert shifted.drifted and "t1_p50" in shifted.reasons[0]
    assert shifted.flagged < shifted.cases
    with pytest.raises(DataError, match="no drift.json"):
        monitor_folder(tmp_path, {})


def _priority_of_a_thread(level: str) -> tuple[str, int, int]:
    from tumorseg.serving.shadow import lower_priority

    seen: list[tuple[str, int, int]] = []

    def body() -> None:
        tid = threading.get_native_id()
        applied = lower_priority(level)
        seen.append((applied, os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid)))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    return seen[0]


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policies")
def test_the_shadow_thread_runs_at_idle_priority_and_the_rest_of_the_process_does_not() -> None:
    applied, policy, _ = _priority_of_a_thread("idle")
    assert applied == "SCHED_IDLE" and policy == os.SCHED_IDLE
    applied, policy, nice = _priority_of_a_thread("low")
    assert applied == "nice 19" and policy == os.SCHED_OTHER and nice == 19
    assert _priority_of_a_thread("normal")[0] == "normal priority"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, 0) == 0


def test_images_are_compared_with_training_images_of_their_own_storage() -> None:
    from tumorseg.monitoring.drift import IMAGE, planar_features
    from tumorseg.monitoring.scanner_changes import PLANAR_CHANGES

    rng = np.random.default_rng(0)

    def slice_(scale: float, size: int = 64) -> np.ndarray:
        image = np.zeros((size, size))
        image[8:-8, 8:-8] = rng.uniform(0.2, 1.0, (size - 16, size - 16)) * scale
        return image

    cases = [planar_features(f"m{i}", slice_(1000 * rng.uniform(0.9, 1.1)), "mat-v5") for i in range(6)]
    cases += [planar_features(f"p{i}", slice_(200 * rng.uniform(0.9, 1.1)), "png") for i in range(6)]
    profile = Profile(cases, kind=IMAGE)
    assert profile.categories == ["image", "mat"]
    monitor = DriftMonitor.from_params(profile, MonitorConfig())
    png = slice_(200)
    assert not monitor.check(planar_features("ok", png, "png")).flagged
    # a 10x 8-bit image would pass as a .mat one: each storage has its own bands
    scaled = monitor.check(planar_features("x10", PLANAR_CHANGES["intensity_scale"](png), "png"))
    assert any(line.startswith("intensity_p50 ") for line in scaled.outside)
    bigger = monitor.check(planar_features("x2", PLANAR_CHANGES["resolution"](png), "png"))
    assert any(line.startswith("height 128 ") for line in bigger.outside)
    only_mat = DriftMonitor.from_params(Profile(cases[:6], kind=IMAGE), MonitorConfig())
    assert only_mat.check(planar_features("p", png, "png")).outside == [
        "file type image not in training (mat)"
    ]


def test_a_broken_profile_or_an_odd_image_never_fails_a_prediction(tmp_path: Path) -> None:
    from tumorseg.monitoring.drift import PROFILE_ARTIFACT, load_profile, planar_features, try_check

    (tmp_path / "p.json").write_text("{not json")
    assert load_profile({PROFILE_ARTIFACT: tmp_path / "p.json"}) is None  # the model still loads
    line = planar_features("thin", np.ones((1, 40)), "png")  # one pixel high: no gradient, no error
    assert line.values["edge_strength"] == 0.0
    monitor = DriftMonitor.from_params(profile_of(4), MonitorConfig())

    def unreadable() -> None:
        raise DataError("case.nii.gz: truncated")

    assert try_check(monitor, unreadable, "case") is None and monitor.counts()["checked"] == 0
