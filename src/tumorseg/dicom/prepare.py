"""A DICOM study to a BraTS-ready case: T1, T2 and FLAIR co-registered to T1ce (rigid, mutual
information), N4 bias correction, 1 mm resampling, brain extraction, written as a ``brats2021``
case folder with the transforms and the T1ce series' geometry needed to go back
(``tumorseg_import.json``).

Geometry is SimpleITK's: LPS physical points, ``direction`` columns are the index axes. A transform
``fixed_to_moving`` maps a point of the T1ce frame to the same anatomy in another series' frame
(SimpleITK's registration convention). The written case's grid has RAS-aligned axes (LPS direction
``diag(-1, -1, 1)``), so its arrays are in RAS order and its NIfTI affine is diagonal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.dicom.config import MODALITIES_4, BiasConfig, DicomConfig, RegisterConfig
from tumorseg.dicom.series import DicomInputError, Series, Study, dicom_folder, pick_series, read_series, scan
from tumorseg.errors import DataError, first_line
from tumorseg.faults import write_point

IMPORT_RECORD = "tumorseg_import.json"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_RAS_AXES_LPS = np.diag([-1.0, -1.0, 1.0])  # the written grid's direction (LPS): RAS-ordered arrays
_BRAIN_MARGIN_MM = 10.0


@dataclass(frozen=True)
class Geometry:
    """A 3-D grid in LPS: voxel count, spacing (mm), origin (centre of voxel 0) and direction."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: Any) -> Geometry:
        return cls(
            tuple(int(v) for v in image.GetSize()),  # type: ignore[arg-type]
            tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
            tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
            tuple(float(v) for v in image.GetDirection()),
        )

    @classmethod
    def from_ras_affine(cls, affine: np.ndarray, shape: tuple[int, ...]) -> Geometry:
        """The grid of a NIfTI image (RAS ``affine``, array ``shape``)."""
        lps = _LPS_TO_RAS @ np.asarray(affine, dtype=float)
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        direction = lps[:3, :3] / spacing
        return cls(
            tuple(int(n) for n in shape[:3]),  # type: ignore[arg-type]
            tuple(float(v) for v in spacing),  # type: ignore[arg-type]
            tuple(float(v) for v in lps[:3, 3]),  # type: ignore[arg-type]
            tuple(float(v) for v in direction.ravel()),
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        return cls(tuple(d["size"]), tuple(d["spacing"]), tuple(d["origin"]), tuple(d["direction"]))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    def image(self, pixel: int | None = None) -> Any:
        """An empty SimpleITK image on this grid (a resampling reference)."""
        import SimpleITK as sitk

        return self.place(sitk.Image(list(self.size), sitk.sitkUInt8 if pixel is None else pixel))

    def image_of(self, array: np.ndarray) -> Any:
        """A SimpleITK image of ``array`` (this grid's shape, indexed ``(i, j, k)``) on this grid."""
        import SimpleITK as sitk

        return self.place(sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).transpose(2, 1, 0))))

    def place(self, img: Any) -> Any:
        """``img`` (a SimpleITK image of this grid's size) given this grid's spacing, origin, direction."""
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(self.direction)
        return img

    def index_to_lps(self) -> np.ndarray:
        """4x4: continuous voxel index ``(i, j, k)`` -> LPS mm."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.direction).reshape(3, 3) @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ras_affine(self) -> np.ndarray:
        """The NIfTI affine (voxel index -> RAS mm) of this grid."""
        return _LPS_TO_RAS @ self.index_to_lps()


def rigid_matrix(transform: Any) -> np.ndarray:
    """4x4 LPS matrix of a SimpleITK rigid/affine transform (``y = A (x - c) + t + c``)."""
    t = transform
    if hasattr(t, "GetNthTransform") and t.GetNumberOfTransforms() == 1:
        t = t.GetNthTransform(0)
    import SimpleITK as sitk

    affine = sitk.AffineTransform(3)
    affine.SetMatrix(t.GetMatrix())
    affine.SetTranslation(t.GetTranslation())
    affine.SetCenter(t.GetCenter())
    a = np.asarray(affine.GetMatrix()).reshape(3, 3)
    c, tr = np.asarray(affine.GetCenter()), np.asarray(affine.GetTranslation())
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = tr + c - a @ c
    return m


def matrix_transform(matrix: np.ndarray) -> Any:
    """A SimpleITK affine transform from a 4x4 LPS matrix."""
    import SimpleITK as sitk

    t = sitk.AffineTransform(3)
    t.SetMatrix(np.asarray(matrix)[:3, :3].ravel().tolist())
    t.SetTranslation(np.asarray(matrix)[:3, 3].tolist())
    return t


def register_rigid(fixed: Any, moving: Any, cfg: RegisterConfig) -> Any:
    """Rigid ``fixed -> moving`` transform maximising Mattes mutual information (multi-resolution,
    random sampling with a fixed seed). Both series share the scanner's frame of reference, so the
    search starts at the identity, centred on the fixed image."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=cfg.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(cfg.sampling_fraction, cfg.seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=cfg.learning_rate,
        minStep=cfg.min_step,
        numberOfIterations=cfg.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    set_pyramid(reg, fixed, cfg.level_spacing_mm, cfg.smoothing_sigmas_mm)
    initial = sitk.Euler3DTransform()
    size = np.asarray(fixed.GetSize()) - 1
    initial.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint((size / 2.0).tolist()))
    reg.SetInitialTransform(initial, inPlace=False)
    return reg.Execute(fixed, moving)


