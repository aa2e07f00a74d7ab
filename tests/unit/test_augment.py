"""The intensity augmentations that imitate other scanners: per-sequence gamma, blur, low resolution,
bias fields."""

from __future__ import annotations

import numpy as np
import torch

from tumorseg.data.transforms import (
    IMAGE_KEY,
    LABEL_KEY,
    AugmentConfig,
    PlanarAugmentConfig,
    augmentation_transforms,
    smooth_field,
)

OFF = {
    "flip_prob": 0.0,
    "affine_prob": 0.0,
    "intensity_scale_prob": 0.0,
    "intensity_shift_prob": 0.0,
    "gamma_prob": 0.0,
    "noise_prob": 0.0,
}


def _patch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        IMAGE_KEY: rng.normal(size=(4, 16, 16, 16)).astype(np.float32),
        LABEL_KEY: rng.integers(0, 4, size=(1, 16, 16, 16)).astype(np.uint8),
    }


def _run(cfg: AugmentConfig, seed: int, patch: dict[str, np.ndarray]) -> torch.Tensor:
    (step,) = augmentation_transforms(cfg, 3)
    step.set_random_state(seed=seed)
    out = step({k: v.copy() for k, v in patch.items()})
    assert np.array_equal(np.asarray(out[LABEL_KEY]), patch[LABEL_KEY])  # intensity only
    return torch.as_tensor(out[IMAGE_KEY])


def test_channel_gamma_draws_one_gamma_per_sequence_and_keeps_each_range() -> None:
    cfg = AugmentConfig(**OFF, channel_gamma_prob=1.0, gamma_range=(0.5, 2.0))
    patch = _patch()
    out = _run(cfg, 7, patch)
    image = torch.as_tensor(patch[IMAGE_KEY])
    gammas = []
    for c in range(4):
        low, high = image[c].min(), image[c].max()
        assert torch.isclose(out[c].min(), low) and torch.isclose(out[c].max(), high)
        unit_in = (image[c] - low) / (high - low)
        unit_out = (out[c] - low) / (high - low)
        mid = (unit_in > 0.2) & (unit_in < 0.8)
        gammas.append(float((torch.log(unit_out[mid]) / torch.log(unit_in[mid])).median()))
    assert all(0.5 <= g <= 2.0 for g in gammas)
    assert len({round(g, 3) for g in gammas}) == 4  # each sequence its own contrast change
    assert torch.equal(out, _run(cfg, 7, patch))  # seeded
    assert not torch.equal(out, _run(cfg, 8, patch))


def test_channel_gamma_off_leaves_the_image_and_zero_probability_never_changes_it() -> None:
    patch = _patch(1)
    out = _run(AugmentConfig(**OFF, channel_gamma_prob=1e-9), 3, patch)
    assert torch.equal(out, torch.as_tensor(patch[IMAGE_KEY]))
    assert augmentation_transforms(AugmentConfig(**OFF), 3) == []


def test_blur_and_low_resolution_smooth_the_image() -> None:
    patch = _patch(2)
    roughness = float(np.abs(np.diff(patch[IMAGE_KEY], axis=1)).mean())
    for key in ("blur_prob", "low_res_prob"):
        out = _run(AugmentConfig(**OFF, **{key: 1.0}), 5, patch)
        assert float(torch.diff(out, dim=1).abs().mean()) < 0.8 * roughness, key


def test_smooth_field_is_a_bounded_low_order_shading() -> None:
    rng = np.random.RandomState(4)
    for shape in ((24, 20, 16), (40, 32)):
        field = smooth_field(rng, shape, 0.4)
        assert field.shape == shape and field.dtype == np.float32
        log = np.log(field)
        assert np.isclose(np.abs(log).max(), 0.4, atol=1e-4)  # the peak is the strength
        # smooth: neighbouring voxels differ far less than the field's range
        assert float(np.abs(np.diff(log, axis=0)).max()) < 0.2 * float(log.max() - log.min())
    assert np.array_equal(smooth_field(np.random.RandomState(1), (8, 8, 8), 0.0), np.ones((8, 8, 8)))


