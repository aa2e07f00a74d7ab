"""Segmentation networks (all from :mod:`monai.networks.nets`) built by name from ``model:``.

Each maps ``(B, 4, H, W, D)`` (or ``(B, 4, H, W)`` in 2-D) to same-size logits with one channel per
train region (``model.output: regions``) or per label (``labels``). Built here and passed into the
LightningModule, so the same factory rebuilds it from a checkpoint's config for evaluation, export
and serving. ``flexible_unet`` is randomly initialised: nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from tumorseg.config import Section
from tumorseg.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

NetworkName = Literal[
    "unet",
    "attention_unet",
    "segresnet",
    "dynunet",
    "swinunetr",
    "flexible_unet",
    "efficientnet_attention_unet",
]
OutputMode = Literal["regions", "labels"]

IN_CHANNELS = 4
"""t1, t1ce, t2, flair (see :data:`tumorseg.data.conventions.CANONICAL_MODALITIES`)."""


class _StridedLevels(Section):
    """A U-Net's ``channels`` per level and ``strides`` between levels (one fewer)."""

    @model_validator(mode="after")
    def _levels(self) -> _StridedLevels:
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError("strides needs one entry fewer than channels")
        return self


class UNetConfig(_StridedLevels):
    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = Field(2, ge=0)


class AttentionUNetConfig(_StridedLevels):
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)


class SegResNetConfig(Section):
    init_filters: int = Field(16, ge=1)
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)

    @model_validator(mode="after")
    def _levels(self) -> SegResNetConfig:
        if len(self.blocks_up) != len(self.blocks_down) - 1:
            raise ValueError("blocks_up needs one entry fewer than blocks_down")
        return self


class DynUNetConfig(Section):
    base_filters: int = Field(32, ge=1)
    max_filters: int = Field(320, ge=1)
    max_levels: int = Field(5, ge=1, description="most stride-2 stages")
    min_feature_size: int = Field(4, ge=1, description="smallest bottleneck size along an axis")
    deep_supervision: bool = False
    deep_supervision_heads: int = Field(2, ge=1)
    res_block: bool = True


class SwinUNETRConfig(Section):
    feature_size: int = Field(24, ge=12, multiple_of=12)
    depths: tuple[int, int, int, int] = (2, 2, 2, 2)
    num_heads: tuple[int, int, int, int] = (3, 6, 12, 24)


class FlexibleUNetConfig(Section):
    backbone: Literal[
        "efficientnet-b0",
        "efficientnet-b1",
        "efficientnet-b2",
        "efficientnet-b3",
        "efficientnet-b4",
        "efficientnet-b5",
        "efficientnet-b6",
        "efficientnet-b7",
    ] = "efficientnet-b0"
    decoder_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 16)


class SliceLSTMConfig(Section):
    """``model.slice_lstm``: a convolutional LSTM along one volume axis in front of the network
    (:class:`~tumorseg.models.composite_networks.SliceConvLSTM`; 3-D only)."""

    enabled: bool = False
    axis: Literal[0, 1, 2] = Field(2, description="spatial axis it runs along (2: axial slices of RAS data)")
    hidden_channels: int = Field(8, ge=1)
    kernel_size: int = Field(3, ge=1)
    bidirectional: bool = True

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd (the slice keeps its size)")
        return value


