"""Synthetic multi-modal brain MRI with gliomas: the embedded default dataset (``tumorseg synth``).

A case warps the MNI152 GM/WM/CSF maps, grows a glioma in white matter (mass effect, necrosis,
enhancing rim, oedema along WM), renders T1/T1ce/T2/FLAIR with tissue contrasts, bias, Rician noise
and int16 quantisation in BraTS's 240 x 240 x 155 mm box. Case ``k`` depends only on ``(seed, k)``;
brats2024-gli cavities and brats2024-ped cysts draw from their own streams.

So that a model learns gliomas rather than this generator's look, each case also draws its own look
(``synth`` keys): rims of 3-10 mm with non-enhancing gaps, nodular or solid enhancement, non-enhancing
tumour (some tumours without any enhancement), further foci and satellites, oedema fading into normal tissue, a contrast table around
:data:`_CONTRAST`, partial volume at the tumour's borders, and per sequence a coarser acquisition,
k-space motion or a phase-encode ghost, and its noise level. Labels follow what is rendered: ``ET``
where the tumour enhances, ``NCR`` where its core does not, ``ED`` where the oedema's signal is above
the case's threshold.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from tumorseg.config import DATASET_LAYOUTS, SynthConfig
from tumorseg.data.conventions import (
    BRATS_PREFIX_CONVENTIONS,
    CANONICAL_MODALITIES,
    LAYOUTS,
    MSD_CHANNEL_ORDER,
    MSD_LABEL_NAMES,
    MSD_MODALITY_NAMES,
    LabelConvention,
    LabelSet,
    get_convention,
)
from tumorseg.data.manifest import atomic_write_text
from tumorseg.data.parallel import map_cases
from tumorseg.errors import ConfigError, DataError
from tumorseg.faults import write_point

log = logging.getLogger(__name__)

_Rng = np.random.Generator
_Maps = dict[str, np.ndarray]

BRATS_FOV_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
BRATS_WORLD_CENTRE_MM: tuple[float, float, float] = (-119.5, 119.5, 77.0)
"""RAS world position of the BraTS box's centre (LPS-stored, voxel 0 at x=0, y=239, z=0)."""
MNI_BOX_CENTRE_MM: tuple[float, float, float] = (0.0, -17.0, 14.0)
"""MNI point at the box centre: the brain's centre in x/y; in z the box cuts the lowest brainstem."""

SYNTH_META_NAME = "synth_meta.json"
TUMOUR_TYPE = "glioma"
ORIENTATIONS_REORIENTED: tuple[str, ...] = ("LPS", "LAS")  # LPS is how BraTS stores its volumes
TISSUES: tuple[str, ...] = ("gm", "wm", "csf")

# Mean intensity per sequence relative to white matter, as gliomas look on clinical 1.5/3 T protocols:
# T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR suppresses free water (CSF dark) but not oedema.
# Non-enhancing tumour (``net``, labelled with necrosis as NCR/NETC) is solid tumour without contrast
# uptake: dark on T1/T1ce, bright on T2/FLAIR yet darker there than oedema's free water. Each case
# draws its own table around this one (``contrast_jitter``).
_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"gm": 0.70, "wm": 1.0, "csf": 0.28, "ncr": 0.38, "net": 0.52, "et": 0.62, "ed": 0.66},
    "t1ce": {"gm": 0.73, "wm": 1.0, "csf": 0.30, "ncr": 0.36, "net": 0.56, "et": 1.75, "ed": 0.68},
    "t2": {"gm": 1.40, "wm": 1.0, "csf": 2.60, "ncr": 2.30, "net": 1.65, "et": 1.60, "ed": 1.95},
    "flair": {"gm": 1.25, "wm": 1.0, "csf": 0.28, "ncr": 0.95, "net": 1.30, "et": 1.40, "ed": 1.75},
}
_TUMOUR_PARTS: tuple[str, ...] = ("ncr", "net", "et", "ed")
_BASE_SCALE: dict[str, float] = {"t1": 520.0, "t1ce": 680.0, "t2": 340.0, "flair": 420.0}  # raw WM
# Fluids: rc (resection cavity) is free water; cc (cyst) is proteinaceous (T2 > NCR, FLAIR between).
_CONTRAST_FLUID: dict[str, dict[str, float]] = {
    "t1": {"rc": 0.26, "cc": 0.33},
    "t1ce": {"rc": 0.28, "cc": 0.32},
    "t2": {"rc": 2.65, "cc": 2.85},
    "flair": {"rc": 0.34, "cc": 0.58},
}
_FLUID_PARTS: tuple[str, ...] = ("rc", "cc")

# The generator's part codes, and each part's label per label set (parts a set lacks are never drawn).
_PART_CODES: dict[str, int] = {"NCR": 1, "ED": 2, "ET": 3, "RC": 4, "CC": 5}
_PART_LABELS: dict[str, dict[str, str]] = {
    "glioma": {"NCR": "NCR", "ED": "ED", "ET": "ET"},
    "glioma_post": {"NCR": "NETC", "ED": "SNFH", "ET": "ET", "RC": "RC"},
    "pediatric": {"NCR": "NETC", "ED": "ED", "ET": "ET", "CC": "CC"},
}

RESECTION_FRACTION = 0.5  # cases with a resection cavity (brats2024-gli; never tumour-free ones)
CYST_FRACTION = 0.5  # cases with cysts (brats2024-ped; never tumour-free ones)
_CAVITY_STREAM = 0x2CA7
_CYST_STREAM = 0xC157
_VARIETY_STREAM = 0x7A21  # the case's look: enhancement, foci, oedema border, contrasts
_ACQUISITION_STREAM = 0xAC0  # resolution loss and artefacts per sequence

SYNTH_LAYOUTS: tuple[str, ...] = DATASET_LAYOUTS
_NATIVE_LAYOUTS: tuple[str, ...] = ("brats2021", "brats2023", "msd")
_AUTO_CONVENTION = {**{name: name for name in _NATIVE_LAYOUTS}, "nnunet": "brats2023", "monai": "brats2023"}
"""Convention of ``labels: auto`` per layout."""

BRATS_PREFIXES: dict[str, str] = {
    "brats2023": "GLI",
    "brats2023-ssa": "SSA",
    "brats2023-men": "MEN",
    "brats2023-met": "MET",
    "brats2023-goat": "GoAT",
    "brats2023-ped": "PED",
    "brats2024-ped": "PED",
    "brats2024-gli": "GLI",
}
"""Case-id prefix of BraTS 2023+ names per convention (``BraTS-MEN-00001-000``); others: GLI."""

NNUNET_DATASET = "Dataset500_TumorsegSynth"  # nnU-Net v2 raw dataset folder inside the output
NNUNET_CHANNEL_NAMES: dict[str, str] = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
MONAI_DATALIST = "datalist.json"
MONAI_FOLDS = 5

_QUANTISE_MAX = 32767.0
_ED_NOISE_FLOOR = 0.65  # smallest factor noise applies to the oedema's distance (keeps it positive)
_PV_BOX = 0.18  # logistic scale of a voxel-sized box average, per mm of voxel edge
_HARD_EDGE_MM = 0.02  # logistic scale of the tumour's boundaries without partial volume


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case, ``(X, Y, Z)`` arrays in RAS order (:func:`write_case` applies ``orientation``).

    ``images``: float32 scanner units, 0 outside ``brain_mask``; ``labels``: uint8 internal codes of
    ``convention``'s set; ``tissue``: GM/WM/CSF probabilities before the tumour (contrast ground truth);
    ``info``: the ``synth_meta.json`` record.
    """

    index: int
    images: dict[str, np.ndarray]
    labels: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    tumour_free: bool
    brain_mask: np.ndarray
    tissue: dict[str, np.ndarray]
    orientation: str = "RAS"
    info: dict[str, Any] = field(default_factory=dict)
    convention: str = "brats2021"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.labels.shape)  # type: ignore[return-value]

    @property
    def label_set(self) -> LabelSet:
        return get_convention(self.convention).label_set

    def code(self, part: str) -> int:
        """Internal code of a generated part (``NCR``, ``ED``, ``ET``, ``RC``, ``CC``) in the case's set."""
        return self.label_set.code(_PART_LABELS[self.label_set.name][part])

    @property
    def has_necrosis(self) -> bool:
        return bool((self.labels == self.code("NCR")).any())


@dataclass(frozen=True)
class _Template:
    """MNI152 tissue maps at one spacing (read-only): float32 ``(3, I, J, K)`` GM/WM/CSF, MNI mm of
    voxel 0, tumour centres ``(N, 3)`` in cerebral WM with their depth, the brain's bounding box."""

    tissue: np.ndarray
    origin_mm: np.ndarray
    spacing: np.ndarray
    centres_mm: np.ndarray
    depth_mm: np.ndarray
    brain_lo_mm: np.ndarray
    brain_hi_mm: np.ndarray


