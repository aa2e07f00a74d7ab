"""DICOM studies as they come off a scanner or PACS: files grouped by study and series, each series
classified as T1 / T1ce / T2 / FLAIR / other, one series picked per modality and read with its
geometry checked.

Everything reads headers only (``stop_before_pixels``) until a series is picked; pixel data is then
read by SimpleITK (GDCM's decoders), so a compressed transfer syntax is read when GDCM can decode it
and reported by name when it cannot.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.dicom.config import MODALITIES_4, ClassifyConfig
from tumorseg.errors import DataError

MODALITY_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR", "other": "other"}
MAX_ZIP_BYTES = 8 * 1024**3  # a study unpacked beyond this is refused (a zip bomb, not a study)
_MIN_VOLUME_SLICES = 10  # fewer images than this is a localiser or a single slab, never a volume
_NON_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation",
    "1.2.840.10008.5.1.4.1.1.11.1": "a presentation state",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
}
_TRANSFER_SYNTAX_NAMES = {
    "1.2.840.10008.1.2": "implicit VR little endian",
    "1.2.840.10008.1.2.1": "explicit VR little endian",
    "1.2.840.10008.1.2.2": "explicit VR big endian",
    "1.2.840.10008.1.2.1.99": "deflated explicit VR little endian",
    "1.2.840.10008.1.2.5": "RLE lossless",
    "1.2.840.10008.1.2.4.50": "JPEG baseline",
    "1.2.840.10008.1.2.4.51": "JPEG extended",
    "1.2.840.10008.1.2.4.57": "JPEG lossless",
    "1.2.840.10008.1.2.4.70": "JPEG lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "HTJ2K lossless",
    "1.2.840.10008.1.2.4.202": "HTJ2K lossless RPCL",
    "1.2.840.10008.1.2.4.203": "HTJ2K",
    "1.2.840.10008.1.2.4.110": "JPEG XL lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
}


class DicomInputError(DataError):
    """A DICOM input that cannot be imported: the message names the series and what is wrong."""


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _floats(value: Any) -> tuple[float, ...] | None:
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


@dataclass
class SliceHeader:
    """What one file says about itself (headers only)."""

    path: Path
    sop_uid: str
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    rows: int
    columns: int
    frames: int
    is_image: bool
    sop_class: str
    transfer_syntax: str


@dataclass
class Series:
    """One series of a study: its descriptive tags, its files and how it was classified."""

    study_uid: str
    uid: str
    number: int
    description: str
    protocol: str
    sequence_name: str
    image_type: str
    modality_tag: str
    echo_time: float | None
    repetition_time: float | None
    inversion_time: float | None
    contrast: bool
    acquisition_type: str
    slice_thickness: float | None
    diffusion: bool
    slices: list[SliceHeader] = field(default_factory=list)
    modality: str = "other"
    reason: str = ""

    @property
    def label(self) -> str:
        """How a user recognises the series: number and description."""
        desc = self.description or "no description"
        return f'series {self.number} "{desc}"'

    @property
    def images(self) -> list[SliceHeader]:
        return [s for s in self.slices if s.is_image]

    @property
    def n_images(self) -> int:
        return sum(max(1, s.frames) for s in self.images)

    def voxel_mm(self) -> tuple[float, float, float] | None:
        """In-plane spacing and slice spacing (from positions, else the thickness)."""
        first = self.images[0] if self.images else None
        if first is None or first.pixel_spacing is None:
            return None
        gap = self.slice_thickness or 1.0
        normal_gaps = _position_gaps(self.images)
        if normal_gaps is not None and len(normal_gaps):
            gap = float(np.median(normal_gaps))
        return (first.pixel_spacing[0], first.pixel_spacing[1], gap)

    def is_3d(self) -> bool:
        """A 3-D acquisition, or one whose voxels are near-isotropic (at most 1.5x)."""
        if self.acquisition_type.upper() == "3D":
            return True
        vox = self.voxel_mm()
        return vox is not None and max(vox) / max(min(vox), 1e-6) <= 1.5

    def describe(self) -> dict[str, Any]:
        vox = self.voxel_mm()
        return {
            "series_uid": self.uid,
            "series_number": self.number,
            "description": self.description,
            "modality": self.modality,
            "reason": self.reason,
            "images": self.n_images,
            "voxel_mm": None if vox is None else [round(v, 3) for v in vox],
            "acquisition": "3D" if self.is_3d() else "2D",
        }


@dataclass
class Study:
    """The series of one StudyInstanceUID."""

    uid: str
    description: str
    series: list[Series]

    @property
    def label(self) -> str:
        desc = f'"{self.description}" ' if self.description else ""
        return f"study {desc}({self.uid})"

    def of(self, modality: str) -> list[Series]:
        return [s for s in self.series if s.modality == modality]


@contextlib.contextmanager
def dicom_folder(source: str | Path) -> Iterator[Path]:
    """``source`` as a folder: itself, or a zip unpacked into a temporary folder (removed after).

    A zip member that would land outside the folder, or a zip that unpacks beyond
    :data:`MAX_ZIP_BYTES`, is refused.
    """
    src = Path(source)
    if src.is_dir():
        yield src
        return
    if not src.exists():
        raise DicomInputError(f"{src}: no such file or folder; give a DICOM folder or a .zip of one")
    if not zipfile.is_zipfile(src):
        raise DicomInputError(f"{src}: neither a folder nor a zip file; give a DICOM folder or a .zip of one")
    tmp = Path(tempfile.mkdtemp(prefix="tumorseg-dicom-"))
    try:
        with zipfile.ZipFile(src) as archive:
            total = 0
            for info in archive.infolist():
                total += info.file_size
                target = (tmp / info.filename).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise DicomInputError(
                        f"{src}: member {info.filename!r} points outside the archive; refused"
                    )
            if total > MAX_ZIP_BYTES:
                raise DicomInputError(
                    f"{src}: unpacks to {total / 1024**3:.1f} GB, more than {MAX_ZIP_BYTES / 1024**3:.0f} GB; "
                    "give the study as a folder"
                )
            archive.extractall(tmp)
        yield tmp
    except zipfile.BadZipFile as exc:
        raise DicomInputError(f"{src}: a damaged zip file ({exc}); zip the study again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_header(path: Path) -> Any | None:
    """The file's dataset without pixel data, or None when it is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=None)
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, KeyError):
        return None


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _has_contrast(ds: Any, tags: Sequence[str]) -> bool:
    for keyword in tags:
        value = ds.get(keyword, None)
        if value not in (None, "", b"") and str(value).strip() not in ("", "0", "NONE", "None"):
            return True
    return False


