"""Synthetic multi-modal brain MRI with gliomas: the embedded default dataset (``tumorseg synth``).

Why synthetic data built on a real template: the pipeline has to run end to end on a laptop
without a data-use agreement, yet every stage (ingest, validation, preprocessing, training)
must meet the same difficulties as on BraTS: real cortical folding and ventricles, four
co-registered sequences with their true tissue contrasts, irregular tumours with three
sub-regions, scanner bias and noise, odd orientations and voxel sizes.

How a case is made:

1. **Anatomy.** nilearn ships the MNI152 (ICBM 2009a) T1 template, its grey- and white-matter
   probability maps and a brain mask. CSF (ventricles and sulci) is derived as brain mask minus
   GM minus WM plus the low-T1 voxels of the template. The three maps are resampled once per
   voxel spacing (cached), then each case pulls them through its own small affine (scale,
   rotation, shift) and a random low-frequency deformation, so no two brains are alike.
2. **Glioma.** A centre is drawn in cerebral white matter. The tumour core is a lobulated,
   randomly rotated ellipsoid (noise-perturbed distance field) that pushes the surrounding
   anatomy outwards (mass effect); a noisy inner region is necrotic (NCR), the rest of the core
   is the enhancing rim (ET); a share of tumours has no necrosis (solid enhancing). Peritumoural
   oedema (ED) spreads along white matter: its distance from the core is divided by a speed that
   is high in WM and low in GM, is perturbed by noise, never enters CSF, and only components
   connected to the core are kept. A share of cases is tumour-free.
3. **Contrast.** Each sequence is a mixture of per-tissue intensities (relative to white matter)
   following the real sequences: T1 WM > GM > CSF; T1ce as T1 with a bright enhancing rim and a
   dark necrotic core; T2 CSF > GM > WM with bright oedema and necrosis; FLAIR with CSF
   suppressed, GM slightly above WM and bright oedema. Tissue texture and tumour heterogeneity
   are smooth multiplicative noise; partial volume comes from soft (sigmoid) region boundaries.
4. **Scanner.** Per sequence: a smooth multiplicative bias field, Rician noise (magnitude of a
   complex Gaussian), an intensity scale and offset; skull-stripped (background exactly 0).
   Optionally a thick-slice axis and storage in LPS/LAS with the affine to match. Files hold
   int16 scanner units (as BraTS distributes them) and uint8 labels in the layout's convention.

Geometry follows BraTS: a 240 x 240 x 155 mm field of view, ``round(240/s) x round(240/s) x
round(155/s)`` voxels at spacing ``s`` (exactly 240 x 240 x 155 at 1 mm), world box placed as in
BraTS (voxel centres x -239..0, y 0..239, z 0..154 mm at 1 mm). Output is deterministic: case
``k`` depends only on ``(seed, k)``, not on how many cases are written.

Label conventions (``synth.labels``)
------------------------------------
The ``seg`` files are written in one convention of :file:`label_sets.yaml` (``auto``: the layout's
own, ``brats2021`` / ``brats2023`` / ``msd``; ``nnunet`` and ``monai`` write ``brats2023`` codes).
A case's arrays hold the internal codes of the convention's label set:

- **glioma** conventions (brats2021, brats2023, brats2023-ssa/-men/-met/-ped/-goat, msd): the
  tumours above, only the codes (and for BraTS 2023+ names the case-id prefix) change.
- **brats2024-gli** (post-treatment, label set glioma_post): necrosis is NETC, oedema SNFH, and
  :data:`RESECTION_FRACTION` of the cases (chosen like the tumour-free ones, from ``(seed, k)``)
  have a **resection cavity** (RC): a fluid-filled, lobulated cavity off the tumour centre that
  replaces most of the core and reaches beyond it, leaving residual ET/NETC on one side and SNFH
  around. Free-water contrast: dark on T1 and T1ce (no enhancing rim), bright on T2, suppressed on
  FLAIR, so it is distinct from NETC (FLAIR-bright) and from the tumour. RC never overlaps a
  tumour label.
- **brats2024-ped** (label set pediatric): necrosis is NETC, and :data:`CYST_FRACTION` of the
  cases have 1-3 round **cysts** (CC) inside the tumour core: dark on T1, not enhancing, very
  bright on T2, intermediate on FLAIR (proteinaceous fluid: brighter than CSF, darker than NETC).

A cavity or cysts draw from their own random stream: the rest of the case (anatomy, tumour, bias
and noise) is the same as without them. ``synth_meta.json`` records per case the tumour type,
``tumour_free``, ``necrosis`` (NCR/NETC present), the volume of every label of the set and, for
these two conventions, ``resection_cavity`` / ``cysts``; ``label_convention`` and ``label_set``
are recorded at the top, except for brats2021/brats2023/msd with ``labels: auto`` (their layout
names the convention), whose output is byte-identical to what tumorseg wrote before conventions
existed. One time point per patient (``-000``) is written.

Layouts and case ids
--------------------
- ``brats2021``: ``BraTS2021_00001/BraTS2021_00001_{t1,t1ce,t2,flair,seg}.nii.gz``.
- ``brats2023``: ``BraTS-GLI-00001-000/BraTS-GLI-00001-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``; the
  prefix follows the convention (:data:`BRATS_PREFIXES`: MEN, MET, SSA, GoAT, PED, GLI).
- ``msd``: ``imagesTr/BRATS_001.nii.gz`` (4-D: FLAIR, T1, T1ce, T2), ``labelsTr/``, ``dataset.json``.
- ``nnunet``: :data:`NNUNET_DATASET` ``/imagesTr/<case>_0000..0003.nii.gz`` (T1, T1ce, T2, FLAIR as
  ``channel_names`` says), ``labelsTr/<case>.nii.gz`` and ``dataset.json`` with plain ``labels``
  named by the convention (``{"background": 0, "NCR": 1, "ED": 2, "ET": 3}``: the convention's own
  codes, which nnU-Net needs consecutive, so brats2021's 0/1/2/4 is refused) and, outside
  nnU-Net's keys, ``label_convention``.
- ``monai``: BraTS 2023-style case folders (``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``; BraTS
  2021 names for the brats2021 convention) and ``datalist.json``: ``training`` entries
  ``{"case_id", "image": [t1, t1ce, t2, flair], "label", "fold"}`` (paths relative to the JSON, 5
  folds round-robin), ``testing`` (empty), ``channel_names``, ``labels`` (code -> name) and
  ``label_convention``.

nnU-Net and MONAI case ids are the convention's own ids (``BraTS-PED-00001-000``, ``BRATS_001``),
as a dataset converted from that challenge would have them: the prefix tells a reader the
sub-challenge, which the label names alone cannot (MEN and GLI code the same labels).

Any layout takes any convention (except brats2021's non-consecutive codes in nnU-Net), but only
where :func:`labels_implied` holds does a reader find the convention by itself: BraTS 2021 and MSD
folders are read in their own codes, BraTS 2023+ folders by prefix (PED and GLI 2024 must be
named). Otherwise ``synthesize_dataset`` logs that ``ingest.labels`` must name the convention.
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

log = logging.getLogger(__name__)

BRATS_FOV_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
"""Field of view of a BraTS volume (240 x 240 x 155 voxels of 1 mm)."""

BRATS_WORLD_CENTRE_MM: tuple[float, float, float] = (-119.5, 119.5, 77.0)
"""RAS world position of the centre of the BraTS box (LPS-stored, voxel 0 at x=0, y=239, z=0)."""

MNI_BOX_CENTRE_MM: tuple[float, float, float] = (0.0, -17.0, 14.0)
"""MNI point placed at the box centre: the brain's centre in x/y; in z the 155 mm box keeps about
9 mm above the vertex and cuts the lowest brainstem, as BraTS volumes do."""

SYNTH_META_NAME = "synth_meta.json"
TUMOUR_TYPE = "glioma"
ORIENTATIONS_REORIENTED: tuple[str, ...] = ("LPS", "LAS")
"""Storage orientations of re-oriented cases (LPS is how BraTS itself stores its volumes)."""

TISSUES: tuple[str, ...] = ("gm", "wm", "csf")

# Mean intensity of each tissue / tumour sub-region per sequence, relative to white matter (= 1).
# Values follow the usual appearance of gliomas on clinical 1.5/3 T protocols (BraTS-like):
# T1 WM > GM > CSF; T2 CSF > GM > WM; FLAIR suppresses free water (CSF dark) but not oedema.
_CONTRAST: dict[str, dict[str, float]] = {
    "t1": {"gm": 0.70, "wm": 1.0, "csf": 0.28, "ncr": 0.38, "et": 0.62, "ed": 0.66},
    "t1ce": {"gm": 0.73, "wm": 1.0, "csf": 0.30, "ncr": 0.36, "et": 1.75, "ed": 0.68},
    "t2": {"gm": 1.40, "wm": 1.0, "csf": 2.60, "ncr": 2.30, "et": 1.60, "ed": 1.95},
    "flair": {"gm": 1.25, "wm": 1.0, "csf": 0.28, "ncr": 0.95, "et": 1.40, "ed": 1.75},
}
_BASE_SCALE: dict[str, float] = {"t1": 520.0, "t1ce": 680.0, "t2": 340.0, "flair": 420.0}
"""Typical raw intensity of white matter per sequence (arbitrary scanner units)."""

# Fluid-filled parts of the post-treatment and paediatric label sets, same scale as _CONTRAST.
# rc: resection cavity, free water like CSF (FLAIR slightly above CSF: blood products, protein);
# cc: tumour cyst, proteinaceous fluid: T2 brighter than necrosis, FLAIR between CSF and necrosis.
_CONTRAST_FLUID: dict[str, dict[str, float]] = {
    "t1": {"rc": 0.26, "cc": 0.33},
    "t1ce": {"rc": 0.28, "cc": 0.32},
    "t2": {"rc": 2.65, "cc": 2.85},
    "flair": {"rc": 0.34, "cc": 0.58},
}
_FLUID_PARTS: tuple[str, ...] = ("rc", "cc")

# Parts the generator draws (codes of its own working label map) and the label each part is in
# each label set it can write. A part a set lacks is never drawn for it.
_PART_CODES: dict[str, int] = {"NCR": 1, "ED": 2, "ET": 3, "RC": 4, "CC": 5}
_PART_LABELS: dict[str, dict[str, str]] = {
    "glioma": {"NCR": "NCR", "ED": "ED", "ET": "ET"},
    "glioma_post": {"NCR": "NETC", "ED": "SNFH", "ET": "ET", "RC": "RC"},
    "pediatric": {"NCR": "NETC", "ED": "ED", "ET": "ET", "CC": "CC"},
}

RESECTION_FRACTION = 0.5
"""Share of the cases given a resection cavity (brats2024-gli; tumour-free cases get none)."""
CYST_FRACTION = 0.5
"""Share of the cases given cysts (brats2024-ped; tumour-free cases get none)."""
_CAVITY_STREAM = 0x2CA7
_CYST_STREAM = 0xC157

SYNTH_LAYOUTS: tuple[str, ...] = DATASET_LAYOUTS
"""Layouts ``tumorseg synth`` writes."""
_AUTO_CONVENTION: dict[str, str] = {
    "brats2021": "brats2021",
    "brats2023": "brats2023",
    "msd": "msd",
    "nnunet": "brats2023",
    "monai": "brats2023",
}
"""Convention of ``labels: auto`` per layout."""
_NATIVE_LAYOUTS: tuple[str, ...] = ("brats2021", "brats2023", "msd")

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

NNUNET_DATASET = "Dataset500_TumorsegSynth"
"""Folder of the ``nnunet`` layout inside the output (nnU-Net v2 raw dataset name)."""
NNUNET_CHANNEL_NAMES: dict[str, str] = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
"""``channel_names`` of the nnU-Net and MONAI layouts (:data:`CANONICAL_MODALITIES` order)."""
MONAI_DATALIST = "datalist.json"
MONAI_FOLDS = 5

_QUANTISE_MAX = 32767.0
_ED_NOISE_FLOOR = 0.65
"""Smallest factor the noise may apply to the oedema's effective distance (keeps it positive)."""
_PV_MM = np.float32(0.7)
"""Partial-volume width (mm) of the tumour's region boundaries."""


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case, in RAS voxel order (stored orientation applied by :func:`write_case`).

    Attributes:
        index: case number (1-based), the same in every layout.
        images: modality (``t1``, ``t1ce``, ``t2``, ``flair``) -> float32 volume ``(X, Y, Z)``.
        labels: uint8 labels ``(X, Y, Z)`` in the internal codes of the label set of
            ``convention`` (glioma: 0 background, 1 NCR, 2 ED, 3 ET).
        affine: 4x4 voxel-to-world (RAS mm) matrix of the RAS arrays.
        spacing: voxel size in mm ``(sx, sy, sz)``.
        tumour_free: True when the case has no tumour (labels all 0).
        brain_mask: bool ``(X, Y, Z)``, the skull-stripped brain (images are 0 outside).
        tissue: ``gm``/``wm``/``csf`` -> float32 probability ``(X, Y, Z)`` of the deformed anatomy
            (after the mass effect, before the tumour replaced tissue), kept so that tests and
            benchmarks can check contrasts against the ground truth.
        orientation: axis codes the case is stored in (``RAS``, ``LPS`` or ``LAS``).
        info: JSON-able description (tumour centre, radii, necrosis, volumes).
        convention: the label convention the case was generated for (its label set is that of
            ``labels``; :func:`write_case` writes it, or another convention of the same set).
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


