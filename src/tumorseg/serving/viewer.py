"""What the browser viewer needs from a prediction: display volumes, slices, Dice, and a bounded store.

A kept :class:`DisplayCase` holds uint8-windowed modalities and labels on the closest RAS grid (flips and
permutations only: voxels stay the model's), sliced in radiological convention; a 2-D prediction is a
one-slice :class:`PlanarDisplay`. :class:`ResultStore` keeps ``serve.max_results`` of them (LRU, TTL)."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tumorseg.data.conventions import CANONICAL_MODALITIES, GLIOMA, LabelSet

PLANE_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``(X, Y, Z)`` or ``(C, X, Y, Z)`` ``volume`` on the closest RAS grid (no resampling), with its voxel
    sizes in mm along the new axes."""
    from nibabel.orientations import io_orientation

    from tumorseg.data.grid import reorient
    from tumorseg.data.layouts import spacing_from_affine

    ornt = io_orientation(affine)
    zooms = spacing_from_affine(affine)
    # ornt[i, 0] is the output axis source axis i lands on: voxel sizes follow the output order.
    spacing = tuple(zooms[int(source)] for source in np.argsort(ornt[:, 0]))
    return reorient(volume, ornt), spacing  # type: ignore[return-value]


def window_uint8(volume: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """One modality ``(X, Y, Z)`` -> uint8, windowed on percentiles of its non-zero voxels, from every
    7th voxel: exact enough for display, and a 240 x 240 x 155 volume is not sorted per request."""
    sample = volume.reshape(-1)[::7]
    sample = sample[np.isfinite(sample) & (sample != 0)]
    if sample.size == 0:
        return np.zeros(volume.shape, dtype=np.uint8)
    low, high = np.percentile(sample, [low_pct, high_pct])
    scale = 255.0 / max(float(high - low), 1e-6)
    out = np.nan_to_num((volume - low) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(out, 0, 255).astype(np.uint8)


REGION_COLOURS: dict[str, tuple[int, int, int]] = {
    "WT": (46, 204, 64),
    "TC": (255, 65, 54),
    "ET": (255, 220, 0),
    "RC": (177, 13, 201),
    "CC": (255, 133, 27),
}
"""Overlay colour of each train region by name."""

FALLBACK_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 116, 217),
    (240, 18, 190),
    (61, 153, 112),
    (133, 20, 75),
)
"""Colours of regions not in :data:`REGION_COLOURS` (a user-defined label set), by region index."""

LABEL_CAPTIONS: dict[str, str] = {
    "ED": "oedema",
    "NCR": "necrosis",
    "ET": "enhancing",
    "SNFH": "FLAIR hyperintensity",
    "NETC": "non-enhancing core",
    "RC": "resection cavity",
    "CC": "cyst",
}
"""What a region shows on the overlay, by the label it is painted as (WT -> ED -> ``oedema``)."""


def label_set_info(label_set: LabelSet) -> dict[str, Any]:
    """The label set as the viewer and API clients need it: ``name``, ``description``, ``labels`` (code
    string -> name), ``regions`` in the network's order (``name``, ``codes``, ``paint``, ``caption``,
    ``colour`` ``[r, g, b]``) and ``overlay_order``, innermost first (ET before TC before WT for glioma)."""
    regions = []
    for index, region in enumerate(label_set.train_regions):
        paint = label_set.labels[region.paint]
        colour = list(REGION_COLOURS.get(region.name, FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)]))
        codes = [int(c) for c in region.codes]
        caption = LABEL_CAPTIONS.get(paint, paint)
        regions.append(
            {"name": region.name, "codes": codes, "paint": paint, "caption": caption, "colour": colour}
        )
    return {
        "name": label_set.name,
        "description": label_set.description,
        "labels": {str(code): name for code, name in sorted(label_set.labels.items()) if code},
        "regions": regions,
        "overlay_order": [r.name for r in reversed(label_set.train_regions)],
    }


def dice_per_region(
    prediction: np.ndarray, reference: np.ndarray, label_set: LabelSet = GLIOMA
) -> dict[str, float]:
    """Dice of each train region between two internal label volumes of one shape (both empty: 1.0, as BraTS)."""
    return {
        region.name: binary_dice(np.isin(prediction, region.codes), np.isin(reference, region.codes))
        for region in label_set.train_regions
    }


