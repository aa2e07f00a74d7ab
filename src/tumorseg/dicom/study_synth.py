"""Generated DICOM MR studies (``tumorseg synth --generator dicom``) with their true geometry kept.

A study is one generated head (:func:`~tumorseg.dicom.heads.synth_head`) scanned as several MR series,
one file per slice, as three vendors write them: T1ce (3-D, 1 mm), T1 (3-D or 2-D), T2 (2-D axial),
FLAIR (3-D sagittal or 2-D), and with ``distractors`` a 3-plane localiser, a DWI trace and its ADC map,
a coarse 2-D duplicate of a 3-D T1 and in some studies a coronal T2. The patient moves between series:
each has its own rigid ``head_to_scanner`` misalignment. Descriptions vary by vendor; in about one
study in three one of T1, T2 and FLAIR says nothing ("SE", "Series 5", ""), so that only its timing
(TE, TR, TI) tells what it is. Only T1ce carries ContrastBolusAgent.

Layout of ``out_root``::

    STUDY_0001/S001/IM0001.dcm ...      the DICOM study (one folder per series)
    truth/STUDY_0001/truth.json          ids, series, misalignments, grids (:func:`read_truth`)
    truth/STUDY_0001/seg_t1ce.nii.gz     the case's labels on the T1ce series' grid (uint8 internal codes)
    truth/STUDY_0001/brain_t1ce.nii.gz   the case's brain mask there
    truth/STUDY_0001/nifti/BraTS2021_00001/...   the case itself, BraTS-ready (brats2021)

Coordinates: the head lives on its case's grid; its LPS world is the case's RAS world with x and y
negated. ``head_to_scanner`` (4 x 4, LPS mm) maps a head point to where the series saw it; a series
voxel ``(column, row, slice)`` is at ``index_to_lps @ (c, r, k, 1)``. A registration of series ``k``
onto T1ce should recover ``from_t1ce = head_to_scanner_k @ inv(head_to_scanner_t1ce)`` (T1ce scanner
point -> the same anatomy in series ``k``'s scanner space).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage as ndi

from tumorseg.config import SynthConfig
from tumorseg.data.synth import (
    SyntheticCase,
    case_id,
    file_mode,
    rician_noise,
    seed_word,
    synthesize_case,
    write_case,
    write_json,
)
from tumorseg.dicom.config import StudiesConfig
from tumorseg.dicom.heads import Head, synth_head
from tumorseg.faults import write_point

if TYPE_CHECKING:
    from tumorseg.params import Params

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
TRUTH_DIR = "truth"
TRUTH_NAME = "truth.json"
SEG_NAME = "seg_t1ce.nii.gz"
BRAIN_NAME = "brain_t1ce.nii.gz"
NIFTI_DIR = "nifti"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Flips x and y: RAS world <-> DICOM patient (LPS) world (its own inverse)."""

_STUDY_STREAM = 0x57D1
_STORED_MAX = 4095  # 12-bit pixels
_FOV_MARGIN_MM = 12.0  # in-plane, around the moved head's box
_SLAB_MARGIN_MM = 4.0  # along the slices
_MAX_MATRIX = 320
_CHUNK_POINTS = 2_000_000  # points resampled at once (memory)
_VAGUE_FRACTION = 1.0 / 3.0
_T2_COR_FRACTION = 0.5
_CONTRAST_AGENTS = ("Gadobutrol", "Gadoterate meglumine", "Gadobenate dimeglumine", "Gadoteridol")

_PLANES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
}
"""ImageOrientationPatient (row direction, column direction) per plane, LPS; the slices step along
their cross product."""

_SCANNERS: dict[str, dict[str, float]] = {
    "SIEMENS": {"Skyra": 3.0, "Prisma_fit": 3.0, "Avanto_fit": 1.5, "Aera": 1.5},
    "GE MEDICAL SYSTEMS": {"DISCOVERY MR750": 3.0, "SIGNA Premier": 3.0, "Optima MR450w": 1.5},
    "Philips": {"Ingenia": 3.0, "Ingenia Elition X": 3.0, "Achieva": 1.5},
}