# ---------------------------------------------------------------- template anatomy
@dataclass(frozen=True)
class _Template:
    """Tissue maps of the MNI152 template on a grid of a given spacing (read-only, cached).

    Attributes:
        tissue: float32 ``(3, I, J, K)``: GM, WM, CSF probabilities (sum 1 in the brain, 0 outside).
        origin_mm: MNI position of voxel ``(0, 0, 0)``.
        spacing: grid spacing in mm.
        centres_mm: ``(N, 3)`` MNI positions allowed as tumour centres (cerebral white matter).
        depth_mm: ``(N,)`` distance of each centre to the brain surface.
        brain_lo_mm: lowest MNI corner of the brain's bounding box (``brain_hi_mm`` the highest).
    """

    tissue: np.ndarray
    origin_mm: np.ndarray
    spacing: np.ndarray
    centres_mm: np.ndarray
    depth_mm: np.ndarray
    brain_lo_mm: np.ndarray
    brain_hi_mm: np.ndarray


@functools.lru_cache(maxsize=1)
def _mni_anatomy() -> _Template:
    """The 1 mm MNI152 template as GM/WM/CSF maps ``(3, 197, 233, 189)``, with tumour centres.

    Loaded once per process (about 2 s, most of it importing nilearn); arrays are read-only
    because the cache shares them.
    """
    from nilearn import datasets  # heavy import (scikit-learn), only when a dataset is generated

    t1_img = datasets.load_mni152_template(resolution=1)
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    gm = np.clip(gm, 0.0, 1.0) * mask
    wm = np.clip(wm, 0.0, 1.0) * mask
    # CSF is what the brain mask holds beyond GM and WM, plus voxels dark on T1 (ventricles,
    # sulci), whose GM/WM maps are blurred by the template's averaging.
    residual = np.clip(1.0 - gm - wm, 0.0, 1.0)
    dark_t1 = np.clip((0.50 - t1) / 0.22, 0.0, 1.0)
    csf = np.maximum(residual, dark_t1) * mask
    total = gm + wm + csf
    inside = total > 1e-6
    tissue = np.zeros((3, *t1.shape), dtype=np.float32)
    for k, prob in enumerate((gm, wm, csf)):
        tissue[k][inside] = prob[inside] / total[inside]
    tissue.flags.writeable = False

    # Tumour centres: cerebral white matter, away from the surface, not in the cerebellum or
    # brainstem (adult gliomas are mostly supratentorial), off the midline. Depth from a 2 mm
    # distance transform (8x cheaper than at 1 mm; centres only need it to within a voxel).
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
    """The template's tissue maps resampled to ``spacing`` (anti-aliased), cached per spacing."""
    base = _mni_anatomy()
    spacing_arr = np.asarray(spacing, dtype=np.float64)
    if np.allclose(spacing_arr, base.spacing):
        return base
    # Gaussian pre-filter so that a coarse grid sees the partial-volume average of a real
    # acquisition at that voxel size, not aliased 1 mm detail (FWHM ~ voxel size).
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


