"""Label sets, label conventions, modality names and dataset layouts.

:file:`label_sets.yaml` (documented in its header) holds the **label sets** (internal codes, output
regions, how they are painted back) and the **conventions** (how a dataset family codes its ``seg``
files and how its challenge scores them). Cases are read through their convention into the set's
internal codes; predictions are written back in the input's convention.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import numpy as np

CANONICAL_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
"""Channel order of every preprocessed image tensor (C = 4)."""

LESION_RULES: tuple[str, ...] = ("brats2023", "brats2024")
"""Lesion-wise algorithms (:mod:`tumorseg.evaluation.lesionwise`)."""

DEFAULT_LABEL_SET = "glioma"
"""The label set of a model that names none."""


@dataclass(frozen=True)
class TrainRegion:
    """One output channel of a region-trained network: internal ``codes`` inside it, the code it is
    painted as (nnU-Net's ``regions_class_order``), the smallest earlier region containing it (its
    prediction is kept inside, as TC inside WT) or -1."""

    name: str
    codes: tuple[int, ...]
    paint: int
    parent: int = -1


@dataclass(frozen=True)
class LabelSet:
    """A label space: ``labels`` (internal code -> name, 0 background) and ordered ``train_regions``."""

    name: str
    description: str
    labels: dict[int, str]
    train_regions: tuple[TrainRegion, ...]

    @property
    def codes(self) -> tuple[int, ...]:
        return tuple(sorted(c for c in self.labels if c))

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.train_regions)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.labels[c] for c in sorted(self.labels))

    def out_channels(self, output: str) -> int:
        """Network output channels: one per train region, or one per label with background."""
        return len(self.train_regions) if output == "regions" else len(self.labels)

    def code(self, name: str) -> int:
        for code, label in self.labels.items():
            if label == name:
                return code
        raise KeyError(
            f"label set {self.name} has no label {name!r}; it has {', '.join(self.labels.values())}"
        )

    def regions(self, labels: np.ndarray) -> np.ndarray:
        """Binary train-region masks ``(R, *spatial)`` of an internal label volume."""
        return np.stack([np.isin(labels, r.codes) for r in self.train_regions])

    def paint(self, regions: np.ndarray) -> np.ndarray:
        """Internal labels from region masks ``(R, *spatial)``: nested, then painted in order."""
        kept: list[np.ndarray] = []
        out = np.zeros(np.asarray(regions[0]).shape, dtype=np.uint8)
        for index, region in enumerate(self.train_regions):
            mask = np.asarray(regions[index], dtype=bool)
            if region.parent >= 0:
                mask = mask & kept[region.parent]
            kept.append(mask)
            out[mask] = region.paint
        return out

    def to_dict(self) -> dict[str, Any]:
        """The table as ``label_sets.yaml`` writes it (for model cards and exports)."""
        return {
            "description": self.description,
            "labels": {int(c): n for c, n in self.labels.items() if c},
            "train_regions": [
                {"name": r.name, "labels": [self.labels[c] for c in r.codes], "paint": self.labels[r.paint]}
                for r in self.train_regions
            ],
        }


@dataclass(frozen=True)
class RegionRule:
    """A scored region (internal ``codes``), its lesion-matching ``dilation`` iterations and the volume
    at or below which reference lesions are not counted."""

    name: str
    codes: tuple[int, ...]
    dilation: int
    min_volume_mm3: float


@dataclass(frozen=True)
class LabelConvention:
    """How a dataset family codes its ``seg`` files (``to_canonical``: source value -> internal code)
    and how its challenge scores them (``scored`` regions, lesion-wise ``rules``, HD95 penalty of a
    missed or false-positive lesion)."""

    name: str
    title: str
    label_set: LabelSet
    to_canonical: dict[int, int]
    scored: tuple[RegionRule, ...]
    rules: str
    hd95_penalty_mm: float = 374.0

    @property
    def from_canonical(self) -> dict[int, int]:
        return {c: s for s, c in self.to_canonical.items()}

    @property
    def allowed_values(self) -> frozenset[int]:
        return frozenset(self.to_canonical)

    @property
    def region_names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.scored)

    def region_masks(self, internal: np.ndarray) -> np.ndarray:
        """Binary masks ``(len(scored), *spatial)`` of the scored regions."""
        return np.stack([np.isin(internal, r.codes) for r in self.scored])

    def source_codes(self) -> dict[str, int]:
        """Label name -> the value this convention writes for it."""
        return {self.label_set.labels[c]: s for s, c in self.to_canonical.items() if c}

    def encode(self, source_labels: np.ndarray) -> np.ndarray:
        """Source labels -> internal codes (ValueError for unknown values)."""
        return _remap(source_labels, self.to_canonical, self.name)

    def decode(self, canonical_labels: np.ndarray) -> np.ndarray:
        """Internal codes -> this convention's."""
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