# SeriesDescription choices: vendor -> series key -> candidates; ``{plane}`` as the vendor spells it.
_DESCRIPTIONS: dict[str, dict[str, list[str]]] = {
    "SIEMENS": {
        "t1ce_3d": ["T1_MPRAGE_{PLANE}_+C", "t1_mprage_{plane}_p2_iso_post", "t1_mpr_{plane}_iso_KM"],
        "t1_3d": ["t1_mprage_{plane}_p2_iso", "T1_MPRAGE_{PLANE}", "t1_mpr_{plane}_iso"],
        "t1_2d": ["t1_se_tra", "t1_tse_tra", "T1_SE_TRA"],
        "t2_2d": ["t2_tse_tra", "t2_tse_tra_p2", "t2_blade_tra"],
        "flair_2d": ["t2_tirm_{plane}_dark-fluid", "t2_flair_{plane}", "T2_FLAIR_{PLANE}"],
        "flair_3d": ["t2_space_dark-fluid_sag_p2_iso", "T2_FLAIR_3D_SAG", "t2_spc_flair_sag_p2_iso"],
        "t1_dup": ["t1_se_tra_5mm", "t1_tse_tra_5mm"],
        "t2_cor": ["t2_tse_cor", "t2_tse_cor_p2"],
        "dwi": ["ep2d_diff_trace", "ep2d_diff_3scan_trace_p2_TRACEW"],
        "adc": ["ep2d_diff_3scan_trace_p2_ADC", "ep2d_diff_trace_ADC"],
        "loc": ["localizer", "AAHead_Scout"],
    },
    "GE MEDICAL SYSTEMS": {
        "t1ce_3d": ["{Plane} 3D T1 BRAVO +C", "{PLANE} T1 POST GD 3D", "{plane} 3D T1 BRAVO +C"],
        "t1_3d": ["{Plane} 3D T1 BRAVO", "{PLANE} T1 BRAVO PRE"],
        "t1_2d": ["AX T1 PRE", "AX T1 SE", "Ax T1"],
        "t2_2d": ["AX T2 FSE", "Ax T2 PROPELLER", "AX T2"],
        "flair_2d": ["{PLANE} T2 FLAIR", "{Plane} FLAIR"],
        "flair_3d": ["Sag CUBE FLAIR", "3D FLAIR SAG", "SAG 3D FLAIR"],
        "t1_dup": ["AX T1 SE 5mm", "Ax T1 FSE"],
        "t2_cor": ["COR T2 FSE", "Cor T2"],
        "dwi": ["AX DWI B1000", "Ax DWI 1000b"],
        "adc": ["Apparent Diffusion Coefficient (mm2/s)", "AX ADC"],
        "loc": ["3-plane loc", "3 Plane Localizer"],
    },
    "Philips": {
        "t1ce_3d": ["T1W_3D_TFE_Gd", "sT1W_3D_TFE +C", "T1W_3D_TFE_POST"],
        "t1_3d": ["T1W_3D_TFE", "sT1W_3D_TFE", "T1W_3D_TFE_PRE"],
        "t1_2d": ["T1W_SE_AX", "T1W_SE", "T1W_SE_TRA"],
        "t2_2d": ["T2W_TSE", "T2W_TSE_TRA", "T2W_TSE_AX"],
        "flair_2d": ["T2W_FLAIR", "T2W_FLAIR_{PLANE}"],
        "flair_3d": ["3D_FLAIR_SAG", "VISTA FLAIR", "3D FLAIR"],
        "t1_dup": ["T1W_SE_5mm", "T1W_SE_AX_5mm"],
        "t2_cor": ["T2W_TSE_COR", "T2W_TSE_CORONAL"],
        "dwi": ["DWI b1000", "DWI SENSE"],
        "adc": ["ADC map", "DWI ADC"],
        "loc": ["Survey", "SURVEY_MST"],
    },
}
_PLANE_WORDS: dict[str, dict[str, str]] = {
    "SIEMENS": {"axial": "tra", "sagittal": "sag", "coronal": "cor"},
    "GE MEDICAL SYSTEMS": {"axial": "ax", "sagittal": "sag", "coronal": "cor"},
    "Philips": {"axial": "ax", "sagittal": "sag", "coronal": "cor"},
}
_VAGUE: tuple[str, ...] = ("SE", "Series {number}", "")


@dataclass(frozen=True)
class SeriesTruth:
    """One series of a generated study as it was made.

    ``modality``: t1, t1ce, t2, flair (the series a pipeline should use), ``other`` for distractors;
    ``weighting``: what the series shows (t1, t1ce, t2, flair, dwi, adc, localizer: a distractor's
    too); ``folder``: relative to the study folder; ``head_to_scanner``: 4 x 4 LPS mm, head point ->
    where this series saw it; ``geometry``: its grid (``index_to_lps``, pixel spacing, slices ...).
    """

    modality: str
    series_uid: str
    series_number: int
    description: str
    folder: str
    head_to_scanner: np.ndarray
    weighting: str = ""
    geometry: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Grid:
    """One series' voxel grid in scanner (LPS) space: voxel ``(c, r, k)`` at
    ``origin + c * pixel * row + r * pixel * col + k * step * normal``."""

    plane: str
    row: np.ndarray
    col: np.ndarray
    origin: np.ndarray
    pixel: float
    step: float
    thickness: float
    rows: int
    columns: int
    slices: int

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row, self.col)

    @property
    def index_to_lps(self) -> np.ndarray:
        out = np.eye(4)
        out[:3, 0] = self.row * self.pixel
        out[:3, 1] = self.col * self.pixel
        out[:3, 2] = self.normal * self.step
        out[:3, 3] = self.origin
        return out

    def position(self, k: int) -> np.ndarray:
        return self.origin + k * self.step * self.normal

    def describe(self, acquisition: str) -> dict[str, Any]:
        index_to_lps = self.index_to_lps
        return {
            "acquisition": acquisition,
            "plane": self.plane,
            "image_orientation_patient": [*map(float, self.row), *map(float, self.col)],
            "first_position": [float(v) for v in self.origin],
            "pixel_spacing": [self.pixel, self.pixel],
            "slice_thickness": self.thickness,
            "spacing_between_slices": self.step,
            "rows": self.rows,
            "columns": self.columns,
            "slices": self.slices,
            "index_to_lps": index_to_lps.tolist(),
            "index_to_ras": (LPS_FROM_RAS @ index_to_lps).tolist(),
        }


@dataclass(frozen=True)
class _Plan:
    """What one series is: its key (``t1ce_3d`` ...), role, sequence and grid settings."""

    key: str
    modality: str  # t1, t1ce, t2, flair or other
    weighting: str
    source: str  # the head image it shows
    acquisition: str  # 2D or 3D
    planes: tuple[str, ...]  # one, or three (a localiser)
    pixel: float
    thickness: float
    gap: float = 0.0
    noise: float = 0.4  # extra noise, relative to the head's
    vague: bool = False
    misalign_like: str = ""  # share another series' misalignment (ADC: its DWI's)


