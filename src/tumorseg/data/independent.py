"""An independent glioma MRI generator: the generalisation check of the embedded dataset.

A model trained on :mod:`tumorseg.data.synth` can learn that generator instead of glioma appearance.
This module shares none of its anatomy, tumour growth, contrast table, noise model or storage, so a
score on its cases says how far a model generalises (``docs/independent-set.md`` lists every
difference):

* **Anatomy**: no template. A procedural head: the cerebrum is a deformed superquadric whose
  cortex is folded by the zero sheets of a band-limited random field (sulci), split by an
  interhemispheric fissure, with lateral and third ventricles and deep grey nuclei as deformed
  ellipsoids, a foliated cerebellum and a brainstem; size, shape, position and tilt vary per case.
* **Tumours**: unions of random metaballs; enhancement is an irregular band with gaps, patchy
  nodules chosen by a random field, or absent (non-enhancing tumour); necrosis is a random-walk cavity
  off the lesion's centre; oedema spreads a noisy distance from the core, not along white matter;
  some cases have two lesions, some none.
* **Contrast and scanner**: a 3 T-like table (stronger T1 GM/WM contrast, FLAIR with less CSF
  suppression), a second-order polynomial bias, additive Gaussian noise, per-case intensity scales
  and uint16 / int16 / float32 storage.

Volumes are BraTS-sized (240 x 240 x 155 at 1 mm, the BraTS box, stored LPS) and skull-stripped.
Labels are drawn from the same masks the images are rendered from: ET is what enhances on T1ce, ED
what is bright on FLAIR outside the core, NCR the non-enhancing core (necrosis and non-enhancing
tumour). Case ``k`` depends only on ``(seed, k, spacing_mm)``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tumorseg.data.conventions import CANONICAL_MODALITIES, GLIOMA, LAYOUTS, get_convention
from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import ConfigError, DataError
from tumorseg.faults import write_point

log = logging.getLogger(__name__)

_Rng = np.random.Generator

INDEPENDENT_LAYOUTS: tuple[str, ...] = ("brats2023", "brats2021", "nnunet")
"""Layouts written, one sub-folder of the output each; case ``k`` goes to ``layouts[(k - 1) % n]``."""
LAYOUT_CONVENTIONS: dict[str, str] = {"brats2023": "brats2023", "brats2021": "brats2021", "nnunet": "msd"}
"""The ``seg`` convention of each layout (the nnU-Net set is coded as nnU-Net's Dataset137: 1 ED,
2 NCR, 3 ET, declared as regions)."""
REFERENCES_FOLDER = "references"
"""``<out>/references/<layout>/<case_id>.nii.gz``: flat copies of the segmentations for ``evaluate``."""
META_NAME = "independent_meta.json"
GENERATOR_NAME = "tumorseg independent"
CASE_NUMBER_OFFSET = 80000
"""Case numbers in ids start here (``BraTS-GLI-80001-000``), apart from the embedded generator's."""
NNUNET_DATASET = "Dataset601_IndependentGlioma"
"""nnU-Net dataset name (in ``dataset.json``); the files sit directly in ``<out>/nnunet``."""
NNUNET_CHANNELS: dict[str, str] = {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}
"""Channel order of the nnU-Net set: not the canonical one, so readers must follow ``dataset.json``."""
_NNUNET_ORDER: tuple[str, ...] = ("flair", "t1", "t1ce", "t2")
NNUNET_LABELS: dict[str, Any] = {
    "background": 0,
    "whole tumor": [1, 2, 3],
    "tumor core": [2, 3],
    "enhancing tumor": [3],
}

BRATS_SHAPE_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
_BOX_CENTRE_RAS: tuple[float, float, float] = (-119.5, 119.5, 77.0)
"""RAS position of the BraTS box's centre (voxel 0 at x = 0, y = 239, z = 0, stored LPS)."""
_NCR, _ED, _ET = GLIOMA.code("NCR"), GLIOMA.code("ED"), GLIOMA.code("ET")

# Mean intensity relative to white matter: a 3 T protocol (MPRAGE-like T1 with more GM/WM contrast than
# the embedded generator's table, FLAIR with incomplete CSF suppression). Tumour parts: ``nec`` necrosis
# (fluid-like), ``net`` non-enhancing solid tumour, ``et`` enhancing tumour, ``ed`` oedema.
CONTRAST_3T: dict[str, dict[str, float]] = {
    "t1": {
        "csf": 0.18,
        "gm": 0.62,
        "wm": 1.0,
        "deep": 0.80,
        "nec": 0.30,
        "net": 0.55,
        "et": 0.68,
        "ed": 0.60,
    },
    "t1ce": {
        "csf": 0.22,
        "gm": 0.66,
        "wm": 1.0,
        "deep": 0.82,
        "nec": 0.32,
        "net": 0.58,
        "et": 2.0,
        "ed": 0.63,
    },
    "t2": {"csf": 3.4, "gm": 1.55, "wm": 1.0, "deep": 1.25, "nec": 2.9, "net": 1.9, "et": 1.6, "ed": 2.1},
    "flair": {
        "csf": 0.45,
        "gm": 1.35,
        "wm": 1.0,
        "deep": 1.15,
        "nec": 1.05,
        "net": 1.8,
        "et": 1.45,
        "ed": 1.95,
    },
}
WHITE_MATTER_SCALE: dict[str, tuple[float, float]] = {
    "t1": (900.0, 2600.0),
    "t1ce": (1100.0, 3200.0),
    "t2": (500.0, 2200.0),
    "flair": (300.0, 1400.0),
}
"""Range of the stored white-matter value per sequence (float32 cases store it divided by 1000)."""
STORAGE_DTYPES: tuple[str, ...] = ("uint16", "int16", "float32")
_FOLD_SIGMA_MM = 3.2
"""Correlation scale of the cortical folding noise: sulci ~10 mm apart, as on adult brains."""
_TISSUES: tuple[str, ...] = ("csf", "gm", "wm", "deep")
_PARTS: tuple[str, ...] = ("nec", "net", "et", "ed")