def scan(folder: str | Path, cfg: ClassifyConfig) -> list[Study]:
    """Every study under ``folder`` (searched recursively), its series classified.

    Files that are not DICOM (a README, a DICOMDIR's siblings, hidden files) are left out; a folder
    with no DICOM at all is a :class:`DicomInputError`.
    """
    root = Path(folder)
    studies: dict[str, Study] = {}
    series: dict[tuple[str, str], Series] = {}
    n_files = 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.name.upper() == "DICOMDIR":
            continue
        ds = _read_header(path)
        if ds is None or "SOPClassUID" not in ds:
            continue
        n_files += 1
        study_uid = _text(ds, "StudyInstanceUID") or "unknown-study"
        series_uid = _text(ds, "SeriesInstanceUID") or f"unknown-series-{path.parent}"
        study = studies.setdefault(study_uid, Study(study_uid, _text(ds, "StudyDescription"), []))
        key = (study_uid, series_uid)
        if key not in series:
            image_type = _text(ds, "ImageType").upper()
            series[key] = Series(
                study_uid=study_uid,
                uid=series_uid,
                number=int(_float(ds.get("SeriesNumber"), 0) or 0),
                description=_text(ds, "SeriesDescription"),
                protocol=_text(ds, "ProtocolName"),
                sequence_name=_text(ds, "SequenceName"),
                image_type=image_type,
                modality_tag=_text(ds, "Modality"),
                echo_time=_float(ds.get("EchoTime")),
                repetition_time=_float(ds.get("RepetitionTime")),
                inversion_time=_float(ds.get("InversionTime")),
                contrast=_has_contrast(ds, cfg.contrast_tags),
                acquisition_type=_text(ds, "MRAcquisitionType"),
                slice_thickness=_float(ds.get("SliceThickness")),
                diffusion="DiffusionBValue" in ds or "DIFFUSION" in image_type or "ADC" in image_type,
            )
            study.series.append(series[key])
        sop_class = _text(ds, "SOPClassUID")
        meta = getattr(ds, "file_meta", None)
        series[key].slices.append(
            SliceHeader(
                path=path,
                sop_uid=_text(ds, "SOPInstanceUID"),
                position=_floats(ds.get("ImagePositionPatient")),
                orientation=_floats(ds.get("ImageOrientationPatient")),
                pixel_spacing=_floats(ds.get("PixelSpacing")),
                rows=int(_float(ds.get("Rows"), 0) or 0),
                columns=int(_float(ds.get("Columns"), 0) or 0),
                frames=int(_float(ds.get("NumberOfFrames"), 1) or 1),
                is_image="Rows" in ds and sop_class not in _NON_IMAGE_CLASSES,
                sop_class=sop_class,
                transfer_syntax=_text(meta, "TransferSyntaxUID") if meta is not None else "",
            )
        )
    if n_files == 0:
        raise DicomInputError(f"{root}: no DICOM files found; give the folder (or zip) of a DICOM study")
    for study in studies.values():
        study.series.sort(key=lambda s: (s.number, s.uid))
        for s in study.series:
            s.modality, s.reason = classify(s, cfg)
    return sorted(studies.values(), key=lambda st: st.uid)


