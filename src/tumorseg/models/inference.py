"""Whole-volume inference and the label <-> region conversions shared by validation and scoring.

Volumes ``(B, 4, X, Y, Z)`` go through MONAI's sliding-window (3-D) or slice (2-D) inferer; regions are
thresholded, nested as BraTS does, and small components dropped, so validation and test score one map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tumorseg.data.conventions import GLIOMA, LabelSet
from tumorseg.models.config import SlidingWindowConfig


def make_inferer(cfg: SlidingWindowConfig, roi_size: Sequence[int]) -> Any:
    """A MONAI inferer for ``(B, C, X, Y, Z)`` volumes and a network trained on ``roi_size`` patches (a
    2-element ``roi_size`` is a 2-D network, run on axial slices)."""
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
    """0/1 train regions ``(B, R, *spatial)`` -> uint8 internal labels ``(B, 1, *spatial)``, each region
    kept inside its parent (ET in TC in WT) and painted in order, as ``LabelSet.paint`` does."""
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
    """Zero the whole-tumour components of canonical ``labels`` ``(B, 1, X, Y, Z)`` below ``min_volume_mm3``
    (measured with ``spacing_mm``; 0 returns ``labels`` unchanged)."""
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
    """Logits ``(B, C, *spatial)`` (regions or labels: ``output``) -> uint8 labels ``(B, 1, *spatial)``."""
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
    """``(logits (B, C, X, Y, Z), uint8 labels (B, 1, X, Y, Z))`` of ``image`` ``(B, 4, X, Y, Z)`` with
    ``inferer``, components below ``min_component_mm3`` removed."""
    logits = inferer(image, network)
    labels = logits_to_labels(logits, output, threshold, label_set)
    return logits, remove_small_components(labels, min_component_mm3, spacing_mm)