class ModelConfig(Section):
    """``model:`` which network, its output mode and its shape.

    Attributes:
        name: ``unet`` (residual), ``attention_unet``, ``segresnet`` (Myronenko, BraTS 2018),
            ``dynunet`` (nnU-Net-style), ``swinunetr`` (Swin encoder), ``flexible_unet`` (EfficientNet),
            ``efficientnet_attention_unet`` (EfficientNet encoder, attention-gated decoder: seed 003).
        output: ``regions`` (one sigmoid channel per train region of the label set, as BraTS
            scores: WT/TC/ET for glioma) or ``labels`` (softmax over background and every label).
        label_set: the label space (:mod:`tumorseg.data.conventions`); training sets it from the
            data, params.yaml leaves it out.
        norm: normalisation layer (``instance`` suits batch sizes of 2).
        unet, attention_unet, segresnet, dynunet, swinunetr, flexible_unet,
            efficientnet_attention_unet: per-network shape; but for ``dynunet``, the keys are the MONAI
            class's own arguments.
        slice_lstm: an optional ConvLSTM pre-processing stage in front of the network (3-D).
    """

    name: NetworkName = "unet"
    output: OutputMode = "regions"
    label_set: str = "glioma"
    norm: Literal["instance", "batch"] = "instance"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    unet: UNetConfig = UNetConfig()
    attention_unet: AttentionUNetConfig = AttentionUNetConfig()
    segresnet: SegResNetConfig = SegResNetConfig()
    dynunet: DynUNetConfig = DynUNetConfig()
    swinunetr: SwinUNETRConfig = SwinUNETRConfig()
    flexible_unet: FlexibleUNetConfig = FlexibleUNetConfig()
    efficientnet_attention_unet: FlexibleUNetConfig = FlexibleUNetConfig()
    slice_lstm: SliceLSTMConfig = SliceLSTMConfig()

    @field_validator("label_set")
    @classmethod
    def _known_label_set(cls, value: str) -> str:
        from tumorseg.data.conventions import LABEL_SETS

        if value not in LABEL_SETS:
            raise ValueError(f"unknown label set {value!r}; use one of {', '.join(LABEL_SETS)}")
        return value

    @property
    def out_channels(self) -> int:
        from tumorseg.data.conventions import get_label_set

        return get_label_set(self.label_set).out_channels(self.output)


def dynunet_kernels_strides(
    patch_size: Sequence[int], spacing: Sequence[float], *, max_levels: int = 5, min_feature_size: int = 4
) -> tuple[list[list[int]], list[list[int]]]:
    """nnU-Net's rule: ``(kernels, strides)``, one ``[k_x, k_y(, k_z)]`` per level, the first stride all
    ones (the input block keeps full resolution). An axis is halved while its feature map stays at
    least ``2 * min_feature_size`` voxels and its spacing is within 2x of the finest axis (coarse axes
    wait for the others); its kernel is 3 where the spacing allows, 1 otherwise."""
    sizes = [float(s) for s in patch_size]
    spacings = [float(s) for s in spacing][: len(sizes)]
    kernels: list[list[int]] = []
    strides: list[list[int]] = [[1] * len(sizes)]
    while len(strides) <= max_levels:
        finest = min(spacings)
        ratios = [sp / finest for sp in spacings]
        stride = [
            2 if r <= 2 and size >= 2 * min_feature_size else 1 for r, size in zip(ratios, sizes, strict=True)
        ]
        if all(s == 1 for s in stride):
            break
        kernels.append([3 if r <= 2 else 1 for r in ratios])
        sizes = [size / s for size, s in zip(sizes, stride, strict=True)]
        spacings = [sp * s for sp, s in zip(spacings, stride, strict=True)]
        strides.append(stride)
    kernels.append([3] * len(sizes))
    return kernels, strides


