"""Label conventions, modality names and dataset layouts.

tumorseg keeps one *canonical* convention internally (the BraTS 2023+ one):

====  =========================================  ==================
code  meaning                                    BraTS region(s)
====  =========================================  ==================
0     background
1     NCR: necrotic / non-enhancing tumour core  WT, TC
2     ED: peritumoural oedema                    WT
3     ET: enhancing tumour                       WT, TC, ET
====  =========================================  ==================

Channels are always stacked in :data:`CANONICAL_MODALITIES` order
(T1, T1ce, T2, FLAIR). Each source convention maps to and from the canonical
codes through a lookup table, so predictions are written back in the user's own
convention.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANONICAL_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Channel order of every preprocessed image tensor (C = 4)."""

CANONICAL_LABELS: dict[int, str] = {0: "background", 1: "NCR", 2: "ED", 3: "ET"}

REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
"""BraTS evaluation regions as sets of canonical labels."""

REGION_NAMES: tuple[str, ...] = tuple(REGIONS)


@dataclass(frozen=True)
class LabelConvention:
    """A source label convention and its mapping to canonical codes.

    Attributes:
        name: ``brats2021``, ``brats2023`` or ``msd``.
        to_canonical: source label value -> canonical label value.
    """

    name: str
    to_canonical: dict[int, int]

    @property
    def from_canonical(self) -> dict[int, int]:
        return {c: s for s, c in self.to_canonical.items()}

    @property
    def allowed_values(self) -> frozenset[int]:
        return frozenset(self.to_canonical)

    def encode(self, source_labels: np.ndarray) -> np.ndarray:
        """Map a source label volume to canonical codes (unknown values raise ValueError)."""
        return _remap(source_labels, self.to_canonical, self.name)

    def decode(self, canonical_labels: np.ndarray) -> np.ndarray:
        """Map a canonical label volume back to this convention's codes."""
        return _remap(canonical_labels, self.from_canonical, self.name)


def _remap(labels: np.ndarray, table: dict[int, int], name: str) -> np.ndarray:
    values = np.asarray(labels)
    if values.dtype.kind == "f":
        rounded = np.rint(values)
        if not np.array_equal(rounded, values):
            raise ValueError(f"label volume has non-integer values; not a {name} segmentation")
        values = rounded
    values = values.astype(np.int64, copy=False)
    unknown = sorted(set(np.unique(values).tolist()) - set(table))
    if unknown:
        raise ValueError(f"label values {unknown} are not in the {name} convention {sorted(table)}")
    lut = np.zeros(max(table) + 1, dtype=np.uint8)
    for src, dst in table.items():
        lut[src] = dst
    return lut[values]


LABEL_CONVENTIONS: dict[str, LabelConvention] = {
    "brats2021": LabelConvention("brats2021", {0: 0, 1: 1, 2: 2, 4: 3}),
    "brats2023": LabelConvention("brats2023", {0: 0, 1: 1, 2: 2, 3: 3}),
    # MSD Task01_BrainTumour: 1 oedema, 2 non-enhancing tumour, 3 enhancing tumour.
    "msd": LabelConvention("msd", {0: 0, 1: 2, 2: 1, 3: 3}),
}


def get_convention(name: str) -> LabelConvention:
    try:
        return LABEL_CONVENTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown label convention {name!r}; use one of {sorted(LABEL_CONVENTIONS)}"
        ) from None


def regions_from_canonical(labels: np.ndarray) -> np.ndarray:
    """Binary region masks from a canonical label volume.

    Args:
        labels: integer volume, shape ``(H, W, D)`` (or any spatial shape).

    Returns:
        bool array of shape ``(3, H, W, D)`` in :data:`REGION_NAMES` order (WT, TC, ET).
    """
    return np.stack([np.isin(labels, codes) for codes in REGIONS.values()])


def canonical_from_regions(regions: np.ndarray) -> np.ndarray:
    """Inverse of :func:`regions_from_canonical` for nested region masks.

    Args:
        regions: bool/0-1 array ``(3, H, W, D)`` for WT, TC, ET. TC is taken inside
            WT and ET inside TC, as BraTS post-processing does.

    Returns:
        uint8 canonical labels ``(H, W, D)``: WT-only -> ED (2), TC-only -> NCR (1), ET -> ET (3).
    """
    wt, tc, et = (np.asarray(r, dtype=bool) for r in regions)
    tc = tc & wt
    et = et & tc
    out = np.zeros(wt.shape, dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = 3
    return out


@dataclass(frozen=True)
class LayoutSpec:
    """File naming of one public dataset layout.

    Attributes:
        name: layout id used on the command line.
        label_convention: name of the :class:`LabelConvention` its ``seg`` files use.
        modality_suffixes: canonical modality -> file suffix (BraTS-style layouts only).
        seg_suffix: suffix of the segmentation file.
    """

    name: str
    label_convention: str
    modality_suffixes: dict[str, str]
    seg_suffix: str


LAYOUTS: dict[str, LayoutSpec] = {
    # BraTS 2020/2021: BraTS2021_00001/BraTS2021_00001_{t1,t1ce,t2,flair,seg}.nii.gz
    "brats2021": LayoutSpec(
        "brats2021", "brats2021", {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair"}, "_seg"
    ),
    # BraTS 2023+: BraTS-GLI-00001-000/BraTS-GLI-00001-000-{t1n,t1c,t2w,t2f,seg}.nii.gz
    "brats2023": LayoutSpec(
        "brats2023", "brats2023", {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f"}, "-seg"
    ),
    # MSD Task01: imagesTr/BRATS_001.nii.gz (4-D: FLAIR, T1w, T1gd, T2w), labelsTr/BRATS_001.nii.gz
    "msd": LayoutSpec("msd", "msd", {}, ""),
}

MSD_CHANNEL_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
"""Canonical modality of each channel of an MSD Task01 4-D image."""

MSD_MODALITY_NAMES: dict[str, str] = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
"""``dataset.json`` modality entry of MSD Task01."""

MSD_LABEL_NAMES: dict[str, str] = {
    "0": "background",
    "1": "edema",
    "2": "non-enhancing tumor",
    "3": "enhancing tumour",
}
"""``dataset.json`` labels entry of MSD Task01 (spelling as in the real file)."""