def set_pyramid(
    reg: Any, fixed: Any, level_spacing_mm: Sequence[float], smoothing_sigmas_mm: Sequence[float]
) -> None:
    """The levels of a SimpleITK registration in mm: each level's voxel size (a shrink factor of
    ``fixed``'s finest spacing) and its Gaussian smoothing."""
    finest = min(fixed.GetSpacing())
    reg.SetShrinkFactorsPerLevel([max(1, int(round(mm / finest))) for mm in level_spacing_mm])
    reg.SetSmoothingSigmasPerLevel(list(smoothing_sigmas_mm))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()


def output_grid(reference: Any, spacing_mm: float) -> Geometry:
    """The RAS-aligned grid at ``spacing_mm`` covering ``reference``'s field of view."""
    geo = Geometry.of(reference)
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=float)
    corners = corners * (np.asarray(geo.size) - 1)
    lps = (geo.index_to_lps() @ np.c_[corners, np.ones(8)].T)[:3].T
    axes = lps @ _RAS_AXES_LPS  # coordinates along the grid's axes (RAS)
    lo, hi = axes.min(axis=0), axes.max(axis=0)
    size = tuple(int(np.floor((h - lo_) / spacing_mm)) + 1 for lo_, h in zip(lo, hi, strict=True))
    origin = _RAS_AXES_LPS @ lo
    return Geometry(size, (spacing_mm,) * 3, tuple(float(v) for v in origin), tuple(_RAS_AXES_LPS.ravel()))  # type: ignore[arg-type]


def resample(image: Any, grid: Geometry, transform: Any | None = None, *, order: int = 1) -> Any:
    """``image`` on ``grid`` (``transform``: grid point -> image point; identity when None)."""
    import SimpleITK as sitk

    interpolator = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}[order]
    t = sitk.Transform(3, sitk.sitkIdentity) if transform is None else transform
    return sitk.Resample(image, grid.image(sitk.sitkFloat32), t, interpolator, 0.0, sitk.sitkFloat32)


def grid_array(
    image: Any,
    grid: Geometry,
    transform: Any | None,
    bias: BiasConfig,
    timed: Callable[[str, Callable[[], Any]], Any] | None = None,
) -> np.ndarray:
    """``image`` resampled onto ``grid`` (``transform``: grid point -> image point), N4-corrected when
    ``bias.enabled``, as a RAS-ordered array; ``timed(step, fn)`` runs (and times) the ``resample``
    and ``n4`` steps when given."""

    def run(_step: str, fn: Callable[[], Any]) -> Any:
        return fn()

    step = timed or run
    on_grid = step("resample", lambda: resample(image, grid, transform))
    if bias.enabled:
        on_grid = step("n4", lambda img=on_grid: correct_bias(img, bias))
    return ras_array(on_grid)


