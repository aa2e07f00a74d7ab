"""Whole heads around generated brains: CSF rim, dura, skull, scalp, background (what a scanner sees).

:func:`synth_head` wraps a :class:`~tumorseg.data.synth.SyntheticCase` (skull-stripped, 0 outside
``brain_mask``) in the tissues a brain-extraction network must learn to remove, on the case's own grid:

* a CSF rim (dark on T1/T1ce/FLAIR, bright on T2) at the case's own CSF level;
* the dura, which enhances on T1ce;
* the skull: inner and outer tables of cortical bone (no signal) around fatty marrow (diploe);
* the scalp: temporal muscle on the sides, galea, subcutaneous fat (bright on T1/T1ce, fairly bright
  on T2/FLAIR) with a few vessels that enhance on T1ce, and skin.

Each layer's thickness varies smoothly around the head (shells of the brain's distance transform cut
by smooth random fields), so the head is no dilation of the brain. Tissue levels are ratios to the
case's own white-matter level per sequence; one smooth multiplicative bias field per sequence covers
the whole head (the brain's values are the case's times that field); Rician noise at the case's noise
level fills the background. The BraTS box cuts the head where it leaves the box (the vertex, the neck).
A head depends only on ``(case.index, seed)`` and the case.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from tumorseg.data.conventions import CANONICAL_MODALITIES
from tumorseg.data.synth import SyntheticCase, rician_noise, seed_word, smooth_random_field

_HEAD_STREAM = 0x4EAD

# Levels relative to the case's white matter per sequence (fat: short T1, long-ish T2 on fast spin
# echo; cortical bone: no signal; the dura and scalp vessels take up gadolinium).
_HEAD_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"dura": 0.35, "bone": 0.05, "marrow": 1.05, "muscle": 0.55, "galea": 0.30, "fat": 1.45, "skin": 0.75},
    "t1ce": {"dura": 1.15, "bone": 0.05, "marrow": 1.12, "muscle": 0.62, "galea": 0.45, "fat": 1.40, "skin": 0.82},
    "t2": {"dura": 0.45, "bone": 0.05, "marrow": 0.85, "muscle": 0.50, "galea": 0.35, "fat": 1.50, "skin": 0.95},
    "flair": {"dura": 0.50, "bone": 0.05, "marrow": 0.75, "muscle": 0.65, "galea": 0.40, "fat": 1.25, "skin": 1.00},
}  # fmt: skip
_VESSEL_T1CE = 1.9  # scalp vessels on T1ce, relative to white matter (flowing blood stays dark on T1)
_LAYERS: tuple[str, ...] = ("csf", "dura", "bone_in", "marrow", "bone_out", "muscle", "galea", "fat", "skin")
_CONTROL_GRID = (5, 5, 4)  # control points of the thickness fields over the BraTS box (~50 mm apart)
_BIAS_STRENGTH = (0.15, 0.30)  # log-amplitude range of the per-sequence bias field
_MAX_HEAD_MM = 39.0  # thickest head around the brain: the layers' thickest, added up
_LEVEL_JITTER = 0.08  # each head's tissue levels: exp(U(-j, j)) around the table


@dataclass(frozen=True)
class Head:
    """A generated head on its case's grid, ``(X, Y, Z)`` arrays in RAS order.

    ``images``: modality -> float32 scanner units, the whole head with background noise; ``brain_mask``:
    the case's brain (what brain extraction must find); ``head_mask``: brain, CSF rim, skull and scalp;
    ``affine``: the case's (RAS, mm).
    """

    images: dict[str, np.ndarray]
    brain_mask: np.ndarray
    head_mask: np.ndarray
    affine: np.ndarray


def head_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of the head around case ``index``: seeded from ``(seed, index)`` only."""
    return np.random.default_rng([seed_word(seed), int(index), _HEAD_STREAM])