@functools.lru_cache(maxsize=1)
def _mni_anatomy() -> _Template:
    """The 1 mm MNI152 template as GM/WM/CSF maps ``(3, 197, 233, 189)``, once per process (~2 s)."""
    from nilearn import datasets  # heavy import (scikit-learn), only when a dataset is generated

    t1_img = datasets.load_mni152_template(resolution=1)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    gm = np.clip(gm, 0.0, 1.0) * mask
    wm = np.clip(wm, 0.0, 1.0) * mask
    # CSF: the brain beyond GM and WM, plus voxels dark on T1 (ventricles, sulci; blurred in GM/WM).
    residual = np.clip(1.0 - gm - wm, 0.0, 1.0)
    dark_t1 = np.clip((0.50 - t1) / 0.22, 0.0, 1.0)
    csf = np.maximum(residual, dark_t1) * mask
    total = gm + wm + csf
    inside = total > 1e-6
    tissue = np.zeros((3, *t1.shape), dtype=np.float32)
    for k, prob in enumerate((gm, wm, csf)):
        tissue[k][inside] = prob[inside] / total[inside]
    tissue.flags.writeable = False

    # Tumour centres: supratentorial cerebral WM (adult gliomas), off the midline, away from the
    # surface; depth from a 2 mm distance transform (8x cheaper, precise enough for a centre).
    depth = ndi.distance_transform_edt(mask[::2, ::2, ::2], sampling=2.0)
    ijk = np.argwhere(tissue[1][::2, ::2, ::2] > 0.75)
    centre_depth = depth[tuple(ijk.T)]
    mni = ijk * 2.0 + affine[:3, 3]
    x, y, z = mni.T
    supratentorial = (z > -22.0) & ~((y < -38.0) & (z < 2.0)) & ~((np.abs(x) < 18.0) & (z < 2.0))
    keep = supratentorial & (np.abs(x) > 6.0) & (centre_depth > 14.0)
    brain_ijk = np.argwhere(mask)
    return _Template(
        tissue=tissue,
        origin_mm=affine[:3, 3].copy(),
        spacing=np.ones(3),
        centres_mm=mni[keep].astype(np.float32),
        depth_mm=centre_depth[keep].astype(np.float32),
        brain_lo_mm=brain_ijk.min(axis=0) + affine[:3, 3],
        brain_hi_mm=brain_ijk.max(axis=0) + affine[:3, 3],
    )


@functools.lru_cache(maxsize=8)
def _template(spacing: tuple[float, float, float]) -> _Template:
    """The template's tissue maps resampled to ``spacing`` (Gaussian pre-filter, FWHM ~ voxel size:
    the partial-volume average of a real acquisition, not aliased 1 mm detail)."""
    base = _mni_anatomy()
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if np.allclose(spacing_arr, base.spacing):
        return base
    sigma = np.sqrt(np.maximum(spacing_arr**2 - 1.0, 0.0)) / 2.355
    extent = np.asarray(base.tissue.shape[1:]) - 1.0
    out_shape = np.floor(extent / spacing_arr).astype(int) + 1
    grids = [
        np.arange(n, dtype=np.float32) * np.float32(s) for n, s in zip(out_shape, spacing_arr, strict=True)
    ]
    coords = np.stack(np.meshgrid(*grids, indexing="ij"))
    resampled = np.empty((3, *out_shape), dtype=np.float32)
    for k in range(3):
        smooth = ndi.gaussian_filter(base.tissue[k], sigma)
        resampled[k] = ndi.map_coordinates(smooth, coords, order=1, output=np.float32)
    resampled.flags.writeable = False
    return dataclasses.replace(base, tissue=resampled, spacing=spacing_arr)


def brats_grid(spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of the BraTS box at ``spacing`` (mm): ``round(240/sx) x round(240/sy) x
    round(155/sz)`` voxels centred on it (exactly the BraTS grid at 1 mm)."""
    sp = np.asarray(spacing, dtype=np.float64)
    shape = tuple(int(round(f / s)) for f, s in zip(BRATS_FOV_MM, sp, strict=True))
    affine = np.eye(4)
    affine[:3, :3] = np.diag(sp)
    affine[:3, 3] = np.asarray(BRATS_WORLD_CENTRE_MM) - (np.asarray(shape) - 1) / 2.0 * sp
    return shape, affine  # type: ignore[return-value]


def _gaussian_basis(n: int, n_ctrl: int) -> np.ndarray:
    """``(n, n_ctrl)`` smooth interpolation weights of ``n_ctrl`` evenly spread control points."""
    pos = np.linspace(0.0, 1.0, n, dtype=np.float32)[:, None]
    centres = np.linspace(-0.15, 1.15, n_ctrl, dtype=np.float32)[None, :]
    width = 1.3 / max(n_ctrl - 1, 1)
    return np.exp(-0.5 * ((pos - centres) / width) ** 2).astype(np.float32)


def smooth_random_field(
    rng: _Rng, shape: Sequence[int], n_ctrl: Sequence[int], region: Sequence[slice] | None = None
) -> np.ndarray:
    """Low-frequency random field over ``shape`` (or its ``region``, same values), float32, ``|f| <= 1``.

    A tensor product of per-axis Gaussian bases on an ``n_ctrl`` control grid: smooth by construction
    and ~10x faster than ``scipy.ndimage.zoom`` at 240 x 240 x 155.
    """
    coeffs = rng.standard_normal(tuple(n_ctrl)).astype(np.float32)
    bases = [_gaussian_basis(n, k) for n, k in zip(shape, n_ctrl, strict=True)]
    # Mean and peak from every 4th voxel of the full grid (the field is far smoother than that).
    coarse = np.einsum("ia,jb,kc,abc->ijk", *(b[::4] for b in bases), coeffs, optimize=True)
    mean = float(coarse.mean())
    peak = float(np.abs(coarse - mean).max())
    if region is not None:
        bases = [b[sl] for b, sl in zip(bases, region, strict=True)]
    out = np.einsum("ia,jb,kc,abc->ijk", *bases, coeffs, optimize=True).astype(np.float32)
    out -= np.float32(mean)
    return out / np.float32(peak) if peak > 0 else out


def _local_noise(rng: _Rng, shape: Sequence[int], sigma_vox: Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise normalised to unit standard deviation, float32 ``shape``."""
    noise = ndi.gaussian_filter(
        rng.standard_normal(tuple(shape), dtype=np.float32), sigma_vox, mode="reflect"
    )
    std = float(noise.std())
    return noise / std if std > 0 else noise


def rician_noise(rng: _Rng, values: np.ndarray, sigma: np.float32) -> np.ndarray:
    """``|values + n_re + i n_im|`` with Gaussian ``n`` of std ``sigma`` (real part drawn first)."""
    n_re = rng.standard_normal(values.shape, dtype=np.float32) * sigma
    n_im = rng.standard_normal(values.shape, dtype=np.float32) * sigma
    return np.sqrt((values + n_re) ** 2 + n_im**2)


def _random_rotation(rng: _Rng, max_deg: float) -> np.ndarray:
    """Rotation matrix with Euler angles uniform in ``[-max_deg, max_deg]`` about each axis."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _uniform_rotation(rng: _Rng) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean mask (empty stays empty)."""
    components, n = ndi.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(sizes.argmax())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * x))).astype(np.float32)


# Flag k of a stream is ``frac(offset + k * alpha) < fraction`` (Roberts' R-sequence): it depends only
# on (seed, k), yet honours the fraction closely for any number of cases, unlike a Bernoulli draw.
_PHI4 = 1.1673039782614187  # root of x**5 = x + 1
_STREAMS: tuple[str, ...] = (
    "tumour_free",
    "no_necrosis",
    "anisotropic",
    "reoriented",
    "resection",
    "cystic",
    "multifocal",
    "satellites",
    "nodular",
    "low_resolution",
    "artefact",
    "non_enhancing",
)
"""Per-case flags; new ones go last (a flag's stream depends on its position)."""
_STREAM_ALPHA = {name: math.fmod(1.0 / _PHI4 ** (k + 1), 1.0) for k, name in enumerate(_STREAMS[:6])}
# Beyond the sixth, powers of 1 / phi4 come close to 1/3, 1/4, 1/5 (flags in clusters over a few dozen
# cases): later streams take quadratic irrationals with small continued-fraction terms, each away from
# the other alphas and their complements (which would tie two streams' flags together).
_STREAM_ALPHA |= dict(
    zip(
        _STREAMS[6:],
        (
            math.sqrt(2) - 1,
            math.sqrt(7) - 2,
            (math.sqrt(13) - 3) / 2,
            (math.sqrt(17) - 3) / 2,
            (math.sqrt(21) - 3) / 2,
            (math.sqrt(29) - 5) / 2,
        ),
        strict=True,
    )
)


def _case_flag(seed: int, index: int, stream: str, fraction: float) -> bool:
    offset = np.random.default_rng([seed_word(seed), 0x5EED, list(_STREAM_ALPHA).index(stream)]).random()
    return math.fmod(offset + index * _STREAM_ALPHA[stream], 1.0) < fraction


def seed_word(seed: int) -> int:
    """The seed as a non-negative integer (NumPy seed sequences reject negative entropy)."""
    return int(seed) % 2**64


def case_rng(seed: int, index: int) -> _Rng:
    """The random generator of case ``index``: seeded from ``(seed, index)`` only."""
    return np.random.default_rng([seed_word(seed), int(index)])


def variety_rng(seed: int, index: int, stream: int = _VARIETY_STREAM) -> _Rng:
    """A side stream of case ``index``: its look (enhancement, foci, oedema border, contrasts) or,
    with ``stream=_ACQUISITION_STREAM``, its acquisition. Each is its own, so that anatomy and tumour
    geometry (:func:`case_rng`) are drawn alike whatever they draw, and a case with artefacts differs
    from its artefact-free twin only in the sequences they touch."""
    return np.random.default_rng([seed_word(seed), int(index), stream])


