"""Brain extraction by atlas (tumorseg.dicom.atlas): nilearn's MNI152 mask registered to a head's T1ce."""

from __future__ import annotations

import numpy as np
import pytest

from tumorseg.config import SynthConfig
from tumorseg.data.synth import synthesize_case
from tumorseg.dicom import atlas, brain
from tumorseg.dicom.heads import Head, synth_head
from tumorseg.errors import DataError


@pytest.fixture(scope="module")
def head() -> Head:
    return synth_head(synthesize_case(2, SynthConfig(spacing_mm=2.0, seed=31)), seed=8)


def test_rough_brain_cuts_the_scalp_away(head: Head) -> None:
    rough = atlas.rough_brain(head.images["t1ce"], head.affine)
    scalp = head.head_mask & ~head.brain_mask
    assert brain.dice(rough, head.brain_mask) > 0.85
    assert (rough & scalp).sum() < 0.2 * scalp.sum()


def test_the_registered_mask_finds_the_brain_of_a_generated_head(head: Head) -> None:
    extractor = atlas.AtlasBrainExtractor()
    mask = extractor.extract(head.images, head.affine)
    assert mask.shape == head.brain_mask.shape and mask.dtype == bool
    assert brain.dice(mask, head.brain_mask) > 0.9
    # Moved 12 mm and turned 6 degrees, the head's brain is still found: the search is not the identity.
    moved = brain.moved_head(head, brain.rotation_matrix((6.0, 0.0, 0.0)), (12.0, 0.0, 0.0))
    assert brain.dice(extractor.extract(moved.images, moved.affine), moved.brain_mask) > 0.9


def test_load_brain_extractor_names_the_atlas_and_t1ce_is_required() -> None:
    extractor = brain.load_brain_extractor(atlas.ATLAS_URI, tracking_uri="sqlite:///unused.db")
    assert isinstance(extractor, atlas.AtlasBrainExtractor)
    with pytest.raises(DataError, match="registered to the T1ce"):
        extractor.extract({"t2": np.zeros((8, 8, 8), np.float32)}, np.eye(4))


def test_a_registration_that_cannot_start_is_one_line_and_seed_zero_is_refused() -> None:
    blank = {"t1ce": np.zeros((24, 24, 24), np.float32)}  # no head: nothing to register to
    with pytest.raises(DataError, match="could not be registered to the T1ce") as caught:
        atlas.AtlasBrainExtractor().extract(blank, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="seeds from the clock"):
        atlas.AtlasBrainExtractor(seed=0)