def _normalised(text: str) -> str:
    return " " + re.sub(r"[_\-./,:;()\[\]]+", " ", text.lower()) + " "


def classify(series: Series, cfg: ClassifyConfig) -> tuple[str, str]:
    """``(modality, reason)``: per-site override, then what the series is (not an image, too few
    slices, diffusion), then its description, then its sequence parameters."""
    if series.uid in cfg.overrides:
        return cfg.overrides[series.uid], "site override (series UID)"
    for pattern, modality in cfg.overrides.items():
        with contextlib.suppress(re.error):
            if re.search(pattern, series.description, flags=re.IGNORECASE):
                return modality, f"site override ({pattern!r})"
    if not series.images:
        kinds = {_NON_IMAGE_CLASSES.get(s.sop_class, "not an image") for s in series.slices}
        return "other", ", ".join(sorted(kinds))
    if series.modality_tag and series.modality_tag != "MR":
        return "other", f"modality {series.modality_tag}, not MR"
    if "LOCALIZER" in series.image_type:
        return "other", "a localiser (ImageType)"
    if series.n_images < _MIN_VOLUME_SLICES:
        return "other", f"{series.n_images} images: too few for a volume"
    if series.diffusion:
        return "other", "diffusion (b-value or ImageType)"
    text = _normalised(" ".join((series.description, series.protocol, series.sequence_name)))
    for modality in cfg.order:
        for pattern in cfg.patterns.get(modality, []):
            if re.search(pattern, text):
                return _with_contrast(modality, series, text, f"description matches {pattern!r}")
    return _by_parameters(series, cfg)


def _with_contrast(modality: str, series: Series, text: str, reason: str) -> tuple[str, str]:
    """A T1 with a contrast agent tag is T1ce; a "T1ce" description that says "pre" is T1 unless the
    agent tag is there."""
    pre = re.search(r"\bpre\b|\bnative\b|\bnon ?contrast\b|\bwithout\b", text) is not None
    if modality == "t1" and series.contrast:
        return "t1ce", reason + " and a contrast agent tag"
    if modality == "t1ce" and pre and not series.contrast:
        return "t1", reason + ", but it says pre-contrast and has no agent tag"
    return modality, reason


def _by_parameters(series: Series, cfg: ClassifyConfig) -> tuple[str, str]:
    te, ti = series.echo_time, series.inversion_time
    if te is None:
        return "other", "description says nothing and no echo time"
    if ti is not None and ti >= cfg.flair_min_ti_ms and te > cfg.t2_min_te_ms:
        return "flair", f"TE {te:g} ms and TI {ti:g} ms (inversion-recovery T2)"
    if te > cfg.t2_min_te_ms:
        return "t2", f"TE {te:g} ms (T2-weighted)"
    if te < cfg.t1_max_te_ms:
        if series.contrast:
            return "t1ce", f"TE {te:g} ms (T1-weighted) and a contrast agent tag"
        return "t1", f"TE {te:g} ms (T1-weighted), no contrast agent tag"
    return "other", f"TE {te:g} ms: neither T1- nor T2-weighted"


def _preference(series: Series) -> tuple[Any, ...]:
    """Sort key, best first: 3-D before 2-D, smaller voxels, more images, the later series."""
    vox = series.voxel_mm() or (99.0, 99.0, 99.0)
    return (not series.is_3d(), round(float(np.prod(vox)), 3), -series.n_images, -series.number)


def pick_series(study: Study) -> dict[str, Series]:
    """One series per modality (3-D over 2-D, finer over coarser); a study without one of the four is
    a one-line error saying what it has."""
    missing = [m for m in MODALITIES_4 if not study.of(m)]
    if missing:
        have = "; ".join(
            f"{MODALITY_NAMES[m]}: " + ", ".join(s.label for s in study.of(m))
            for m in (*MODALITIES_4, "other")
            if study.of(m)
        )
        names = ", ".join(MODALITY_NAMES[m] for m in missing)
        raise DicomInputError(
            f"{study.label}: no {names} series found; it has {have or 'no series'} "
            "(if a series is mislabelled, add its description or UID to dicom.classify.overrides)"
        )
    return {m: sorted(study.of(m), key=_preference)[0] for m in MODALITIES_4}


