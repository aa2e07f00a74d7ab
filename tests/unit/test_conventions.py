from __future__ import annotations

import numpy as np
import pytest

from tumorseg.data.conventions import (
    LABEL_CONVENTIONS,
    canonical_from_regions,
    get_convention,
    regions_from_canonical,
)


@pytest.mark.parametrize(
    ("name", "source", "canonical"),
    [
        ("brats2021", [0, 1, 2, 4], [0, 1, 2, 3]),
        ("brats2023", [0, 1, 2, 3], [0, 1, 2, 3]),
        # MSD: 1 oedema -> ED (2), 2 non-enhancing -> NCR (1), 3 enhancing -> ET (3)
        ("msd", [0, 1, 2, 3], [0, 2, 1, 3]),
    ],
)
def test_encode_decode_round_trip(name: str, source: list[int], canonical: list[int]) -> None:
    conv = get_convention(name)
    src = np.array(source, dtype=np.uint8)
    assert conv.encode(src).tolist() == canonical
    assert conv.decode(conv.encode(src)).tolist() == source


def test_encode_rejects_values_outside_convention() -> None:
    with pytest.raises(ValueError, match=r"\[3\].*brats2021"):
        LABEL_CONVENTIONS["brats2021"].encode(np.array([0, 1, 3]))


def test_encode_rejects_non_integer_labels() -> None:
    with pytest.raises(ValueError, match="non-integer"):
        LABEL_CONVENTIONS["brats2023"].encode(np.array([0.0, 1.5]))


def test_unknown_convention_names_choices() -> None:
    with pytest.raises(ValueError, match="brats2021"):
        get_convention("brats2019")


def test_regions_follow_brats_definitions() -> None:
    labels = np.array([0, 1, 2, 3])
    wt, tc, et = regions_from_canonical(labels)
    assert wt.tolist() == [False, True, True, True]
    assert tc.tolist() == [False, True, False, True]
    assert et.tolist() == [False, False, False, True]


def test_canonical_from_regions_inverts_regions() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(6, 5, 4)).astype(np.uint8)
    assert np.array_equal(canonical_from_regions(regions_from_canonical(labels)), labels)


def test_canonical_from_regions_nests_inconsistent_masks() -> None:
    # ET predicted outside TC/WT is dropped, as BraTS post-processing nests the regions.
    regions = np.zeros((3, 2), dtype=bool)
    regions[2, 0] = True  # ET only
    regions[:, 1] = True  # all three
    assert canonical_from_regions(regions).tolist() == [0, 3]
