"""Whole-volume inference and the label <-> region conversions shared by validation and scoring.

Networks are trained on patches (or axial slices); whole volumes ``(B, 4, X, Y, Z)`` are
predicted with MONAI's :class:`~monai.inferers.SlidingWindowInferer` (3-D) or
:class:`~monai.inferers.SliceInferer` (2-D networks run slice by slice along Z), with the
training patch as the window and the settings of params.yaml's ``sliding_window:`` section.

Predictions become an internal label map ``(B, 1, X, Y, Z)`` of the model's label set (glioma:
0 bg, 1 NCR, 2 ED, 3 ET): region outputs are thresholded, nested (TC inside WT, ET inside TC) and
painted back as BraTS post-processing does, and tumour components below ``sliding_window.min_component_mm3`` are dropped,
so validation and test scoring score the same map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from tumorseg.config import Section
from tumorseg.data.conventions import GLIOMA, LabelSet


class SlidingWindowConfig(Section):
    """``sliding_window:`` whole-volume inference (validation, test scoring, serving).

    Attributes:
        overlap: fraction of the window shared by neighbouring windows.
        blend_mode: ``gaussian`` weights window centres over borders; ``constant`` averages.
        sw_batch_size: windows per forward pass.
        threshold: sigmoid probability above which a region voxel is foreground.
        min_component_mm3: connected tumour components (26-connected whole tumour) smaller than
            this are removed, as BraTS post-processing does; 0 keeps everything. One stray voxel
            on a tumour-free scan scores Dice 0 for every region under the BraTS convention.
    """

    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_component_mm3: float = Field(1000.0, ge=0.0)


def make_inferer(cfg: SlidingWindowConfig, roi_size: Sequence[int]) -> Any:
    """A MONAI inferer for ``(B, C, X, Y, Z)`` volumes and a network trained on ``roi_size`` patches.

    A 2-element ``roi_size`` means a 2-D network: it runs on axial slices (the Z axis).
    """
    from monai.inferers import SliceInferer, SlidingWindowInferer

    kwargs = dict(
        roi_size=tuple(roi_size),
        sw_batch_size=cfg.sw_batch_size,
        overlap=cfg.overlap,
        mode=cfg.blend_mode,
        padding_mode="constant",
    )
    if len(roi_size) == 2:
        return SliceInferer(spatial_dim=2, **kwargs)
    return SlidingWindowInferer(**kwargs)


def labels_to_regions(labels: torch.Tensor, label_set: LabelSet = GLIOMA) -> torch.Tensor:
    """Internal labels ``(B, 1, *spatial)`` -> float 0/1 train-region masks ``(B, R, *spatial)``."""
    codes = labels[:, 0].long()
    masks = [
        torch.isin(codes, torch.tensor(region.codes, device=codes.device))
        for region in label_set.train_regions
    ]
    return torch.stack(masks, dim=1).to(torch.float32)


def regions_to_labels(regions: torch.Tensor, label_set: LabelSet = GLIOMA) -> torch.Tensor:
    """0/1 train regions ``(B, R, *spatial)`` -> internal labels ``(B, 1, *spatial)`` uint8.

    Each region is kept inside its parent (TC inside WT, ET inside TC) and painted in order, as
    :meth:`tumorseg.data.conventions.LabelSet.paint` does.
    """
    out = torch.zeros_like(regions[:, 0], dtype=torch.uint8)
    kept: list[torch.Tensor] = []
    for index, region in enumerate(label_set.train_regions):
        mask = regions[:, index].bool()
        if region.parent >= 0:
            mask = mask & kept[region.parent]
        kept.append(mask)
        out[mask] = region.paint
    return out[:, None]


def remove_small_components(
    labels: torch.Tensor, min_volume_mm3: float, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)
) -> torch.Tensor:
    """Zero the tumour components (26-connected, whole tumour) smaller than ``min_volume_mm3``.

    Args:
        labels: canonical labels ``(B, 1, X, Y, Z)``.
        min_volume_mm3: smallest component kept; 0 returns ``labels`` unchanged.
        spacing_mm: voxel spacing, to measure components in mm^3 (MONAI ``RemoveSmallObjects``).
    """
    if min_volume_mm3 <= 0 or not labels.any():
        return labels
    import warnings

    from monai.transforms import RemoveSmallObjects

    remove = RemoveSmallObjects(
        min_size=min_volume_mm3, connectivity=labels.dim() - 2, by_measure=True, pixdim=tuple(spacing_mm)
    )
    with warnings.catch_warnings():  # scikit-image's min_size -> max_size rename, inside MONAI
        warnings.simplefilter("ignore", FutureWarning)
        keep = torch.stack([torch.as_tensor(remove(item > 0)) for item in labels.cpu()])
    return labels * keep.to(labels.device, labels.dtype)


def logits_to_labels(
    logits: torch.Tensor, output: str, threshold: float = 0.5, label_set: LabelSet = GLIOMA
) -> torch.Tensor:
    """Network logits ``(B, C, *spatial)`` -> internal labels ``(B, 1, *spatial)`` uint8.

    Args:
        logits: one channel per train region (``output="regions"``) or per label (``"labels"``).
        output: the network's output mode.
        threshold: sigmoid probability threshold for regions.
        label_set: the label space the network was trained in.
    """
    if output == "regions":
        return regions_to_labels(torch.sigmoid(logits.float()) > threshold, label_set)
    return logits.argmax(dim=1, keepdim=True).to(torch.uint8)


@torch.no_grad()
def predict_labels(
    network: torch.nn.Module,
    image: torch.Tensor,
    inferer: Any,
    output: str,
    threshold: float = 0.5,
    *,
    min_component_mm3: float = 0.0,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    label_set: LabelSet = GLIOMA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-volume prediction.

    Args:
        network: a trained network in eval mode.
        image: ``(B, 4, X, Y, Z)`` preprocessed volumes.
        inferer: from :func:`make_inferer`.
        output: ``regions`` or ``labels``.
        threshold: sigmoid threshold (regions).
        min_component_mm3: drop tumour components smaller than this (:func:`remove_small_components`).
        spacing_mm: voxel spacing of ``image``.
        label_set: the label space the network was trained in.

    Returns:
        ``(logits (B, C, X, Y, Z), labels (B, 1, X, Y, Z) uint8)``.
    """
    logits = inferer(image, network)
    labels = logits_to_labels(logits, output, threshold, label_set)
    return logits, remove_small_components(labels, min_component_mm3, spacing_mm)