def downsampling_factors(
    cfg: ModelConfig, patch_size: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> tuple[int, ...]:
    """Per-axis factor the patch size must be divisible by for ``cfg.name``."""
    if cfg.name == "dynunet":
        d = cfg.dynunet
        _, strides = dynunet_kernels_strides(
            patch_size, spacing, max_levels=d.max_levels, min_feature_size=d.min_feature_size
        )
        return tuple(math.prod(s[axis] for s in strides) for axis in range(len(patch_size)))
    factor = {
        "unet": math.prod(cfg.unet.strides),
        "attention_unet": math.prod(cfg.attention_unet.strides),
        "segresnet": 2 ** (len(cfg.segresnet.blocks_down) - 1),
    }.get(cfg.name, 32)  # swinunetr, flexible_unet, efficientnet_attention_unet
    return (factor,) * len(patch_size)


def check_patch_size(
    cfg: ModelConfig, patch_size: Sequence[int], *, key: str, spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> None:
    """ConfigError (one line naming ``key``) unless every patch axis is a multiple of the network's
    downsampling factor (and, for SwinUNETR, at least 64)."""
    factors = downsampling_factors(cfg, patch_size, spacing)
    # SwinUNETR's bottleneck is patch/32 and instance-normalised, which needs more than one voxel.
    smallest = 64 if cfg.name == "swinunetr" else 1
    if min(patch_size) < smallest:
        raise ConfigError(
            f"{key}: {list(patch_size)} is smaller than {smallest}, the smallest patch model.name={cfg.name} accepts"
        )
    bad = [(p, f) for p, f in zip(patch_size, factors, strict=True) if p % f != 0]
    if bad:
        suggestion = [max(f, round(p / f) * f) for p, f in zip(patch_size, factors, strict=True)]
        raise ConfigError(
            f"{key}: {list(patch_size)} is not divisible by {list(factors)}, the downsampling factor of "
            f"model.name={cfg.name}; use e.g. {suggestion}"
        )


_CLASS_NAMES = {
    "unet": "UNet",
    "attention_unet": "AttentionUnet",
    "segresnet": "SegResNet",
    "dynunet": "DynUNet",
    "swinunetr": "SwinUNETR",
    "flexible_unet": "FlexibleUNet",
}
"""Network name -> class in :mod:`monai.networks.nets` (names: MONAI is slow to import)."""


def _network_arguments(
    cfg: ModelConfig, patch_size: Sequence[int], spacing: Sequence[float]
) -> dict[str, Any]:
    """The MONAI class's arguments besides dims and channels: the network's own section plus norm/dropout."""
    if cfg.name != "dynunet":
        shared = {
            "unet": {"norm": cfg.norm, "dropout": cfg.dropout},
            "attention_unet": {"dropout": cfg.dropout},  # MONAI's AttentionUnet always uses batch norm
            "segresnet": {"dropout_prob": cfg.dropout or None, "norm": cfg.norm},
            "swinunetr": {"norm_name": cfg.norm, "drop_rate": cfg.dropout},
            "flexible_unet": {"pretrained": False, "norm": cfg.norm, "dropout": cfg.dropout},
            "efficientnet_attention_unet": {"norm": cfg.norm, "dropout": cfg.dropout},
        }[cfg.name]
        return {**getattr(cfg, cfg.name).model_dump(), **shared}
    d = cfg.dynunet
    kernels, strides = dynunet_kernels_strides(
        patch_size, spacing, max_levels=d.max_levels, min_feature_size=d.min_feature_size
    )
    return {
        "kernel_size": kernels,
        "strides": strides,
        "upsample_kernel_size": strides[1:],
        "filters": [min(d.base_filters * 2**i, d.max_filters) for i in range(len(strides))],
        "dropout": cfg.dropout or None,
        "norm_name": cfg.norm,
        "deep_supervision": d.deep_supervision,
        "deep_supr_num": min(d.deep_supervision_heads, len(strides) - 2) if d.deep_supervision else 1,
        "res_block": d.res_block,
    }


def build_network(
    cfg: ModelConfig,
    *,
    spatial_dims: int,
    patch_size: Sequence[int],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    in_channels: int = IN_CHANNELS,
) -> nn.Module:
    """A randomly initialised network giving ``(B, cfg.out_channels, *spatial)`` logits.

    Args:
        spatial_dims: 3 for patches ``(B, C, H, W, D)``, 2 for slices ``(B, C, H, W)``.
        patch_size, spacing: training patch and voxel spacing (mm); only DynUNet's shape depends on
            them (coarse axes stay at full size longer).

    DynUNet with deep supervision returns ``(B, heads + 1, C, *spatial)`` in training mode.
    ``model.slice_lstm.enabled`` puts a ConvLSTM stage in front (3-D only: ConfigError otherwise).
    """
    arguments = {
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": cfg.out_channels,
        **_network_arguments(cfg, patch_size, spacing),
    }
    if cfg.name == "efficientnet_attention_unet":
        from tumorseg.models.composite_networks import EfficientNetAttentionUNet

        network = EfficientNetAttentionUNet(**arguments)
    else:
        from monai.networks import nets

        network = getattr(nets, _CLASS_NAMES[cfg.name])(**arguments)
    if not cfg.slice_lstm.enabled:
        return network
    if spatial_dims != 3:
        raise ConfigError(
            "model.slice_lstm runs along a volume axis: it is for 3-D models only; set enabled: false"
        )
    from tumorseg.models.composite_networks import SliceConvLSTM, SliceLSTMSegmenter

    lstm = cfg.slice_lstm
    stage = SliceConvLSTM(
        in_channels,
        hidden=lstm.hidden_channels,
        axis=lstm.axis,
        kernel_size=lstm.kernel_size,
        bidirectional=lstm.bidirectional,
    )
    return SliceLSTMSegmenter(stage, network)