def synth_head(case: SyntheticCase, seed: int) -> Head:
    """The head around ``case``'s brain: skull, scalp and background, bias-field and noise included.

    Deterministic per ``(case.index, seed)``; any spacing (thicknesses are in mm). ValueError for a
    case without brain voxels.
    """
    brain = np.asarray(case.brain_mask, dtype=bool)
    if not brain.any():
        raise ValueError(f"case {case.index} has an empty brain mask")
    rng = head_rng(seed, case.index)
    shape = case.shape
    spacing = np.asarray(case.spacing, dtype=np.float64)
    # Distance (mm) of each voxel outside the brain to the nearest brain voxel.
    dist = ndi.distance_transform_edt(~brain, sampling=spacing).astype(np.float32)
    shell = ~brain & (dist < _MAX_HEAD_MM + float(spacing.max()))
    flat = np.flatnonzero(shell)
    del shell
    bounds = _layer_bounds(rng, shape, spacing, case.affine, flat)
    fractions = _layer_fractions(dist.ravel()[flat], bounds, float(spacing.mean()))
    del dist, bounds
    vessels = _vessels(rng, shape, spacing, flat)
    texture = _texture(rng, shape, flat)
    head_fraction = np.zeros(shape, dtype=np.float32)
    head_fraction.ravel()[flat] = sum(fractions.values())
    head_mask = brain | (head_fraction >= 0.5)

    wm, csf = _reference_voxels(case)
    levels = _head_levels(rng)
    images: dict[str, np.ndarray] = {}
    for m in CANONICAL_MODALITIES:
        brain_values = case.images[m]
        wm_level = float(np.median(brain_values[wm]))
        table = {**levels[m], "csf": float(np.median(brain_values[csf])) / wm_level}
        signal = sum(np.float32(table[_tissue(layer)]) * fractions[layer] for layer in _LAYERS)
        if m == "t1ce":  # vessels replace part of the fat
            fat_share = fractions["fat"] * vessels
            signal += np.float32(_VESSEL_T1CE - table["fat"]) * fat_share
        signal = signal * texture * np.float32(wm_level)
        sigma = _noise_sigma(brain_values, wm)
        out = np.zeros(shape, dtype=np.float32)
        out.ravel()[flat] = signal
        outside = ~brain
        out[outside] = rician_noise(rng, out[outside], np.float32(sigma))
        out[brain] = brain_values[brain]
        strength = float(rng.uniform(*_BIAS_STRENGTH))
        out *= np.exp(np.float32(strength) * smooth_random_field(rng, shape, (3, 3, 3)))
        images[m] = out
    return Head(images=images, brain_mask=brain, head_mask=head_mask, affine=np.asarray(case.affine))


def _tissue(layer: str) -> str:
    """Tissue of a layer: the tables of cortical bone share one level."""
    return "bone" if layer.startswith("bone") else layer


def _layer_bounds(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: np.ndarray,
    affine: np.ndarray,
    flat: np.ndarray,
) -> list[np.ndarray]:
    """Outer boundary (mm from the brain) of each of :data:`_LAYERS` at the voxels ``flat``, rising.

    Thicknesses (mm) vary smoothly around the head: CSF 1-4.5, dura ~1, inner/outer table 1-2.5 each,
    marrow 1.5-5, temporal muscle up to ~9 on the sides above the ears, galea ~1, fat 2-7, skin 1-2.
    """

    def field(low: float, high: float) -> np.ndarray:
        f = np.clip(smooth_random_field(rng, shape, _CONTROL_GRID).ravel()[flat], -1.0, 1.0)
        return np.float32(low) + np.float32(0.5 * (high - low)) * (f + np.float32(1.0))

    thickness = {
        "csf": field(1.0, 4.5),
        "dura": field(0.7, 1.2),
        "bone_in": field(1.0, 2.5),
        "marrow": field(1.5, 5.0),
        "bone_out": field(1.0, 2.5),
        "muscle": _temporal_muscle(rng, shape, spacing, affine).ravel()[flat],
        "galea": field(0.6, 1.4),
        "fat": field(2.0, 7.0),
        "skin": field(1.0, 2.0),
    }
    bounds, total = [], np.zeros(flat.size, dtype=np.float32)
    for layer in _LAYERS:
        total = total + thickness[layer]
        bounds.append(total)
    return bounds


def _temporal_muscle(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, affine: np.ndarray
) -> np.ndarray:
    """Temporalis thickness (mm): up to 6-9 mm on both sides, low over the ear, none at the vertex."""
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    x = (np.arange(shape[0]) * spacing[0] + affine[0, 3] - centre[0]).astype(np.float32)
    z = (np.arange(shape[2]) * spacing[2] + affine[2, 3] - centre[2]).astype(np.float32)
    lateral = np.clip((np.abs(x) - 35.0) / 25.0, 0.0, 1.0)  # sides of the head only
    height = np.exp(-0.5 * ((z + 10.0) / 28.0) ** 2)  # temporal fossa, below the brain's centre
    peak = np.float32(rng.uniform(6.0, 9.0))
    profile = peak * lateral[:, None, None] * height[None, None, :]
    wobble = np.float32(1.0) + np.float32(0.25) * np.clip(
        smooth_random_field(rng, shape, _CONTROL_GRID), -1, 1
    )
    return np.broadcast_to(profile, shape).astype(np.float32) * wobble + np.float32(0.2)