TABLE_FILE = "label_sets.yaml"


class LabelTableError(ValueError):
    """``label_sets.yaml`` breaks its own rules (a packaging bug, or a user's edited copy)."""


def _codes_of(names: Iterable[str], labels: dict[int, str], where: str) -> tuple[int, ...]:
    by_name = {n: c for c, n in labels.items()}
    try:
        return tuple(sorted(by_name[str(n)] for n in names))
    except KeyError as exc:
        raise LabelTableError(f"{where}: label {exc.args[0]!r} is not one of {sorted(by_name)}") from None


def build_label_set(name: str, table: dict[str, Any]) -> LabelSet:
    """A :class:`LabelSet` from its ``label_sets.yaml`` entry."""
    where = f"{TABLE_FILE}: label_sets.{name}"
    labels = {0: "background", **{int(c): str(n) for c, n in dict(table["labels"]).items()}}
    if sorted(labels) != list(range(len(labels))):
        raise LabelTableError(f"{where}: internal codes must be 1..N without gaps, got {sorted(labels)}")
    regions: list[TrainRegion] = []
    for entry in table["train_regions"]:
        codes = _codes_of(entry["labels"], labels, f"{where}.{entry['name']}")
        paint = _codes_of([entry["paint"]], labels, f"{where}.{entry['name']}.paint")[0]
        if paint not in codes:
            raise LabelTableError(f"{where}.{entry['name']}: paint {entry['paint']} is not inside the region")
        parents = [i for i, r in enumerate(regions) if set(codes) < set(r.codes)]
        parent = min(parents, key=lambda i: len(regions[i].codes)) if parents else -1
        regions.append(TrainRegion(str(entry["name"]), codes, paint, parent))
    painted = {r.paint for r in regions}
    if painted != set(labels) - {0}:
        raise LabelTableError(
            f"{where}: train_regions must paint every label once, they paint {sorted(painted)}"
        )
    return LabelSet(name, str(table.get("description", "")), labels, tuple(regions))


def build_convention(name: str, table: dict[str, Any], label_sets: dict[str, LabelSet]) -> LabelConvention:
    """A :class:`LabelConvention` from its ``label_sets.yaml`` entry."""
    where = f"{TABLE_FILE}: conventions.{name}"
    try:
        label_set = label_sets[str(table["label_set"])]
    except KeyError:
        raise LabelTableError(f"{where}: unknown label_set {table.get('label_set')!r}") from None
    to_canonical = {0: 0}
    for value, label in dict(table["codes"]).items():
        to_canonical[int(value)] = _codes_of([label], label_set.labels, f"{where}.codes")[0]
    if sorted(to_canonical.values()) != sorted(label_set.labels):
        raise LabelTableError(f"{where}: codes must name every label of {label_set.name} once")
    rules = str(table.get("rules", "brats2023"))
    if rules not in LESION_RULES:
        raise LabelTableError(f"{where}: rules {rules!r} is not one of {', '.join(LESION_RULES)}")
    scored = tuple(
        RegionRule(
            str(region),
            _codes_of(spec["labels"], label_set.labels, f"{where}.regions.{region}"),
            int(spec.get("dilation", 0)),
            float(spec.get("min_volume_mm3", 0.0)),
        )
        for region, spec in dict(table["regions"]).items()
    )
    penalty = float(table.get("hd95_penalty_mm", 374.0))
    return LabelConvention(
        name, str(table.get("title", name)), label_set, to_canonical, scored, rules, penalty
    )


