"""MONAI dictionary transforms for training patches, and the ``data_loader:`` / ``augment:`` sections.

The random part runs on the patch drawn out of core (:mod:`tumorseg.data.case_store`), not the volume,
keeping the CPU cost per patch small; in 2-D mode the patch is an axial slab ``(px, py, 1)``, squeezed.
Labels stay canonical codes ``(1, *spatial)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from tumorseg.config import Section

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from monai.transforms import Compose


class DataLoaderConfig(Section):
    """``data_loader:`` patch sampling, batching and loader workers.

    Attributes:
        patch_size: 3-D training patch (voxels); also the sliding-window ROI at validation.
        batch_size: patches per optimiser step (per device).
        sampler: ``pos_neg`` (``foreground_fraction`` of the patches centred on tumour, the rest on
            brain) or ``label_classes`` (``class_ratios`` of centres on bg/NCR/ED/ET: rare NCR/ET
            oversampled).
        cache_mb: in-memory case cache budget (MiB, per process); 0 reads every patch out of core.
    """

    mode: Literal["3d", "2d"] = "3d"
    patch_size: tuple[int, int, int] = (64, 64, 64)
    patch_size_2d: tuple[int, int] = (64, 64)
    batch_size: int = Field(2, ge=1)
    sampler: Literal["pos_neg", "label_classes"] = "pos_neg"
    foreground_fraction: float = Field(0.5, ge=0.0, le=1.0)
    class_ratios: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    num_workers: int = Field(0, ge=0)
    cache_mb: int = Field(0, ge=0)
    pin_memory: bool = False

    @model_validator(mode="after")
    def _positive_sizes(self) -> DataLoaderConfig:
        if min(self.patch_size) < 1:
            raise ValueError("patch_size values must be positive")
        if min(self.patch_size_2d) < 1:
            raise ValueError("patch_size_2d values must be positive")
        if min(self.class_ratios) < 0 or self.class_ratios[0] <= 0:  # tumour-free cases have only bg
            raise ValueError("class_ratios must be non-negative with a positive background (first) share")
        return self

    @property
    def spatial_dims(self) -> int:
        return 3 if self.mode == "3d" else 2

    @property
    def network_patch(self) -> tuple[int, ...]:
        """The patch the network sees: ``(px, py, pz)`` in 3-D, ``(px, py)`` in 2-D."""
        return tuple(self.patch_size) if self.mode == "3d" else tuple(self.patch_size_2d)

    @property
    def crop_size(self) -> tuple[int, int, int]:
        """The crop taken from a ``(X, Y, Z)`` volume: a 2-D patch is a one-voxel-thick axial slab."""
        return tuple(self.patch_size) if self.mode == "3d" else (*self.patch_size_2d, 1)

    def patch_key(self) -> str:
        """The params.yaml key holding the active patch size (for error messages)."""
        return "data_loader.patch_size" if self.mode == "3d" else "data_loader.patch_size_2d"


class AugmentConfig(Section):
    """``augment:`` random augmentation of training patches (probabilities are per patch).

    Rotation and scaling share one affine resampling (half the CPU cost of separate transforms).
    Elastic deformation is off by default: on a 2-core CPU it costs more than a training step.
    ``channel_gamma_prob`` draws a gamma per sequence (contrast between sequences varies across
    scanners and protocols); ``blur_prob`` and ``low_res_prob`` imitate partial volume and thick slices
    (nnU-Net's Gaussian blur and low-resolution simulation). ``bias_field_prob`` multiplies a sequence by
    a smooth field ``exp(p)``, ``p`` a random second-order polynomial of the patch coordinates with
    ``|p|`` up to ``bias_field_strength`` (receive-coil shading that bias correction left behind).
    """

    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    affine_prob: float = Field(0.2, ge=0.0, le=1.0)
    rotate_deg: float = Field(15.0, ge=0.0, le=180.0)
    scale_range: float = Field(0.1, ge=0.0, lt=1.0)
    elastic_prob: float = Field(0.0, ge=0.0, le=1.0)
    elastic_sigma: tuple[float, float] = (5.0, 8.0)
    elastic_magnitude: tuple[float, float] = (50.0, 150.0)
    intensity_scale_prob: float = Field(0.3, ge=0.0, le=1.0)
    intensity_scale: float = Field(0.1, ge=0.0, lt=1.0)
    intensity_shift_prob: float = Field(0.3, ge=0.0, le=1.0)
    intensity_shift: float = Field(0.1, ge=0.0)
    gamma_prob: float = Field(0.15, ge=0.0, le=1.0)
    gamma_range: tuple[float, float] = (0.7, 1.5)
    noise_prob: float = Field(0.1, ge=0.0, le=1.0)
    noise_std: float = Field(0.05, ge=0.0)
    channel_gamma_prob: float = Field(0.0, ge=0.0, le=1.0)
    blur_prob: float = Field(0.0, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    low_res_prob: float = Field(0.0, ge=0.0, le=1.0)
    low_res_zoom: tuple[float, float] = (0.5, 1.0)
    bias_field_prob: float = Field(0.0, ge=0.0, le=1.0)
    bias_field_strength: float = Field(0.3, ge=0.0, le=2.0)

    @model_validator(mode="after")
    def _ordered_ranges(self) -> AugmentConfig:
        for name in ("elastic_sigma", "elastic_magnitude", "gamma_range", "blur_sigma", "low_res_zoom"):
            low, high = getattr(self, name)
            if low <= 0 or high < low:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high")
        return self


IMAGE_KEY = "image"
LABEL_KEY = "label"
BRAIN_KEY = "brain"
CASE_INDEX_KEY = "case_index"  # position in the split; validation drops DDP padding duplicates by it


def load_preprocessed_case(path: str | Path) -> dict[str, np.ndarray]:
    """Read one preprocessed ``.npz`` case, channel-first as MONAI dictionary transforms expect:
    ``image`` float32 ``(4, X, Y, Z)``, ``label`` uint8 and ``brain`` bool ``(1, X, Y, Z)``."""
    with np.load(path) as npz:
        return {
            IMAGE_KEY: npz["image"].astype(np.float32),
            LABEL_KEY: npz["label"].astype(np.uint8)[None],
            BRAIN_KEY: npz["brain"].astype(bool)[None],
        }


def augmentation_transforms(augment: AugmentConfig, spatial_dims: int) -> list[Any]:
    """The random augmentations applied to each patch ``(C, *patch)`` after cropping."""
    from monai.transforms import (
        Rand2DElasticd,
        Rand3DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandGaussianSmoothd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSimulateLowResolutiond,
    )

    keys = [IMAGE_KEY, LABEL_KEY]
    spatial = {"keys": keys, "mode": ("bilinear", "nearest"), "padding_mode": "zeros"}
    steps: list[Any] = []
    if augment.flip_prob > 0:
        steps += [
            RandFlipd(keys=keys, prob=augment.flip_prob, spatial_axis=axis) for axis in range(spatial_dims)
        ]
    if augment.affine_prob > 0 and (augment.rotate_deg > 0 or augment.scale_range > 0):
        angle = math.radians(augment.rotate_deg)
        steps.append(
            RandAffined(
                prob=augment.affine_prob,
                rotate_range=(angle,) * (3 if spatial_dims == 3 else 1),
                scale_range=(augment.scale_range,) * spatial_dims,
                **spatial,
            )
        )
    if augment.elastic_prob > 0:
        elastic = {"magnitude_range": augment.elastic_magnitude, "prob": augment.elastic_prob, **spatial}
        if spatial_dims == 3:
            steps.append(Rand3DElasticd(sigma_range=augment.elastic_sigma, **elastic))
        else:  # the 2-D variant deforms a control-point grid whose spacing plays the role of sigma
            steps.append(Rand2DElasticd(spacing=augment.elastic_sigma, **elastic))
    channel_wise = {"keys": IMAGE_KEY, "channel_wise": True}
    if augment.intensity_scale_prob > 0:
        scale, prob = augment.intensity_scale, augment.intensity_scale_prob
        steps.append(RandScaleIntensityd(factors=scale, prob=prob, **channel_wise))
    if augment.intensity_shift_prob > 0:
        shift, prob = augment.intensity_shift, augment.intensity_shift_prob
        steps.append(RandShiftIntensityd(offsets=shift, prob=prob, **channel_wise))
    if augment.gamma_prob > 0:
        steps.append(RandAdjustContrastd(keys=IMAGE_KEY, prob=augment.gamma_prob, gamma=augment.gamma_range))
    if augment.channel_gamma_prob > 0:
        steps += channel_gamma(augment.channel_gamma_prob, augment.gamma_range)
    steps += bias_field(augment.bias_field_prob, augment.bias_field_strength)
    if augment.blur_prob > 0:
        sigma = augment.blur_sigma
        steps.append(
            RandGaussianSmoothd(
                keys=IMAGE_KEY, prob=augment.blur_prob, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma
            )
        )
    if augment.low_res_prob > 0:
        steps.append(
            RandSimulateLowResolutiond(
                keys=IMAGE_KEY,
                prob=augment.low_res_prob,
                zoom_range=augment.low_res_zoom,
                upsample_mode="trilinear" if spatial_dims == 3 else "bilinear",
            )
        )
    if augment.noise_prob > 0:
        steps.append(RandGaussianNoised(keys=IMAGE_KEY, prob=augment.noise_prob, std=augment.noise_std))
    return steps


def per_channel(prob: float, change: Callable[[np.random.RandomState, Any], Any]) -> Any:
    """A MONAI ``Randomizable`` that, for each image channel in turn with probability ``prob``, replaces
    it by ``change(R, channel)`` (its own draws from the transform's generator; None keeps the channel).
    ``image`` ``(C, *spatial)`` in, a float32 tensor out."""
    import torch
    from monai.transforms import Randomizable

    class RandPerChanneld(Randomizable):
        def randomize(self, data: Any = None) -> None:
            """The draws happen per channel in ``__call__``."""

        def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
            image = torch.as_tensor(data[IMAGE_KEY], dtype=torch.float32)
            out = image.clone()
            for c in range(image.shape[0]):
                if self.R.random_sample() >= prob:
                    continue
                changed = change(self.R, image[c])
                if changed is not None:
                    out[c] = changed
            return {**data, IMAGE_KEY: out}

    return RandPerChanneld()


def channel_gamma(prob: float, gamma: tuple[float, float]) -> list[Any]:
    """A gamma drawn per image channel (MONAI's ``RandAdjustContrastd`` draws one for every channel, and
    costs ~80 ms per 64^3 channel): each channel rescaled to [0, 1], raised to its gamma, scaled back."""

    def change(rng: np.random.RandomState, channel: Any) -> Any:
        g = float(rng.uniform(*gamma))
        low, high = channel.min(), channel.max()
        span = (high - low).clamp_min(1e-7)
        return ((channel - low) / span).pow(g) * span + low

    return [per_channel(prob, change)]


def smooth_field(rng: np.random.RandomState, shape: Sequence[int], strength: float) -> np.ndarray:
    """float32 ``exp(p)`` over ``shape``: ``p`` a second-order polynomial of the coordinates (each axis
    in [-1, 1]) with normal coefficients, its peak ``|p|`` scaled to ``strength``. Built from 1-D and
    2-D terms broadcast once, so a 64^3 field costs a few milliseconds."""
    dims = len(shape)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]

    def spread(values: np.ndarray, along: tuple[int, ...]) -> np.ndarray:
        return values.reshape([shape[k] if k in along else 1 for k in range(dims)])

    lin, sq = rng.normal(0.0, 1.0, dims), rng.normal(0.0, 0.7, dims)
    p = np.zeros(tuple(shape), np.float32)
    for k, a in enumerate(axes):
        p += spread(np.float32(lin[k]) * a + np.float32(sq[k]) * a * a, (k,))
        for m in range(k + 1, dims):
            p += spread(np.float32(rng.normal(0.0, 0.7)) * np.outer(a, axes[m]), (k, m))
    peak = float(np.abs(p).max())
    if peak <= 0:
        return np.ones(tuple(shape), np.float32)
    p *= np.float32(strength / peak)
    return np.exp(p, out=p)


def bias_field(prob: float, strength: float) -> list[Any]:
    """Per image channel, with probability ``prob``: a smooth multiplicative field (:func:`smooth_field`,
    peak log-amplitude drawn in ``[0, strength]``) applied above the channel's lowest non-zero value, so
    that the darkest tissue keeps its value and contrast varies across the patch as under a receive
    coil; zero voxels (the background a z-scored volume stores as 0) are left alone. Off (no step, so
    no random draw either) unless ``prob`` and ``strength`` are both above 0."""
    import torch

    if prob <= 0 or strength <= 0:
        return []

    def change(rng: np.random.RandomState, channel: Any) -> Any:
        field = smooth_field(rng, channel.shape, float(rng.uniform(0.0, strength)))
        tissue = channel != 0  # a z-scored volume stores its background as exactly 0
        if not bool(tissue.any()):
            return None
        low = channel[tissue].min()
        return torch.where(tissue, (channel - low) * torch.from_numpy(field) + low, channel)

    return [per_channel(prob, change)]


def train_transforms(loader: DataLoaderConfig, augment: AugmentConfig) -> Compose:
    """Augmentation of one drawn patch: ``image`` float32 ``(4, *crop)``, ``label`` uint8 ``(1, *crop)``
    in, the same keys as plain tensors ``(4, *patch)``, ``(1, *patch)`` out (2-D slab squeezed)."""
    from monai.transforms import CastToTyped, Compose, EnsureTyped, SqueezeDimd

    steps: list[Any] = []
    if loader.mode == "2d":
        steps.append(SqueezeDimd(keys=[IMAGE_KEY, LABEL_KEY], dim=-1))
    steps += augmentation_transforms(augment, loader.spatial_dims)
    steps.append(CastToTyped(keys=[IMAGE_KEY, LABEL_KEY], dtype=(np.float32, np.uint8)))
    # MONAI transforms re-wrap outputs in MetaTensors; plain tensors keep the network's forward
    # free of MetaTensor's per-operation overhead (and checkpoints free of MONAI types).
    steps.append(EnsureTyped(keys=[IMAGE_KEY, LABEL_KEY], data_type="tensor", track_meta=False))
    return Compose(steps)


class PlanarAugmentConfig(Section):
    """``train_2d.augment:`` random augmentation per image (MONAI dictionary transforms)."""

    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    affine_prob: float = Field(0.3, ge=0.0, le=1.0)
    rotate_deg: float = Field(10.0, ge=0.0, le=180.0)
    scale_range: float = Field(0.1, ge=0.0, lt=1.0)
    intensity_scale_prob: float = Field(0.3, ge=0.0, le=1.0)
    intensity_scale: float = Field(0.1, ge=0.0)
    intensity_shift_prob: float = Field(0.3, ge=0.0, le=1.0)
    intensity_shift: float = Field(0.1, ge=0.0)
    noise_prob: float = Field(0.1, ge=0.0, le=1.0)
    noise_std: float = Field(0.05, ge=0.0)
    gamma_prob: float = Field(0.0, ge=0.0, le=1.0)
    gamma_range: tuple[float, float] = Field((0.7, 1.5))
    bias_field_prob: float = Field(0.0, ge=0.0, le=1.0)
    bias_field_strength: float = Field(0.3, ge=0.0, le=2.0)