def binary_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two 0/1 masks of one shape; both empty counts as 1.0 (as BraTS)."""
    pred, ref = np.asarray(prediction) > 0, np.asarray(reference) > 0
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / total


def planar_scores(prediction: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """``dice`` and ``iou`` (``{"tumour": x}``) and ``hd95_px`` of a 2-D prediction against a ground truth
    of its size, as the 2-D evaluation scores them (both empty: 1.0 and 0 px; one empty: 0.0 and the
    image diagonal)."""
    from tumorseg.evaluation.metrics import overlap_scores, segmentation_scores

    dice, hd95 = segmentation_scores(prediction, reference)
    iou = overlap_scores(prediction, reference)["iou"]
    return {"dice": {"tumour": round(dice, 4)}, "iou": {"tumour": round(iou, 4)}, "hd95_px": round(hd95, 3)}


@dataclass
class DisplayCase:
    """A prediction kept for the viewer: uint8 ``(4, X, Y, Z)`` windowed modalities (t1, t1ce, t2, flair)
    and ``(X, Y, Z)`` internal labels on the RAS grid, the ``.nii.gz`` bytes in the input's geometry and
    ``label_convention`` (a ground truth is read in it, on the ``source_shape`` grid), and once given the
    ground truth on the RAS grid with its Dice. A DICOM study is shown as imported (its case on the
    imported grid) and also keeps its DICOM-SEG (``dicom_seg``, named ``dicom_seg_name``)."""

    case_id: str
    images: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    summary: dict[str, Any]
    segmentation: bytes
    file_name: str
    source_shape: tuple[int, ...]
    source_affine: np.ndarray
    label_convention: str
    label_set: LabelSet = GLIOMA
    reference: np.ndarray | None = None
    dice: dict[str, float] | None = None
    dicom_seg: bytes | None = None
    dicom_seg_name: str | None = None
    t1ce_grid: Any = None
    """A DICOM study's T1ce series grid (:class:`~tumorseg.dicom.prepare.Geometry`); with ``case_grid``
    (the imported case's), a ground truth on the T1ce series is brought onto the case."""
    case_grid: Any = None
    touched: float = field(default_factory=time.monotonic)

    media_type = "application/gzip"

    def attach_dicom_seg(
        self, data: bytes, file_name: str, t1ce_grid: Any = None, case_grid: Any = None
    ) -> None:
        """Keep the DICOM-SEG of a DICOM study for download beside the segmentation, and the T1ce
        series' and the imported case's grids (a ground truth may come on either)."""
        self.dicom_seg, self.dicom_seg_name = data, file_name
        self.t1ce_grid, self.case_grid = t1ce_grid, case_grid

    def slices(self) -> dict[str, int]:
        """Number of slices per plane."""
        return {plane: int(self.labels.shape[axis]) for plane, axis in PLANE_AXIS.items()}

    def focus(self) -> dict[str, int]:
        """Per plane, the slice with the most tumour (the middle slice when there is none)."""
        tumour = self.labels > 0
        focus: dict[str, int] = {}
        for plane, axis in PLANE_AXIS.items():
            counts = tumour.sum(axis=tuple(a for a in range(3) if a != axis))
            focus[plane] = int(np.argmax(counts)) if counts.any() else self.labels.shape[axis] // 2
        return focus

    def score_reference(self, canonical_source: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """A ground truth given on the source grid (internal codes), as kept, and the prediction's Dice
        per region against it; nothing is stored (:meth:`keep_reference`)."""
        reference, _ = to_ras(canonical_source, self.source_affine)
        reference = np.ascontiguousarray(reference, dtype=np.uint8)
        return reference, dice_per_region(self.labels, reference, self.label_set)

    def keep_reference(self, reference: np.ndarray, dice: dict[str, float]) -> None:
        """Show ``reference`` and its scores (from :meth:`score_reference`) from now on."""
        self.reference, self.dice = reference, dice

    def set_reference(self, canonical_source: np.ndarray) -> dict[str, float]:
        """Store a ground truth given on the source grid (internal codes) and score the prediction."""
        self.keep_reference(*self.score_reference(canonical_source))
        return self.dice

    def slice_payload(self, plane: str, index: int, modality: str) -> dict[str, Any]:
        """One slice in radiological orientation: ``image``, ``labels`` and, once given, ``reference``,
        with ``pixel_mm`` (column, row)."""
        axis = PLANE_AXIS[plane]
        channel = CANONICAL_MODALITIES.index(modality)
        layers = {"image": self.images[channel], "labels": self.labels, "reference": self.reference}
        rows = {
            name: _radiological(np.take(volume, index, axis=axis), plane)
            for name, volume in layers.items()
            if volume is not None
        }
        in_plane = [self.spacing[a] for a in range(3) if a != axis]
        return _payload(plane, index, modality, rows, in_plane)


def _payload(
    plane: str, index: int, modality: str, layers: dict[str, np.ndarray], pixel_mm: list[float]
) -> dict[str, Any]:
    """A slice's JSON: each ``(height, width)`` uint8 layer as base64 of its bytes, rows top to bottom."""
    payload: dict[str, Any] = {"plane": plane, "index": index, "modality": modality}
    for name, rows in layers.items():
        payload[name] = base64.b64encode(np.ascontiguousarray(rows, dtype=np.uint8).tobytes()).decode("ascii")
    payload["height"], payload["width"] = (int(n) for n in layers["labels"].shape)
    payload["pixel_mm"] = pixel_mm
    return payload


def _radiological(section: np.ndarray, plane: str) -> np.ndarray:
    """A RAS section -> displayed rows and columns: axial ``(X, Y)`` rows anterior -> posterior, columns
    patient right -> left; coronal ``(X, Z)`` and sagittal ``(Y, Z)`` rows superior -> inferior."""
    return section[::-1, ::-1].T


def build_display_case(
    case_id: str,
    image: np.ndarray,
    canonical: np.ndarray,
    affine: np.ndarray,
    label_convention: str,
    summary: dict[str, Any],
    segmentation: bytes,
    label_set: LabelSet = GLIOMA,
) -> DisplayCase:
    """A :class:`DisplayCase` from float32 ``(4, X, Y, Z)`` modalities and uint8 ``(X, Y, Z)`` internal
    predicted labels on the source grid (``affine``: its voxel-to-world)."""
    images, spacing = to_ras(image, affine)
    labels, _ = to_ras(canonical, affine)
    windowed = np.stack([window_uint8(channel) for channel in images])
    return DisplayCase(
        case_id=case_id,
        images=windowed,
        labels=np.ascontiguousarray(labels, dtype=np.uint8),
        spacing=spacing,
        summary=summary,
        segmentation=segmentation,
        file_name=f"{case_id}.nii.gz",
        source_shape=tuple(int(n) for n in canonical.shape),
        source_affine=np.asarray(affine, dtype=np.float64),
        label_convention=label_convention,
        label_set=label_set,
    )


@dataclass
class PlanarDisplay:
    """A 2-D prediction kept for the viewer as the one ``axial`` slice, shown as stored (a 2-D file has no
    orientation): uint8 ``(H, W)`` windowed image, 0/1 mask and ground truth (the file's own ``tumorMask``,
    a demo image's mask, or None until one is uploaded) with its :func:`planar_scores`, and the mask PNG
    (0/255) bytes."""

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    pixel_mm: float
    summary: dict[str, Any]
    segmentation: bytes
    file_name: str
    reference: np.ndarray | None = None
    scores: dict[str, Any] | None = None
    touched: float = field(default_factory=time.monotonic)

    media_type = "image/png"

    def slices(self) -> dict[str, int]:
        return {"axial": 1}

    def focus(self) -> dict[str, int]:
        return {"axial": 0}

    def score_reference(self, mask: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """A ground truth of the image's size (nonzero: tumour), as kept, and the prediction's
        :func:`planar_scores` against it; nothing is stored (:meth:`keep_reference`)."""
        reference = np.ascontiguousarray(np.asarray(mask) > 0, dtype=np.uint8)
        return reference, planar_scores(self.labels, reference)

    def keep_reference(self, reference: np.ndarray, scores: dict[str, Any]) -> None:
        """Show ``reference`` and its scores (from :meth:`score_reference`) from now on."""
        self.reference, self.scores = reference, scores

    def set_reference(self, mask: np.ndarray) -> dict[str, Any]:
        """Store a ground truth of the image's size (nonzero: tumour) and score the prediction against it."""
        self.keep_reference(*self.score_reference(mask))
        return self.scores

    def slice_payload(self, plane: str, index: int, modality: str) -> dict[str, Any]:
        """The image as :meth:`DisplayCase.slice_payload` sends a slice (``modality`` is ignored)."""
        layers = {"image": self.image, "labels": self.labels, "reference": self.reference}
        rows = {name: layer for name, layer in layers.items() if layer is not None}
        return _payload("axial", 0, "image", rows, [self.pixel_mm, self.pixel_mm])


def build_planar_display(
    result: dict[str, Any], image: np.ndarray, mask: np.ndarray, reference: np.ndarray | None
) -> PlanarDisplay:
    """A :class:`PlanarDisplay` of a 2-D job's ``result`` with its float ``(H, W)`` image, 0/1 mask and
    ground truth (or None; its scores are the summary's)."""
    summary = result["summary"]
    return PlanarDisplay(
        case_id=summary["case_id"],
        image=window_uint8(np.asarray(image, dtype=np.float32)),
        labels=np.ascontiguousarray(mask > 0, dtype=np.uint8),
        pixel_mm=float(summary["pixel_size_mm"] or 1.0),
        summary=summary,
        segmentation=result["segmentation"],
        file_name=result["file_name"],
        reference=None if reference is None else np.ascontiguousarray(reference > 0, dtype=np.uint8),
    )


class ResultStore:
    """Display cases by random id: at most ``max_items``, each expiring ``ttl_s`` after its last use;
    thread-safe (stored from worker threads, read from the event loop)."""

    def __init__(self, max_items: int, ttl_s: float) -> None:
        self.max_items = max_items
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, DisplayCase | PlanarDisplay] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self) -> float:
        """Drop the expired items (call with the lock held); returns the time it used."""
        now = time.monotonic()
        for key in [k for k, item in self._items.items() if now - item.touched > self.ttl_s]:
            del self._items[key]
        return now

    def add(self, item: DisplayCase | PlanarDisplay) -> str:
        """Store ``item`` (dropping expired and least recently used ones) and return its new id."""
        key = secrets.token_urlsafe(12)
        with self._lock:
            now = self._expire()
            while len(self._items) >= self.max_items:
                self._items.popitem(last=False)
            item.touched = now
            self._items[key] = item
        return key

    def get(self, key: str) -> DisplayCase | PlanarDisplay | None:
        with self._lock:
            now = self._expire()
            item = self._items.get(key)
            if item is not None:
                item.touched = now
                self._items.move_to_end(key)
            return item

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)