def _ds(value: float) -> str:
    """A DICOM decimal string (16 characters at most) for ``value``: 10 significant digits or fewer."""
    for digits in (10, 9, 8, 7, 6):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return "0" if text == "-0" else text
    return f"{float(value):.6e}"


def _study_rng(seed: int, study_index: int) -> np.random.Generator:
    return np.random.default_rng([seed_word(seed), int(study_index), _STUDY_STREAM])


def study_id(study_index: int) -> str:
    """``STUDY_0001`` for study 1."""
    return f"STUDY_{study_index:04d}"


def truth_dir(study_dir: Path) -> Path:
    """The truth folder of a study folder (``<out>/truth/<study_id>``)."""
    return Path(study_dir).parent / TRUTH_DIR / Path(study_dir).name


def read_truth(study_dir: Path) -> tuple[dict[str, Any], list[SeriesTruth]]:
    """``truth.json`` of a generated study: the whole record and its series."""
    record = json.loads((truth_dir(study_dir) / TRUTH_NAME).read_text())
    series = [
        SeriesTruth(
            modality=s["modality"],
            series_uid=s["series_uid"],
            series_number=int(s["series_number"]),
            description=s["description"],
            folder=s["folder"],
            head_to_scanner=np.asarray(s["head_to_scanner"], dtype=np.float64),
            weighting=s["weighting"],
            geometry=s["geometry"],
        )
        for s in record["series"]
    ]
    return record, series


def study_complete(out_root: Path, study_index: int) -> bool:
    """Whether study ``study_index`` is written (its folder and its truth)."""
    sid = study_id(study_index)
    return (Path(out_root) / sid).is_dir() and (Path(out_root) / TRUTH_DIR / sid / TRUTH_NAME).is_file()


def _plan_series(rng: np.random.Generator, cfg: StudiesConfig) -> list[_Plan]:
    """The study's series in acquisition order: geometry and role of each."""
    t1ce_plane = str(rng.choice(["sagittal", "axial"]))
    t1_3d = bool(rng.random() < 0.6)
    t1_plane = str(rng.choice(["sagittal", "axial"])) if t1_3d else "axial"
    flair_3d = bool(rng.random() < 0.4)
    flair_plane = "sagittal" if flair_3d else str(rng.choice(["axial", "coronal"]))
    vague = str(rng.choice(["t1", "t2", "flair"])) if rng.random() < _VAGUE_FRACTION else ""
    t2_cor = bool(rng.random() < _T2_COR_FRACTION)
    t2_thickness = float(rng.uniform(3.0, 5.0))
    t1 = _Plan(
        key="t1_3d" if t1_3d else "t1_2d", modality="t1", weighting="t1", source="t1",
        acquisition="3D" if t1_3d else "2D", planes=(t1_plane,),
        pixel=1.0 if t1_3d else float(rng.uniform(0.9, 1.0)),
        thickness=1.0 if t1_3d else float(rng.uniform(3.0, 5.0)),
        gap=0.0 if t1_3d else float(rng.choice([0.0, 0.1, 0.2])), vague=vague == "t1",
    )  # fmt: skip
    t1ce = _Plan(
        key="t1ce_3d", modality="t1ce", weighting="t1ce", source="t1ce", acquisition="3D",
        planes=(t1ce_plane,), pixel=1.0, thickness=1.0,
    )  # fmt: skip
    t2 = _Plan(
        key="t2_2d", modality="t2", weighting="t2", source="t2", acquisition="2D", planes=("axial",),
        pixel=float(rng.uniform(0.45, 0.9)), thickness=t2_thickness,
        gap=float(rng.choice([0.0, 0.1, 0.2])), vague=vague == "t2",
    )  # fmt: skip
    flair = _Plan(
        key="flair_3d" if flair_3d else "flair_2d", modality="flair", weighting="flair", source="flair",
        acquisition="3D" if flair_3d else "2D", planes=(flair_plane,),
        pixel=1.0 if flair_3d else float(rng.uniform(0.7, 1.0)),
        thickness=1.0 if flair_3d else float(rng.uniform(3.0, 5.0)),
        gap=0.0 if flair_3d else float(rng.choice([0.0, 0.1])), vague=vague == "flair",
    )  # fmt: skip
    if not cfg.distractors:
        return [t2, flair, t1, t1ce]
    loc = _Plan(
        key="loc", modality="other", weighting="localizer", source="t1", acquisition="2D",
        planes=("sagittal", "coronal", "axial"), pixel=float(rng.uniform(1.0, 1.2)),
        thickness=float(rng.uniform(7.0, 10.0)),
    )  # fmt: skip
    dwi = _Plan(
        key="dwi", modality="other", weighting="dwi", source="t2", acquisition="2D", planes=("axial",),
        pixel=2.0, thickness=5.0, gap=float(rng.choice([0.0, 0.2])), noise=1.2,
    )  # fmt: skip
    adc = _Plan(
        key="adc", modality="other", weighting="adc", source="t2", acquisition="2D", planes=("axial",),
        pixel=2.0, thickness=5.0, gap=dwi.gap, noise=1.0, misalign_like="dwi",
    )  # fmt: skip
    plans = [loc, t2, flair, dwi, adc]
    t1_group = [t1]
    if t1_3d:
        dup = _Plan(
            key="t1_dup", modality="other", weighting="t1", source="t1", acquisition="2D",
            planes=("axial",), pixel=float(rng.uniform(1.0, 1.2)), thickness=float(rng.uniform(5.0, 6.0)),
        )  # fmt: skip
        t1_group = [dup, t1] if rng.random() < 0.5 else [t1, dup]
    plans += [*t1_group, t1ce]
    if t2_cor:
        plans.append(
            _Plan(
                key="t2_cor",
                modality="other",
                weighting="t2",
                source="t2",
                acquisition="2D",
                planes=("coronal",),
                pixel=float(rng.uniform(0.8, 1.0)),
                thickness=float(rng.uniform(4.0, 5.0)),
            )  # fmt: skip
        )
    return plans


