"""The 2-D networks: a segmenter from :func:`tumorseg.models.networks.build_network` (``spatial_dims=2``,
one input channel, so every ``model_2d.name`` works) and MONAI's :class:`~monai.networks.nets.Classifier`
with ``1 + len(TUMOUR_TYPES)`` outputs: a tumour-present logit (sigmoid), then the type logits (softmax).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tumorseg.data.planar import TUMOUR_TYPES
from tumorseg.models.config import PlanarModelConfig

CLASSIFIER_OUTPUTS = 1 + len(TUMOUR_TYPES)


class PlanarNetwork(nn.Module):
    """Segmenter ``(B, 1, n, n) -> (B, 1, n, n)`` and classifier ``(B, 1, n, n) -> (B, 4)`` at side ``n``."""

    def __init__(self, segmenter: nn.Module, classifier: nn.Module, input_size: int) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.classifier = classifier
        self.input_size = int(input_size)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 1, S, S)`` -> (segmentation logits ``(B, 1, S, S)``, class logits ``(B, 4)``).

        The image is area-averaged to ``n`` and the logits resized back (bilinear), so callers see
        the preprocessed grid.
        """
        size = tuple(image.shape[-2:])
        small = image
        if size != (self.input_size, self.input_size):
            small = F.interpolate(image, size=(self.input_size, self.input_size), mode="area")
        seg = self.segmenter(small)
        if seg.shape[-2:] != size:
            seg = F.interpolate(seg, size=size, mode="bilinear", align_corners=False)
        return seg, self.classifier(small)


def build_planar_network(cfg: PlanarModelConfig) -> PlanarNetwork:
    """Randomly initialised :class:`PlanarNetwork` for ``model_2d``."""
    from monai.networks.nets import Classifier

    from tumorseg.models.networks import build_network

    size = cfg.input_size
    segmenter = build_network(cfg, spatial_dims=2, patch_size=(size, size), spacing=(1.0, 1.0), in_channels=1)
    c = cfg.classifier
    classifier = Classifier(
        in_shape=(1, size, size),
        classes=CLASSIFIER_OUTPUTS,
        channels=c.channels,
        strides=c.strides,
        num_res_units=c.num_res_units,
        dropout=c.dropout or None,
    )
    init_output_bias(segmenter, cfg.foreground_prior, cfg.out_channels)
    return PlanarNetwork(segmenter, classifier, size)


def init_output_bias(network: nn.Module, prior: float, out_channels: int) -> None:
    """Set the bias of the output convolution (the last 2-D one with ``out_channels`` outputs, which
    every MONAI network built here adds unchanged into the logits) to ``log(prior / (1 - prior))``."""
    last = None
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.out_channels == out_channels:
            last = module
    if last is not None and last.bias is not None:
        with torch.no_grad():
            last.bias.fill_(math.log(prior / (1.0 - prior)))