def _position_gaps(images: Sequence[SliceHeader]) -> np.ndarray | None:
    """Distances between consecutive slice positions along the slice normal, sorted."""
    if len(images) < 2 or images[0].orientation is None or any(s.position is None for s in images):
        return None
    row, col = np.asarray(images[0].orientation[:3]), np.asarray(images[0].orientation[3:6])
    normal = np.cross(row, col)
    depth = np.sort([float(np.dot(normal, s.position)) for s in images])  # type: ignore[arg-type]
    return np.diff(depth)


def sorted_slices(series: Series) -> list[SliceHeader]:
    """The series' images in slice order along the normal (SimpleITK's order), after the checks of
    :func:`check_geometry`."""
    images = series.images
    row, col = np.asarray(images[0].orientation[:3]), np.asarray(images[0].orientation[3:6])  # type: ignore[index]
    normal = np.cross(row, col)
    return sorted(images, key=lambda s: float(np.dot(normal, s.position)))  # type: ignore[arg-type]


def check_geometry(series: Series) -> None:
    """One-line errors for what makes a series no volume: images of different sizes, orientations
    or pixel spacings, missing geometry tags, two images at one position, missing slices or a
    slice spacing that varies."""
    images = series.images
    name = series.label
    strays = [s for s in series.slices if not s.is_image]
    if strays:
        kind = _NON_IMAGE_CLASSES.get(strays[0].sop_class, "a file without pixel data")
        raise DicomInputError(
            f"{name}: {strays[0].path.name} is not an image ({kind}) but carries the series' UID; "
            "remove it from the series folder and import again"
        )
    if len(images) == 1 and images[0].frames > 1:
        return  # one multi-frame object: its per-frame geometry is checked by the reader
    if any(s.position is None or s.orientation is None or s.pixel_spacing is None for s in images):
        raise DicomInputError(
            f"{name}: images without ImagePositionPatient, ImageOrientationPatient or PixelSpacing; "
            "it cannot be placed in space"
        )
    if len({(s.rows, s.columns) for s in images}) > 1:
        raise DicomInputError(f"{name}: images of different sizes; it is not one volume")
    if np.ptp(np.asarray([s.orientation for s in images]), axis=0).max() > 1e-3:
        raise DicomInputError(f"{name}: images in different orientations; it is not one volume")
    if np.ptp(np.asarray([s.pixel_spacing for s in images]), axis=0).max() > 1e-3:
        raise DicomInputError(f"{name}: images with different pixel spacings; it is not one volume")
    gaps = _position_gaps(images)
    assert gaps is not None
    if (gaps < 1e-3).any():
        raise DicomInputError(
            f"{name}: two images at the same slice position (several echoes or repeats in one series); "
            "split it or pick another series with dicom.classify.overrides"
        )
    step = float(np.median(gaps))
    if (gaps > 1.5 * step).any():
        where = int(np.argmax(gaps > 1.5 * step)) + 1
        missing = int(round(float(gaps.max()) / step)) - 1
        raise DicomInputError(
            f"{name}: {missing} slice(s) missing after slice {where} of {len(images)} "
            f"(gap {gaps.max():.2f} mm, spacing {step:.2f} mm); export the whole series again"
        )
    if np.ptp(gaps) > max(0.01 * step, 1e-3):
        raise DicomInputError(
            f"{name}: slice spacing varies from {gaps.min():.3f} to {gaps.max():.3f} mm; "
            "it is not one regular volume (resample it on the scanner or pick another series)"
        )


def read_series(series: Series) -> tuple[Any, list[Path]]:
    """The series as a SimpleITK float32 image (rescale applied, LPS geometry) and its files in slice
    order; one-line errors for a broken geometry or pixel data the installed decoders cannot read."""
    import SimpleITK as sitk

    check_geometry(series)
    images = series.images
    files = [images[0].path] if len(images) == 1 else [s.path for s in sorted_slices(series)]
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in files])
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        with _quiet_itk():
            image = reader.Execute()
    except RuntimeError as exc:
        syntax = images[0].transfer_syntax
        syntax_name = _TRANSFER_SYNTAX_NAMES.get(syntax, "an unknown transfer syntax")
        if syntax not in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"):
            raise DicomInputError(
                f"{series.label}: pixel data in {syntax_name} ({syntax}) cannot be decoded by the installed "
                "decoders (SimpleITK/GDCM); export it uncompressed (e.g. gdcmconv --raw) and import again"
            ) from None
        detail = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
        raise DicomInputError(f"{series.label}: its pixel data cannot be read ({detail})") from None
    if image.GetDimension() != 3 or min(image.GetSize()) < 2:
        raise DicomInputError(f"{series.label}: not a 3-D volume (size {image.GetSize()})")
    return image, files


@contextlib.contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK's warnings (``GDCMImageIO``...) go to stderr from C++; they are not errors here."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)