def correct_bias(image: Any, cfg: BiasConfig) -> Any:
    """N4 on a shrunk copy inside an Otsu head mask; the fitted field divides the full image."""
    import SimpleITK as sitk

    image = sitk.Cast(sitk.Clamp(image, lowerBound=0.0), sitk.sitkFloat32)
    mask = sitk.OtsuThreshold(image, 0, 1, 128)
    if sitk.GetArrayViewFromImage(mask).sum() < 1000:
        return image
    factor = [cfg.shrink_factor] * 3
    small = sitk.Shrink(image, factor) + 1e-3
    small_mask = sitk.Shrink(mask, factor)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([cfg.iterations] * cfg.fitting_levels)
    n4.Execute(small, small_mask)
    # The field is smooth: evaluated on the shrunk grid and interpolated, not a B-spline per voxel.
    log_small = n4.GetLogBiasFieldAsImage(small)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    log_field = sitk.Resample(log_small, image, identity, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(image / sitk.Exp(log_field), sitk.sitkFloat32)


def ras_array(image: Any) -> np.ndarray:
    """The voxel array of an image on a RAS-aligned grid, indexed ``(i, j, k)`` (RAS order)."""
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def case_id_for(study_uid: str) -> str:
    """A case id from the StudyInstanceUID's hash: nothing of the patient in a file name."""
    return "study-" + hashlib.sha1(study_uid.encode()).hexdigest()[:10]


@dataclass
class ImportedCase:
    """A study written as a case: its folder, what was picked and how it was brought together."""

    case_id: str
    case_dir: Path
    study: Study
    picked: dict[str, Series]
    fixed_to_moving: dict[str, np.ndarray]
    reference: Geometry
    grid: Geometry
    t1ce_files: list[Path]
    seconds: dict[str, float] = field(default_factory=dict)
    brain_mask: np.ndarray | None = None
    """The extracted brain on ``full_grid`` (in memory only: what ``dicom-check`` scores)."""
    full_grid: Geometry | None = None

    def record(self, source_root: Path) -> dict[str, Any]:
        def rel(p: Path) -> str:
            try:
                return str(p.relative_to(source_root))
            except ValueError:
                return str(p)

        return {
            "case_id": self.case_id,
            "study_uid": self.study.uid,
            "series": {m: s.describe() for m, s in self.picked.items()},
            "left_out": [s.describe() for s in self.study.series if s not in self.picked.values()],
            "fixed_to_moving_lps": {m: np.round(t, 8).tolist() for m, t in self.fixed_to_moving.items()},
            "t1ce_geometry": self.reference.to_dict(),
            "case_geometry": self.grid.to_dict(),
            "t1ce_files": [rel(p) for p in self.t1ce_files],
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


def _crop_to(mask: np.ndarray, grid: Geometry, margin_mm: float) -> tuple[tuple[slice, ...], Geometry]:
    """The brain's bounding box plus ``margin_mm`` on ``grid``, and the cropped grid."""
    if not mask.any():
        return tuple(slice(0, n) for n in grid.size), grid
    idx = np.argwhere(mask)
    margin = int(np.ceil(margin_mm / grid.spacing[0]))
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, grid.size)
    origin = grid.index_to_lps() @ np.r_[lo, 1.0]
    cropped = Geometry(
        tuple(int(v) for v in hi - lo), grid.spacing, tuple(float(v) for v in origin[:3]), grid.direction
    )  # type: ignore[arg-type]
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)), cropped


