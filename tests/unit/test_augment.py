"""The intensity augmentations that imitate other scanners: per-sequence gamma, blur, low resolution."""

from __future__ import annotations

import numpy as np
import torch

from tumorseg.data.transforms import IMAGE_KEY, LABEL_KEY, AugmentConfig, augmentation_transforms

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