def _layer_fractions(dist: np.ndarray, bounds: list[np.ndarray], voxel_mm: float) -> dict[str, np.ndarray]:
    """Share of each layer in each shell voxel (``dist``: mm from the brain): a voxel-wide linear ramp
    at every boundary (partial volume), so the shares add up to the voxel's part of the head."""
    out: dict[str, np.ndarray] = {}
    below = np.zeros_like(dist)
    for layer, bound in zip(_LAYERS, bounds, strict=True):
        inside = np.clip((bound - dist) / np.float32(voxel_mm) + np.float32(0.5), 0.0, 1.0)
        out[layer] = inside - below
        below = inside
    return out


def _vessels(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray, flat: np.ndarray
) -> np.ndarray:
    """Share of scalp vessels in each shell voxel: thin ridges of a smooth random field (~5 %)."""
    coarse = tuple(max(8, int(round(n * s / 4.0))) for n, s in zip(shape, spacing, strict=True))  # 4 mm
    noise = ndi.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 1.0)
    noise /= np.float32(max(float(noise.std()), 1e-6))
    ridge = np.exp(-0.5 * (noise / np.float32(0.12)) ** 2)  # near the zero level set: tubes and sheets
    zoomed = _resize(ridge, shape)
    return (np.float32(0.8) * np.clip((zoomed.ravel()[flat] - 0.5) / 0.3, 0.0, 1.0)).astype(np.float32)


def _texture(rng: np.random.Generator, shape: tuple[int, int, int], flat: np.ndarray) -> np.ndarray:
    """~6 % smooth texture of the tissues outside the brain, a factor on the shell voxels ``flat``."""
    coarse = tuple(max(4, n // 4) for n in shape)
    noise = ndi.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 1.0)
    noise /= np.float32(max(float(noise.std()), 1e-6))
    return np.float32(1.0) + np.float32(0.06) * _resize(noise, shape).ravel()[flat]


def _resize(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``volume`` stretched to ``shape`` (linear), float32."""
    factors = np.asarray(shape, dtype=np.float64) / np.asarray(volume.shape)
    out = ndi.zoom(volume, factors, order=1, grid_mode=True, mode="nearest")
    pad = [(0, max(0, n - o)) for n, o in zip(shape, out.shape, strict=True)]
    return np.pad(out[: shape[0], : shape[1], : shape[2]], pad, mode="edge").astype(np.float32)


def _reference_voxels(case: SyntheticCase) -> tuple[np.ndarray, np.ndarray]:
    """Masks of the case's purest healthy white matter and CSF (the levels every layer is scaled by)."""
    healthy = case.brain_mask & (case.labels == 0)

    def purest(prob: np.ndarray) -> np.ndarray:
        values = prob[healthy]
        cut = min(0.9, float(np.quantile(values, 0.95))) if values.size else 0.0
        sel = healthy & (prob >= cut)
        return sel if sel.any() else case.brain_mask

    return purest(case.tissue["wm"]), purest(case.tissue["csf"])


def _head_levels(rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """This head's tissue levels: :data:`_HEAD_CONTRAST` with each level jittered by ``exp(U(-j, j))``."""
    return {
        m: {k: v * math.exp(rng.uniform(-_LEVEL_JITTER, _LEVEL_JITTER)) for k, v in table.items()}
        for m, table in _HEAD_CONTRAST.items()
    }


def _noise_sigma(image: np.ndarray, wm: np.ndarray) -> float:
    """The noise level of ``image`` (std of its Gaussian noise), from neighbour differences in white
    matter (smooth there: the difference is noise): ``1.4826 MAD / sqrt 2``."""
    diffs = []
    for axis in range(3):
        both = np.logical_and(
            np.take(wm, range(1, wm.shape[axis]), axis=axis),
            np.take(wm, range(wm.shape[axis] - 1), axis=axis),
        )
        d = np.diff(image, axis=axis)[both]
        if d.size:
            diffs.append(d)
    if not diffs:
        return 0.0
    d = np.concatenate(diffs)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2.0))