def test_bias_field_shades_each_sequence_its_own_way_above_its_minimum() -> None:
    patch = _patch(3)
    patch[IMAGE_KEY] = patch[IMAGE_KEY] + 4.0  # positive, so a ratio to the input is the field
    out = _run(AugmentConfig(**OFF, bias_field_prob=1.0, bias_field_strength=0.5), 11, patch)
    image = torch.as_tensor(patch[IMAGE_KEY])
    ratios = []
    for c in range(4):
        low = image[c].min()
        assert torch.isclose(out[c].min(), low)  # the darkest voxel keeps its value
        field = (out[c] - low) / (image[c] - low).clamp_min(1e-6)
        keep = (image[c] - low) > 0.5
        assert float(field[keep].log().abs().max()) <= 0.5 + 1e-3
        ratios.append(float(field[keep].std()))
    assert all(r > 1e-3 for r in ratios) and len({round(r, 4) for r in ratios}) == 4
    cfg = AugmentConfig(**OFF, bias_field_prob=1.0, bias_field_strength=0.5)
    assert torch.equal(out, _run(cfg, 11, patch))  # seeded
    assert not torch.equal(out, _run(cfg, 12, patch))
    off = _run(AugmentConfig(**OFF, bias_field_prob=1e-9), 11, patch)
    assert torch.equal(off, image)


def test_bias_field_leaves_the_zero_background_of_a_z_scored_volume_alone() -> None:
    patch = _patch(5)
    image = patch[IMAGE_KEY]
    image[:, :, :, :4] = 0.0  # outside the brain, as preprocessing stores it
    out = _run(AugmentConfig(**OFF, bias_field_prob=1.0, bias_field_strength=0.5), 3, patch)
    assert torch.all(out[:, :, :, :4] == 0)
    tissue = torch.as_tensor(image[:, :, :, 4:])
    assert not torch.allclose(out[:, :, :, 4:], tissue)
    for c in range(4):  # the darkest tissue voxel keeps its value
        assert torch.isclose(out[c, :, :, 4:].min(), tissue[c].min())


def test_planar_augmentation_takes_the_bias_field_too() -> None:
    from tumorseg.data.datamodule import MASK_KEY, training_transforms

    cfg = PlanarAugmentConfig(
        flip_prob=0.0, affine_prob=0.0, intensity_scale_prob=0.0, intensity_shift_prob=0.0, noise_prob=0.0
    )
    image = np.random.default_rng(0).normal(size=(1, 32, 32)).astype(np.float32) + 3.0
    mask = np.zeros((1, 32, 32), np.float32)
    plain = training_transforms(cfg, seed=1)({IMAGE_KEY: image.copy(), MASK_KEY: mask})
    assert np.allclose(np.asarray(plain[IMAGE_KEY]), image)
    on = cfg.model_copy(update={"bias_field_prob": 1.0})
    shaded = training_transforms(on, seed=1)({IMAGE_KEY: image.copy(), MASK_KEY: mask})
    assert not np.allclose(np.asarray(shaded[IMAGE_KEY]), image)
    assert np.array_equal(np.asarray(shaded[MASK_KEY]), mask)
    again = training_transforms(on, seed=1)({IMAGE_KEY: image.copy(), MASK_KEY: mask})
    other = training_transforms(on, seed=2)({IMAGE_KEY: image.copy(), MASK_KEY: mask})
    assert np.array_equal(np.asarray(again[IMAGE_KEY]), np.asarray(shaded[IMAGE_KEY]))
    assert not np.allclose(np.asarray(other[IMAGE_KEY]), np.asarray(shaded[IMAGE_KEY]))
    # strength 0 is off: the same draws as without the key
    zero = training_transforms(on.model_copy(update={"bias_field_strength": 0.0}), seed=1)
    unshaded = zero({IMAGE_KEY: image.copy(), MASK_KEY: mask})[IMAGE_KEY]
    assert np.array_equal(np.asarray(unshaded), np.asarray(plain[IMAGE_KEY]))


def test_bias_field_is_no_step_unless_its_probability_and_strength_are_both_on() -> None:
    """Off is decided in one place: no transform, so no random draw, for either key at 0."""
    from tumorseg.data.transforms import bias_field

    assert bias_field(0.0, 0.5) == [] and bias_field(0.5, 0.0) == []
    assert len(bias_field(0.5, 0.5)) == 1