@cache
def _tables() -> tuple[dict[str, LabelSet], dict[str, LabelConvention]]:
    from tumorseg import yamlio

    text = resources.files("tumorseg.data").joinpath(TABLE_FILE).read_text()
    data = yamlio.safe_load(text)
    sets = {name: build_label_set(name, spec) for name, spec in data["label_sets"].items()}
    conventions = {name: build_convention(name, spec, sets) for name, spec in data["conventions"].items()}
    return sets, conventions


LABEL_SETS: dict[str, LabelSet] = _tables()[0]
LABEL_CONVENTIONS: dict[str, LabelConvention] = _tables()[1]

GLIOMA: LabelSet = LABEL_SETS[DEFAULT_LABEL_SET]

REGIONS: dict[str, tuple[int, ...]] = {r.name: r.codes for r in GLIOMA.train_regions}
REGION_NAMES: tuple[str, ...] = GLIOMA.region_names


BRATS_PREFIX_CONVENTIONS: dict[str, str] = {
    "GLI": "brats2023",
    "SSA": "brats2023-ssa",
    "MEN": "brats2023-men",
    "MET": "brats2023-met",
    "GOAT": "brats2023-goat",
}
"""BraTS 2023+ case-id prefix (upper-cased) -> its convention when unambiguous."""

AMBIGUOUS_BRATS_PREFIXES: dict[str, tuple[str, ...]] = {"PED": ("brats2023-ped", "brats2024-ped")}
"""Prefixes whose codes changed between challenges (PED 2023 codes as GLI, PED 2024 1 ET 2 NETC 3 CC 4 ED)."""


def get_convention(name: str) -> LabelConvention:
    try:
        return LABEL_CONVENTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown label convention {name!r}; use one of {', '.join(LABEL_CONVENTIONS)}"
        ) from None


def get_label_set(name: str | None) -> LabelSet:
    """A label set by name; ``None`` or ``""`` (a model saved before label sets) is ``glioma``."""
    if not name:
        return GLIOMA
    try:
        return LABEL_SETS[name]
    except KeyError:
        raise ValueError(f"unknown label set {name!r}; use one of {', '.join(LABEL_SETS)}") from None


def label_set_of(conventions: Iterable[str], *, where: str = "the dataset") -> LabelSet:
    """The one label set of these conventions (ValueError for several: they cannot be trained together)."""
    names = sorted({str(c) for c in conventions if c and str(c) != "nan"})
    sets = sorted({get_convention(c).label_set.name for c in names})
    if len(sets) > 1:
        raise ValueError(
            f"{where} mixes label sets {', '.join(sets)} (conventions {', '.join(names)}); "
            "train one label set at a time: keep one dataset family per data.source"
        )
    return get_label_set(sets[0] if sets else None)


def regions_from_canonical(labels: np.ndarray, label_set: LabelSet = GLIOMA) -> np.ndarray:
    """Binary train-region masks ``(R, *spatial)`` of an internal label volume (WT, TC, ET for glioma)."""
    return label_set.regions(labels)


def canonical_from_regions(regions: np.ndarray, label_set: LabelSet = GLIOMA) -> np.ndarray:
    """Inverse of :func:`regions_from_canonical` for nested masks (see :meth:`LabelSet.paint`)."""
    return label_set.paint(regions)


@dataclass(frozen=True)
class LayoutSpec:
    """A layout's file suffixes after the case id (BraTS-style only) and its ``seg`` convention."""

    name: str
    label_convention: str
    modality_suffixes: dict[str, str]
    seg_suffix: str


LAYOUTS: dict[str, LayoutSpec] = {
    # BraTS2021_00001/BraTS2021_00001_t1.nii.gz; BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz
    "brats2021": LayoutSpec(
        "brats2021", "brats2021", {"t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "flair": "_flair"}, "_seg"
    ),
    "brats2023": LayoutSpec(
        "brats2023", "brats2023", {"t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "flair": "-t2f"}, "-seg"
    ),
    "msd": LayoutSpec("msd", "msd", {}, ""),  # imagesTr/BRATS_001.nii.gz (4-D), labelsTr/BRATS_001.nii.gz
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
