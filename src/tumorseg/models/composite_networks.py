"""Networks built from MONAI blocks that MONAI has no class for: the seed-003 system's two parts.

* :class:`EfficientNetAttentionUNet`: MONAI's ``FlexibleUNet`` (EfficientNet encoder, U-Net decoder)
  with MONAI's ``AttentionBlock`` gating every skip connection, as the Attention U-Net does.
* :class:`SliceConvLSTM`: a convolutional LSTM run along one axis of the volume, slice after slice
  (both directions), whose output corrects the input channels before the segmenter sees them: a
  learned pre-processing step (denoising, intensity normalisation, coherence between neighbouring
  slices) trained end to end with the segmenter. Neither torch nor MONAI ships a convolutional LSTM,
  so the cell is written here (the standard gates of Shi et al. 2015).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.nets.attentionunet import AttentionBlock
from monai.networks.nets.flexible_unet import FLEXUNET_BACKBONE
from torch import nn


class EfficientNetAttentionUNet(FlexibleUNet):
    """``FlexibleUNet`` whose skip features pass an attention gate driven by the upsampled decoder
    features before they are concatenated (Oktay et al. 2018); same arguments as ``FlexibleUNet``."""

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        backbone: str,
        decoder_channels: Sequence[int],
        norm: str,
        dropout: float,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            backbone=backbone,
            pretrained=False,
            decoder_channels=tuple(decoder_channels),
            spatial_dims=spatial_dims,
            norm=norm,
            dropout=dropout,
        )
        encoder = FLEXUNET_BACKBONE.register_dict[backbone]
        skip_channels = list(encoder["feature_channel"])[:-1][::-1]
        decoder_in = [encoder["feature_channel"][-1], *decoder_channels[: len(skip_channels) - 1]]
        # UpCat halves the channels it upsamples when a skip follows: the gate's signal has in // 2
        self.gates = nn.ModuleList(
            AttentionBlock(spatial_dims, f_int=max(skip // 2, 1), f_g=up // 2, f_l=skip, dropout=dropout)
            for up, skip in zip(decoder_in, skip_channels, strict=True)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        features = self.encoder(inputs)
        skips = features[:-1][::-1]
        x = features[-1]
        for index, block in enumerate(self.decoder.blocks):
            up = block.upsample(x)
            if index < self.skip_connect:
                skip = skips[index]
                up = _pad_to(up, skip)
                x = block.convs(torch.cat([self.gates[index](g=up, x=skip), up], dim=1))
            else:
                x = block.convs(up)
        return self.segmentation_head(x)


def _pad_to(up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Replicate-pad ``up`` by one voxel where an odd ``skip`` axis made it one short (as MONAI's UpCat)."""
    pads: list[int] = []
    for axis in range(up.dim() - 1, 1, -1):
        pads += [0, int(skip.shape[axis] != up.shape[axis])]
    return nn.functional.pad(up, pads, "replicate") if any(pads) else up


class _ConvLSTMCell(nn.Module):
    """One 2-D convolutional LSTM step: input, forget, output and candidate gates from one convolution."""

    def __init__(self, in_channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, o, g = torch.chunk(self.gates(torch.cat([x, h], dim=1)), 4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def run(self, slices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Hidden states of every slice, in the order given."""
        first = slices[0]
        h = first.new_zeros(first.shape[0], self.hidden, *first.shape[2:])
        state = (h, h)
        out = []
        for x in slices:
            state = self(x, state)
            out.append(state[0])
        return out


class SliceConvLSTM(nn.Module):
    """``(B, C, X, Y, Z)`` -> same shape: the input plus a correction that a (bidirectional) ConvLSTM
    computes slice by slice along spatial ``axis`` (0, 1 or 2). The correction's 1x1 output layer
    starts at zero, so training starts from the plain segmenter and learns what helps it."""

    def __init__(
        self,
        channels: int,
        *,
        hidden: int = 8,
        axis: int = 2,
        kernel_size: int = 3,
        bidirectional: bool = True,
    ) -> None:
        super().__init__()
        self.axis = axis
        self.forward_cell = _ConvLSTMCell(channels, hidden, kernel_size)
        self.backward_cell = _ConvLSTMCell(channels, hidden, kernel_size) if bidirectional else None
        self.project = nn.Conv2d(hidden * (2 if bidirectional else 1), channels, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = 2 + self.axis
        slices = list(torch.unbind(x, dim=dim))
        hidden = self.forward_cell.run(slices)
        if self.backward_cell is not None:
            backward = self.backward_cell.run(slices[::-1])[::-1]
            hidden = [torch.cat(pair, dim=1) for pair in zip(hidden, backward, strict=True)]
        correction = torch.stack([self.project(h) for h in hidden], dim=dim)
        return x + correction


class SliceLSTMSegmenter(nn.Module):
    """``segmenter(lstm(x))``, trained end to end (the seed-003 system when the segmenter is
    :class:`EfficientNetAttentionUNet`)."""

    def __init__(self, lstm: SliceConvLSTM, segmenter: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter(self.lstm(x))