def _misalignment(rng: np.random.Generator, centre: np.ndarray, max_deg: float, max_mm: float) -> np.ndarray:
    """A rigid 4 x 4 (LPS): rotation of up to ``max_deg`` about a random axis through ``centre``, then
    a shift of up to ``max_mm`` in a random direction."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(0.0, max_deg))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    rot = np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)
    direction = rng.standard_normal(3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(0.0, max_mm)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = centre + shift - rot @ centre
    return out


def _head_box_lps(head: Head) -> tuple[np.ndarray, np.ndarray]:
    """The head's 8 bounding-box corners (LPS, mm, voxel edges) and its centroid (LPS)."""
    ijk = np.argwhere(head.head_mask)
    lo, hi = ijk.min(axis=0) - 0.5, ijk.max(axis=0) + 0.5
    corners = np.array(
        [[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
    )
    lps_from_index = LPS_FROM_RAS @ head.affine
    centre = lps_from_index @ np.array([*ijk.mean(axis=0), 1.0])
    return (lps_from_index @ corners.T).T[:, :3], centre[:3]


def _grid(
    rng: np.random.Generator,
    plane: str,
    corners: np.ndarray,
    pixel: float,
    thickness: float,
    step: float,
    single_slice: bool = False,
) -> _Grid:
    """The grid of one series covering the moved head's ``corners`` (LPS) in ``plane``; the field of
    view is off-centre by a few mm, the matrix at most :data:`_MAX_MATRIX` (coarser pixels if need be)."""
    row, col = (np.asarray(v) for v in _PLANES[plane])
    normal = np.cross(row, col)
    along = [corners @ axis for axis in (row, col, normal)]
    lo = np.array([a.min() for a in along])
    hi = np.array([a.max() for a in along])
    extent = hi - lo + np.array([2 * _FOV_MARGIN_MM, 2 * _FOV_MARGIN_MM, 2 * _SLAB_MARGIN_MM])
    if single_slice:  # a localiser: one square field of view, the same in every plane
        extent[:2] = float(np.max(hi - lo)) + 2 * _FOV_MARGIN_MM
    fov = float(max(extent[0], extent[1]))
    pixel = round(max(pixel, fov / _MAX_MATRIX), 4)
    columns = int(math.ceil(extent[0] / pixel / 2.0)) * 2
    rows = int(math.ceil(extent[1] / pixel / 2.0)) * 2
    slices = 1 if single_slice else int(math.ceil(extent[2] / step))
    centre = (lo + hi) / 2.0 + np.array([*rng.uniform(-4.0, 4.0, 2), 0.0])
    start = centre - np.array([(columns - 1) * pixel, (rows - 1) * pixel, (slices - 1) * step]) / 2.0
    origin = np.round(start[0] * row + start[1] * col + start[2] * normal, 2)
    return _Grid(plane, row, col, origin, pixel, step, thickness, rows, columns, slices)


def _resample(
    volume: np.ndarray, voxel_from_index: np.ndarray, grid: _Grid, order: int
) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` (case grid) sampled on ``grid`` (``(slices, rows, columns)`` float32) through
    ``voxel_from_index`` (series index -> case voxel); and where the grid's points fall outside the
    case's box (bool, same shape)."""
    upper = (np.asarray(volume.shape) - 0.5)[:, None]
    out = np.zeros((grid.slices, grid.rows, grid.columns), dtype=np.float32)
    outside = np.zeros(out.shape, dtype=bool)
    rr, cc = np.meshgrid(np.arange(grid.rows), np.arange(grid.columns), indexing="ij")
    rr, cc = rr.astype(np.float64).ravel(), cc.astype(np.float64).ravel()
    per_chunk = max(1, _CHUNK_POINTS // rr.size)
    m = voxel_from_index
    for k0 in range(0, grid.slices, per_chunk):
        kk = np.arange(k0, min(grid.slices, k0 + per_chunk), dtype=np.float64)[:, None]
        coords = np.stack([(m[a, 0] * cc + m[a, 1] * rr) + (m[a, 2] * kk + m[a, 3]) for a in range(3)])
        coords = coords.reshape(3, -1).astype(np.float32)
        sample = ndi.map_coordinates(volume, coords, order=order, mode="constant", cval=0.0, prefilter=False)
        n = kk.shape[0]
        out[k0 : k0 + n] = sample.reshape(n, grid.rows, grid.columns)
        outside[k0 : k0 + n] = np.any((coords < -0.5) | (coords > upper), axis=0).reshape(
            n, grid.rows, grid.columns
        )
    return out, outside


def _acquired(image: np.ndarray, affine: np.ndarray, grid: _Grid, head_to_scanner: np.ndarray) -> np.ndarray:
    """``image`` as the series' voxels average it (partial volume): a Gaussian with FWHM the slice
    thickness along the slice normal and the pixel size in plane, where these exceed the head's
    voxels. The normal, taken into the head's grid, is within a few degrees of a voxel axis; the
    Gaussian is that covariance's diagonal (it blurs, it moves nothing)."""
    spacing = np.abs(np.asarray(affine)[:3, :3].diagonal())
    normal = np.linalg.inv(head_to_scanner)[:3, :3] @ grid.normal  # LPS; |x|, |y| as in RAS
    voxel = float(spacing.min())
    s_slice = math.sqrt(max(grid.thickness**2 - voxel**2, 0.0)) / 2.355
    s_plane = math.sqrt(max(grid.pixel**2 - voxel**2, 0.0)) / 2.355
    variance = s_plane**2 + (s_slice**2 - s_plane**2) * normal**2
    sigma = np.sqrt(np.maximum(variance, 0.0)) / spacing
    sigma[sigma < 0.25] = 0.0
    if not sigma.any():
        return image
    return ndi.gaussian_filter(image, sigma, mode="nearest", truncate=3.0).astype(np.float32)


def _background_sigma(head: Head, modality: str) -> float:
    """Noise level of the head's background (Rayleigh: median / 1.1774), from every 5th voxel."""
    background = head.images[modality][~head.head_mask][::5]
    return float(np.median(background)) / 1.1774 if background.size else 0.0


@dataclass(frozen=True)
class _Scanner:
    """A study's scanner: vendor, model and field strength."""

    vendor: str
    model: str
    tesla: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Scanner:
        vendor = str(rng.choice(list(_SCANNERS)))
        model = str(rng.choice(list(_SCANNERS[vendor])))
        return cls(vendor, model, _SCANNERS[vendor][model])


def _sequence(rng: np.random.Generator, plan: _Plan, scanner: _Scanner) -> dict[str, Any]:
    """Timing and sequence tags of a series, as its vendor sets them (ms, degrees)."""
    vendor = scanner.vendor
    siemens, ge = vendor == "SIEMENS", vendor == "GE MEDICAL SYSTEMS"
    key = plan.key
    if key in ("t1ce_3d", "t1_3d"):
        if siemens:
            seq = {"TR": rng.uniform(1900, 2300), "TE": rng.uniform(2.2, 3.0), "TI": rng.uniform(900, 1100),
                   "FA": 8.0, "SS": ["GR", "IR"], "SV": ["SK", "SP", "MP"], "SN": "*tfl3d1_16ns", "ETL": 1}  # fmt: skip
        elif ge:
            seq = {"TR": rng.uniform(7.5, 9.5), "TE": rng.uniform(2.8, 3.6), "TI": rng.uniform(900, 1050),
                   "FA": 12.0, "SS": ["GR", "IR"], "SV": ["SS", "SK"], "SN": "efgre3d", "ETL": 1}  # fmt: skip
        else:
            seq = {"TR": rng.uniform(7.0, 9.0), "TE": rng.uniform(3.2, 4.0), "FA": 8.0, "SS": ["GR"],
                   "SV": ["SS", "SP"], "SN": "T1TFE", "ETL": 1}  # fmt: skip
    elif key in ("t1_2d", "t1_dup"):
        seq = {"TR": rng.uniform(400, 700), "TE": rng.uniform(8, 15), "FA": 90.0, "SS": ["SE"], "SV": ["SP"],
               "SN": "*se2d1" if siemens else ("se2d" if ge else "SE"), "ETL": 1}  # fmt: skip
    elif key in ("t2_2d", "t2_cor"):
        seq = {"TR": rng.uniform(3500, 6500), "TE": rng.uniform(85, 115), "FA": 150.0 if siemens else 90.0,
               "SS": ["SE"], "SV": ["SK", "SP"], "SN": "*tse2d1_18" if siemens else ("fse-xl" if ge else "TSE"),
               "ETL": int(rng.integers(12, 24))}  # fmt: skip
    elif key == "flair_2d":
        seq = {"TR": rng.uniform(8000, 10000), "TE": rng.uniform(80, 130), "TI": rng.uniform(2000, 2500),
               "FA": 150.0 if siemens else 90.0, "SS": ["SE", "IR"], "SV": ["SK", "SP", "MP"],
               "SN": "*tir2d1_21" if siemens else ("fseir" if ge else "IR"), "ETL": int(rng.integers(14, 28))}  # fmt: skip
    elif key == "flair_3d":
        seq = {"TR": rng.uniform(4800, 7000), "TE": rng.uniform(320, 420), "TI": rng.uniform(1650, 2200),
               "FA": 120.0 if siemens else 90.0, "SS": ["SE", "IR"], "SV": ["SK", "SP", "MP"],
               "SN": "*spcir3d1_278ns" if siemens else ("cube-ir" if ge else "TSE"), "ETL": int(rng.integers(150, 280))}  # fmt: skip
    elif key in ("dwi", "adc"):
        seq = {"TR": rng.uniform(4000, 8000), "TE": rng.uniform(80, 100), "FA": 90.0, "SS": ["EP"],
               "SV": ["SK", "SP"], "SN": "*ep_b1000t" if siemens else ("epi2" if ge else "DwiSE"), "ETL": 1}  # fmt: skip
    else:  # localiser
        seq = {"TR": rng.uniform(7.0, 9.0), "TE": rng.uniform(3.0, 4.5), "FA": 20.0, "SS": ["GR"], "SV": ["SP"],
               "SN": "*fl2d1" if siemens else ("fgre" if ge else "FFE"), "ETL": 1}  # fmt: skip
    return seq


def _description(rng: np.random.Generator, plan: _Plan, vendor: str, number: int) -> tuple[str, str]:
    """SeriesDescription and ProtocolName in the vendor's style (both vague for a vague series)."""
    if plan.vague:
        text = str(rng.choice(list(_VAGUE))).format(number=number)
        return text, {"SIEMENS": text, "GE MEDICAL SYSTEMS": "BRAIN TUMOR", "Philips": "SENSE"}[vendor]
    word = _PLANE_WORDS[vendor][plan.planes[0]]
    template = str(rng.choice(_DESCRIPTIONS[vendor][plan.key]))
    text = template.format(plane=word, PLANE=word.upper(), Plane=word.capitalize())
    protocol = {"SIEMENS": text, "GE MEDICAL SYSTEMS": "BRAIN TUMOR", "Philips": f"{text} SENSE"}[vendor]
    return text, protocol


def _uid(seed: int, *parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["tumorseg-dicom-study", str(seed), *map(str, parts)]))


def _series_number(vendor: str, position: int) -> int:
    """Philips numbers series 101, 201 ...; the others 1, 2 ..."""
    return 100 * position + 1 if vendor == "Philips" else position


def _stored(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """uint16 12-bit pixels of a series and the scale back to its intensities (RescaleSlope)."""
    top = float(np.percentile(values[values > 0], 99.8)) if (values > 0).any() else 1.0
    gain = rng.uniform(2400.0, 3400.0) / max(top, 1e-6)
    pixels = np.clip(np.rint(values * gain), 0, _STORED_MAX).astype(np.uint16)
    return pixels, 1.0 / gain


def _render_series(
    head: Head,
    plan: _Plan,
    grids: list[_Grid],
    head_to_scanner: np.ndarray,
    rng: np.random.Generator,
    sigmas: dict[str, float],
) -> np.ndarray:
    """The series' intensities, ``(slices, rows, columns)`` float32 (a localiser: one slice per grid);
    ``sigmas``: the head's background noise level per modality."""
    voxel_from_lps = np.linalg.inv(head.affine) @ LPS_FROM_RAS @ np.linalg.inv(head_to_scanner)
    head_sigma = sigmas[plan.source]
    sigma = np.float32(max(head_sigma * plan.noise, 1e-3))
    slices = []
    for grid in grids:
        source = _acquired(head.images[plan.source], head.affine, grid, head_to_scanner)
        values, outside = _resample(source, voxel_from_lps @ grid.index_to_lps, grid, 1)
        del source
        if plan.weighting == "dwi":  # b1000 trace: free water (bright on T2) fades; ADC keeps it bright
            top = np.float32(np.percentile(values[values > 0], 99.0)) if (values > 0).any() else np.float32(1)
            values = values * np.exp(-np.clip(values / top, 0.0, 1.0) * np.float32(0.7))
        values = rician_noise(rng, values, sigma).astype(np.float32)
        if outside.any():  # beyond the case's box: background noise only, at the head's level
            full = np.float32(math.hypot(head_sigma, float(sigma)))
            values[outside] = rician_noise(rng, np.zeros(int(outside.sum()), np.float32), full)
        slices.append(values)
    return np.concatenate(slices, axis=0)


def _write_series(
    folder: Path,
    pixels: np.ndarray,
    slope: float,
    grids: list[_Grid],
    common: dict[str, Any],
    series_uid: str,
    seed: int,
    study: str,
) -> None:
    """One DICOM file per slice (``IM0001.dcm`` ...), explicit VR little endian, file meta included."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    folder.mkdir(parents=True)
    values = pixels.astype(np.float32) * np.float32(slope)
    body = values[pixels > 0]
    lo, hi = np.percentile(body, [1.0, 99.5]) if body.size else (0.0, 1.0)
    ds = Dataset()
    for name, value in common.items():
        setattr(ds, name, value)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SeriesInstanceUID = series_uid
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if common["Manufacturer"] == "Philips":  # stored x RescaleSlope; the window applies to that
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", _ds(slope), "US"
        centre, width = (lo + hi) / 2.0, hi - lo
    else:
        centre, width = (lo + hi) / 2.0 / slope, (hi - lo) / slope
    ds.WindowCenter, ds.WindowWidth = _ds(round(float(centre))), _ds(round(max(float(width), 1.0)))
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "TUMORSEG_SYNTH"
    k = 0
    for grid in grids:
        ds.ImageOrientationPatient = [_ds(v) for v in (*grid.row, *grid.col)]
        ds.PixelSpacing = [_ds(grid.pixel), _ds(grid.pixel)]
        ds.SliceThickness = _ds(grid.thickness)
        ds.SpacingBetweenSlices = _ds(grid.step)
        ds.Rows, ds.Columns = grid.rows, grid.columns
        for s in range(grid.slices):
            k += 1
            sop = _uid(seed, study, series_uid, k)
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.InstanceNumber = k
            position = grid.position(s)
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(position @ grid.normal))
            ds.PixelData = np.ascontiguousarray(pixels[k - 1]).tobytes()
            ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)


def _labels_on(
    case: SyntheticCase, head: Head, grid: _Grid, head_to_scanner: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The case's labels and brain mask on a series grid (nearest neighbour), ``(columns, rows, slices)``."""
    voxel_from_index = (
        np.linalg.inv(head.affine) @ LPS_FROM_RAS @ np.linalg.inv(head_to_scanner) @ grid.index_to_lps
    )
    labels, _ = _resample(case.labels.astype(np.float32), voxel_from_index, grid, 0)
    brain, _ = _resample(case.brain_mask.astype(np.float32), voxel_from_index, grid, 0)
    return (
        np.rint(labels).astype(np.uint8).transpose(2, 1, 0),
        (brain > 0.5).astype(np.uint8).transpose(2, 1, 0),
    )


def _save_nifti(path: Path, data: np.ndarray, affine_ras: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(data), affine_ras)
    img.header.set_qform(affine_ras, code=1)
    img.header.set_sform(affine_ras, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _common_tags(
    scanner: _Scanner,
    study_index: int,
    study_uid: str,
    frame_uid: str,
    patient: dict[str, str],
) -> dict[str, Any]:
    """Tags every file of the study shares."""
    date = f"2024{1 + (study_index * 7) % 12:02d}{1 + (study_index * 11) % 28:02d}"
    return {
        "SpecificCharacterSet": "ISO_IR 100",
        "StudyDate": date,
        "SeriesDate": date,
        "AcquisitionDate": date,
        "ContentDate": date,
        "StudyTime": "081500",
        "AccessionNumber": f"A{study_index:07d}",
        "Modality": "MR",
        "Manufacturer": scanner.vendor,
        "ManufacturerModelName": scanner.model,
        "InstitutionName": "TUMORSEG SYNTHETIC",
        "ReferringPhysicianName": "",
        "StudyDescription": "MR BRAIN TUMOR",
        "PatientName": f"SYNTH^HEAD{study_index}",
        "PatientID": f"SYNTH{study_index:04d}",
        "PatientBirthDate": "",
        "PatientSex": patient["sex"],
        "PatientAge": patient["age"],
        "PatientPosition": "HFS",
        "BodyPartExamined": "BRAIN",
        "MagneticFieldStrength": _ds(scanner.tesla),
        "ImagingFrequency": _ds(round(42.577478 * scanner.tesla, 6)),
        "ImagedNucleus": "1H",
        "StudyInstanceUID": study_uid,
        "StudyID": str(study_index),
        "FrameOfReferenceUID": frame_uid,
        "PositionReferenceIndicator": "",
    }


def _series_tags(
    plan: _Plan, seq: dict[str, Any], number: int, description: str, protocol: str, agent: str
) -> dict[str, Any]:
    """Tags every file of one series shares."""
    minutes = 15 + 4 * (number if number < 100 else number // 100)
    tags: dict[str, Any] = {
        "ImageType": ["DERIVED", "PRIMARY", "ADC", "ADC"]
        if plan.weighting == "adc"
        else ["ORIGINAL", "PRIMARY", "M", "ND"],
        "SeriesTime": f"08{minutes:02d}00",
        "AcquisitionTime": f"08{minutes:02d}30",
        "SeriesNumber": number,
        "AcquisitionNumber": 1,
        "SeriesDescription": description,
        "ProtocolName": protocol,
        "ScanningSequence": seq["SS"],
        "SequenceVariant": seq["SV"],
        "ScanOptions": "",
        "MRAcquisitionType": plan.acquisition,
        "SequenceName": seq["SN"],
        "RepetitionTime": _ds(round(float(seq["TR"]), 2)),
        "EchoTime": _ds(round(float(seq["TE"]), 2)),
        "NumberOfAverages": "1",
        "EchoTrainLength": int(seq["ETL"]),
        "FlipAngle": _ds(float(seq["FA"])),
        "InPlanePhaseEncodingDirection": "ROW" if plan.planes[0] == "axial" else "COL",
    }
    if "TI" in seq:
        tags["InversionTime"] = _ds(round(float(seq["TI"]), 1))
    if plan.weighting in ("dwi", "adc"):
        tags["DiffusionBValue"] = 1000.0
    if agent:
        tags["ContrastBolusAgent"] = agent
        tags["ContrastBolusRoute"] = "IV"
    return tags


def write_study(
    case: SyntheticCase,
    head: Head,
    out_root: Path,
    study_index: int,
    cfg: StudiesConfig,
    seed: int,
    spacing_scale: float = 1.0,
) -> Path:
    """Write study ``study_index`` of ``head`` (generated from ``case``) under ``out_root``; its folder.

    The study folder and its truth folder are built in temporary folders and renamed into place, so a
    study is either complete or absent (a study written before is replaced). Deterministic per
    ``(seed, study_index)`` and the case. ``spacing_scale`` multiplies every pixel spacing and slice
    thickness (tests: coarse series of coarse cases).
    """
    out_root = Path(out_root)
    sid = study_id(study_index)
    rng = _study_rng(seed, study_index)
    scanner = _Scanner.draw(rng)
    plans = _plan_series(rng, cfg)
    patient = {"sex": str(rng.choice(["F", "M"])), "age": f"{int(rng.integers(25, 80)):03d}Y"}
    agent = str(rng.choice(list(_CONTRAST_AGENTS)))
    study_uid = _uid(seed, sid, "study")
    frame_uid = _uid(seed, sid, "frame")
    common = _common_tags(scanner, study_index, study_uid, frame_uid, patient)
    corners, centre = _head_box_lps(head)

    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / TRUTH_DIR).mkdir(exist_ok=True)
    tmp_study = Path(tempfile.mkdtemp(prefix=f".{sid}.", suffix=".tmp", dir=out_root))
    tmp_truth = Path(tempfile.mkdtemp(prefix=f".{sid}.", suffix=".tmp", dir=out_root / TRUTH_DIR))
    try:
        series_truth, misalignments = [], {}
        sigmas = {m: _background_sigma(head, m) for m in head.images}
        t1ce_geometry: tuple[_Grid, np.ndarray] | None = None
        for position, plan in enumerate(plans, start=1):
            number = _series_number(scanner.vendor, position)
            if plan.misalign_like:
                transform = misalignments[plan.misalign_like]
            else:
                transform = _misalignment(rng, centre, cfg.max_rotation_deg, cfg.max_shift_mm)
            misalignments[plan.key] = transform
            moved = (transform[:3, :3] @ corners.T).T + transform[:3, 3]
            pixel, thickness = plan.pixel * spacing_scale, plan.thickness * spacing_scale
            step = round(thickness * (1.0 + plan.gap), 3)
            grids = [
                _grid(rng, p, moved, pixel, round(thickness, 3), step, single_slice=len(plan.planes) > 1)
                for p in plan.planes
            ]
            values = _render_series(head, plan, grids, transform, rng, sigmas)
            pixels, slope = _stored(values, rng)
            del values
            seq = _sequence(rng, plan, scanner)
            description, protocol = _description(rng, plan, scanner.vendor, number)
            series_uid = _uid(seed, sid, "series", number)
            tags = {
                **common,
                **_series_tags(
                    plan, seq, number, description, protocol, agent if plan.modality == "t1ce" else ""
                ),
            }
            folder = f"S{number:03d}"
            _write_series(tmp_study / folder, pixels, slope, grids, tags, series_uid, seed, sid)
            if plan.modality == "t1ce":
                t1ce_geometry = (grids[0], transform)
            series_truth.append(
                {
                    "modality": plan.modality,
                    "weighting": plan.weighting,
                    "series_uid": series_uid,
                    "series_number": number,
                    "description": description,
                    "protocol_name": protocol,
                    "vague_description": plan.vague,
                    "folder": folder,
                    "files": int(pixels.shape[0]),
                    "head_to_scanner": transform.tolist(),
                    "timing_ms": {k: round(float(seq[k]), 2) for k in ("TR", "TE", "TI") if k in seq},
                    "contrast_agent": agent if plan.modality == "t1ce" else "",
                    "geometry": grids[0].describe(plan.acquisition)
                    if len(grids) == 1
                    else {
                        "acquisition": plan.acquisition,
                        "planes": [g.describe(plan.acquisition) for g in grids],
                    },
                }
            )
        assert t1ce_geometry is not None
        grid, t1ce_transform = t1ce_geometry
        for entry in series_truth:
            entry["from_t1ce"] = (
                np.asarray(entry["head_to_scanner"]) @ np.linalg.inv(t1ce_transform)
            ).tolist()
        labels, brain = _labels_on(case, head, grid, t1ce_transform)
        affine_ras = LPS_FROM_RAS @ grid.index_to_lps
        _save_nifti(tmp_truth / SEG_NAME, labels, affine_ras)
        _save_nifti(tmp_truth / BRAIN_NAME, brain, affine_ras)
        written = write_case(case, tmp_truth / NIFTI_DIR, layout="brats2021")
        record = {
            "study_id": sid,
            "study_index": study_index,
            "seed": seed,
            "study_instance_uid": study_uid,
            "frame_of_reference_uid": frame_uid,
            "patient_name": common["PatientName"],
            "patient_id": common["PatientID"],
            "manufacturer": scanner.vendor,
            "model": scanner.model,
            "field_strength_t": scanner.tesla,
            "case_index": case.index,
            "case_id": case_id("brats2021", case.index),
            "case_affine_ras": np.asarray(case.affine).tolist(),
            "case_shape": list(case.shape),
            "label_convention": case.convention,
            "head_lps_from_case_ras": LPS_FROM_RAS.tolist(),
            "head_centre_lps": [float(v) for v in centre],
            "seg_t1ce": SEG_NAME,
            "brain_t1ce": BRAIN_NAME,
            "nifti": f"{NIFTI_DIR}/{written.name}",
            "series": series_truth,
        }
        write_json(tmp_truth / TRUTH_NAME, record)
        _publish(tmp_truth, out_root / TRUTH_DIR / sid)
        _publish(tmp_study, out_root / sid)
    finally:
        for tmp in (tmp_study, tmp_truth):
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out_root / sid


def _publish(tmp: Path, target: Path) -> None:
    """Rename a finished temporary folder to ``target``, replacing an older one (never half visible)."""
    os.chmod(tmp, file_mode(0o777))  # mkdtemp makes it private; a dataset is shared
    write_point(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old.{os.getpid()}")
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def _generate_study(index: int, out: Path, cfg: SynthConfig, scfg: StudiesConfig) -> Path:
    """Study ``index``: case ``index`` of ``cfg`` in its head, written under ``out`` (a worker's job)."""
    case = synthesize_case(index, cfg)
    return write_study(case, synth_head(case, scfg.seed), out, index, scfg, scfg.seed)


def synth_studies(
    params: Params,
    out: Path | None = None,
    n: int | None = None,
    progress: Callable[[str], None] = print,
    workers: int = 2,
) -> list[Path]:
    """Generate ``n`` studies (default ``dicom.studies.studies``) under ``out`` (``dicom.studies.out``).

    Study ``i`` scans case ``i`` of ``synth`` at 1 mm (BraTS size) with ``dicom.studies.seed`` as the
    seed, wrapped in its head; a study already complete is skipped (one ``progress`` line each). The
    others are written in ``workers`` processes (0: one per core), with studies done of all, rate and
    time left on screen; ``workers`` does not change the output. Returns the study folders in order.
    """
    from tumorseg.data.parallel import map_cases

    scfg = params.dicom.studies
    out = Path(out if out is not None else scfg.out)
    n = scfg.studies if n is None else int(n)
    cfg: SynthConfig = params.synth.model_copy(
        update={"spacing_mm": 1.0, "seed": scfg.seed, "layout": "brats2021", "labels": "auto"}
    )
    todo = []
    for i in range(1, n + 1):
        if study_complete(out, i):
            progress(f"dicom studies: {i}/{n} {study_id(i)} already complete")
        else:
            todo.append(i)
    work = partial(_generate_study, out=out, cfg=cfg, scfg=scfg)
    for _ in map_cases(work, todo, workers=workers, what="dicom studies", unit="studies"):
        pass
    return [out / study_id(i) for i in range(1, n + 1)]