# ---------------------------------------------------------------- geometry
def brats_grid(spacing: Sequence[float]) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and RAS affine of the BraTS field of view sampled at ``spacing``.

    Args:
        spacing: voxel size in mm ``(sx, sy, sz)``.

    Returns:
        ``(shape, affine)``: ``round(240/sx) x round(240/sy) x round(155/sz)`` voxels and the 4x4
        affine whose grid is centred on the BraTS box (exactly the BraTS grid at 1 mm).
    """
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
    rng: np.random.Generator,
    shape: Sequence[int],
    n_ctrl: Sequence[int],
    region: Sequence[slice] | None = None,
) -> np.ndarray:
    """Low-frequency random field of unit peak over a grid of ``shape``.

    A tensor product of per-axis Gaussian bases weighted by random coefficients on a coarse
    control grid. Written by hand (instead of up-sampling a coarse grid with
    ``scipy.ndimage.zoom``) because the separable product costs one multiply-add per voxel and
    control point, about 10x faster at 240 x 240 x 155, and is smooth by construction.

    Args:
        rng: random generator (consumed deterministically).
        shape: output shape ``(X, Y, Z)``.
        n_ctrl: control points per axis (more = higher frequency).
        region: evaluate only this box of the grid (the field is the same as the full one there).

    Returns:
        float32 array ``(X, Y, Z)`` (or the region's shape) with ``|field| <= 1``.
    """
    coeffs = rng.standard_normal(tuple(n_ctrl)).astype(np.float32)
    bases = [_gaussian_basis(n, k) for n, k in zip(shape, n_ctrl, strict=True)]
    # Mean and peak from the full grid sampled every 4th voxel (the field is far smoother than
    # that), so a region gets exactly the values the full field has there.
    coarse = np.einsum("ia,jb,kc,abc->ijk", *(b[::4] for b in bases), coeffs, optimize=True)
    mean = float(coarse.mean())
    peak = float(np.abs(coarse - mean).max())
    if region is not None:
        bases = [b[sl] for b, sl in zip(bases, region, strict=True)]
    out = np.einsum("ia,jb,kc,abc->ijk", *bases, coeffs, optimize=True).astype(np.float32)
    out -= np.float32(mean)
    return out / np.float32(peak) if peak > 0 else out


def _local_noise(rng: np.random.Generator, shape: Sequence[int], sigma_vox: Sequence[float]) -> np.ndarray:
    """Gaussian-filtered white noise normalised to unit standard deviation, float32 ``shape``."""
    noise = ndi.gaussian_filter(
        rng.standard_normal(tuple(shape), dtype=np.float32), sigma_vox, mode="reflect"
    )
    std = float(noise.std())
    return noise / std if std > 0 else noise


def _random_rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    """Rotation matrix with Euler angles uniform in ``[-max_deg, max_deg]`` about each axis."""
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _uniform_rotation(rng: np.random.Generator) -> np.ndarray:
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


# ---------------------------------------------------------------- case-level choices
# Additive recurrence with the generalised golden ratio (Roberts' R-sequence): flag k of a stream
# is ``frac(offset + k * alpha) < fraction``. It depends only on (seed, k), like the rest of a case,
# yet honours a fraction closely for any number of cases (a Bernoulli draw would not: 15 % of 36
# cases could easily come out as 2 or 10).
_PHI4 = 1.1673039782614187  # root of x**5 = x + 1
_STREAMS: tuple[str, ...] = ("tumour_free", "no_necrosis", "anisotropic", "reoriented", "resection", "cystic")
"""Per-case flags; new ones go last (a flag's stream depends on its position)."""
_STREAM_ALPHA: dict[str, float] = {
    name: math.fmod(1.0 / _PHI4 ** (k + 1), 1.0) for k, name in enumerate(_STREAMS)
}


def _case_flag(seed: int, index: int, stream: str, fraction: float) -> bool:
    """Deterministic low-discrepancy Bernoulli flag of case ``index`` for one attribute."""
    offset = np.random.default_rng([_seed_word(seed), 0x5EED, list(_STREAM_ALPHA).index(stream)]).random()
    return math.fmod(offset + index * _STREAM_ALPHA[stream], 1.0) < fraction


def _seed_word(seed: int) -> int:
    """The seed as a non-negative integer (NumPy seed sequences reject negative entropy)."""
    return int(seed) % 2**64


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of case ``index``: seeded from ``(seed, index)`` only."""
    return np.random.default_rng([_seed_word(seed), int(index)])


# ---------------------------------------------------------------- one case
@dataclass(frozen=True)
class _CaseFlags:
    """The case-level choices of one case, each from its own low-discrepancy stream (no case draw).

    Attributes:
        tumour_free: no tumour at all.
        necrotic: the tumour has a necrotic core (NCR/NETC).
        anisotropic: thick slices along z.
        reoriented: stored in LPS or LAS instead of RAS.
        resected: a resection cavity (label sets with ``RC`` only).
        cystic: cysts in the tumour core (label sets with ``CC`` only).
    """

    tumour_free: bool
    necrotic: bool
    anisotropic: bool
    reoriented: bool
    resected: bool
    cystic: bool

    @classmethod
    def of(cls, cfg: SynthConfig, index: int, parts: dict[str, str]) -> _CaseFlags:
        """The flags of case ``index``; ``parts`` are the generated parts the label set has."""
        tumour_free = _case_flag(cfg.seed, index, "tumour_free", cfg.tumour_free_fraction)
        return cls(
            tumour_free=tumour_free,
            necrotic=not _case_flag(cfg.seed, index, "no_necrosis", cfg.no_necrosis_fraction),
            anisotropic=_case_flag(cfg.seed, index, "anisotropic", cfg.anisotropic_fraction),
            reoriented=_case_flag(cfg.seed, index, "reoriented", cfg.reoriented_fraction),
            resected="RC" in parts
            and not tumour_free
            and _case_flag(cfg.seed, index, "resection", RESECTION_FRACTION),
            cystic="CC" in parts and not tumour_free and _case_flag(cfg.seed, index, "cystic", CYST_FRACTION),
        )


def synthesize_case(index: int, cfg: SynthConfig) -> SyntheticCase:
    """Generate case ``index`` (1-based) of the dataset described by ``cfg``.

    Deterministic: the same ``(cfg, index)`` gives identical arrays, whatever the number of
    cases in the dataset. Each step below draws from the case's generator in turn (grid, anatomy,
    tumour, tumour regions, rendering), so their order is part of the output: a new draw goes
    last, or into a stream of its own as the cavity and cysts do.

    Args:
        index: case number, from 1.
        cfg: the ``synth`` section of params.yaml.

    Returns:
        The case in RAS voxel order, images float32 ``(X, Y, Z)`` and labels in the internal
        codes of the label set of ``cfg.labels`` (see :func:`synth_convention`).

    Raises:
        ValueError: ``cfg.labels`` names a convention whose label set the generator cannot draw.
    """
    if index < 1:
        raise ValueError(f"case index starts at 1 (got {index})")
    convention = get_convention(synth_convention(cfg.layout, cfg.labels))
    label_set = _drawable(convention)
    rng = case_rng(cfg.seed, index)
    flags = _CaseFlags.of(cfg, index, _PART_LABELS[label_set.name])
    spacing, orientation = _case_grid(rng, float(cfg.spacing_mm), flags)
    shape, affine = brats_grid(spacing)
    tpl = _template(spacing)
    mni, region = _pull_back_field(rng, tpl, affine, shape)
    tumour = {} if flags.tumour_free else _draw_tumour(rng, tpl, flags.necrotic)
    if tumour:
        _apply_mass_effect(mni, tumour)
    idx, tissue_crop, brain_crop = _sample_template(mni, tpl)
    del mni
    labels_crop, fractions, box, fluid_rng = _tumour_regions(
        rng, idx, tpl, tumour, tissue_crop, brain_crop, spacing, flags, _fluid_rng(cfg.seed, index, flags)
    )
    del idx
    images_crop = _render(
        rng, tissue_crop, brain_crop, labels_crop, fractions, box, cfg, tumour, spacing, shape, region,
        fluid_rng=fluid_rng,
    )  # fmt: skip
    labels = _uncrop(labels_crop, shape, region)
    if label_set.name != "glioma":  # parts -> the set's internal codes (glioma's are the parts')
        labels = _part_lut(label_set)[labels]
    return SyntheticCase(
        index=index,
        images={m: _uncrop(v, shape, region) for m, v in images_crop.items()},
        labels=labels,
        affine=affine,
        spacing=spacing,
        tumour_free=flags.tumour_free,
        orientation=orientation,
        tissue={t: _uncrop(v, shape, region) for t, v in tissue_crop.items()},
        brain_mask=_uncrop(brain_crop, shape, region),
        info=_case_info(index, label_set, labels, tumour, flags.tumour_free, orientation, spacing, shape),
        convention=convention.name,
    )


def _case_grid(
    rng: np.random.Generator, s: float, flags: _CaseFlags
) -> tuple[tuple[float, float, float], str]:
    """Voxel spacing (thick z slices for an anisotropic case) and storage orientation of a case."""
    slice_factor = float(rng.choice([2.0, 2.5, 3.0])) if flags.anisotropic else 1.0
    spacing = (s, s, round(min(s * slice_factor, 6.0), 3))
    orientation = str(rng.choice(ORIENTATIONS_REORIENTED)) if flags.reoriented else "RAS"
    return spacing, orientation


def _pull_back_field(
    rng: np.random.Generator, tpl: _Template, affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[list[np.ndarray], tuple[slice, slice, slice]]:
    """Per-case anatomy: the MNI mm position each voxel samples, over the box the brain can occupy.

    World (output) mm map to MNI mm through a small affine (scale, rotation, shift) plus a smooth
    random deformation. The MNI152 template is larger than a typical native-space brain (it was
    built by affine registration to the enlarged MNI305 target), so cases are mostly shrunk a
    little. Only the part of the box the brain can occupy (about half of it) is computed: faster
    at 1 mm.

    Returns:
        ``(mni, region)``: three float32 ``(x, y, z)`` coordinate maps (MNI x, y, z) over
        ``region``, the slices of the output grid they cover.
    """
    scale = np.diag(rng.uniform([0.87, 0.86, 0.9], [1.0, 1.01, 1.02]))
    rotation = _random_rotation(rng, 6.0)
    shift = rng.uniform(-4.0, 4.0, 3)
    pull = rotation @ np.linalg.inv(scale)  # offset from the box centre (mm) -> MNI offset
    mni_centre = np.asarray(MNI_BOX_CENTRE_MM) + shift
    displacement_mm = float(rng.uniform(2.0, 4.5))
    region = _brain_region(tpl, pull, mni_centre, affine, shape, margin_mm=displacement_mm + 10.0)
    axes = [
        (
            affine[k, 3]
            + affine[k, k] * np.arange(region[k].start, region[k].stop)
            - BRATS_WORLD_CENTRE_MM[k]
        ).astype(np.float32)
        for k in range(3)
    ]
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


def _draw_tumour(rng: np.random.Generator, tpl: _Template, necrotic: bool) -> dict[str, Any]:
    """Tumour geometry in MNI mm (so that it deforms with the anatomy), centred in cerebral white matter.

    The dict's entries are drawn in the order they are written, which the output depends on.
    """
    pick = int(rng.integers(len(tpl.centres_mm)))
    centre = tpl.centres_mm[pick].astype(np.float64) + rng.uniform(-1.0, 1.0, 3)
    depth = float(tpl.depth_mm[pick])
    r_core = float(min(rng.uniform(8.0, 25.0), 0.85 * depth))
    return {
        "centre_mni": centre,
        "r_core": r_core,
        "axes": rng.uniform(0.75, 1.3, 3),
        "rotation": _uniform_rotation(rng),
        "lobulation": float(rng.uniform(0.12, 0.3)),
        "necrosis_ratio": float(rng.uniform(0.45, 0.8)) if necrotic else 0.0,
        "oedema_reach": float(rng.uniform(5.0, 24.0)),
        "mass_effect": float(rng.uniform(0.25, 0.5)),
    }


def _sample_template(
    mni: list[np.ndarray], tpl: _Template
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """The template pulled through the field: ``(idx, tissue, brain)`` over the working region.

    ``idx`` is the ``(3, x, y, z)`` template voxel position of each voxel, ``tissue`` the GM/WM/CSF
    probabilities there (trilinear, 0 outside the template) and ``brain`` where they sum above 0.5.
    """
    idx = np.stack([(mni[k] - np.float32(tpl.origin_mm[k])) / np.float32(tpl.spacing[k]) for k in range(3)])
    tissue = {
        name: ndi.map_coordinates(tpl.tissue[k], idx, order=1, output=np.float32, mode="constant", cval=0.0)
        for k, name in enumerate(TISSUES)
    }
    brain = (tissue["gm"] + tissue["wm"] + tissue["csf"]) > 0.5
    return idx, tissue, brain


def _fluid_rng(seed: int, index: int, flags: _CaseFlags) -> np.random.Generator | None:
    """The own stream of a cavity or cysts, so the anatomy, tumour, bias and noise stay those of the
    case without them (None when the case has neither)."""
    if not (flags.resected or flags.cystic):
        return None
    stream = _CAVITY_STREAM if flags.resected else _CYST_STREAM
    return np.random.default_rng([_seed_word(seed), int(index), stream])


def _tumour_regions(
    rng: np.random.Generator,
    idx: np.ndarray,
    tpl: _Template,
    tumour: dict[str, Any],
    tissue: dict[str, np.ndarray],
    brain: np.ndarray,
    spacing: tuple[float, float, float],
    flags: _CaseFlags,
    fluid_rng: np.random.Generator | None,
) -> tuple[np.ndarray, dict[str, np.ndarray], tuple[slice, ...], np.random.Generator | None]:
    """Tumour sub-regions (labels + soft fractions for partial volume), computed only near the tumour.

    Returns:
        ``(labels, fractions, box, fluid_rng)``: part labels over the working region, the soft
        fractions in the tumour ``box`` (:func:`_grow_tumour`, plus ``rc`` / ``cc``), and the
        cavity's or cysts' stream for the rendering (None without a tumour, a cavity or cysts).
    """
    labels = np.zeros(brain.shape, dtype=np.uint8)
    if not tumour:
        return labels, {}, (), None
    box, labels_box, fractions = _grow_tumour(rng, idx, tpl, tumour, tissue, brain, spacing)
    if fluid_rng is not None:
        centre_idx = (tumour["centre_mni"] - tpl.origin_mm) / tpl.spacing
        offset = np.stack(
            [(idx[k][box] - np.float32(centre_idx[k])) * np.float32(tpl.spacing[k]) for k in range(3)]
        )
        if flags.resected:
            _add_cavity(fluid_rng, offset, tumour, labels_box, fractions, brain[box], spacing)
        else:
            _add_cysts(fluid_rng, offset, tumour, labels_box, fractions, spacing)
    labels[box] = labels_box
    return labels, fractions, box, fluid_rng


def _uncrop(crop: np.ndarray, shape: tuple[int, int, int], region: tuple[slice, ...]) -> np.ndarray:
    """A working-region map placed on the full grid, zeros (background) elsewhere."""
    out = np.zeros(shape, dtype=crop.dtype)
    out[region] = crop
    return out


def _case_info(
    index: int,
    label_set: LabelSet,
    labels: np.ndarray,
    tumour: dict[str, Any],
    tumour_free: bool,
    orientation: str,
    spacing: tuple[float, float, float],
    shape: tuple[int, int, int],
) -> dict[str, Any]:
    """The JSON-able record of a case in ``synth_meta.json`` (``labels`` in the set's internal codes)."""
    parts = _PART_LABELS[label_set.name]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    info: dict[str, Any] = {
        "case_index": index,
        "tumour_type": None if tumour_free else TUMOUR_TYPE,
        "necrosis": bool((labels == label_set.code(parts["NCR"])).any()),
        "orientation": orientation,
        "spacing_mm": list(spacing),
        "shape": list(shape),
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
    if tumour:
        info["centre_mni_mm"] = [round(float(v), 1) for v in tumour["centre_mni"]]
        info["core_radius_mm"] = round(tumour["r_core"], 1)
    return info


def synth_convention(layout: str, labels: str = "auto") -> str:
    """The convention the ``seg`` files of ``layout`` are written in (``auto``: the layout's own;
    ``nnunet`` and ``monai`` write ``brats2023`` codes)."""
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
    """The convention of ``layout`` + ``labels`` when the generator can write that pair.

    Raises:
        ValueError: unknown layout or convention, a label set the generator cannot draw, or
            non-consecutive codes for nnU-Net (brats2021's ET is 4; nnU-Net needs 0..N).
    """
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
    """Whether a reader finds ``convention`` from ``layout`` alone (no ``ingest.labels`` needed).

    BraTS 2021 and MSD folders are read in their own codes, BraTS 2023+ folders by the case-id
    prefix (PED is coded differently in 2023 and 2024, GLI 2024 adds RC to GLI 2023's codes);
    nnU-Net and MONAI datasets declare their labels (and ``label_convention``) in their JSON.
    """
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


def _brain_region(
    tpl: _Template,
    pull: np.ndarray,
    mni_centre: np.ndarray,
    affine: np.ndarray,
    shape: Sequence[int],
    margin_mm: float,
) -> tuple[slice, slice, slice]:
    """Voxel box of the output grid that can receive brain, given the case's affine pull-back.

    The template's brain bounding box (grown by ``margin_mm`` for the smooth deformation and the
    mass effect) is mapped back through the inverse of the affine part; everything outside is
    background and needs no computation.
    """
    lo = tpl.brain_lo_mm - margin_mm
    hi = tpl.brain_hi_mm + margin_mm
    corners = np.array([[(lo, hi)[b][k] for k, b in enumerate(bits)] for bits in np.ndindex(2, 2, 2)])
    world = (np.linalg.inv(pull) @ (corners - mni_centre).T).T + np.asarray(BRATS_WORLD_CENTRE_MM)
    vox = (world - affine[:3, 3]) / np.diag(affine)[:3]
    start = np.clip(np.floor(vox.min(axis=0)).astype(int) - 1, 0, np.asarray(shape))
    stop = np.clip(np.ceil(vox.max(axis=0)).astype(int) + 2, 0, np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop, strict=True))  # type: ignore[return-value]


def _apply_mass_effect(mni: list[np.ndarray], tumour: dict[str, Any]) -> None:
    """Push the anatomy away from the tumour centre, in place on the pull-back field.

    Each output point at distance ``r`` from the centre samples the template at
    ``r * (1 - a * exp(-r^2 / 2 sigma^2))``: the neighbourhood is magnified (tissue displaced
    outwards, ventricles compressed), smoothly fading to no displacement far away. With
    ``a <= 0.5`` the map stays monotonic in ``r`` (no folding).
    """
    centre = tumour["centre_mni"]
    sigma = 1.2 * tumour["r_core"]
    strength = tumour["mass_effect"]
    d = [mni[k] - np.float32(centre[k]) for k in range(3)]
    r2 = d[0] ** 2 + d[1] ** 2 + d[2] ** 2
    factor = 1.0 - np.float32(strength) * np.exp(-r2 / np.float32(2.0 * sigma * sigma))
    for k in range(3):
        mni[k] = np.float32(centre[k]) + d[k] * factor


def _grow_tumour(
    rng: np.random.Generator,
    idx: np.ndarray,
    tpl: _Template,
    tumour: dict[str, Any],
    tissue: dict[str, np.ndarray],
    brain: np.ndarray,
    spacing: tuple[float, float, float],
) -> tuple[tuple[slice, ...], np.ndarray, dict[str, np.ndarray]]:
    """Tumour core, necrosis, enhancing rim and oedema inside the tumour's bounding box.

    Draws from ``rng`` in this order: core outline, necrosis (when the tumour has one), oedema.

    Args:
        idx: ``(3, X, Y, Z)`` template voxel coordinates of each output voxel (after mass effect).

    Returns:
        ``(box, labels, fractions)``: the bounding box (slices of the output volume), canonical
        labels in it, and soft fractions ``ncr``, ``et``, ``ed`` (float32, same shape) for the
        intensity model.
    """
    sp = np.asarray(spacing)
    box, rel = _tumour_box(idx, tpl, tumour)
    shape = tuple(sl.stop - sl.start for sl in box)
    brain_box = brain[box]
    # Lobulated ellipsoid: distance measured in the tumour's own (rotated, stretched) frame and
    # perturbed by smooth noise; the noise scales set lobe size (~ a third of the radius).
    local = np.einsum("ij,jxyz->ixyz", tumour["rotation"].T.astype(np.float32), rel)
    local /= tumour["axes"].astype(np.float32)[:, None, None, None]
    dist = np.sqrt((local**2).sum(axis=0))
    lobe_sigma = np.maximum(0.3 * tumour["r_core"] / sp, 0.8)
    # tanh bounds the perturbation to +-lobulation: the core never reaches beyond its box.
    core_dist = dist * (
        1.0 + np.float32(tumour["lobulation"]) * np.tanh(_local_noise(rng, shape, lobe_sigma))
    )
    s_core = _sigmoid((np.float32(tumour["r_core"]) - core_dist) / _PV_MM) * brain_box
    core = _largest_component(s_core > 0.5)
    s_core *= ndi.binary_dilation(core, iterations=2)
    if tumour["necrosis_ratio"] > 0:
        s_nec = _necrosis(rng, local, core_dist, tumour, lobe_sigma)
    else:
        s_nec = np.zeros(shape, dtype=np.float32)
    ncr = core & (s_nec > 0.5)
    et = core & ~ncr
    ed, s_ed, from_core = _oedema(rng, core, tissue, brain_box, box, tumour, sp)

    labels = np.zeros(shape, dtype=np.uint8)
    labels[ed] = 2
    labels[ncr] = 1
    labels[et] = 3
    grown = ndi.binary_dilation(ed | core)
    s_nec_in_core = s_core * s_nec
    fractions = {
        "ncr": s_nec_in_core,
        "et": s_core - s_nec_in_core,
        "ed": (1.0 - s_core) * s_ed * grown,
        "from_core": from_core,
    }
    return box, labels, fractions


def _tumour_box(
    idx: np.ndarray, tpl: _Template, tumour: dict[str, Any]
) -> tuple[tuple[slice, ...], np.ndarray]:
    """The box of the working region the tumour and its oedema can reach, and ``(3, x, y, z)`` offsets
    (template mm) of its voxels from the tumour centre.

    The box holds everything the oedema can reach: its effective distance is at least
    ``_ED_NOISE_FLOOR`` times the Euclidean one (speed <= 1).
    """
    centre_idx = (tumour["centre_mni"] - tpl.origin_mm) / tpl.spacing
    # Distance to the centre in template mm (the pull-back is smooth: template mm ~ output mm).
    offset = [(idx[k] - np.float32(centre_idx[k])) * np.float32(tpl.spacing[k]) for k in range(3)]
    core_reach = tumour["r_core"] * float(tumour["axes"].max()) / (1.0 - tumour["lobulation"])
    reach = core_reach + tumour["oedema_reach"] * 1.5 / _ED_NOISE_FLOOR + 4.0
    near = (offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2) < reach**2
    nz = (
        np.nonzero(near.any(axis=(1, 2)))[0],
        np.nonzero(near.any(axis=(0, 2)))[0],
        np.nonzero(near.any(axis=(0, 1)))[0],
    )
    box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)
    return box, np.stack([o[box] for o in offset])


def _necrosis(
    rng: np.random.Generator,
    local: np.ndarray,
    core_dist: np.ndarray,
    tumour: dict[str, Any],
    lobe_sigma: np.ndarray,
) -> np.ndarray:
    """Soft necrosis: a noisier, off-centre inner region; the rim left around it varies in thickness.

    Args:
        local: ``(3, x, y, z)`` offsets in the tumour's own (rotated, stretched) frame.
        core_dist: the core's perturbed distance field.
    """
    shift = rng.uniform(-0.2, 0.2, 3).astype(np.float32) * np.float32(tumour["r_core"])
    nec_dist = np.sqrt(((local - shift[:, None, None, None]) ** 2).sum(axis=0))
    nec_dist *= 1.0 + np.float32(0.25) * np.tanh(_local_noise(rng, core_dist.shape, lobe_sigma * 0.8))
    r_nec = np.float32(tumour["necrosis_ratio"] * tumour["r_core"])
    s_nec = _sigmoid((r_nec - nec_dist) / _PV_MM)
    # Keep at least a thin enhancing rim: necrosis only well inside the core.
    s_nec *= _sigmoid((np.float32(tumour["r_core"]) - np.float32(1.5) - core_dist) / _PV_MM)
    return s_nec


def _oedema(
    rng: np.random.Generator,
    core: np.ndarray,
    tissue: dict[str, np.ndarray],
    brain_box: np.ndarray,
    box: tuple[slice, ...],
    tumour: dict[str, Any],
    sp: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Oedema around the ``core``: ``(mask, soft fraction, distance from the core in mm)``.

    Its distance from the core is divided by a spread speed that is high in white matter
    (vasogenic oedema tracks along fibres, sparing cortex) and perturbed by noise, so it grows
    finger-like; free water is not oedema, and only components connected to the tumour count
    (no islands across sulci).
    """
    wm_box = tissue["wm"][box]
    csf_box = tissue["csf"][box]
    speed = 0.12 + 0.88 * ndi.gaussian_filter(wm_box, np.maximum(1.5 / sp, 0.5))
    from_core = ndi.distance_transform_edt(~core, sampling=sp).astype(np.float32)
    ed_noise = _local_noise(rng, core.shape, np.maximum(5.0 / sp, 0.8))
    effective = from_core / speed * (1.0 + np.float32(1.0 - _ED_NOISE_FLOOR) * np.tanh(ed_noise))
    reach_ed = np.float32(tumour["oedema_reach"])
    s_ed = _sigmoid((reach_ed - effective) / (np.float32(0.12) * reach_ed + _PV_MM))
    s_ed *= np.clip(1.0 - 1.5 * csf_box, 0.0, 1.0) * brain_box
    ed = (s_ed > 0.5) & ~core
    components, _ = ndi.label(ed | core)
    touching = np.unique(components[core])
    ed &= np.isin(components, touching[touching > 0])
    return ed, s_ed, from_core


def _add_cavity(
    rng: np.random.Generator,
    offset: np.ndarray,
    tumour: dict[str, Any],
    labels: np.ndarray,
    fractions: dict[str, np.ndarray],
    brain: np.ndarray,
    spacing: tuple[float, float, float],
) -> None:
    """Resect the tumour: a fluid cavity (part ``RC``) replacing most of the core, in place.

    The cavity is the tumour's own (rotated, stretched) shape at 0.7-1.0 of the core radius, its
    centre moved 0.25-0.6 radii off the tumour centre and its outline lobulated: it takes the
    core on one side and reaches past it into the oedema and brain on the other, leaving residual
    enhancing / non-enhancing tumour in a crescent. The soft fraction ``rc`` replaces tumour and
    tissue in the intensity model (partial volume at its edge like the other parts).

    Args:
        offset: ``(3, x, y, z)`` template-mm offset of each voxel of the tumour box from its centre.
        labels, fractions: the tumour box's part labels and soft fractions (:func:`_grow_tumour`).
        brain: the brain mask of the box (the cavity stays inside the brain).
    """
    sp = np.asarray(spacing)
    r_core = float(tumour["r_core"])
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    centre = (direction * rng.uniform(0.25, 0.6) * r_core).astype(np.float32)
    r_cav = np.float32(rng.uniform(0.7, 1.0) * r_core)
    rel = offset - centre[:, None, None, None]
    local = np.einsum("ij,jxyz->ixyz", tumour["rotation"].T.astype(np.float32), rel)
    local /= tumour["axes"].astype(np.float32)[:, None, None, None]
    dist = np.sqrt((local**2).sum(axis=0))
    dist *= 1.0 + np.float32(0.12) * np.tanh(_local_noise(rng, dist.shape, np.maximum(0.3 * r_cav / sp, 0.8)))
    s_rc = _sigmoid((r_cav - dist) / np.float32(0.7)) * brain
    cavity = _largest_component(s_rc > 0.5)
    if not cavity.any():
        return
    s_rc *= ndi.binary_dilation(cavity, iterations=2)
    labels[cavity] = _PART_CODES["RC"]
    for part in ("ncr", "et", "ed"):
        fractions[part] = fractions[part] * (1.0 - s_rc)
    fractions["rc"] = s_rc.astype(np.float32)


def _add_cysts(
    rng: np.random.Generator,
    offset: np.ndarray,
    tumour: dict[str, Any],
    labels: np.ndarray,
    fractions: dict[str, np.ndarray],
    spacing: tuple[float, float, float],
) -> None:
    """Put 1-3 round cysts (part ``CC``) inside the tumour core, in place.

    Each cyst is a sphere of 0.25-0.5 core radii (at least 1.25 voxels) centred deep enough in
    the core to be mostly inside it; cyst voxels outside the core are not cyst (CC is part of the
    tumour core). The soft fraction ``cc`` takes the place of necrosis and enhancing tumour.
    """
    core = (labels == _PART_CODES["NCR"]) | (labels == _PART_CODES["ET"])
    if not core.any():
        return
    sp = np.asarray(spacing, dtype=np.float64)
    depth = ndi.distance_transform_edt(core, sampling=sp)
    s_cc = np.zeros(core.shape, dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        radius = max(float(rng.uniform(0.25, 0.5)) * float(tumour["r_core"]), 1.25 * float(sp.max()))
        candidates = np.argwhere(depth >= min(0.6 * radius, 0.8 * float(depth.max())))
        at = tuple(candidates[int(rng.integers(len(candidates)))])
        centre = offset[(slice(None), *at)]
        dist = np.sqrt(((offset - centre[:, None, None, None]) ** 2).sum(axis=0))
        s_cc = np.maximum(s_cc, _sigmoid((np.float32(radius) - dist) / np.float32(0.7)))
    cysts = (s_cc > 0.5) & core
    if not cysts.any():
        return
    labels[cysts] = _PART_CODES["CC"]
    s_core = fractions["ncr"] + fractions["et"]
    fractions["cc"] = (s_cc * s_core).astype(np.float32)
    for part in ("ncr", "et"):
        fractions[part] = fractions[part] * (1.0 - s_cc)


def _render(
    rng: np.random.Generator,
    tissue: dict[str, np.ndarray],
    brain: np.ndarray,
    labels: np.ndarray,
    fractions: dict[str, np.ndarray],
    box: tuple[slice, ...],
    cfg: SynthConfig,
    tumour: dict[str, Any],
    spacing: tuple[float, float, float],
    grid_shape: Sequence[int],
    region: Sequence[slice],
    fluid_rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Four co-registered skull-stripped sequences from tissue and tumour fractions.

    Draws from ``rng`` in this order: tissue texture, tumour texture, per-case contrast jitter,
    then per sequence its bias field, noise and scanner scale.

    Args:
        tissue, brain, labels: maps of the working region of the grid, ``(x, y, z)``.
        fractions: soft NCR/ET/ED fractions in the tumour ``box`` (see :func:`_grow_tumour`), and
            RC / CC where a cavity or cysts were added.
        grid_shape, region: the full grid and where the working region lies in it (the bias
            field is defined on the full grid).
        fluid_rng: the random stream of the cavity or cysts (their texture and contrast jitter),
            so that ``rng`` is consumed exactly as without them.

    Returns:
        modality -> float32 ``(x, y, z)``, 0 outside the brain, scanner units.
    """
    shape = labels.shape
    # Everything below runs on the brain voxels only (flat C-order indices), ~1/5 of the box.
    flat = np.flatnonzero(brain)
    voxels = {t: tissue[t].ravel()[flat] for t in TISSUES}
    texture_v = _tissue_texture(rng, shape, flat)
    mix = _TumourMix.of(rng, fluid_rng, brain, box, fractions, tumour, spacing, flat) if tumour else None
    jitter = {m: rng.uniform(0.97, 1.03, 6) for m in CANONICAL_MODALITIES}  # per-case contrast
    fluids = [k for k in _FLUID_PARTS if k in fractions]
    fluid_jitter = (
        {m: fluid_rng.uniform(0.97, 1.03, len(fluids)) for m in CANONICAL_MODALITIES} if fluids else {}
    )
    images: dict[str, np.ndarray] = {}
    for m in CANONICAL_MODALITIES:
        c = {k: np.float32(v * j) for (k, v), j in zip(_CONTRAST[m].items(), jitter[m], strict=True)}
        values = (c["gm"] * voxels["gm"] + c["wm"] * voxels["wm"] + c["csf"] * voxels["csf"]) * texture_v
        if mix is not None:
            mix.apply(values, c, m, fluid_jitter.get(m, ()))
        out = np.zeros(shape, dtype=np.float32)
        out.ravel()[flat] = _scanner(rng, values, m, cfg, grid_shape, region, flat)
        images[m] = out
    return images


def _tissue_texture(rng: np.random.Generator, shape: tuple[int, ...], flat: np.ndarray) -> np.ndarray:
    """Tissue texture shared by all sequences (it is the same tissue): ~3 % smooth variation, as a
    factor on the brain voxels ``flat``."""
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
    """How the tumour's parts replace healthy tissue in the brain voxels of the tumour box.

    Attributes:
        pos: positions (in the flat brain vector) of the brain voxels of the tumour box.
        f: part -> soft fraction at those voxels (``ncr``, ``et``, ``ed``, fluids, ``from_core``).
        noise: part -> unit texture of the part at those voxels.
        fade: oedema contrast weight, strongest next to the tumour.
        rest: the healthy tissue's share.
        fluids: the fluid parts present (``rc``, ``cc``).
    """

    pos: np.ndarray
    f: dict[str, np.ndarray]
    noise: dict[str, np.ndarray]
    fade: np.ndarray
    rest: np.ndarray
    fluids: list[str]

    @classmethod
    def of(
        cls,
        rng: np.random.Generator,
        fluid_rng: np.random.Generator | None,
        brain: np.ndarray,
        box: tuple[slice, ...],
        fractions: dict[str, np.ndarray],
        tumour: dict[str, Any],
        spacing: tuple[float, float, float],
        flat: np.ndarray,
    ) -> _TumourMix:
        """Draw the parts' textures (tumour parts from ``rng``, fluids from ``fluid_rng``)."""
        in_box = np.zeros(brain.shape, dtype=bool)
        in_box[box] = True
        # C order inside the box matches C order in the region, so boolean selection lines them up.
        pos = np.flatnonzero(in_box.ravel()[flat])
        sel = brain[box]
        f = {k: v[sel] for k, v in fractions.items()}
        sp_vox = np.maximum(2.0 / np.asarray(spacing), 0.7)
        noise = {k: _local_noise(rng, sel.shape, sp_vox)[sel] for k in ("ncr", "et", "ed")}
        # Oedema is strongest next to the tumour and fades outwards.
        fade = 0.6 + 0.4 * np.exp(-f["from_core"] / np.float32(3.0 * tumour["oedema_reach"] + 1.0))
        rest = 1.0 - f["ncr"] - f["et"] - f["ed"]
        fluids = [k for k in _FLUID_PARTS if k in fractions]
        for k in fluids:
            assert fluid_rng is not None
            rest = rest - f[k]
            noise[k] = _local_noise(fluid_rng, sel.shape, sp_vox)[sel]
        return cls(pos=pos, f=f, noise=noise, fade=fade, rest=rest, fluids=fluids)

    def apply(
        self, values: np.ndarray, c: dict[str, np.float32], modality: str, fluid_jitter: Sequence[float]
    ) -> None:
        """Mix the parts into one sequence's healthy ``values``, in place (contrasts ``c``)."""
        f, noise = self.f, self.noise
        healthy = values[self.pos]
        ed_level = c["ed"] * (1.0 + np.float32(0.06) * noise["ed"])
        ed_level = healthy + (ed_level - healthy) * self.fade
        ncr_level = c["ncr"] * (1.0 + np.float32(0.10) * noise["ncr"])
        et_level = c["et"] * (1.0 + np.float32(0.08) * noise["et"])
        values[self.pos] = (
            healthy * self.rest + ed_level * f["ed"] + ncr_level * f["ncr"] + et_level * f["et"]
        )
        for k, j in zip(self.fluids, fluid_jitter, strict=True):
            level = np.float32(_CONTRAST_FLUID[modality][k] * j) * (1.0 + np.float32(0.04) * noise[k])
            values[self.pos] += level * f[k]


def _scanner(
    rng: np.random.Generator,
    values: np.ndarray,
    modality: str,
    cfg: SynthConfig,
    grid_shape: Sequence[int],
    region: Sequence[slice],
    flat: np.ndarray,
) -> np.ndarray:
    """One sequence through the scanner: smooth multiplicative bias, Rician noise, scale and offset.

    ``values`` (the brain voxels ``flat``) is changed in place by the bias; the result is new.
    """
    bias = smooth_random_field(rng, grid_shape, (3, 3, 3), region).ravel()[flat]
    values *= np.exp(np.float32(cfg.bias_field_strength) * bias)
    sigma = np.float32(cfg.noise_level * rng.uniform(0.8, 1.2))
    if sigma > 0:
        n_re = rng.standard_normal(values.shape, dtype=np.float32) * sigma
        n_im = rng.standard_normal(values.shape, dtype=np.float32) * sigma
        values = np.sqrt((values + n_re) ** 2 + n_im**2)
    scale = np.float32(_BASE_SCALE[modality] * math.exp(rng.uniform(-0.4, 0.4)))
    offset = np.float32(rng.uniform(0.0, 0.06))
    return (values + offset) * scale


# ---------------------------------------------------------------- writing
def case_id(layout: str, index: int, labels: str = "auto") -> str:
    """Case identifier as the real dataset spells it (``BraTS2021_00001``, ``BraTS-GLI-00001-000``,
    ``BRATS_001``).

    BraTS 2023+ names take the prefix of the convention (``BraTS-MEN-00001-000`` for
    brats2023-men, :data:`BRATS_PREFIXES`). ``nnunet`` and ``monai`` cases are named as in the
    convention's own dataset: BraTS 2021 names for brats2021, MSD names for msd, BraTS 2023+ names
    otherwise.
    """
    if layout not in SYNTH_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {sorted(SYNTH_LAYOUTS)}")
    convention = synth_convention(layout, labels)
    if layout in _NATIVE_LAYOUTS:
        family = layout
    else:
        family = convention if convention in ("brats2021", "msd") else "brats2023"
    if family == "brats2021":
        return f"BraTS2021_{index:05d}"
    if family == "msd":
        return f"BRATS_{index:03d}"
    return f"BraTS-{BRATS_PREFIXES.get(convention, 'GLI')}-{index:05d}-000"


def _monai_suffixes(convention: str) -> tuple[dict[str, str], str]:
    """File suffixes of a ``monai`` case: BraTS 2021 names for brats2021, BraTS 2023 ones otherwise."""
    spec = LAYOUTS["brats2021" if convention == "brats2021" else "brats2023"]
    return spec.modality_suffixes, spec.seg_suffix


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
    """Write one case in ``layout`` under ``out_dir``, atomically.

    The files are written into a temporary folder inside ``out_dir`` and renamed into place, so a
    reader never sees a half-written case. An existing case folder is updated file by file
    (identical files are left untouched; other files in it are never removed).

    Args:
        case: the generated case.
        out_dir: dataset root (``nnunet``: the folder holding :data:`NNUNET_DATASET`).
        layout: ``brats2021``, ``brats2023``, ``msd``, ``nnunet`` or ``monai``.
        index: case number in the file names (default ``case.index``).
        orientation: storage axis codes (default ``case.orientation``); ``RAS`` stores as is.
        labels: convention of the ``seg`` file; ``auto``: the layout's own for a glioma case
            (:func:`synth_convention`), the case's own convention for other label sets.

    Returns:
        The case folder (BraTS layouts, ``monai``) or the (first) image file (``msd``, ``nnunet``).

    Raises:
        ValueError: unknown layout, a convention of another label set than the case's, or one
            the layout cannot hold (:func:`check_layout_labels`).
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
    seg = convention.decode(case.labels).astype(np.uint8)

    if layout == "msd":
        stacked = np.stack([_quantise(case.images[m]) for m in MSD_CHANNEL_ORDER], axis=-1)
        files = {
            out_dir / "imagesTr" / f"{cid}.nii.gz": _nifti(stacked, case.affine, orientation),
            out_dir / "labelsTr" / f"{cid}.nii.gz": _nifti(seg, case.affine, orientation),
        }
        # Label first, image last: a case is listed by its image, which only appears complete.
        for target in sorted(files, key=lambda p: p.parent.name != "labelsTr"):
            _publish_files(target.parent, {target.name: files[target]}, nib)
        return out_dir / "imagesTr" / f"{cid}.nii.gz"

    if layout == "nnunet":
        root = out_dir / NNUNET_DATASET
        _publish_files(root / "labelsTr", {f"{cid}.nii.gz": _nifti(seg, case.affine, orientation)}, nib)
        channels = {
            f"{cid}_{channel:04d}.nii.gz": _nifti(_quantise(case.images[m]), case.affine, orientation)
            for channel, m in enumerate(CANONICAL_MODALITIES)
        }
        _publish_files(root / "imagesTr", channels, nib)
        return root / "imagesTr" / f"{cid}_0000.nii.gz"

    if layout == "monai":
        suffixes, seg_suffix = _monai_suffixes(convention.name)
    else:
        suffixes, seg_suffix = LAYOUTS[layout].modality_suffixes, LAYOUTS[layout].seg_suffix
    named = {
        f"{cid}{suffixes[m]}.nii.gz": _nifti(_quantise(case.images[m]), case.affine, orientation)
        for m in CANONICAL_MODALITIES
    }
    named[f"{cid}{seg_suffix}.nii.gz"] = _nifti(seg, case.affine, orientation)
    _publish_files(out_dir / cid, named, nib, whole_folder=True)
    return out_dir / cid


def _publish_files(target_dir: Path, images: dict[str, Any], nib: Any, whole_folder: bool = False) -> None:
    """Save ``name -> image`` into ``target_dir`` through a temporary sibling folder.

    With ``whole_folder`` and no existing ``target_dir``, the temporary folder itself is renamed
    into place (one atomic step for the whole case). Otherwise each file is moved with
    ``os.replace`` (atomic per file), skipping files whose bytes are already identical.
    """
    parent = target_dir.parent if whole_folder else target_dir
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.", suffix=".tmp", dir=parent))
    try:
        for name, img in images.items():
            nib.save(img, tmp / name)  # final basename: the gzip header is identical after rename
        if whole_folder and not target_dir.exists():
            os.chmod(tmp, _mode(0o777))  # mkdtemp makes it private; a dataset is shared
            os.rename(tmp, target_dir)
            return
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in images:
            src, dst = tmp / name, target_dir / name
            if dst.is_file() and _same_bytes(src, dst):
                continue
            os.replace(src, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _mode(requested: int) -> int:
    """``requested`` permission bits less the process umask (what ``open``/``mkdir`` would give)."""
    umask = os.umask(0)
    os.umask(umask)
    return requested & ~umask


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Atomic JSON write with ordinary (umask) permissions, not the temp file's private ones."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    os.chmod(path, _mode(0o666))


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()


def _write_msd_dataset_json(out: Path, convention: str = "msd") -> None:
    """``dataset.json`` of MSD Task01, listing every complete image/label pair in the folder.

    ``labels`` is MSD's own table for the msd convention; for another convention it names that
    convention's codes (``{"0": "background", "1": "NETC", ...}``) and ``label_convention`` says which.
    """
    images = sorted(p.name for p in (out / "imagesTr").glob("BRATS_*.nii.gz"))
    pairs = [n for n in images if (out / "labelsTr" / n).is_file()]
    labels = dict(MSD_LABEL_NAMES) if convention == "msd" else {"0": "background", **_code_names(convention)}
    meta = {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images "
        "(synthetic, generated by tumorseg synth from the MNI152 template)",
        # Same keys as the real file; the values say what this data really is.
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
    _write_json(out / "dataset.json", meta)


def _code_names(convention: str) -> dict[str, str]:
    """``{"1": "NCR", "2": "ED", ...}``: the convention's codes (background left out), ascending."""
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
    suffixes, seg_suffix = _monai_suffixes(convention)
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
    """Generate and write case ``index`` (runs in a worker process); its id and facts."""
    case = synthesize_case(index, cfg)
    write_case(case, out, cfg.layout, index, labels=convention)
    cid = case_id(cfg.layout, index, convention)
    return cid, {"case_id": cid, "tumour_free": case.tumour_free, **case.info}


def synthesize_dataset(out: str | Path, cfg: SynthConfig, *, workers: int = 2) -> list[str]:
    """Generate ``cfg.cases`` cases in ``cfg.layout`` under ``out`` (the ``synth`` stage).

    Cases are written one by one, each atomically; files in ``out`` that tumorseg did not
    write are never touched. ``synth_meta.json`` records the parameters and per-case facts
    (tumour type, necrosis, orientation, spacing, label volumes). ``msd`` and ``nnunet`` get a
    ``dataset.json``, ``monai`` a ``datalist.json``: MSD's lists every complete case in the folder
    (as before), nnU-Net's and MONAI's the cases of this run.

    Args:
        out: dataset root (created if missing).
        cfg: the ``synth`` section of params.yaml (CLI options already applied).
        workers: processes generating cases (0: one per core); each case depends only on its
            index and the seed, so the output does not depend on it.

    Returns:
        The case identifiers written, in order.

    Raises:
        ConfigError: a value of ``cfg`` out of range (CLI overrides are re-checked here), or a
            layout and convention that do not go together.
        DataError: ``out`` exists and is not a folder, or cannot be written.
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
            _write_json(out / NNUNET_DATASET / "dataset.json", nnunet_dataset_json(written, convention))
        elif cfg.layout == "monai":
            _write_json(out / MONAI_DATALIST, monai_datalist(written, convention))
        params = cfg.model_dump()
        native = cfg.labels == "auto" and cfg.layout in _NATIVE_LAYOUTS
        if native:
            # The layout names the convention: the same file as before synth.labels existed.
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
        _write_json(out / SYNTH_META_NAME, meta)
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