# ------------------------------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class _Frame:
    """The BraTS grid at one spacing and where the head lies in it.

    ``affine``: LPS-stored 4x4 (mm); ``box``: the voxel region holding the head (everything else is
    background); ``u``: float32 ``(3, *box shape)`` head coordinates in mm (x right, y anterior, z
    superior, origin between the hemispheres at the level of the basal ganglia).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: float
    box: tuple[slice, slice, slice]
    u: np.ndarray
    to_head: tuple[np.ndarray, np.ndarray]

    def region(self, lo_mm: Sequence[float], hi_mm: Sequence[float]) -> tuple[slice, slice, slice]:
        """Slices of ``u`` (box-relative) covering the head-frame box ``[lo_mm, hi_mm]``."""
        return _index_box(self.to_head, np.array([lo_mm, hi_mm], dtype=np.float64), self.box)

    @property
    def box_shape(self) -> tuple[int, int, int]:
        return tuple(int(s.stop - s.start) for s in self.box)  # type: ignore[return-value]


def brats_lps_grid(spacing_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of the BraTS box stored LPS at ``spacing_mm`` (240 x 240 x 155 at 1 mm)."""
    shape = tuple(int(round(f / spacing_mm)) for f in BRATS_SHAPE_MM)
    affine = np.diag([-spacing_mm, -spacing_mm, spacing_mm, 1.0])
    half = (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0
    affine[:3, 3] = np.asarray(_BOX_CENTRE_RAS) - affine[:3, :3] @ half
    return shape, affine  # type: ignore[return-value]


def _rotation(rng: _Rng, max_deg: Sequence[float]) -> np.ndarray:
    """Rotation with angles uniform in ``[-max_deg, max_deg]`` about x (pitch), y (roll), z (yaw)."""
    a, b, c = np.deg2rad(rng.uniform(-1.0, 1.0, 3) * np.asarray(max_deg))
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


_HEAD_EXTENT_MM = np.array([[-74.0, -98.0, -95.0], [74.0, 88.0, 74.0]])
"""Head-frame box that holds every structure (before the per-case scale)."""


def _frame(rng: _Rng, spacing_mm: float) -> _Frame:
    """Place a head of random size and tilt in the BraTS box; head coordinates of the voxels it covers."""
    shape, affine = brats_lps_grid(spacing_mm)
    scale = rng.uniform(0.9, 1.05, 3) * rng.uniform(0.95, 1.03)
    rotation = _rotation(rng, (14.0, 6.0, 8.0))
    centre = np.asarray(_BOX_CENTRE_RAS) + np.array(
        [rng.uniform(-5, 5), rng.uniform(-6, 6), rng.uniform(-6, 2)]
    )
    # Head coordinate of voxel ijk: u = diag(1/scale) R^T (A ijk + t - centre) = M ijk + b.
    to_head = np.diag(1.0 / scale) @ rotation.T
    m = to_head @ affine[:3, :3]
    b = to_head @ (affine[:3, 3] - centre)
    full = tuple(slice(0, n) for n in shape)
    box = _index_box((m, b), _HEAD_EXTENT_MM, full)
    axes = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
    u = np.empty((3, *(len(a) for a in axes)), dtype=np.float32)
    for k in range(3):
        u[k] = (
            np.float32(m[k, 0]) * axes[0][:, None, None]
            + np.float32(m[k, 1]) * axes[1][None, :, None]
            + np.float32(m[k, 2]) * axes[2][None, None, :]
            + np.float32(b[k])
        )
    return _Frame(shape, affine, float(spacing_mm), box, u, (m, b))  # type: ignore[arg-type]


def _index_box(
    to_head: tuple[np.ndarray, np.ndarray], extent_mm: np.ndarray, within: Sequence[slice]
) -> tuple[slice, slice, slice]:
    """Voxel slices (relative to ``within``) holding the head-frame box ``extent_mm`` ``(2, 3)``."""
    m, b = to_head
    corners = np.array([[x, y, z] for x in extent_mm[:, 0] for y in extent_mm[:, 1] for z in extent_mm[:, 2]])
    ijk = np.linalg.solve(m, (corners - b).T).T
    out = []
    for axis, sl in enumerate(within):
        lo = int(np.clip(math.floor(ijk[:, axis].min()), sl.start, sl.stop))
        hi = int(np.clip(math.ceil(ijk[:, axis].max()) + 1, sl.start, sl.stop))
        out.append(slice(lo - sl.start, max(hi, lo) - sl.start))
    return tuple(out)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- random fields
def _band_noise(rng: _Rng, shape: Sequence[int], sigma_mm: float, spacing_mm: float) -> np.ndarray:
    """Band-limited noise: white noise through a Gaussian of ``sigma_mm``, unit std, float32 ``shape``."""
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    noise = ndi.gaussian_filter(noise, sigma_mm / spacing_mm, mode="wrap", truncate=3.0)
    std = float(noise.std())
    return noise / np.float32(std) if std > 0 else noise


def _cosine_field(rng: _Rng, u: np.ndarray, terms: int, wavelength_mm: tuple[float, float]) -> np.ndarray:
    """Smooth field of unit variance: ``terms`` plane waves of random direction, phase and wavelength
    over head coordinates ``u`` ``(3, ...)`` (a random Fourier series, cheap at any resolution)."""
    out = np.zeros(u.shape[1:], dtype=np.float32)
    for _ in range(terms):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        k = direction * (2.0 * math.pi / rng.uniform(*wavelength_mm))
        phase = np.float32(rng.uniform(0.0, 2.0 * math.pi))
        arg = np.float32(k[0]) * u[0] + np.float32(k[1]) * u[1] + np.float32(k[2]) * u[2] + phase
        out += np.cos(arg)
    return out * np.float32(math.sqrt(2.0 / terms))


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume step: 0.5 at ``x = 0``, from ~0 to ~1 over ``width`` mm (logistic)."""
    return (0.5 + 0.5 * np.tanh(x * np.float32(2.0 / width))).astype(np.float32)


def _ellipsoid_depth(u: np.ndarray, centre: Sequence[float], axes: Sequence[float]) -> np.ndarray:
    """Approximate signed depth (mm, > 0 inside) of an axis-aligned ellipsoid: ``(1 - r) * min(axes)``."""
    r2 = sum(((u[k] - np.float32(centre[k])) / np.float32(axes[k])) ** 2 for k in range(3))
    return (1.0 - np.sqrt(r2)) * np.float32(min(axes))


# -------------------------------------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class _Head:
    """The healthy head over the frame's box: ``tissue`` fractions (csf, gm, wm, deep grey nuclei;
    float32, summing to 1 inside ``brain``), ``brain`` (bool, the skull-stripping mask) and
    ``site_depth`` (mm inside the cerebrum away from the surface and the ventricles, <= 0 elsewhere:
    where tumours may grow)."""

    tissue: dict[str, np.ndarray]
    brain: np.ndarray
    site_depth: np.ndarray
    facts: dict[str, Any] = field(default_factory=dict)


def _cortex(e: np.ndarray, csf_mm: float, gm_mm: np.ndarray | float, pv: float) -> tuple[np.ndarray, ...]:
    """CSF, GM, WM fractions from ``e``, the distance (mm) to the nearest pial surface or sulcal sheet."""
    csf = _soft(np.float32(csf_mm) - e, pv)
    grey_or_fluid = _soft(np.float32(csf_mm) + gm_mm - e, pv)
    return csf, grey_or_fluid - csf, 1.0 - grey_or_fluid


def _cerebrum(
    rng: _Rng, frame: _Frame, warp: np.ndarray, folds: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Depth (mm) of the cerebrum and its CSF/GM/WM fractions.

    The outer surface is a superquadric bent by ``warp``; its floor dips under the temporal and
    occipital lobes. Sulci are the zero sheets of the band-limited noise ``folds`` (``|W| / |grad W|``
    is the distance to the sheet) down to a sulcal depth; the interhemispheric fissure is the
    mid-plane down to the corpus callosum.
    """
    u, pv = frame.u, max(frame.spacing, 1.0) * 0.8
    a, b, c = rng.uniform(61.0, 69.0), rng.uniform(79.0, 87.0), rng.uniform(59.0, 65.0)
    power = np.float32(rng.uniform(2.2, 2.8))
    z0 = np.float32(rng.uniform(6.0, 10.0))
    radius = (
        np.abs(u[0] * np.float32(1 / a)) ** power
        + np.abs(u[1] * np.float32(1 / b)) ** power
        + np.abs((u[2] - z0) * np.float32(1 / c)) ** power
    ) ** np.float32(1.0 / power)
    depth = (1.0 - radius * (1.0 + np.float32(0.04) * warp)) * np.float32(3.0 / (1 / a + 1 / b + 1 / c))
    lateral = np.clip(np.abs(u[0]) * np.float32(1 / 50.0), 0.0, 1.0) ** 1.5
    temporal = np.exp(-((u[1] * np.float32(1 / 40.0)) ** 2))
    frontal = _soft(u[1] - np.float32(25.0), 20.0)
    floor = -14.0 - np.float32(rng.uniform(24.0, 32.0)) * lateral * temporal - np.float32(12.0) * frontal
    depth = np.minimum(depth, u[2] - floor)

    sheet = np.abs(folds) * np.float32(_FOLD_SIGMA_MM / math.sqrt(1.5))  # mm to the nearest sulcal sheet
    sulcal_depth = np.float32(rng.uniform(12.0, 18.0)) + np.float32(4.0) * warp
    e_sulcus = np.sqrt(sheet**2 + np.maximum(depth - sulcal_depth, 0.0) ** 2)
    midline = np.abs(u[0] - np.float32(rng.uniform(-2.0, 2.0)) - np.float32(1.5) * warp)
    callosum = (np.abs(u[1] + 5.0) < 36.0) * np.maximum(np.float32(rng.uniform(16.0, 21.0)) - u[2], 0.0)
    e_fissure = np.sqrt(midline**2 + callosum**2)
    e = np.minimum(np.minimum(depth, e_sulcus), e_fissure)
    gm_mm = np.float32(rng.uniform(2.4, 3.0)) + np.float32(0.4) * warp
    return depth, _cortex(e, rng.uniform(0.6, 0.9), gm_mm, pv)