def bring_together(
    picked: dict[str, Series], cfg: DicomConfig, progress: Callable[[str], None] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Geometry, Geometry, list[Path], dict[str, float]]:
    """Read, co-register to T1ce, resample to ``cfg.spacing_mm``, N4: ``(arrays, fixed_to_moving,
    t1ce geometry, grid, t1ce files, seconds per step)``."""
    seconds: dict[str, float] = {}

    def timed(step: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        seconds[step] = seconds.get(step, 0.0) + time.perf_counter() - start
        return out

    images, t1ce_files = {}, []
    for m in MODALITIES_4:
        images[m], files = timed("read", lambda m=m: read_series(picked[m]))
        if m == "t1ce":
            t1ce_files = files
    fixed = images["t1ce"]
    transforms = {"t1ce": None}
    for m in ("t1", "t2", "flair"):
        transforms[m] = timed("register", lambda m=m: register_rigid(fixed, images[m], cfg.registration))
        if progress:
            progress(f"registered {m} to t1ce")
    grid = output_grid(fixed, cfg.spacing_mm)
    arrays: dict[str, np.ndarray] = {}
    for m in MODALITIES_4:
        arrays[m] = grid_array(images[m], grid, transforms[m], cfg.bias, timed)
    matrices = {m: (np.eye(4) if t is None else rigid_matrix(t)) for m, t in transforms.items()}
    return arrays, matrices, Geometry.of(fixed), grid, t1ce_files, seconds


def _write_case(
    case_dir: Path, case_id: str, arrays: dict[str, np.ndarray], affine: np.ndarray, record: dict[str, Any]
) -> None:
    """The case folder through a temporary folder renamed at the end: complete or absent."""
    import nibabel as nib

    from tumorseg.data.synth import file_mode  # scipy.ndimage: not on predict's cold import path

    case_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{case_id}.", suffix=".tmp", dir=case_dir.parent))
    try:
        for m, data in arrays.items():
            img = nib.Nifti1Image(data.astype(np.float32), affine)
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            img.header.set_xyzt_units("mm", "sec")
            nib.save(img, tmp / f"{case_id}_{m}.nii.gz")
        (tmp / IMPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, file_mode(0o777))  # mkdtemp makes it private; a dataset is shared
        if case_dir.exists():
            shutil.rmtree(case_dir)
        write_point(case_dir)
        os.rename(tmp, case_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def import_study(
    study: Study,
    out_root: Path,
    cfg: DicomConfig,
    brain: Any,
    *,
    source_root: Path,
    progress: Callable[[str], None] | None = None,
) -> ImportedCase:
    """One study to ``out_root/<case_id>/``: pick, read, register, N4, resample, extract the brain,
    crop to it, write. ``brain``: a :class:`~tumorseg.dicom.brain.BrainExtractor`."""
    picked = pick_series(study)
    arrays, matrices, reference, grid, t1ce_files, seconds = bring_together(picked, cfg, progress)
    start = time.perf_counter()
    try:
        mask = brain.extract(arrays, grid.ras_affine())
    except DataError as exc:
        raise DicomInputError(f"{study.label}: {picked['t1ce'].label}: {first_line(exc, 300)}") from None
    seconds["brain_extraction"] = time.perf_counter() - start
    if mask.sum() < 1000:
        raise DicomInputError(
            f"{study.label}: brain extraction found almost no brain in {picked['t1ce'].label}; "
            "check that the series show a head"
        )
    box, cropped = _crop_to(mask, grid, _BRAIN_MARGIN_MM)
    stripped = {m: np.where(mask, a, 0.0).astype(np.float32)[box] for m, a in arrays.items()}
    case_id = case_id_for(study.uid)
    case = ImportedCase(
        case_id,
        out_root / case_id,
        study,
        picked,
        matrices,
        reference,
        cropped,
        t1ce_files,
        seconds,
        mask,
        grid,
    )
    start = time.perf_counter()
    _write_case(case.case_dir, case_id, stripped, cropped.ras_affine(), case.record(source_root))
    seconds["write"] = time.perf_counter() - start
    return case


def import_studies(
    root: Path, out: str | Path, cfg: DicomConfig, brain: Any, *, progress: Callable[[str], None] = print
) -> list[ImportedCase]:
    """Every study under the folder ``root`` to a case under ``out``, one progress line each."""
    out = Path(out)
    start = time.perf_counter()
    studies = scan(root, cfg.classify)
    scanned = time.perf_counter() - start
    cases = []
    begin = time.perf_counter()
    for n, study in enumerate(studies, 1):
        case = import_study(study, out, cfg, brain, source_root=root)
        case.seconds = {"read_classify": scanned / len(studies), **case.seconds}
        picked = ", ".join(f"{m} {s.label}" for m, s in case.picked.items())
        elapsed = time.perf_counter() - begin
        left = elapsed / n * (len(studies) - n)
        progress(
            f"[{n}/{len(studies)}] {study.label} -> {case.case_dir} ({picked}); "
            f"{elapsed:.0f} s, about {left:.0f} s left"
        )
        cases.append(case)
    return cases


def import_dicom(
    source: str | Path,
    out: str | Path,
    cfg: DicomConfig,
    brain: Any,
    *,
    progress: Callable[[str], None] = print,
) -> list[ImportedCase]:
    """Every study in ``source`` (a folder or a zip) to a case under ``out``."""
    with dicom_folder(source) as root:
        return import_studies(root, out, cfg, brain, progress=progress)