@dataclass(frozen=True)
class _CaseFlags:
    """A case's choices, each from its own stream; ``resected``/``cystic`` only for sets with RC / CC."""

    tumour_free: bool
    necrotic: bool
    anisotropic: bool
    reoriented: bool
    resected: bool
    cystic: bool
    multifocal: bool = False
    satellites: bool = False
    nodular: bool = False
    low_resolution: bool = False
    artefact: bool = False
    non_enhancing: bool = False

    @classmethod
    def of(cls, cfg: SynthConfig, index: int, parts: dict[str, str]) -> _CaseFlags:
        flag = functools.partial(_case_flag, cfg.seed, index)
        tumour_free = flag("tumour_free", cfg.tumour_free_fraction)
        necrotic = not flag("no_necrosis", cfg.no_necrosis_fraction)
        return cls(
            tumour_free=tumour_free,
            necrotic=necrotic,
            anisotropic=flag("anisotropic", cfg.anisotropic_fraction),
            reoriented=flag("reoriented", cfg.reoriented_fraction),
            resected="RC" in parts and not tumour_free and flag("resection", RESECTION_FRACTION),
            cystic="CC" in parts and not tumour_free and flag("cystic", CYST_FRACTION),
            multifocal=not tumour_free and flag("multifocal", cfg.multifocal_fraction),
            satellites=not tumour_free and flag("satellites", cfg.satellite_fraction),
            nodular=necrotic and not tumour_free and flag("nodular", cfg.nodular_fraction),
            low_resolution=flag("low_resolution", cfg.low_resolution_fraction),
            artefact=flag("artefact", cfg.artefact_fraction),
            non_enhancing=necrotic and not tumour_free and flag("non_enhancing", cfg.non_enhancing_fraction),
        )

    def fluid_rng(self, seed: int, index: int) -> _Rng | None:
        """The own stream of a cavity or cysts, so that the rest of the case is drawn as without them."""
        if not (self.resected or self.cystic):
            return None
        stream = _CAVITY_STREAM if self.resected else _CYST_STREAM
        return np.random.default_rng([seed_word(seed), int(index), stream])


@dataclass
class _Tumour:
    """A glioma in MNI mm (it deforms with the anatomy); :func:`_grow_tumour` sets the reachable
    ``box``, its voxels' ``(3, x, y, z)`` template-mm ``offset`` and soft float32 part ``fractions``.

    :func:`_vary_tumour` sets its look: ``pattern`` (``rim``: necrosis in an enhancing rim; ``nodular``:
    mostly non-enhancing with enhancing nodules; ``solid``: wholly enhancing; ``non-enhancing``: no
    contrast uptake at all), the share of the viable
    tumour left non-enhancing (``enhancement_gap``) in patches of ``enhancement_scale_mm``, the
    enhancement's relative spread, the oedema border's width (share of its reach) and the fading level
    its label stops at, further masses ``foci`` (template-mm offset from the centre, radius mm) of
    which the last ``satellites`` are small nodules next to the main one, and the boundaries' logistic
    width ``pv_mm``.
    """

    centre_mni: np.ndarray
    r_core: float
    axes: np.ndarray
    rotation: np.ndarray
    lobulation: float
    necrosis_ratio: float
    oedema_reach: float
    mass_effect: float
    pattern: str = "rim"
    enhancement_gap: float = 0.0
    enhancement_scale_mm: float = 4.0
    enhancement_spread: float = 0.08
    oedema_softness: float = 0.12
    oedema_threshold: float = 0.5
    foci: list[tuple[np.ndarray, float]] = field(default_factory=list)
    satellites: int = 0
    pv_mm: float = 0.36
    box: tuple[slice, ...] = ()
    offset: np.ndarray | None = None
    fractions: _Maps = field(default_factory=dict)


@dataclass(frozen=True)
class _Anatomy:
    """Deformed anatomy over the grid's working ``region``: spacing ``sp`` (mm), GM/WM/CSF ``tissue``,
    ``brain`` (their sum > 0.5)."""

    tpl: _Template
    sp: np.ndarray
    tissue: _Maps
    brain: np.ndarray
    grid_shape: tuple[int, int, int]
    region: tuple[slice, ...]


def synthesize_case(index: int, cfg: SynthConfig) -> SyntheticCase:
    """Generate case ``index`` (from 1); ValueError for a label set the generator cannot draw.

    Grid, anatomy, tumour, regions and rendering draw from one generator in turn: their order is part
    of the output, so a new draw goes last or into its own stream.
    """
    if index < 1:
        raise ValueError(f"case index starts at 1 (got {index})")
    convention = get_convention(synth_convention(cfg.layout, cfg.labels))
    label_set = _drawable(convention)
    rng, vrng = case_rng(cfg.seed, index), variety_rng(cfg.seed, index)
    flags = _CaseFlags.of(cfg, index, _PART_LABELS[label_set.name])
    spacing, orientation = _case_grid(rng, float(cfg.spacing_mm), flags)
    shape, affine = brats_grid(spacing)
    tpl = _template(spacing)
    mni, region = _pull_back_field(rng, tpl, affine, shape)
    tumour = None if flags.tumour_free else _draw_tumour(rng, tpl, flags.necrotic)
    if tumour is not None:
        pv_mm = _PV_BOX * min(spacing) if cfg.partial_volume else _HARD_EDGE_MM
        _vary_tumour(vrng, tpl, tumour, flags, cfg, pv_mm)
        _apply_mass_effect(mni, tumour)
    idx, tissue, brain = _sample_template(mni, tpl)
    del mni
    anat = _Anatomy(tpl, np.asarray(spacing), tissue, brain, shape, region)
    fluid_rng = flags.fluid_rng(cfg.seed, index)
    labels = np.zeros(brain.shape, dtype=np.uint8)
    if tumour is not None:
        labels_box = _grow_tumour(rng, vrng, idx, anat, tumour)
        if flags.resected:
            _add_cavity(fluid_rng, labels_box, tumour, anat)
        elif flags.cystic:
            _add_cysts(fluid_rng, labels_box, tumour, anat)
        labels[tumour.box] = labels_box
    del idx
    acq_rng = variety_rng(cfg.seed, index, _ACQUISITION_STREAM)
    acquisition = _Acquisition.draw(acq_rng, flags, anat, cfg.noise_jitter)
    images = _render(rng, vrng, fluid_rng, anat, tumour, cfg, acquisition)
    labels = _uncrop(labels, shape, region)
    if label_set.name != "glioma":  # parts -> the set's internal codes (glioma's are the parts')
        labels = _part_lut(label_set)[labels]
    return SyntheticCase(
        index=index,
        images={m: _uncrop(v, shape, region) for m, v in images.items()},
        labels=labels,
        affine=affine,
        spacing=spacing,
        tumour_free=flags.tumour_free,
        orientation=orientation,
        tissue={t: _uncrop(v, shape, region) for t, v in tissue.items()},
        brain_mask=_uncrop(brain, shape, region),
        info=_case_info(index, label_set, labels, tumour, orientation, spacing, acquisition),
        convention=convention.name,
    )


def _case_grid(rng: _Rng, s: float, flags: _CaseFlags) -> tuple[tuple[float, float, float], str]:
    """Voxel spacing (thick z slices for an anisotropic case) and storage orientation of a case."""
    slice_factor = float(rng.choice([2.0, 2.5, 3.0])) if flags.anisotropic else 1.0
    spacing = (s, s, round(min(s * slice_factor, 6.0), 3))
    orientation = str(rng.choice(ORIENTATIONS_REORIENTED)) if flags.reoriented else "RAS"
    return spacing, orientation