_HINDBRAIN_MM = ((-60.0, -80.0, -95.0), (60.0, 15.0, -5.0))
"""Head-frame box of the cerebellum and brainstem."""


def _hindbrain(
    rng: _Rng, frame: _Frame, warp: np.ndarray, folds: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Depth and CSF/GM/WM of the cerebellum (folia: irregular concentric sheets ~4 mm apart around a
    white-matter core) united with the brainstem (a slanted column with a pontine bulge, grey-white
    mixed); computed on their sub-box, depth -10 mm elsewhere."""
    sub = (slice(None), *frame.region(*_HINDBRAIN_MM))
    u, pv, warp, folds = frame.u[sub], max(frame.spacing, 1.0) * 0.8, warp[sub[1:]], folds[sub[1:]]
    centre = (0.0, rng.uniform(-47.0, -40.0), rng.uniform(-36.0, -31.0))
    axes = (rng.uniform(44.0, 52.0), rng.uniform(26.0, 32.0), rng.uniform(20.0, 25.0))
    d_cb = _ellipsoid_depth(u, centre, axes) + np.float32(2.0) * warp
    radial = np.sqrt(sum(((u[k] - np.float32(centre[k])) / np.float32(axes[k])) ** 2 for k in range(3)))
    period = np.float32(rng.uniform(3.6, 4.6))
    phase = radial * np.float32(min(axes)) / period + np.float32(0.6) * folds
    folium = np.abs(phase - np.floor(phase) - np.float32(0.5)) * period
    e_cb = np.minimum(d_cb, np.sqrt(folium**2 + np.maximum(d_cb - np.float32(9.0), 0.0) ** 2))
    csf, gm, wm = _cortex(e_cb, 0.5, 2.0, pv)

    stem_x = np.float32(rng.uniform(-2.0, 2.0))
    slant = np.float32(rng.uniform(0.1, 0.3))  # the brainstem leans back as it descends
    stem_u = np.stack([u[0], u[1] - slant * (u[2] + 20.0), u[2]])
    d_stem = np.maximum(
        _ellipsoid_depth(stem_u, (stem_x, -10.0, -48.0), (11.0, 11.0, 38.0)),
        _ellipsoid_depth(stem_u, (stem_x, -3.0, -35.0), (15.0, 12.0, 13.0)),
    )
    stem = d_stem > d_cb
    csf_stem = _soft(np.float32(0.6) - d_stem, pv)
    depth = np.full(frame.u.shape[1:], -10.0, dtype=np.float32)
    depth[sub[1:]] = np.where(stem, d_stem, d_cb)
    fractions = []
    for part, stem_share in zip((csf, gm, wm), (None, 0.3, 0.7), strict=True):
        full = np.zeros(frame.u.shape[1:], dtype=np.float32)
        stem_value = csf_stem if stem_share is None else np.float32(stem_share) * (1.0 - csf_stem)
        full[sub[1:]] = np.where(stem, stem_value, part)
        fractions.append(full)
    return depth, tuple(fractions)


# Lateral ventricle as five ellipsoids per side along its C shape (centre x is mirrored), then the third
# ventricle; deep grey nuclei per side. Centres and half-axes in head mm; ``f`` scales ventricle width.
_VENTRICLE_PARTS: tuple[tuple[tuple[float, float, float], tuple[float, float, float], bool], ...] = (
    ((11.0, 30.0, 8.0), (4.0, 12.0, 6.0), True),  # frontal horn
    ((9.0, 6.0, 14.0), (4.0, 22.0, 5.0), True),  # body
    ((17.0, -22.0, 9.0), (5.0, 10.0, 7.0), True),  # atrium
    ((16.0, -42.0, 5.0), (2.5, 12.0, 3.0), True),  # occipital horn
    ((30.0, 5.0, -20.0), (3.0, 14.0, 3.0), True),  # temporal horn
    ((0.0, 7.0, -5.0), (1.5, 13.0, 8.0), False),  # third ventricle
)
_NUCLEI: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] = (
    ((11.0, -1.0, 1.0), (8.0, 13.0, 8.0)),  # thalamus
    ((24.0, 19.0, -5.0), (6.0, 14.0, 9.0)),  # lentiform nucleus
    ((13.0, 30.0, 5.0), (4.0, 8.0, 7.0)),  # caudate head
)


def _max_ellipsoid(target: np.ndarray, frame: _Frame, centre: Sequence[float], axes: Sequence[float]) -> None:
    """``target = max(target, ellipsoid depth)`` on the ellipsoid's own sub-box (a few mm around it)."""
    c, a = np.asarray(centre), np.asarray(axes)
    sub = frame.region(c - a - 3.0, c + a + 3.0)
    np.maximum(target[sub], _ellipsoid_depth(frame.u[(slice(None), *sub)], c, a), out=target[sub])


def _deep_structures(rng: _Rng, frame: _Frame, warp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed depth (mm, > 0 inside; -10 far outside) of the ventricles and of the deep grey nuclei, each
    jittered, mirrored with some asymmetry and bent by ``warp``."""
    width = rng.uniform(0.9, 1.8)  # atrophy / age: ventricle width varies far more than length
    ventricles = np.full(frame.u.shape[1:], -10.0, dtype=np.float32)
    nuclei = np.full(frame.u.shape[1:], -10.0, dtype=np.float32)
    for side in (1.0, -1.0):
        asym = rng.uniform(0.85, 1.15)
        for centre, axes, lateral in _VENTRICLE_PARTS:
            if not lateral and side < 0:
                continue
            jitter = rng.uniform(-2.0, 2.0, 3)
            c = (
                side * centre[0] * (0.7 + 0.3 * width) + jitter[0],
                centre[1] + jitter[1],
                centre[2] + jitter[2],
            )
            a = (axes[0] * width * asym, axes[1] * rng.uniform(0.9, 1.1), axes[2] * width * asym)
            _max_ellipsoid(ventricles, frame, c, a)
        for centre, axes in _NUCLEI:
            jitter = rng.uniform(-2.0, 2.0, 3)
            c = (
                side * (centre[0] + 3.0 * (width - 1.0)) + jitter[0],
                centre[1] + jitter[1],
                centre[2] + jitter[2],
            )
            _max_ellipsoid(nuclei, frame, c, axes)
    return ventricles + np.float32(0.5) * warp, nuclei


def _anatomy(rng: _Rng, frame: _Frame) -> _Head:
    """The procedural healthy head (see :class:`_Head`)."""
    pv = max(frame.spacing, 1.0) * 0.8
    warp = _cosine_field(rng, frame.u, 6, (90.0, 220.0))
    folds = _band_noise(rng, frame.u.shape[1:], _FOLD_SIGMA_MM, frame.spacing)
    d_cerebrum, (csf, gm, wm) = _cerebrum(rng, frame, warp, folds)
    d_hind, hind = _hindbrain(rng, frame, warp, folds)
    ventricles, nuclei = _deep_structures(rng, frame, warp)

    hindbrain = d_hind > d_cerebrum
    csf, gm, wm = (np.where(hindbrain, h, t) for h, t in zip(hind, (csf, gm, wm), strict=True))
    brain = np.maximum(d_cerebrum, d_hind) > 0
    cerebral = ~hindbrain & (d_cerebrum > 2.0)
    csf_v = _soft(ventricles, pv) * cerebral
    deep = _soft(nuclei, 2.0 * pv) * cerebral * (1.0 - csf_v) * wm
    keep = 1.0 - csf_v
    tissue = {"csf": csf * keep + csf_v, "gm": gm * keep, "wm": wm * keep - deep, "deep": deep}
    for name in tissue:
        tissue[name] = np.where(brain, tissue[name], 0.0).astype(np.float32)
    site_depth = np.where(cerebral, np.minimum(d_cerebrum, -ventricles - 4.0), -1.0).astype(np.float32)
    facts = {"ventricles_ml": round(float(csf_v.sum()) * frame.spacing**3 / 1000.0, 1)}
    return _Head(tissue, brain, site_depth, facts)


# --------------------------------------------------------------------------------------------- tumours
_RANK = np.zeros(4, dtype=np.uint8)
_RANK[[_ED, _NCR, _ET]] = (1, 2, 3)
"""Precedence of labels where lesions or parts overlap: ET over the core (NCR) over oedema."""
_STYLES: tuple[tuple[str, float, float], ...] = (
    ("rim", 0.5, 0.8),
    ("nodular", 0.3, 0.35),
    ("non-enhancing", 0.2, 0.0),
)
"""Enhancement pattern, its share of lesions and its chance of necrosis."""


@dataclass
class _Tumours:
    """Lesions over the frame's box: uint8 internal ``labels``, soft part fractions ``parts`` (nec,
    net, et, ed; float32, summing to <= 1), ``texture`` (unit noise inside lesions) and facts."""

    labels: np.ndarray
    parts: dict[str, np.ndarray]
    texture: np.ndarray
    facts: list[dict[str, Any]] = field(default_factory=list)


def _pick_site(rng: _Rng, frame: _Frame, head: _Head, need_mm: float) -> np.ndarray | None:
    """A lesion centre (box voxel index) at least ``need_mm`` inside the cerebrum, off the midline."""
    step = max(1, int(round(4.0 / frame.spacing)))
    coarse = (slice(None, None, step),) * 3
    for need in (need_mm, need_mm * 0.6, 4.0):
        ok = (head.site_depth[coarse] > need) & (np.abs(frame.u[0][coarse]) > 10.0)
        candidates = np.argwhere(ok)
        if len(candidates):
            return candidates[rng.integers(len(candidates))] * step
    return None


def _distance_outside(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Euclidean distance (mm) to ``mask``; computed at about 2 mm and upsampled (lesion-scale accuracy)."""
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    factor = max(1, int(round(2.0 / spacing)))
    if factor == 1:
        return ndi.distance_transform_edt(~mask, sampling=spacing).astype(np.float32)
    coarse = ndi.maximum_filter(mask, size=factor)[::factor, ::factor, ::factor]
    dist = ndi.distance_transform_edt(~coarse, sampling=spacing * factor).astype(np.float32)
    up = ndi.zoom(dist, factor, order=1, mode="nearest", grid_mode=True)
    pad = [(0, max(0, n - m)) for n, m in zip(mask.shape, up.shape, strict=True)]
    up = np.pad(up, pad, mode="edge")
    return up[: mask.shape[0], : mask.shape[1], : mask.shape[2]]


def _metaball_core(rng: _Rng, x: np.ndarray, radius: float, noise: np.ndarray) -> tuple[np.ndarray, float]:
    """Field ``F`` (> 1 inside the tumour core) of 3-7 random metaballs roughened by ``noise``; returns
    ``F`` and the mean ball radius (mm), which sets the field's slope at the boundary (~2 / r)."""
    balls = int(rng.integers(3, 8))
    field_ = np.zeros(x.shape[1:], dtype=np.float32)
    radii = radius * rng.uniform(0.35, 0.65, balls)
    for r, c in zip(radii, rng.normal(0.0, 0.3 * radius, (balls, 3)), strict=True):
        d2 = sum((x[k] - np.float32(c[k])) ** 2 for k in range(3))
        field_ += np.float32(r * r) / (d2 + np.float32(0.25))
    return field_ * (1.0 + np.float32(rng.uniform(0.1, 0.3)) * noise), float(radii.mean())


def _random_walk_cavity(rng: _Rng, region: np.ndarray, spacing: float, noise: np.ndarray) -> np.ndarray:
    """Necrosis: balls of a noisy radius along a persistent random walk that starts at a random voxel of
    ``region`` (so not at the lesion's centre) and stays in it; clipped to ``region``."""
    inside = np.argwhere(region)
    if not len(inside):
        return np.zeros_like(region)
    position = inside[rng.integers(len(inside))].astype(np.float64)
    direction = rng.standard_normal(3)
    seeds = np.zeros_like(region)
    step_vox = 1.5 / spacing
    for _ in range(int(rng.integers(8, 30))):
        seeds[tuple(np.clip(np.rint(position).astype(int), 0, np.array(region.shape) - 1))] = True
        direction = direction / np.linalg.norm(direction) + 0.8 * rng.standard_normal(3)
        step = position + step_vox * direction / np.linalg.norm(direction)
        index = tuple(np.clip(np.rint(step).astype(int), 0, np.array(region.shape) - 1))
        if region[index]:
            position = step
        else:
            direction = -direction
    reach = np.float32(rng.uniform(2.5, 6.0)) * (1.0 + np.float32(0.3) * noise)
    return (_distance_outside(seeds, spacing) < reach) & region


def _lesion_parts(
    rng: _Rng, x: np.ndarray, spacing: float, radius: float, style: str, necrosis: bool
) -> dict[str, np.ndarray]:
    """Hard masks of one lesion's core parts on a crop with mm offsets ``x`` ``(3, ...)`` from its centre.

    Enhancement: ``rim``, an irregular band inside the core's edge (its thickness and gaps set by
    random fields); ``nodular``, patches where a random field is high; ``non-enhancing``, none.
    Necrosis is a random-walk cavity inside the enhancing shell; the rest of the core is
    non-enhancing tumour.
    """
    shape = x.shape[1:]
    rough, thick, gaps = (_band_noise(rng, shape, s, spacing) for s in (4.0, 6.0, 3.0))
    core_field, ball_mm = _metaball_core(rng, x, radius, rough)
    core = core_field > 1.0
    band_mm = rng.uniform(1.5, 4.5)
    inner = core_field > 1.0 + np.float32(2.0 * band_mm / ball_mm) * np.clip(1.0 + 0.5 * thick, 0.3, None)
    if style == "rim":
        et = core & ~inner & (gaps > np.float32(rng.uniform(-1.2, -0.5)))
    elif style == "nodular":
        et = core & (gaps > np.float32(rng.uniform(0.3, 0.9)))
    else:
        et = np.zeros(shape, dtype=bool)
    nec = np.zeros(shape, dtype=bool)
    if necrosis:
        nec = _random_walk_cavity(rng, inner & ~et, spacing, thick) if inner.any() else nec
    return {"nec": nec, "net": core & ~et & ~nec, "et": et}


def _grow_lesion(rng: _Rng, frame: _Frame, head: _Head, tumours: _Tumours) -> None:
    """Add one lesion: core parts (:func:`_lesion_parts`) and oedema, a noisy distance from the core
    (shorter in grey matter, never in CSF), merged into ``tumours`` by label precedence."""
    radius = rng.uniform(7.0, 24.0)
    oedema_mm = rng.uniform(2.0, 26.0)
    centre = _pick_site(rng, frame, head, 6.0 + 0.6 * radius)
    if centre is None:
        return
    styles, shares, necrosis_odds = zip(*_STYLES, strict=True)
    style = str(styles[rng.choice(len(styles), p=np.asarray(shares))])
    necrosis = bool(rng.random() < necrosis_odds[styles.index(style)])
    half = int(math.ceil((1.8 * radius + 1.5 * oedema_mm + 6.0) / frame.spacing))
    crop = tuple(
        slice(max(0, int(c) - half), min(n, int(c) + half + 1))
        for c, n in zip(centre, head.brain.shape, strict=True)
    )
    x = np.stack(
        np.meshgrid(
            *[
                (np.arange(s.start, s.stop) - c) * np.float32(frame.spacing)
                for s, c in zip(crop, centre, strict=True)
            ],
            indexing="ij",
        )
    ).astype(np.float32)
    parts = _lesion_parts(rng, x, frame.spacing, radius, style, necrosis)
    allowed = head.brain[crop] & (head.tissue["csf"][crop] < 0.6)
    parts = {k: v & allowed for k, v in parts.items()}
    core = parts["nec"] | parts["net"] | parts["et"]
    wobble = np.clip(1.0 + np.float32(0.5) * _band_noise(rng, core.shape, 5.0, frame.spacing), 0.2, 1.5)
    spread = np.float32(oedema_mm) * wobble
    spread *= 1.0 - np.float32(0.5) * head.tissue["gm"][crop]
    parts["ed"] = ~core & (_distance_outside(core, frame.spacing) < spread) & allowed

    label = np.zeros(core.shape, dtype=np.uint8)
    for name, code in (("ed", _ED), ("nec", _NCR), ("net", _NCR), ("et", _ET)):
        label[parts[name]] = code
    old = tumours.labels[crop]
    take = _RANK[label] > _RANK[old]
    tumours.labels[crop] = np.where(take, label, old)
    for name, mask in parts.items():
        tumours.parts[name][crop] = np.where(take, mask, tumours.parts[name][crop]).astype(np.float32)
    tumours.texture[crop] = np.where(
        take, _band_noise(rng, core.shape, 1.5, frame.spacing), tumours.texture[crop]
    )
    tumours.facts.append(
        {
            "style": style,
            "necrosis": bool(parts["nec"].any()),
            "radius_mm": round(radius, 1),
            "oedema_mm": round(oedema_mm, 1),
            "centre_mm": [round(float(frame.u[k][tuple(centre)]), 1) for k in range(3)],
        }
    )


def _tumours(rng: _Rng, frame: _Frame, head: _Head, tumour_free: bool) -> _Tumours:
    """No lesion (tumour-free), one, or (one case in five) two; soft parts blur the hard masks by a
    partial-volume kernel, so the label boundary is the half-intensity level of the images."""
    shape = head.brain.shape
    tumours = _Tumours(
        np.zeros(shape, dtype=np.uint8),
        {k: np.zeros(shape, dtype=np.float32) for k in _PARTS},
        np.zeros(shape, np.float32),
    )
    if tumour_free:
        return tumours
    for _ in range(2 if rng.random() < 0.2 else 1):
        _grow_lesion(rng, frame, head, tumours)
    sigma = 0.45 * max(1.0, frame.spacing) / frame.spacing
    box = ndi.find_objects((tumours.labels > 0).astype(np.uint8))
    if box and box[0] is not None:
        sub = tuple(slice(max(0, s.start - 3), s.stop + 3) for s in box[0])
        total = np.zeros(tumours.labels[sub].shape, dtype=np.float32)
        for name in _PARTS:
            tumours.parts[name][sub] = ndi.gaussian_filter(tumours.parts[name][sub], sigma)
            total += tumours.parts[name][sub]
        scale = 1.0 / np.maximum(total, 1.0)
        for name in _PARTS:
            tumours.parts[name][sub] *= scale
    return tumours


# ----------------------------------------------------------------------------------- contrast, scanner
def _protocol(rng: _Rng) -> dict[str, dict[str, float]]:
    """This case's contrast table: :data:`CONTRAST_3T` with per-case jitter (6 % per entry, the
    enhancement 0.8-1.25 x), orderings that make the labels visible kept."""
    table = {
        seq: {k: v * math.exp(rng.normal(0.0, 0.06)) for k, v in levels.items()}
        for seq, levels in CONTRAST_3T.items()
    }
    table["t1ce"]["et"] = CONTRAST_3T["t1ce"]["et"] * rng.uniform(0.8, 1.25)
    return table


def _bias(rng: _Rng, shape: Sequence[int], strength: float) -> np.ndarray:
    """Multiplicative bias ``exp(p(x))`` with ``p`` a random second-order polynomial of the box's
    normalised coordinates (a smooth receive-coil profile), ``|p| <= strength``."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    lin, sq, cross = rng.normal(0.0, 1.0, 3), rng.normal(0.0, 0.7, 3), rng.normal(0.0, 0.7, 3)
    p = sum(
        (np.float32(lin[k]) * a + np.float32(sq[k]) * a * a).reshape([-1 if j == k else 1 for j in range(3)])
        for k, a in enumerate(axes)
    )
    x, y, z = (a.reshape([-1 if j == k else 1 for j in range(3)]) for k, a in enumerate(axes))
    p = p + np.float32(cross[0]) * x * y + np.float32(cross[1]) * y * z + np.float32(cross[2]) * x * z
    peak = float(np.abs(p).max())
    return np.exp(p * np.float32(strength / peak)) if peak > 0 else np.ones(tuple(shape), np.float32)


def _render(
    rng: _Rng, head: _Head, tumours: _Tumours, table: dict[str, dict[str, float]]
) -> dict[str, np.ndarray]:
    """The four sequences over the box in white-matter units, then through the scanner: a bias shared
    by the sequences times a per-sequence one, additive Gaussian noise (1.5-5 % of white matter),
    zero outside the brain (skull-stripped)."""
    tumour_total = sum(tumours.parts.values())
    shared_bias = _bias(rng, head.brain.shape, rng.uniform(0.1, 0.3))
    images: dict[str, np.ndarray] = {}
    for seq in CANONICAL_MODALITIES:
        levels = table[seq]
        healthy = sum(np.float32(levels[t]) * head.tissue[t] for t in _TISSUES)
        value = healthy * (1.0 - tumour_total)
        for part in _PARTS:
            grain = np.float32(0.12 if part in ("et", "net") else 0.06)
            value += tumours.parts[part] * np.float32(levels[part]) * (1.0 + grain * tumours.texture)
        value *= shared_bias * _bias(rng, head.brain.shape, rng.uniform(0.05, 0.15))
        value += rng.standard_normal(value.shape, dtype=np.float32) * np.float32(rng.uniform(0.015, 0.05))
        images[seq] = np.where(head.brain, np.maximum(value, 0.0), 0.0).astype(np.float32)
    return images


# ------------------------------------------------------------------------------------------------ cases
_STREAM = 0x1DE9
"""Seed-sequence word of this generator (the embedded generator's cases use other streams)."""
TUMOUR_FREE_EVERY = 6
"""Case ``k`` is tumour-free when ``k % 6 == 3``: 2 of 12 cases, 1 of 6."""


@dataclass(frozen=True)
class IndependentCase:
    """One generated case on the BraTS grid, arrays as stored (LPS voxel order).

    ``images``: modality -> ``(X, Y, Z)`` in ``storage`` dtype (0 outside the brain); ``labels``: uint8
    internal glioma codes (1 NCR, 2 ED, 3 ET); ``affine``: 4x4 LPS (mm); ``info``: the facts recorded in
    ``independent_meta.json``.
    """

    index: int
    images: dict[str, np.ndarray]
    labels: np.ndarray
    affine: np.ndarray
    spacing: float
    tumour_free: bool
    storage: str
    info: dict[str, Any]


def case_rng(seed: int, index: int) -> _Rng:
    """The random stream of case ``index``, from ``(seed, index)`` only."""
    return np.random.default_rng([int(seed) % 2**64, _STREAM, int(index)])


def _store(rng: _Rng, volume: np.ndarray, seq: str, dtype: str) -> tuple[np.ndarray, float]:
    """Scanner scaling and storage: white matter at a random value of :data:`WHITE_MATTER_SCALE`
    (float32 cases divided by 1000), rounded for integer dtypes; returns the array and the WM value."""
    white = rng.uniform(*WHITE_MATTER_SCALE[seq])
    scaled = volume * np.float32(white / 1000.0 if dtype == "float32" else white)
    if dtype == "float32":
        return scaled.astype(np.float32), white / 1000.0
    top = np.iinfo(np.dtype(dtype)).max
    return np.clip(np.rint(scaled), 0, top).astype(dtype), white


def independent_case(
    index: int, seed: int = 0, spacing_mm: float = 1.0, *, tumour: bool | None = None
) -> IndependentCase:
    """Generate case ``index`` (1-based) of the independent set at ``spacing_mm`` (1: 240 x 240 x 155).

    ``tumour`` forces a lesion (True) or none (False); None follows :data:`TUMOUR_FREE_EVERY`.
    """
    if not 0.5 <= spacing_mm <= 4.0:
        raise ValueError(f"spacing_mm must be between 0.5 and 4 mm, got {spacing_mm}")
    rng = case_rng(seed, index)
    tumour_free = index % TUMOUR_FREE_EVERY == 3 if tumour is None else not tumour
    frame = _frame(rng, spacing_mm)
    head = _anatomy(rng, frame)
    tumours = _tumours(rng, frame, head, tumour_free)
    table = _protocol(rng)
    box_images = _render(rng, head, tumours, table)
    storage = STORAGE_DTYPES[((index - 1) // len(INDEPENDENT_LAYOUTS)) % len(STORAGE_DTYPES)]
    images: dict[str, np.ndarray] = {}
    white: dict[str, float] = {}
    for seq in CANONICAL_MODALITIES:
        stored, white[seq] = _store(rng, box_images[seq], seq, storage)
        images[seq] = np.zeros(frame.shape, dtype=stored.dtype)
        images[seq][frame.box] = stored
    labels = np.zeros(frame.shape, dtype=np.uint8)
    labels[frame.box] = tumours.labels
    voxel_ml = spacing_mm**3 / 1000.0
    info = {
        "tumour_free": tumour_free,
        "lesions": tumours.facts,
        "storage": storage,
        "white_matter_value": {k: round(v, 3) for k, v in white.items()},
        "volumes_ml": {
            name: round(float((labels == code).sum()) * voxel_ml, 2)
            for name, code in (("NCR", _NCR), ("ED", _ED), ("ET", _ET))
        },
        "brain_ml": round(float(head.brain.sum()) * voxel_ml, 1),
        **head.facts,
    }
    return IndependentCase(index, images, labels, frame.affine, float(spacing_mm), tumour_free, storage, info)


# -------------------------------------------------------------------------------------------- writing
def case_id(layout: str, index: int) -> str:
    """Case id of case ``index`` in ``layout`` (numbers from :data:`CASE_NUMBER_OFFSET`)."""
    number = CASE_NUMBER_OFFSET + index
    if layout == "brats2023":
        return f"BraTS-GLI-{number:05d}-000"
    if layout == "brats2021":
        return f"BraTS2021_{number:05d}"
    if layout == "nnunet":
        return f"IndepGLI_{number:05d}"
    raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(INDEPENDENT_LAYOUTS)}")


def _nifti(data: np.ndarray, affine: np.ndarray) -> Any:
    import nibabel as nib

    image = nib.Nifti1Image(data, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm", "sec")
    return image


def _file_mode(requested: int = 0o666) -> int:
    umask = os.umask(0)
    os.umask(umask)
    return requested & ~umask


def _publish(folder: Path, images: dict[str, Any], *, whole_folder: bool) -> None:
    """Save ``name -> image`` into ``folder`` through a temporary sibling folder (final basenames, so the
    gzip headers match): renamed as a whole when ``whole_folder`` and ``folder`` is new, else file by file."""
    import nibabel as nib

    parent = folder.parent if whole_folder else folder
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=parent))
    try:
        for name, image in images.items():
            nib.save(image, tmp / name)
            os.chmod(tmp / name, _file_mode())
        if whole_folder and not folder.exists():
            os.chmod(tmp, _file_mode(0o777))
            write_point(folder)
            os.rename(tmp, folder)
            return
        folder.mkdir(parents=True, exist_ok=True)
        for name in images:
            write_point(folder / name)
            os.replace(tmp / name, folder / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_independent_case(case: IndependentCase, out: Path, layout: str) -> str:
    """Write ``case`` in ``layout`` under ``out/<layout>`` (segmentation in :data:`LAYOUT_CONVENTIONS`)
    and its segmentation to ``out/references/<layout>/<case_id>.nii.gz``; returns the case id."""
    cid = case_id(layout, case.index)
    seg = get_convention(LAYOUT_CONVENTIONS[layout]).decode(case.labels).astype(np.uint8)
    images = {m: _nifti(case.images[m], case.affine) for m in CANONICAL_MODALITIES}
    _publish(
        out / REFERENCES_FOLDER / layout, {f"{cid}.nii.gz": _nifti(seg, case.affine)}, whole_folder=False
    )
    if layout == "nnunet":
        root = out / layout
        # The label first: a case is listed by its images, which then appear complete.
        _publish(root / "labelsTr", {f"{cid}.nii.gz": _nifti(seg, case.affine)}, whole_folder=False)
        named = {f"{cid}_{channel:04d}.nii.gz": images[m] for channel, m in enumerate(_NNUNET_ORDER)}
        _publish(root / "imagesTr", named, whole_folder=False)
        return cid
    spec = LAYOUTS[layout]
    named = {f"{cid}{spec.modality_suffixes[m]}.nii.gz": images[m] for m in CANONICAL_MODALITIES}
    named[f"{cid}{spec.seg_suffix}.nii.gz"] = _nifti(seg, case.affine)
    _publish(out / layout / cid, named, whole_folder=True)
    return cid


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")


def _nnunet_dataset_json(case_ids: Sequence[str]) -> dict[str, Any]:
    """nnU-Net v2 ``dataset.json``: regions as nnU-Net's BraTS Dataset137 declares them (MSD codes)."""
    return {
        "channel_names": dict(NNUNET_CHANNELS),
        "labels": dict(NNUNET_LABELS),
        "regions_class_order": [1, 2, 3],
        "numTraining": len(case_ids),
        "file_ending": ".nii.gz",
        "name": NNUNET_DATASET.split("_", 1)[1],
        "description": "synthetic glioma MRI from tumorseg's independent generator (procedural anatomy)",
        "reference": "tumorseg.data.independent",
        "licence": "synthetic",
    }


def _write_one(
    index: int, *, out: Path, seed: int, spacing_mm: float, layouts: tuple[str, ...]
) -> dict[str, Any]:
    """Generate and write case ``index`` (in a worker process); its facts."""
    layout = layouts[(index - 1) % len(layouts)]
    case = independent_case(index, seed, spacing_mm)
    cid = write_independent_case(case, out, layout)
    return {
        "case_id": cid,
        "index": index,
        "layout": layout,
        "label_convention": LAYOUT_CONVENTIONS[layout],
        **case.info,
    }


DIFFERENCES: dict[str, str] = {
    "anatomy": "procedural head (superquadric cerebrum folded by noise zero-sheets, ellipsoid ventricles and "
    "nuclei, foliated cerebellum, brainstem); no template",
    "tumour": "metaball cores; rim / nodular / no enhancement from random fields; random-walk necrosis; "
    "noisy distance-spread oedema; 0-2 lesions",
    "contrast": "3 T-like table (T1 GM/WM 0.62, FLAIR CSF 0.45 of WM, T1ce ET 1.6-2.5 x WM)",
    "scanner": "second-order polynomial bias, additive Gaussian noise 1.5-5 %, uint16 / int16 / float32",
}
"""One line per difference from the embedded generator (recorded in ``independent_meta.json``)."""


def _check_options(cases: int, spacing_mm: float, layouts: Sequence[str]) -> tuple[str, ...]:
    if cases < 1:
        raise ConfigError(f"independent cases: {cases}; generate at least 1 case")
    if not 0.5 <= spacing_mm <= 4.0:
        raise ConfigError(f"independent spacing_mm: {spacing_mm}; use 0.5 to 4 mm (1 = BraTS size)")
    chosen = tuple(layouts)
    unknown = [name for name in chosen if name not in INDEPENDENT_LAYOUTS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"independent layouts: {list(chosen)}; name each of {', '.join(INDEPENDENT_LAYOUTS)} at most once"
        )
    return chosen


def synthesize_independent(
    out: str | Path,
    *,
    cases: int = 12,
    seed: int = 2027,
    layouts: Sequence[str] = INDEPENDENT_LAYOUTS,
    spacing_mm: float = 1.0,
    workers: int = 2,
) -> list[str]:
    """Write the independent 3-D set: ``cases`` cases spread over ``layouts``, one sub-folder each.

    ``out/brats2023`` (BraTS 2023 GLI folders, 1 NCR 2 ED 3 ET), ``out/brats2021`` (1 NCR 2 ED 4 ET),
    ``out/nnunet`` (nnU-Net raw: channels FLAIR, T1, T1ce, T2; 1 ED 2 NCR 3 ET, as
    regions), ``out/references/<layout>`` (flat segmentations for ``tumorseg evaluate --ref``) and
    ``out/independent_meta.json``. Each sub-folder is read by ``tumorseg ingest`` / ``predict`` with
    layout and labels detected. Files are written atomically; ``workers`` does not change the output.
    Returns the case ids in index order. ConfigError for bad options, DataError when ``out`` cannot be
    written.
    """
    chosen = _check_options(cases, spacing_mm, layouts)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass another output folder")
    from tumorseg.data.parallel import map_cases

    try:
        out.mkdir(parents=True, exist_ok=True)
        work = partial(_write_one, out=out, seed=seed, spacing_mm=spacing_mm, layouts=chosen)
        facts = list(map_cases(work, range(1, cases + 1), workers=workers, what="independent"))
        if "nnunet" in chosen:
            ids = [f["case_id"] for f in facts if f["layout"] == "nnunet"]
            _write_json(out / "nnunet" / "dataset.json", _nnunet_dataset_json(ids))
        meta = {
            "generator": GENERATOR_NAME,
            "params": {"cases": cases, "seed": seed, "spacing_mm": spacing_mm, "layouts": list(chosen)},
            "differences_from_embedded_generator": DIFFERENCES,
            "cases": facts,
        }
        _write_json(out / META_NAME, meta)
    except OSError as exc:
        raise DataError(
            f"{exc.filename or out}: cannot write ({exc.strerror}); choose a writable folder"
        ) from None
    log.info("independent: %d cases in %s", len(facts), out)
    return [f["case_id"] for f in facts]


# ------------------------------------------------------------------------------------------------- 2-D
FIGSHARE_SIZE = 512
FIGSHARE_GLIOMA = 2
"""Figshare ``label`` of a glioma (1 meningioma, 2 glioma, 3 pituitary): this generator grows gliomas."""
_FIGSHARE_FIRST, _KAGGLE_FIRST = 1000, 2000
"""Case indices of the volumes 2-D patients and images are cut from (apart from the 3-D set's)."""
KAGGLE_SEQUENCES: tuple[tuple[str, float], ...] = (("t1ce", 0.6), ("t2", 0.25), ("flair", 0.15))
"""Sequence of a Kaggle image and its share (the real set mixes contrasts; Figshare is T1ce only)."""


def _radiological(plane: np.ndarray) -> np.ndarray:
    """An axial LPS-stored plane ``(X, Y)`` as radiologists view it: anterior up, patient right left."""
    return np.ascontiguousarray(plane.T)


def _tumour_slices(labels: np.ndarray, codes: Sequence[int], count: int, min_share: float) -> list[int]:
    """Up to ``count`` axial indices, evenly spread over those where the ``codes`` region covers at
    least ``min_share`` of its largest cross-section."""
    areas = np.isin(labels, codes).sum(axis=(0, 1))
    candidates = np.flatnonzero(areas >= max(1, min_share * areas.max()))
    if not len(candidates):
        return []
    picks = np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().astype(int)
    return sorted({int(candidates[k]) for k in picks})


def figshare_patient(patient: int, seed: int, slices: int, spacing_mm: float) -> list[dict[str, Any]]:
    """Slices of one Figshare-style patient: int16 T1ce ``image`` and uint8 tumour-core ``mask``
    ``(512, 512)``, ``label`` 2 (glioma), ``pid``, ``z``."""
    case = independent_case(_FIGSHARE_FIRST + patient, seed, spacing_mm, tumour=True)
    rng = np.random.default_rng([int(seed) % 2**64, _STREAM, 0xF16, patient])
    t1ce = case.images["t1ce"].astype(np.float32)
    white = case.info["white_matter_value"]["t1ce"]
    scale = rng.uniform(300.0, 900.0) / white  # Figshare's T1ce values: white matter at a few hundred
    out = []
    for z in _tumour_slices(case.labels, (_NCR, _ET), slices, 0.15):
        zoom = FIGSHARE_SIZE / np.asarray(t1ce.shape[:2], dtype=np.float64)
        image = ndi.zoom(
            _radiological(t1ce[:, :, z]) * np.float32(scale),
            zoom[::-1],
            order=1,
            grid_mode=True,
            mode="nearest",
        )
        core = np.isin(case.labels[:, :, z], (_NCR, _ET)).astype(np.uint8)
        mask = ndi.zoom(_radiological(core), zoom[::-1], order=0, grid_mode=True, mode="nearest")
        out.append(
            {
                "image": np.clip(np.rint(image), 0, 32767).astype(np.int16),
                "mask": mask.astype(np.uint8),
                "label": FIGSHARE_GLIOMA,
                "pid": f"{700000 + patient * 41}",
                "z": z,
            }
        )
    return out


def kaggle_picture(index: int, tumour: bool, seed: int, spacing_mm: float) -> dict[str, Any]:
    """Kaggle-style image ``index``: 8-bit ``pixels`` ``(H, W)`` or ``(H, W, 3)`` (170-640 px sides, the
    brain on a black canvas), a T1ce, T2 or FLAIR slice, with its facts."""
    rng = np.random.default_rng([int(seed) % 2**64, _STREAM, 0xCA6, index])
    case = independent_case(_KAGGLE_FIRST + index, seed, spacing_mm, tumour=tumour)
    names, shares = zip(*KAGGLE_SEQUENCES, strict=True)
    sequence = str(names[rng.choice(len(names), p=np.asarray(shares))])
    volume = case.images[sequence].astype(np.float32)
    brain = (volume > 0).sum(axis=(0, 1))
    zs = _tumour_slices(case.labels, (_NCR, _ED, _ET), 5, 0.4) if tumour else []
    zs = zs or [int(z) for z in np.flatnonzero(brain >= 0.6 * brain.max())]
    z = int(zs[rng.integers(len(zs))])
    plane = _radiological(volume[:, :, z])
    height, width = (int(v) for v in rng.integers(170, 641, 2))
    side = int(min(height, width) * rng.uniform(0.75, 0.98))
    brain_px = ndi.zoom(
        plane, side / np.asarray(plane.shape, dtype=np.float64), order=1, grid_mode=True, mode="nearest"
    )
    window = float(np.percentile(plane[plane > 0], 99.7)) * rng.uniform(0.85, 1.15)
    pixels = np.clip(brain_px / np.float32(window), 0.0, 1.0) ** np.float32(rng.uniform(0.75, 1.3)) * 255.0
    canvas = np.zeros((height, width), dtype=np.float32)
    top, left = (
        int(rng.integers(0, height - brain_px.shape[0] + 1)),
        int(rng.integers(0, width - brain_px.shape[1] + 1)),
    )
    canvas[top : top + brain_px.shape[0], left : left + brain_px.shape[1]] = pixels
    rgb = bool(rng.random() < 0.5)
    image = np.rint(np.repeat(canvas[..., None], 3, axis=2) if rgb else canvas).clip(0, 255).astype(np.uint8)
    return {
        "pixels": image,
        "tumour": tumour,
        "sequence": sequence,
        "rgb": rgb,
        "png": bool(rng.random() < 0.3),
        "shape": [height, width],
        "z": z,
    }


def _write_figshare(
    out: Path, patients: int, slices: int, seed: int, spacing_mm: float, workers: int
) -> list[str]:
    """``out/figshare/1.mat, 2.mat, ...`` and their facts; the file names relative to ``out``. Patients
    are drawn in ``workers`` processes and written here, in patient order."""
    from tumorseg.data.parallel import map_cases
    from tumorseg.data.planar_synth import write_figshare_slices

    draw = partial(figshare_patient, seed=seed, slices=slices, spacing_mm=spacing_mm)
    drawn = map_cases(
        draw, range(1, patients + 1), workers=workers, what="independent 2-D figshare", unit="patients"
    )
    facts = [
        {
            "file": f"figshare/{name}",
            "pid": item["pid"],
            "z": item["z"],
            "tumour_pixels": int(item["mask"].sum()),
        }
        for name, item in write_figshare_slices(out / "figshare", drawn)
    ]
    if facts:
        _write_json(out / "figshare" / META_NAME, {"generator": GENERATOR_NAME, "seed": seed, "files": facts})
    return [f["file"] for f in facts]


def _write_kaggle(
    out: Path, images: int, tumour_fraction: float, seed: int, spacing_mm: float, workers: int
) -> list[str]:
    """``out/kaggle/yes/Y1.jpg ... no/N9.png`` (the first ``round(images * fraction)`` with a tumour),
    drawn in ``workers`` processes and written here, in index order."""
    from tumorseg.data.parallel import map_cases
    from tumorseg.data.planar_synth import tumour_first, write_kaggle_images

    n_yes = int(round(images * tumour_fraction))
    draw = partial(tumour_first, n_yes=n_yes, make=kaggle_picture, seed=seed, spacing_mm=spacing_mm)
    indices = range(1, images + 1)
    drawn = map_cases(draw, indices, workers=workers, what="independent 2-D kaggle", unit="images")
    facts = [
        {"file": f"kaggle/{relative}", **{k: v for k, v in item.items() if k != "pixels"}}
        for relative, item in write_kaggle_images(
            out / "kaggle", drawn, indices, quality=lambda i: 80 + i % 16
        )
    ]
    if facts:
        _write_json(out / "kaggle" / META_NAME, {"generator": GENERATOR_NAME, "seed": seed, "files": facts})
    return [f["file"] for f in facts]


def synthesize_independent_2d(
    out: str | Path,
    *,
    patients: int = 8,
    slices_per_patient: int = 3,
    kaggle_images: int = 24,
    tumour_fraction: float = 0.6,
    seed: int = 2027,
    spacing_mm: float = 1.0,
    workers: int = 2,
) -> list[str]:
    """Write the independent 2-D set: ``out/figshare/<n>.mat`` (MATLAB v7.3 ``cjdata`` slices) and
    ``out/kaggle/{yes,no}/`` images (the first ``round(kaggle_images * tumour_fraction)`` in ``yes``),
    cut from this module's volumes and written by the embedded 2-D writers; facts in
    ``independent_meta.json`` of each folder; ``workers`` processes draw the volumes and do not change
    the output. Returns the paths written, relative to ``out``. ConfigError for bad options, DataError
    when ``out`` cannot be written.
    """
    if patients < 0 or kaggle_images < 0 or slices_per_patient < 1 or not 0.0 <= tumour_fraction <= 1.0:
        raise ConfigError(
            "independent 2-D: patients and kaggle_images must be >= 0, slices_per_patient >= 1 and "
            f"tumour_fraction in [0, 1] (got {patients}, {kaggle_images}, {slices_per_patient}, "
            f"{tumour_fraction})"
        )
    _check_options(1, spacing_mm, INDEPENDENT_LAYOUTS)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass another output folder")
    try:
        written = _write_figshare(out, patients, slices_per_patient, seed, spacing_mm, workers)
        written += _write_kaggle(out, kaggle_images, tumour_fraction, seed, spacing_mm, workers)
    except OSError as exc:
        raise DataError(
            f"{exc.filename or out}: cannot write ({exc.strerror}); choose a writable folder"
        ) from None
    log.info("independent 2-D: %d files in %s", len(written), out)
    return written
