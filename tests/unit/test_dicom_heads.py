"""Generated heads around synthetic brains: layers outside the brain, the brain kept, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from tumorseg.config import SynthConfig
from tumorseg.data.synth import SyntheticCase, synthesize_case
from tumorseg.dicom.heads import Head, synth_head


@pytest.fixture(scope="module")
def case() -> SyntheticCase:
    return synthesize_case(1, SynthConfig(spacing_mm=3.0, seed=11))


@pytest.fixture(scope="module")
def head(case: SyntheticCase) -> Head:
    return synth_head(case, seed=5)


def _wm_level(case: SyntheticCase, modality: str) -> float:
    wm = case.brain_mask & (case.labels == 0) & (case.tissue["wm"] > 0.8)
    return float(np.median(case.images[modality][wm]))


def test_head_keeps_the_case_grid_and_masks(case: SyntheticCase, head: Head) -> None:
    assert np.array_equal(head.affine, case.affine)
    assert np.array_equal(head.brain_mask, case.brain_mask)
    assert head.head_mask.shape == case.shape and head.head_mask.dtype == bool
    assert (head.head_mask | ~head.brain_mask).all()  # the brain lies inside the head
    for m, image in head.images.items():
        assert image.dtype == np.float32 and image.shape == case.shape, m
    # Skull and scalp: a shell of 10-40 mm around the brain, not a dilation by a constant.
    outside = head.head_mask & ~head.brain_mask
    dist = ndi.distance_transform_edt(~case.brain_mask, sampling=case.spacing)
    assert outside.sum() > 0.5 * case.brain_mask.sum()
    assert dist[outside].max() < 40.0
    surface = head.head_mask & ~ndi.binary_erosion(head.head_mask) & (dist > 0)
    depth = dist[surface & (np.indices(case.shape)[2] > 0.3 * case.shape[2])]
    assert 10.0 < np.median(depth) < 30.0
    assert np.percentile(depth, 90) - np.percentile(depth, 10) > 4.0  # thickness varies around the head


def test_brain_values_are_the_case_times_a_smooth_bias(case: SyntheticCase, head: Head) -> None:
    brain = case.brain_mask & (case.images["t1"] > 0)
    for m in head.images:
        ratio = head.images[m][brain] / case.images[m][brain]
        assert ratio.min() > 0.6 and ratio.max() < 1.5, m  # exp(+-0.3) at most
        assert ratio.std() > 0.01, m  # a bias field is there
        field = np.ones(case.shape, dtype=np.float32)
        field[brain] = ratio
        # Smooth: neighbouring brain voxels share their factor to within a few per cent.
        both = brain[1:] & brain[:-1]
        assert np.abs(np.diff(field, axis=0)[both]).max() < 0.05, m


def test_layers_have_their_contrasts(case: SyntheticCase, head: Head) -> None:
    dist = ndi.distance_transform_edt(~case.brain_mask, sampling=case.spacing)
    outside = head.head_mask & ~case.brain_mask
    # The outermost layer (skin, fat) vs. the skull's cortical bone somewhere in between.
    levels = {}
    for m in head.images:
        values = head.images[m][outside] / _wm_level(case, m)
        levels[m] = (float(np.percentile(values, 5)), float(np.percentile(values, 97)))
    for m in head.images:
        low, high = levels[m]
        assert low < 0.45, m  # bone (no signal) or CSF on T1/FLAIR
        assert high > 0.9, m  # fat (T1, T1ce), fat and CSF (T2, FLAIR)
    # CSF rim, first voxel out: dark on T1 and FLAIR, bright on T2.
    rim = (dist > 0) & (dist <= case.spacing[0] + 1e-6) & head.head_mask
    t1_rim = np.median(head.images["t1"][rim]) / _wm_level(case, "t1")
    t2_rim = np.median(head.images["t2"][rim]) / _wm_level(case, "t2")
    assert t2_rim > 1.2 * t1_rim
    # Dura and scalp vessels enhance: T1ce shows more outside the brain than T1.
    gain_out = np.mean(head.images["t1ce"][outside]) / _wm_level(case, "t1ce")
    gain_t1 = np.mean(head.images["t1"][outside]) / _wm_level(case, "t1")
    assert gain_out > gain_t1


def test_background_is_noise_at_the_case_level(case: SyntheticCase, head: Head) -> None:
    background = ~ndi.binary_dilation(head.head_mask, iterations=2)
    for m in head.images:
        values = head.images[m][background]
        assert values.min() >= 0.0, m
        assert 0.0 < np.median(values) < 0.2 * _wm_level(case, m), m  # Rician noise, no signal


def test_head_is_deterministic_per_seed(case: SyntheticCase, head: Head) -> None:
    again = synth_head(case, seed=5)
    other = synth_head(case, seed=6)
    for m in head.images:
        assert np.array_equal(again.images[m], head.images[m]), m
    assert np.array_equal(again.head_mask, head.head_mask)
    assert not np.array_equal(other.images["t1"], head.images["t1"])
    assert not np.array_equal(other.head_mask, head.head_mask)


def test_head_around_an_anisotropic_case() -> None:
    case = synthesize_case(2, SynthConfig(spacing_mm=2.5, seed=11, anisotropic_fraction=1.0))
    assert case.spacing[2] > case.spacing[0]
    head = synth_head(case, seed=1)
    assert head.head_mask.sum() > 1.5 * case.brain_mask.sum()
    assert np.array_equal(head.brain_mask, case.brain_mask)