def _pull_back_field(
    rng: _Rng, tpl: _Template, affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[list[np.ndarray], tuple[slice, ...]]:
    """``(mni, region)``: float32 MNI x, y, z of each voxel of ``region`` (the box that can hold brain).

    World -> MNI mm through a small, mostly shrinking affine (MNI152 is larger than a native brain)
    and a smooth random deformation.
    """
    scale = np.diag(rng.uniform([0.87, 0.86, 0.9], [1.0, 1.01, 1.02]))
    rotation = _random_rotation(rng, 6.0)
    shift = rng.uniform(-4.0, 4.0, 3)
    pull = rotation @ np.linalg.inv(scale)  # offset from the box centre (mm) -> MNI offset
    mni_centre = np.asarray(MNI_BOX_CENTRE_MM) + shift
    displacement_mm = float(rng.uniform(2.0, 4.5))
    margin_mm = displacement_mm + 10.0
    lo, hi = tpl.brain_lo_mm - margin_mm, tpl.brain_hi_mm + margin_mm
    corners = np.array([[(lo, hi)[b][k] for k, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    world = (np.linalg.inv(pull) @ (corners - mni_centre).T).T + np.asarray(BRATS_WORLD_CENTRE_MM)
    vox = (world - affine[:3, 3]) / np.diag(affine)[:3]
    start = np.clip(np.floor(vox.min(axis=0)).astype(int) - 1, 0, np.asarray(shape))
    stop = np.clip(np.ceil(vox.max(axis=0)).astype(int) + 2, 0, np.asarray(shape))
    region = tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))
    axes = []  # world mm of the region's voxels from the box centre, per axis
    for k in range(3):
        voxels = np.arange(region[k].start, region[k].stop)
        axes.append((affine[k, 3] + affine[k, k] * voxels - BRATS_WORLD_CENTRE_MM[k]).astype(np.float32))
    ctrl = tuple(max(3, min(6, int(round(f / 45.0)))) for f in BRATS_FOV_MM)
    mni = []
    pull32 = pull.astype(np.float32)
    for row in range(3):
        comp = (
            pull32[row, 0] * axes[0][:, None, None]
            + pull32[row, 1] * axes[1][None, :, None]
            + pull32[row, 2] * axes[2][None, None, :]
        )
        comp = comp + np.float32(mni_centre[row])
        comp += np.float32(displacement_mm) * smooth_random_field(rng, shape, ctrl, region)
        mni.append(comp.astype(np.float32, copy=False))
    return mni, region


def _draw_tumour(rng: _Rng, tpl: _Template, necrotic: bool) -> _Tumour:
    """A tumour centred in cerebral white matter; its fields are drawn in the order written."""
    pick = int(rng.integers(len(tpl.centres_mm)))
    centre = tpl.centres_mm[pick].astype(np.float64) + rng.uniform(-1.0, 1.0, 3)
    depth = float(tpl.depth_mm[pick])
    return _Tumour(
        centre_mni=centre,
        r_core=float(min(rng.uniform(8.0, 25.0), 0.85 * depth)),
        axes=rng.uniform(0.75, 1.3, 3),
        rotation=_uniform_rotation(rng),
        lobulation=float(rng.uniform(0.12, 0.3)),
        necrosis_ratio=float(rng.uniform(0.45, 0.8)) if necrotic else 0.0,
        oedema_reach=float(rng.uniform(5.0, 24.0)),
        mass_effect=float(rng.uniform(0.25, 0.5)),
    )


def _vary_tumour(
    rng: _Rng, tpl: _Template, tumour: _Tumour, flags: _CaseFlags, cfg: SynthConfig, pv_mm: float
) -> None:
    """Draw the tumour's look in place (see :class:`_Tumour`), in the order written.

    Rims are 3-10 mm thick (log-uniform), so some are thin and others thick; non-enhancing gaps come
    in 5-12 mm patches (arcs of the rim, not speckle); a solid tumour (no ``NCR`` label at all:
    ``no_necrosis_fraction``) enhances everywhere.
    """
    rim_mm = float(np.exp(rng.uniform(math.log(3.0), math.log(10.0))))
    gap_u, scale_mm, small_necrosis = (float(v) for v in rng.uniform([0.0, 5.0, 0.2], [1.0, 12.0, 0.45]))
    tumour.pv_mm = pv_mm
    if not flags.necrotic:
        tumour.pattern, tumour.necrosis_ratio, tumour.enhancement_gap = "solid", 0.0, 0.0
    elif flags.non_enhancing:  # lower-grade look: no contrast uptake at all, some with a little necrosis
        tumour.pattern = "non-enhancing"
        tumour.necrosis_ratio = small_necrosis if gap_u < 0.5 else 0.0
        tumour.enhancement_gap = 1.0
    elif flags.nodular:  # half of them with a little necrosis too
        tumour.pattern = "nodular"
        tumour.necrosis_ratio = small_necrosis if gap_u < 0.5 else 0.0
        tumour.enhancement_gap = 0.6 + 0.25 * gap_u
        scale_mm *= 1.3
    else:
        tumour.pattern = "rim"
        tumour.necrosis_ratio = max(1.0 - rim_mm / tumour.r_core, 0.25)
        tumour.enhancement_gap = gap_u * cfg.enhancement_gap_max
    tumour.enhancement_scale_mm = scale_mm
    tumour.enhancement_spread = float(rng.uniform(0.04, 0.3))
    tumour.oedema_softness = 0.06 + float(rng.uniform(0.0, 1.0)) * cfg.oedema_fuzziness
    tumour.oedema_threshold = float(rng.uniform(0.35, 0.6))
    if flags.multifocal:
        tumour.foci.extend(_distant_foci(rng, tpl, tumour))
    if flags.satellites:
        satellites = _satellites(rng, tumour)
        tumour.foci.extend(satellites)
        tumour.satellites = len(satellites)


def _distant_foci(rng: _Rng, tpl: _Template, tumour: _Tumour) -> list[tuple[np.ndarray, float]]:
    """1-2 further masses (radius 4-12 mm) centred in white matter 12-40 mm beyond the main core."""
    offsets = tpl.centres_mm.astype(np.float64) - tumour.centre_mni
    distance = np.linalg.norm(offsets, axis=1)
    near = np.flatnonzero((distance > tumour.r_core + 12.0) & (distance < tumour.r_core + 40.0))
    foci = []
    for _ in range(int(rng.integers(1, 3))):
        radius = float(np.clip(rng.uniform(0.25, 0.6) * tumour.r_core, 4.0, 12.0))
        pick = float(rng.random())
        if len(near):
            foci.append((offsets[near[int(pick * len(near))]], radius))
    return foci


def _satellites(rng: _Rng, tumour: _Tumour) -> list[tuple[np.ndarray, float]]:
    """1-3 small nodules (radius 2-4 mm) 2-10 mm beyond the main core's farthest reach."""
    edge = tumour.r_core * float(tumour.axes.max()) * (1.0 + tumour.lobulation)
    nodules = []
    for _ in range(int(rng.integers(1, 4))):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        distance, radius = rng.uniform([edge + 2.0, 2.0], [edge + 10.0, 4.0])
        nodules.append((direction * distance, float(radius)))
    return nodules


def _sample_template(mni: list[np.ndarray], tpl: _Template) -> tuple[np.ndarray, _Maps, np.ndarray]:
    """``(idx, tissue, brain)``: ``(3, x, y, z)`` template voxel positions, trilinear GM/WM/CSF there,
    and where they sum above 0.5."""
    idx = np.stack([(mni[k] - np.float32(tpl.origin_mm[k])) / np.float32(tpl.spacing[k]) for k in range(3)])
    tissue = {
        name: ndi.map_coordinates(tpl.tissue[k], idx, order=1, output=np.float32, mode="constant", cval=0.0)
        for k, name in enumerate(TISSUES)
    }
    brain = (tissue["gm"] + tissue["wm"] + tissue["csf"]) > 0.5
    return idx, tissue, brain


def _uncrop(crop: np.ndarray, shape: tuple[int, int, int], region: tuple[slice, ...]) -> np.ndarray:
    """A working-region map placed on the full grid, zeros (background) elsewhere."""
    out = np.zeros(shape, dtype=crop.dtype)
    out[region] = crop
    return out


def _case_info(
    index: int,
    label_set: LabelSet,
    labels: np.ndarray,
    tumour: _Tumour | None,
    orientation: str,
    spacing: tuple[float, float, float],
    acquisition: _Acquisition,
) -> dict[str, Any]:
    """The case's ``synth_meta.json`` record (``labels``: full grid, internal codes): a tumour's
    enhancement pattern, number of masses (``foci``, the main one included) and ``satellites``; every
    case's noise factor, coarser sequences and artefacts per sequence."""
    parts = _PART_LABELS[label_set.name]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    info: dict[str, Any] = {
        "case_index": index,
        "tumour_type": None if tumour is None else TUMOUR_TYPE,
        "necrosis": bool((labels == label_set.code(parts["NCR"])).any()),
        "orientation": orientation,
        "spacing_mm": list(spacing),
        "shape": list(labels.shape),
        "volume_ml": {
            name: round(float((labels == code).sum()) * voxel_ml, 3)
            for code, name in sorted(label_set.labels.items())
            if code
        },
    }
    if "RC" in parts:
        info["resection_cavity"] = bool((labels == label_set.code("RC")).any())
    if "CC" in parts:
        info["cysts"] = int(ndi.label(labels == label_set.code("CC"))[1])
    if tumour is not None:
        info["centre_mni_mm"] = [round(float(v), 1) for v in tumour.centre_mni]
        info["core_radius_mm"] = round(tumour.r_core, 1)
        info["enhancement"] = tumour.pattern
        info["foci"] = 1 + len(tumour.foci) - tumour.satellites
        info["satellites"] = tumour.satellites
    info.update(acquisition.describe())
    return info


def synth_convention(layout: str, labels: str = "auto") -> str:
    """The convention of ``layout``'s ``seg`` files (``auto``: the layout's; nnunet/monai: brats2023)."""
    if labels not in (None, "", "auto"):
        get_convention(labels)  # ValueError naming the known ones
        return labels
    try:
        return _AUTO_CONVENTION[layout]
    except KeyError:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(SYNTH_LAYOUTS)}") from None


def _drawable(convention: LabelConvention) -> LabelSet:
    """The convention's label set, if the generator can draw its labels."""
    label_set = convention.label_set
    if label_set.name not in _PART_LABELS:
        raise ValueError(
            f"tumorseg synth cannot draw label set {label_set.name} (convention {convention.name}); "
            f"it draws {', '.join(_PART_LABELS)}"
        )
    return label_set


def check_layout_labels(layout: str, labels: str = "auto") -> str:
    """The convention of ``layout`` + ``labels``; ValueError when the generator cannot write the pair
    (unknown names, an undrawable label set, non-consecutive codes for nnU-Net)."""
    name = synth_convention(layout, labels)
    convention = get_convention(name)
    _drawable(convention)
    values = sorted(convention.allowed_values)
    if layout == "nnunet" and values != list(range(len(values))):
        raise ValueError(
            f"nnU-Net needs consecutive label values 0..N; {name} writes {values} "
            "(use brats2023: the same labels coded 1, 2, 3)"
        )
    return name


def labels_implied(layout: str, convention: str) -> bool:
    """Whether a reader finds ``convention`` from ``layout`` alone: BraTS 2021 and MSD by their own
    codes, BraTS 2023+ by the case-id prefix, nnU-Net and MONAI by their JSON's labels."""
    if layout in ("brats2021", "msd"):
        return convention == layout
    if layout == "brats2023":
        prefix = BRATS_PREFIXES.get(convention, "GLI").upper()
        return BRATS_PREFIX_CONVENTIONS.get(prefix) == convention
    return True


def _part_lut(label_set: LabelSet) -> np.ndarray:
    """Lookup table: generator part code -> internal code of ``label_set`` (0 for parts it lacks)."""
    lut = np.zeros(max(_PART_CODES.values()) + 1, dtype=np.uint8)
    for part, name in _PART_LABELS[label_set.name].items():
        lut[_PART_CODES[part]] = label_set.code(name)
    return lut


def _apply_mass_effect(mni: list[np.ndarray], tumour: _Tumour) -> None:
    """Push the anatomy from the tumour centre, in place: ``r -> r * (1 - a exp(-r^2 / 2 sigma^2))``,
    monotonic (no folding) for ``a <= 0.5``."""
    centre = tumour.centre_mni
    sigma = 1.2 * tumour.r_core
    d = [mni[k] - np.float32(centre[k]) for k in range(3)]
    r2 = d[0] ** 2 + d[1] ** 2 + d[2] ** 2
    factor = 1.0 - np.float32(tumour.mass_effect) * np.exp(-r2 / np.float32(2.0 * sigma * sigma))
    for k in range(3):
        mni[k] = np.float32(centre[k]) + d[k] * factor


def _grow_tumour(rng: _Rng, vrng: _Rng, idx: np.ndarray, anat: _Anatomy, tumour: _Tumour) -> np.ndarray:
    """Core (main mass and ``foci``), necrosis, enhancement, oedema (in this order): sets ``tumour``'s
    box, offset and fractions; returns the part labels in the box.

    Each label is the part that dominates the voxel centre's rendered mix: ``ET`` where the viable
    tumour enhances, ``NCR`` where it is necrotic or does not enhance, ``ED`` where the oedema's fading
    FLAIR/T2 signal is above the case's threshold.
    """
    sp = anat.sp
    tumour.box, tumour.offset = _tumour_box(idx, anat.tpl, tumour)
    box, rel = tumour.box, tumour.offset
    shape = tuple(sl.stop - sl.start for sl in box)
    brain_box = anat.brain[box]
    pv = np.float32(tumour.pv_mm)
    # Lobulated ellipsoid: distance in the tumour's frame, perturbed by noise (lobes ~ radius / 3).
    local = np.einsum("ij,jxyz->ixyz", tumour.rotation.T.astype(np.float32), rel)
    local /= tumour.axes.astype(np.float32)[:, None, None, None]
    dist = np.sqrt((local**2).sum(axis=0))
    lobe_sigma = np.maximum(0.3 * tumour.r_core / sp, 0.8)
    # tanh bounds the perturbation to +-lobulation: the core never reaches beyond its box.
    core_dist = dist * (1.0 + np.float32(tumour.lobulation) * np.tanh(_local_noise(rng, shape, lobe_sigma)))
    s_core = _sigmoid((np.float32(tumour.r_core) - core_dist) / pv) * brain_box
    core = _largest_component(s_core > 0.5)
    s_core *= ndi.binary_dilation(core, iterations=2)
    if tumour.foci:
        s_foci = _foci_fraction(rel, tumour) * brain_box
        s_core = np.maximum(s_core, s_foci)
        core |= s_foci > 0.5
    if tumour.necrosis_ratio > 0:
        s_nec = _necrosis(rng, local, core_dist, tumour, lobe_sigma)
    else:
        s_nec = np.zeros(shape, dtype=np.float32)
    ncr = core & (s_nec > 0.5)
    s_enh = _enhancement(vrng, core & ~ncr, sp, tumour)
    et = core & ~ncr & (s_enh > 0.5)
    ed, s_ed = _oedema(rng, core, anat, tumour)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[ed] = 2
    labels[core & ~et] = 1  # necrotic or non-enhancing: BraTS's "necrotic and non-enhancing core"
    labels[et] = 3
    viable = s_core * (1.0 - s_nec)
    tumour.fractions = {
        "ncr": s_core * s_nec,
        "net": viable * (1.0 - s_enh),
        "et": viable * s_enh,
        "ed": (1.0 - s_core) * s_ed,
    }
    if tumour.pv_mm > _HARD_EDGE_MM:
        _slice_profile(tumour.fractions, sp)
    return labels


def _foci_fraction(rel: np.ndarray, tumour: _Tumour) -> np.ndarray:
    """Soft union (maximum) of the round extra masses ``tumour.foci`` over the box, float32."""
    out = np.zeros(rel.shape[1:], dtype=np.float32)
    pv = np.float32(tumour.pv_mm)
    for offset, radius in tumour.foci:
        d = np.sqrt(sum((rel[k] - np.float32(offset[k])) ** 2 for k in range(3)))
        np.maximum(out, _sigmoid((np.float32(radius) - d) / pv), out=out)
    return out


def _enhancement(rng: _Rng, viable: np.ndarray, sp: np.ndarray, tumour: _Tumour) -> np.ndarray:
    """Where the tumour takes up contrast (soft, float32 over the box): a smooth random field cut at
    its ``enhancement_gap`` quantile over the ``viable`` core, so that share of it does not enhance, in
    patches of ``enhancement_scale_mm`` (a nodular tumour keeps its nodules however small it is)."""
    if tumour.enhancement_gap <= 0.0 or not viable.any():
        return np.ones(viable.shape, dtype=np.float32)
    if tumour.enhancement_gap >= 1.0:  # a non-enhancing tumour
        return np.zeros(viable.shape, dtype=np.float32)
    field_ = _local_noise(rng, viable.shape, np.maximum(tumour.enhancement_scale_mm / sp, 0.7))
    threshold = np.quantile(field_[viable], tumour.enhancement_gap)
    return _sigmoid((field_ - np.float32(threshold)) / np.float32(0.15))


def _slice_profile(fractions: _Maps, sp: np.ndarray) -> None:
    """Thick slices average the tumour's parts over the slice, as the template's maps were pre-filtered
    (:func:`_template`): Gaussian along z of FWHM ``sqrt(sz^2 - sx^2)`` mm, in place."""
    extra = float(sp[2] ** 2 - sp[0] ** 2)
    if extra <= 0.0:
        return
    sigma = math.sqrt(extra) / 2.355 / float(sp[2])
    for part, values in fractions.items():
        fractions[part] = ndi.gaussian_filter1d(values, sigma, axis=2, mode="nearest")


def _tumour_box(idx: np.ndarray, tpl: _Template, tumour: _Tumour) -> tuple[tuple[slice, ...], np.ndarray]:
    """The box the tumour and its oedema can reach, and its voxels' ``(3, x, y, z)`` template-mm
    offsets from the centre (the pull-back is smooth: template mm ~ output mm)."""
    centre_idx = (tumour.centre_mni - tpl.origin_mm) / tpl.spacing
    offset = [(idx[k] - np.float32(centre_idx[k])) * np.float32(tpl.spacing[k]) for k in range(3)]
    core_reach = tumour.r_core * float(tumour.axes.max()) / (1.0 - tumour.lobulation)
    foci_reach = max((float(np.linalg.norm(o)) + r + 2.0 for o, r in tumour.foci), default=0.0)
    oedema = tumour.oedema_reach * (1.0 + 3.0 * tumour.oedema_softness) / _ED_NOISE_FLOOR
    reach = max(core_reach, foci_reach) + oedema + 4.0
    near = (offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2) < reach**2
    nz = [np.nonzero(near.any(axis=tuple(a for a in range(3) if a != k)))[0] for k in range(3)]
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)
    return box, np.stack([o[box] for o in offset])


