"""Building blocks of the synthetic data: the BraTS grid, smooth random fields, template anatomy."""

from __future__ import annotations

import numpy as np
import pytest

from tumorseg.data.synth import _mni_anatomy, _template, brats_grid, case_rng, smooth_random_field


@pytest.mark.parametrize(
    ("spacing", "shape"),
    [((1.0, 1.0, 1.0), (240, 240, 155)), ((2.0, 2.0, 2.0), (120, 120, 78)), ((3.0, 3.0, 6.0), (80, 80, 26))],
)
def test_brats_grid_shape_and_centre(
    spacing: tuple[float, float, float], shape: tuple[int, int, int]
) -> None:
    got_shape, affine = brats_grid(spacing)
    assert got_shape == shape
    assert np.allclose(np.diag(affine)[:3], spacing)
    centre = affine @ np.array([*((np.asarray(shape) - 1) / 2.0), 1.0])
    assert np.allclose(centre[:3], [-119.5, 119.5, 77.0])  # every spacing covers the same box


def test_smooth_random_field_is_bounded_smooth_and_region_consistent() -> None:
    shape, region = (60, 50, 40), (slice(10, 40), slice(5, 50), slice(0, 17))
    full = smooth_random_field(case_rng(1, 1), shape, (4, 4, 3))
    part = smooth_random_field(case_rng(1, 1), shape, (4, 4, 3), region)
    assert full.dtype == np.float32 and full.shape == shape
    assert np.allclose(part, full[region], atol=1e-5)
    assert 0.9 < np.abs(full).max() < 1.1
    # Low frequency: neighbouring voxels differ by a small fraction of the range.
    assert np.abs(np.diff(full, axis=0)).max() < 0.2


def test_template_tissue_maps_partition_the_brain() -> None:
    anatomy = _mni_anatomy()
    total = anatomy.tissue.sum(axis=0)
    brain = total > 0
    assert np.allclose(total[brain], 1.0, atol=1e-4)
    gm_ml, wm_ml, csf_ml = (float(anatomy.tissue[k].sum()) / 1000.0 for k in range(3))
    assert 700 < gm_ml < 1100 and 450 < wm_ml < 800 and 100 < csf_ml < 400
    # Ventricles: CSF deep in the brain, around the midline, above the thalamus.
    origin = anatomy.origin_mm
    lateral_ventricles = [(-18, -40, 15), (-8, 5, 20), (8, 5, 20)]
    for point in lateral_ventricles:
        ijk = tuple(int(round(v)) for v in np.asarray(point) - origin)
        assert anatomy.tissue[2][ijk] > 0.5, point


def test_tumour_centres_lie_in_cerebral_white_matter() -> None:
    anatomy = _mni_anatomy()
    ijk = np.rint(anatomy.centres_mm - anatomy.origin_mm).astype(int)
    assert len(ijk) > 1000
    assert (anatomy.tissue[1][tuple(ijk.T)] > 0.5).mean() > 0.95
    assert (anatomy.centres_mm[:, 2] > -22).all() and (anatomy.depth_mm > 14).all()


def test_template_resampling_keeps_tissue_volumes() -> None:
    fine, coarse = _mni_anatomy(), _template((3.0, 3.0, 3.0))
    assert coarse.tissue.shape[1:] == tuple((np.asarray(fine.tissue.shape[1:]) - 1) // 3 + 1)
    for k in range(3):
        ml_fine = fine.tissue[k].sum() / 1000.0
        ml_coarse = coarse.tissue[k].sum() * 27 / 1000.0
        assert abs(ml_coarse - ml_fine) / ml_fine < 0.05