def _necrosis(
    rng: _Rng, local: np.ndarray, core_dist: np.ndarray, tumour: _Tumour, lobe_sigma: np.ndarray
) -> np.ndarray:
    """Soft necrosis: a noisier, off-centre inner region, so the rim around it varies in thickness."""
    shift = rng.uniform(-0.2, 0.2, 3).astype(np.float32) * np.float32(tumour.r_core)
    nec_dist = np.sqrt(((local - shift[:, None, None, None]) ** 2).sum(axis=0))
    nec_dist *= 1.0 + np.float32(0.25) * np.tanh(_local_noise(rng, core_dist.shape, lobe_sigma * 0.8))
    r_nec = np.float32(tumour.necrosis_ratio * tumour.r_core)
    pv = np.float32(tumour.pv_mm)
    s_nec = _sigmoid((r_nec - nec_dist) / pv)
    # Keep at least a thin viable rim: necrosis only well inside the core.
    s_nec *= _sigmoid((np.float32(tumour.r_core) - np.float32(1.5) - core_dist) / pv)
    return s_nec


def _oedema(rng: _Rng, core: np.ndarray, anat: _Anatomy, tumour: _Tumour) -> tuple[np.ndarray, np.ndarray]:
    """Oedema around ``core``: ``(mask, soft fraction)``. Distance over a speed high in WM (vasogenic
    oedema tracks fibres), plus noise: finger-like, not into CSF. The fraction fades over
    ``oedema_softness`` of the reach (infiltrative border); the label stops at ``oedema_threshold``."""
    box, sp = tumour.box, anat.sp
    speed = 0.12 + 0.88 * ndi.gaussian_filter(anat.tissue["wm"][box], np.maximum(1.5 / sp, 0.5))
    from_core = ndi.distance_transform_edt(~core, sampling=sp).astype(np.float32)
    ed_noise = _local_noise(rng, core.shape, np.maximum(5.0 / sp, 0.8))
    effective = from_core / speed * (1.0 + np.float32(1.0 - _ED_NOISE_FLOOR) * np.tanh(ed_noise))
    reach_ed = np.float32(tumour.oedema_reach)
    width = np.float32(tumour.oedema_softness) * reach_ed + np.float32(tumour.pv_mm)
    s_ed = _sigmoid((reach_ed - effective) / width)
    s_ed *= np.clip(1.0 - 1.5 * anat.tissue["csf"][box], 0.0, 1.0) * anat.brain[box]
    ed = (s_ed > tumour.oedema_threshold) & ~core
    components, _ = ndi.label(ed | core)
    touching = np.unique(components[core])
    ed &= np.isin(components, touching[touching > 0])
    return ed, s_ed


def _add_cavity(rng: _Rng, labels: np.ndarray, tumour: _Tumour, anat: _Anatomy) -> None:
    """Resect the tumour in place: an off-centre fluid cavity (``RC``) leaving a crescent of tumour."""
    sp = anat.sp
    r_core = float(tumour.r_core)
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    centre = (direction * rng.uniform(0.25, 0.6) * r_core).astype(np.float32)
    r_cav = np.float32(rng.uniform(0.7, 1.0) * r_core)
    rel = tumour.offset - centre[:, None, None, None]
    local = np.einsum("ij,jxyz->ixyz", tumour.rotation.T.astype(np.float32), rel)
    local /= tumour.axes.astype(np.float32)[:, None, None, None]
    dist = np.sqrt((local**2).sum(axis=0))
    dist *= 1.0 + np.float32(0.12) * np.tanh(_local_noise(rng, dist.shape, np.maximum(0.3 * r_cav / sp, 0.8)))
    s_rc = _sigmoid((r_cav - dist) / np.float32(0.7)) * anat.brain[tumour.box]
    cavity = _largest_component(s_rc > 0.5)
    if not cavity.any():
        return
    s_rc *= ndi.binary_dilation(cavity, iterations=2)
    labels[cavity] = _PART_CODES["RC"]
    fractions = tumour.fractions
    for part in _TUMOUR_PARTS:
        fractions[part] = fractions[part] * (1.0 - s_rc)
    fractions["rc"] = s_rc.astype(np.float32)


def _add_cysts(rng: _Rng, labels: np.ndarray, tumour: _Tumour, anat: _Anatomy) -> None:
    """Put 1-3 round cysts (``CC``) inside the tumour core, in place (replacing NCR and ET)."""
    core = (labels == _PART_CODES["NCR"]) | (labels == _PART_CODES["ET"])
    if not core.any():
        return
    sp, offset = anat.sp, tumour.offset
    depth = ndi.distance_transform_edt(core, sampling=sp)
    s_cc = np.zeros(core.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        radius = max(float(rng.uniform(0.25, 0.5)) * float(tumour.r_core), 1.25 * float(sp.max()))
        candidates = np.argwhere(depth >= min(0.6 * radius, 0.8 * float(depth.max())))
        at = tuple(candidates[int(rng.integers(len(candidates)))])
        centre = offset[(slice(None), *at)]
        dist = np.sqrt(((offset - centre[:, None, None, None]) ** 2).sum(axis=0))
        s_cc = np.maximum(s_cc, _sigmoid((np.float32(radius) - dist) / np.float32(0.7)))
    cysts = (s_cc > 0.5) & core
    if not cysts.any():
        return
    labels[cysts] = _PART_CODES["CC"]
    fractions = tumour.fractions
    fractions["cc"] = (s_cc * (fractions["ncr"] + fractions["net"] + fractions["et"])).astype(np.float32)
    for part in ("ncr", "net", "et"):
        fractions[part] = fractions[part] * (1.0 - s_cc)


def _render(
    rng: _Rng,
    vrng: _Rng,
    fluid_rng: _Rng | None,
    anat: _Anatomy,
    tumour: _Tumour | None,
    cfg: SynthConfig,
    acquisition: _Acquisition,
) -> _Maps:
    """Four skull-stripped sequences: modality -> float32 ``(x, y, z)``, scanner units.

    ``rng``: tissue and tumour texture, then per sequence bias, noise and scale; ``vrng``: the case's
    contrast table; fluids draw from ``fluid_rng``, so ``rng`` is consumed as without them. Each
    sequence is acquired (:class:`_Acquisition`) before bias and noise, as a scanner does.
    """
    shape = anat.brain.shape
    # Everything below runs on the brain voxels only (flat C-order indices), ~1/5 of the box.
    flat = np.flatnonzero(anat.brain)
    voxels = {t: anat.tissue[t].ravel()[flat] for t in TISSUES}
    texture_v = _tissue_texture(rng, shape, flat)
    mix = None if tumour is None else _TumourMix.of(rng, fluid_rng, anat, tumour, flat)
    table = _contrast_table(vrng, cfg.contrast_jitter, cfg.net_contrast_min)
    fluids = [] if mix is None else mix.fluids
    fluid_jitter = (
        {m: fluid_rng.uniform(0.97, 1.03, len(fluids)) for m in CANONICAL_MODALITIES} if fluids else {}
    )
    images: dict[str, np.ndarray] = {}
    for m in CANONICAL_MODALITIES:
        c = table[m]
        values = (c["gm"] * voxels["gm"] + c["wm"] * voxels["wm"] + c["csf"] * voxels["csf"]) * texture_v
        if mix is not None:
            mix.apply(values, c, m, fluid_jitter.get(m, ()))
        values = acquisition.apply(m, values, anat, flat)
        out = np.zeros(shape, dtype=np.float32)
        out.ravel()[flat] = _scanner(rng, values, m, cfg, anat, flat, acquisition.noise_factor)
        images[m] = out
    return images


def _contrast_table(rng: _Rng, jitter: float, net_min: float = 1.0) -> dict[str, dict[str, np.float32]]:
    """The case's contrasts, ratios to WM (the reference) around :data:`_CONTRAST`.

    Tissues: ``exp(U(-j, j))`` each. Tumour parts: one factor per sequence shared by all parts,
    ``exp(U(-2j, 2j))`` (whole tumours vary more between patients than tissues between brains, so
    tumour and normal tissue overlap in some cases), times each part's own ``exp(U(-j/2, j/2))``.
    The orderings between parts that a reader uses to tell them apart are then kept
    (:func:`_keep_part_order`): MRI contrasts shift between scanners, they do not swap, and a label
    is only learnable where what it marks looks different.

    Non-enhancing tumour then keeps a share ``u`` of its (log) contrast to oedema, one ``u`` per case
    drawn in ``[net_min, 1]``: infiltrative tumour can look almost like oedema on every sequence, a
    difference of a few per cent that a reader (and a model) must still see.
    """
    u = net_min + (1.0 - net_min) * rng.uniform()
    table = {}
    for m in CANONICAL_MODALITIES:
        names = list(_CONTRAST[m])
        part = np.array([k in _TUMOUR_PARTS for k in names])
        spread = np.where(part, 0.5 * jitter, jitter) * np.array([k != "wm" for k in names])
        own = rng.uniform(-1.0, 1.0, len(names)) * spread
        shared = rng.uniform(-1.0, 1.0) * 2.0 * jitter
        factors = np.exp(own + np.where(part, shared, 0.0))
        levels = _keep_part_order(
            m, {k: float(_CONTRAST[m][k] * f) for k, f in zip(names, factors, strict=True)}
        )
        levels["net"] = levels["ed"] * (levels["net"] / levels["ed"]) ** u
        table[m] = {k: np.float32(v) for k, v in levels.items()}
    return table


_ORDER_MIN_GAP = 0.15
"""Parts whose :data:`_CONTRAST` levels differ by at least this log ratio keep their order."""


def _keep_part_order(modality: str, levels: dict[str, float]) -> dict[str, float]:
    """``levels`` with every pair of tumour parts whose base levels differ by a log ratio of at least
    :data:`_ORDER_MIN_GAP` kept in order with at least half that gap (the brighter part is raised)."""
    base = _CONTRAST[modality]
    out = dict(levels)
    parts = sorted(_TUMOUR_PARTS, key=lambda k: base[k])
    for i, hi in enumerate(parts):
        for lo in parts[:i]:
            gap = float(np.log(base[hi] / base[lo]))
            if gap >= _ORDER_MIN_GAP:
                out[hi] = max(out[hi], out[lo] * float(np.exp(0.5 * gap)))
    return out


def _tissue_texture(rng: _Rng, shape: tuple[int, ...], flat: np.ndarray) -> np.ndarray:
    """~3 % smooth tissue texture shared by all sequences, as a factor on the brain voxels ``flat``."""
    coarse = tuple(max(4, n // 4) for n in shape)
    texture = ndi.zoom(_local_noise(rng, coarse, 1.0), np.asarray(shape) / np.asarray(coarse), order=1)
    texture = np.pad(
        texture[: shape[0], : shape[1], : shape[2]],
        [(0, max(0, n - t)) for n, t in zip(shape, texture.shape, strict=True)],
        mode="edge",
    )
    return 1.0 + np.float32(0.03) * texture.ravel()[flat]


@dataclass
class _TumourMix:
    """Tumour parts replacing tissue at ``pos`` (the box's brain voxels in the flat brain vector):
    part -> fraction ``f`` and texture ``noise``; ``rest`` is the healthy share."""

    pos: np.ndarray
    f: dict[str, np.ndarray]
    noise: dict[str, np.ndarray]
    rest: np.ndarray
    fluids: list[str]
    enhancement_spread: np.float32

    @classmethod
    def of(
        cls, rng: _Rng, fluid_rng: _Rng | None, anat: _Anatomy, tumour: _Tumour, flat: np.ndarray
    ) -> _TumourMix:
        in_box = np.zeros(anat.brain.shape, dtype=bool)
        in_box[tumour.box] = True
        # C order inside the box matches C order in the region, so boolean selection lines them up.
        pos = np.flatnonzero(in_box.ravel()[flat])
        sel = anat.brain[tumour.box]
        f = {k: v[sel] for k, v in tumour.fractions.items()}
        sp_vox = np.maximum(2.0 / anat.sp, 0.7)
        noise = {k: _local_noise(rng, sel.shape, sp_vox)[sel] for k in _TUMOUR_PARTS}
        rest = 1.0 - sum(f[k] for k in _TUMOUR_PARTS)
        fluids = [k for k in _FLUID_PARTS if k in tumour.fractions]
        for k in fluids:
            assert fluid_rng is not None
            rest = rest - f[k]
            noise[k] = _local_noise(fluid_rng, sel.shape, sp_vox)[sel]
        spread = np.float32(tumour.enhancement_spread)
        return cls(pos=pos, f=f, noise=noise, rest=rest, fluids=fluids, enhancement_spread=spread)

    def apply(
        self, values: np.ndarray, c: dict[str, np.float32], modality: str, fluid_jitter: Sequence[float]
    ) -> None:
        f, noise = self.f, self.noise
        healthy = values[self.pos]
        level = {
            "ed": c["ed"] * (1.0 + np.float32(0.06) * noise["ed"]),
            "ncr": c["ncr"] * (1.0 + np.float32(0.10) * noise["ncr"]),
            "net": c["net"] * (1.0 + np.float32(0.08) * noise["net"]),
            # tanh keeps heterogeneous enhancement above (1 - spread) of the case's level
            "et": c["et"] * (1.0 + self.enhancement_spread * np.tanh(noise["et"])),
        }
        values[self.pos] = healthy * self.rest + sum(level[k] * f[k] for k in _TUMOUR_PARTS)
        for k, j in zip(self.fluids, fluid_jitter, strict=True):
            level_k = np.float32(_CONTRAST_FLUID[modality][k] * j) * (1.0 + np.float32(0.04) * noise[k])
            values[self.pos] += level_k * f[k]


@dataclass(frozen=True)
class _Acquisition:
    """How each sequence of a case departs from an ideal acquisition, drawn per case.

    ``blur``: modality -> Gaussian sigma per axis in voxels (acquired coarser, in-plane or across
    slices only, and resampled to the grid); ``ghost``: modality -> (phase-encode axis, shift in voxels,
    amplitude), a faint copy of the head shifted along the phase-encode axis and wrapped around the
    field of view; ``motion``: modality -> (shift in voxels, phase-encode axis, k-space lines acquired
    after the head moved), which rings and ghosts along that axis. Skull stripping keeps their part
    inside the brain. ``noise_factor`` scales ``noise_level`` for the whole case (scanners and
    protocols differ in SNR).
    """

    noise_factor: float = 1.0
    blur: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    ghost: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    motion: dict[str, tuple[np.ndarray, int, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def draw(cls, rng: _Rng, flags: _CaseFlags, anat: _Anatomy, noise_jitter: float) -> _Acquisition:
        """A case's acquisition: noise factor ``exp(U(-j, j))`` first (so the flags do not move it),
        then ``low_resolution`` and ``artefact`` cases pick some sequences each."""
        acq = cls(noise_factor=math.exp(rng.uniform(-noise_jitter, noise_jitter)))
        if flags.low_resolution:
            for m in _some_sequences(rng):
                factor, across = float(rng.uniform(1.3, 2.0)), bool(rng.random() < 0.5)
                sigma = math.sqrt(factor**2 - 1.0) / 2.355  # FWHM factor x voxel, in voxels
                acq.blur[m] = (0.0, 0.0, sigma) if across else (sigma, sigma, sigma)
        if flags.artefact:
            crop = anat.brain.shape
            for m in _some_sequences(rng):
                kind, axis = int(rng.integers(3)), int(rng.integers(2))  # 0 ghost, 1 motion, 2 both
                if kind != 1:
                    fold = int(rng.choice([2, 3, 4]))
                    acq.ghost[m] = (axis, anat.grid_shape[axis] // fold, float(rng.uniform(0.04, 0.12)))
                if kind != 0:
                    direction = rng.standard_normal(3)
                    shift_mm = direction / np.linalg.norm(direction) * rng.uniform(1.5, 4.0)
                    moved = np.flatnonzero(rng.random(crop[axis]) < rng.uniform(0.1, 0.35))
                    acq.motion[m] = (shift_mm / anat.sp, axis, moved)
        return acq

    def apply(self, modality: str, values: np.ndarray, anat: _Anatomy, flat: np.ndarray) -> np.ndarray:
        """The sequence's brain-voxel signal ``values`` (flat, float32) as this acquisition gives it."""
        if modality not in self.blur and modality not in self.ghost and modality not in self.motion:
            return values
        volume = np.zeros(anat.brain.shape, dtype=np.float32)
        volume.ravel()[flat] = values
        if modality in self.blur:
            volume = ndi.gaussian_filter(volume, self.blur[modality], mode="constant")
        if modality in self.motion:
            volume = _moved_lines(volume, *self.motion[modality])
        if modality in self.ghost:
            axis, shift, amplitude = self.ghost[modality]
            full = _uncrop(volume, anat.grid_shape, anat.region)
            full += np.float32(amplitude) * np.roll(full, shift, axis=axis)
            volume = full[anat.region]
        return volume.ravel()[flat]

    def describe(self) -> dict[str, Any]:
        """The ``synth_meta.json`` facts: sequences acquired coarser, and each sequence's artefacts."""
        artefacts = {
            m: [kind for kind, table in (("ghost", self.ghost), ("motion", self.motion)) if m in table]
            for m in CANONICAL_MODALITIES
        }
        return {
            "noise_factor": round(self.noise_factor, 3),
            "low_resolution": [m for m in CANONICAL_MODALITIES if m in self.blur],
            "artefacts": {m: kinds for m, kinds in artefacts.items() if kinds},
        }


def _some_sequences(rng: _Rng) -> list[str]:
    """Each sequence with probability 1/2, at least one."""
    picked = rng.random(len(CANONICAL_MODALITIES)) < 0.5
    if not picked.any():
        picked[int(rng.integers(len(CANONICAL_MODALITIES)))] = True
    return [m for m, p in zip(CANONICAL_MODALITIES, picked, strict=True) if p]


def _moved_lines(volume: np.ndarray, shift_vox: np.ndarray, axis: int, lines: np.ndarray) -> np.ndarray:
    """Magnitude image when k-space ``lines`` (indices along phase-encode ``axis``) were acquired with
    the head shifted by ``shift_vox``: a phase ramp on those lines (Fourier shift theorem)."""
    from scipy import fft

    if not len(lines):
        return volume
    kspace = fft.fftn(volume, workers=1)
    freqs = [np.fft.fftfreq(n).astype(np.float32) for n in volume.shape]
    freqs[axis] = freqs[axis][lines]
    phase = sum(
        np.float32(shift_vox[k]) * freqs[k].reshape([-1 if a == k else 1 for a in range(3)]) for k in range(3)
    )
    index: list[Any] = [slice(None)] * 3
    index[axis] = lines
    kspace[tuple(index)] *= np.exp(np.complex64(-2j * np.pi) * phase)
    return np.abs(fft.ifftn(kspace, workers=1)).astype(np.float32)


def _scanner(
    rng: _Rng,
    values: np.ndarray,
    modality: str,
    cfg: SynthConfig,
    anat: _Anatomy,
    flat: np.ndarray,
    noise_factor: float = 1.0,
) -> np.ndarray:
    """One sequence through the scanner: bias (in place on ``values``), Rician noise, scale, offset."""
    bias = smooth_random_field(rng, anat.grid_shape, (3, 3, 3), anat.region).ravel()[flat]
    values *= np.exp(np.float32(cfg.bias_field_strength) * bias)
    sigma = np.float32(cfg.noise_level * noise_factor * rng.uniform(0.8, 1.2))
    if sigma > 0:
        values = rician_noise(rng, values, sigma)
    scale = np.float32(_BASE_SCALE[modality] * math.exp(rng.uniform(-0.4, 0.4)))
    offset = np.float32(rng.uniform(0.0, 0.06))
    return (values + offset) * scale


def case_id(layout: str, index: int, labels: str = "auto") -> str:
    """Case id as the real dataset spells it (``BraTS2021_00001``, ``BraTS-MEN-00001-000``, ``BRATS_001``;
    nnunet/monai: as the convention's own dataset)."""
    if layout not in SYNTH_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {sorted(SYNTH_LAYOUTS)}")
    convention = synth_convention(layout, labels)
    family = layout if layout in _NATIVE_LAYOUTS else convention  # others: the convention's own names
    if family == "brats2021":
        return f"BraTS2021_{index:05d}"
    if family == "msd":
        return f"BRATS_{index:03d}"
    return f"BraTS-{BRATS_PREFIXES.get(convention, 'GLI')}-{index:05d}-000"


def _folder_suffixes(layout: str, convention: str) -> tuple[dict[str, str], str]:
    """Case-folder file suffixes; ``monai`` takes BraTS 2021 names for brats2021, else 2023 ones."""
    if layout == "monai":
        layout = "brats2021" if convention == "brats2021" else "brats2023"
    return LAYOUTS[layout].modality_suffixes, LAYOUTS[layout].seg_suffix


def _quantise(volume: np.ndarray) -> np.ndarray:
    """Round scanner-unit intensities to int16, as BraTS distributes its images."""
    return np.clip(np.rint(volume), 0, _QUANTISE_MAX).astype(np.int16)


def _nifti(data: np.ndarray, affine: np.ndarray, orientation: str) -> Any:
    """A NIfTI-1 image of RAS-ordered ``data`` stored in ``orientation`` (affine adjusted)."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    if orientation != "RAS":
        transform = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(orientation))
        )
        img = img.as_reoriented(transform)
        img = nib.Nifti1Image(np.ascontiguousarray(img.dataobj), img.affine)
    img.header.set_qform(img.affine, code=1)
    img.header.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return img


def write_case(
    case: SyntheticCase,
    out_dir: str | Path,
    layout: str,
    index: int | None = None,
    orientation: str | None = None,
    labels: str = "auto",
) -> Path:
    """Write one case in ``layout`` under ``out_dir`` atomically; return its folder or (msd, nnunet)
    its first image. ``labels``: the ``seg`` convention (``auto``: the layout's when it has the case's
    label set, else the case's); ValueError for another label set or a pair the layout cannot hold.
    """
    if layout not in SYNTH_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {sorted(SYNTH_LAYOUTS)}")
    import nibabel as nib

    out_dir = Path(out_dir)
    index = case.index if index is None else index
    orientation = orientation or case.orientation
    if labels in (None, "", "auto"):
        native = synth_convention(layout)
        same_set = get_convention(native).label_set.name == case.label_set.name
        labels = native if same_set else case.convention
    convention = get_convention(check_layout_labels(layout, labels))
    if convention.label_set.name != case.label_set.name:
        raise ValueError(
            f"case {case.index} has {case.label_set.name} labels; {convention.name} codes "
            f"{convention.label_set.name} (generate it with synth.labels: {convention.name})"
        )
    cid = case_id(layout, index, convention.name)
    seg = _nifti(convention.decode(case.labels).astype(np.uint8), case.affine, orientation)
    if layout == "msd":
        stacked = np.stack([_quantise(case.images[m]) for m in MSD_CHANNEL_ORDER], axis=-1)
        images = {f"{cid}.nii.gz": _nifti(stacked, case.affine, orientation)}
    else:
        images = {
            m: _nifti(_quantise(case.images[m]), case.affine, orientation) for m in CANONICAL_MODALITIES
        }
    if layout == "nnunet":
        images = {f"{cid}_{channel:04d}.nii.gz": images[m] for channel, m in enumerate(CANONICAL_MODALITIES)}
    if layout in ("msd", "nnunet"):
        root = out_dir if layout == "msd" else out_dir / NNUNET_DATASET
        # Label first: a case is listed by its image, which then only appears complete.
        _publish_files(root / "labelsTr", {f"{cid}.nii.gz": seg}, nib)
        _publish_files(root / "imagesTr", images, nib)
        return root / "imagesTr" / next(iter(images))
    suffixes, seg_suffix = _folder_suffixes(layout, convention.name)
    named = {f"{cid}{suffixes[m]}.nii.gz": image for m, image in images.items()}
    named[f"{cid}{seg_suffix}.nii.gz"] = seg
    _publish_files(out_dir / cid, named, nib, whole_folder=True)
    return out_dir / cid


def _publish_files(target_dir: Path, images: dict[str, Any], nib: Any, whole_folder: bool = False) -> None:
    """Save ``name -> image`` into ``target_dir`` through a temporary folder: renamed as a whole
    (``whole_folder``, no ``target_dir`` yet), else file by file, skipping identical files."""
    parent = target_dir.parent if whole_folder else target_dir
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.", suffix=".tmp", dir=parent))
    try:
        for name, img in images.items():
            nib.save(img, tmp / name)  # final basename: the gzip header is identical after rename
        if whole_folder and not target_dir.exists():
            os.chmod(tmp, file_mode(0o777))  # mkdtemp makes it private; a dataset is shared
            write_point(target_dir)
            os.rename(tmp, target_dir)
            return
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in images:
            src, dst = tmp / name, target_dir / name
            if dst.is_file() and _same_bytes(src, dst):
                continue
            write_point(dst)
            os.replace(src, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_mode(requested: int) -> int:
    """``requested`` permission bits less the process umask (what ``open``/``mkdir`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return requested & ~umask


def write_json(path: Path, payload: dict[str, Any], indent: int = 2) -> None:
    """Atomic JSON write (umask permissions, not the temp file's private ones)."""
    atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()


def _write_msd_dataset_json(out: Path, convention: str = "msd") -> None:
    """MSD Task01 ``dataset.json`` listing every complete image/label pair; ``labels`` in ``convention``."""
    images = sorted(p.name for p in (out / "imagesTr").glob("BRATS_*.nii.gz"))
    pairs = [n for n in images if (out / "labelsTr" / n).is_file()]
    labels = dict(MSD_LABEL_NAMES) if convention == "msd" else {"0": "background", **_code_names(convention)}
    meta = {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images "
        "(synthetic, generated by tumorseg synth from the MNI152 template)",
        "reference": "tumorseg synth: MNI152 ICBM 2009a template (nilearn) with simulated gliomas",
        "licence": "synthetic; derived from the MNI ICBM152 template (see its copyright notice)",
        "release": "tumorseg synth",
        "tensorImageSize": "4D",
        "modality": dict(MSD_MODALITY_NAMES),
        "labels": labels,
        "numTraining": len(pairs),
        "numTest": 0,
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in pairs],
        "test": [],
    }
    if convention != "msd":
        meta["label_convention"] = convention
    write_json(out / "dataset.json", meta)


def _code_names(convention: str) -> dict[str, str]:
    """``{"1": "NCR", "2": "ED", ...}``: the convention's tumour codes, ascending."""
    codes = get_convention(convention).source_codes()
    return {str(code): name for name, code in sorted(codes.items(), key=lambda item: item[1])}


def _description(convention: str) -> str:
    conv = get_convention(convention)
    return (
        f"synthetic brain MRI ({conv.title} labels: "
        + ", ".join(f"{code} {name}" for code, name in _code_names(convention).items())
        + "), generated by tumorseg synth from the MNI152 template"
    )


def nnunet_dataset_json(case_ids: Sequence[str], convention: str) -> dict[str, Any]:
    """nnU-Net v2 ``dataset.json`` of the ``nnunet`` layout: plain labels in the convention's codes."""
    return {
        "channel_names": dict(NNUNET_CHANNEL_NAMES),
        "labels": {"background": 0, **{name: int(code) for code, name in _code_names(convention).items()}},
        "numTraining": len(case_ids),
        "file_ending": ".nii.gz",
        "name": NNUNET_DATASET.split("_", 1)[1],
        "description": _description(convention),
        "reference": "tumorseg synth: MNI152 ICBM 2009a template (nilearn) with simulated tumours",
        "licence": "synthetic; derived from the MNI ICBM152 template (see its copyright notice)",
        "release": "tumorseg synth",
        "label_convention": convention,
    }


def monai_datalist(case_ids: Sequence[str], convention: str) -> dict[str, Any]:
    """MONAI datalist of the ``monai`` layout (paths relative to the JSON, folds round-robin)."""
    suffixes, seg_suffix = _folder_suffixes("monai", convention)
    training = [
        {
            "case_id": cid,
            "image": [f"{cid}/{cid}{suffixes[m]}.nii.gz" for m in CANONICAL_MODALITIES],
            "label": f"{cid}/{cid}{seg_suffix}.nii.gz",
            "fold": k % MONAI_FOLDS,
        }
        for k, cid in enumerate(case_ids)
    ]
    return {
        "name": "tumorseg synth",
        "description": _description(convention),
        "channel_names": dict(NNUNET_CHANNEL_NAMES),
        "label_convention": convention,
        "labels": _code_names(convention),
        "numTraining": len(training),
        "training": training,
        "testing": [],
    }


def _write_one(index: int, *, out: Path, cfg: SynthConfig, convention: str) -> tuple[str, dict[str, Any]]:
    """Generate and write case ``index`` in a worker process; its id and facts."""
    case = synthesize_case(index, cfg)
    write_case(case, out, cfg.layout, index, labels=convention)
    cid = case_id(cfg.layout, index, convention)
    return cid, {"case_id": cid, "tumour_free": case.tumour_free, **case.info}


def synthesize_dataset(out: str | Path, cfg: SynthConfig, *, workers: int = 2) -> list[str]:
    """The ``synth`` stage: ``cfg.cases`` cases in ``cfg.layout`` under ``out``; the ids, in order.

    Each case is written atomically, other files are left alone; ``synth_meta.json`` holds params and
    per-case facts, msd/nnunet get a ``dataset.json``, monai a ``datalist.json``. ``workers`` (0: one
    per core) does not change the output. ConfigError for bad values (CLI overrides are re-checked),
    DataError when ``out`` is not a writable folder.
    """
    cfg = _revalidate(cfg)
    convention = synth_convention(cfg.layout, cfg.labels)
    if not labels_implied(cfg.layout, convention):
        log.warning(
            "synth: %s cases in %s codes: a reader takes them for %s codes unless told; "
            "set ingest.labels: %s (or --labels %s) to read them",
            cfg.layout, convention, "the layout's own" if cfg.layout != "brats2023" else "their prefix's",
            convention, convention,
        )  # fmt: skip
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pass another --out")
    written: list[str] = []
    cases_meta: list[dict[str, Any]] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        work = functools.partial(_write_one, out=out, cfg=cfg, convention=convention)
        for cid, meta in map_cases(work, range(1, cfg.cases + 1), workers=workers, what="synth"):
            written.append(cid)
            cases_meta.append(meta)
            log.debug("synth: wrote %s", cid)
        if cfg.layout == "msd":
            _write_msd_dataset_json(out, convention)
        elif cfg.layout == "nnunet":
            write_json(out / NNUNET_DATASET / "dataset.json", nnunet_dataset_json(written, convention))
        elif cfg.layout == "monai":
            write_json(out / MONAI_DATALIST, monai_datalist(written, convention))
        params = cfg.model_dump()
        native = cfg.labels == "auto" and cfg.layout in _NATIVE_LAYOUTS
        if native:  # the layout names the convention
            params.pop("labels", None)
        meta = {
            "generator": "tumorseg synth",
            "template": "MNI152 ICBM 2009a nonlinear symmetric (nilearn)",
            "params": params,
        }
        if not native:
            meta["label_convention"] = convention
            meta["label_set"] = get_convention(convention).label_set.name
        meta["cases"] = cases_meta
        write_json(out / SYNTH_META_NAME, meta)
    except OSError as exc:
        where = exc.filename or out
        raise DataError(f"{where}: cannot write ({exc.strerror}); choose a writable --out") from None
    log.info("synth: %d %s cases (%s labels) in %s", len(written), cfg.layout, convention, out)
    return written


def _revalidate(cfg: SynthConfig) -> SynthConfig:
    """Validate again: ``model_copy(update=...)`` (how the CLI applies options) skips validation."""
    from pydantic import ValidationError

    try:
        cfg = SynthConfig.model_validate(cfg.model_dump())
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in ("synth", *err["loc"]))
        raise ConfigError(f"{key}: {err['msg']}") from None
    try:
        check_layout_labels(cfg.layout, cfg.labels)
    except ValueError as exc:
        raise ConfigError(f"synth.labels: {exc} (layout {cfg.layout})") from None
    return cfg
