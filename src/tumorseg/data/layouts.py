"""Detect and read the public BraTS / MSD dataset layouts.

Three layouts are understood (see :data:`~tumorseg.data.conventions.LAYOUTS`):

- ``brats2021`` (BraTS 2020 and 2021): one folder per case, the folder name is the case id and
  every file is ``<case_id>_{t1,t1ce,t2,flair,seg}.nii.gz``: ``BraTS2021_00001/BraTS2021_00001_t1.nii.gz``
  or ``BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz``. Labels 0/1/2/4.
- ``brats2023`` (BraTS 2023+, any sub-challenge prefix: GLI, MEN, PED, SSA, MET...):
  ``BraTS-GLI-00001-000/BraTS-GLI-00001-000-{t1n,t1c,t2w,t2f,seg}.nii.gz``. Labels 0/1/2/3. The last
  number is the time point, so ``BraTS-GLI-00001-000`` and ``BraTS-GLI-00001-001`` share the patient
  ``BraTS-GLI-00001``.
- ``msd`` (Medical Segmentation Decathlon Task01_BrainTumour): ``imagesTr/BRATS_001.nii.gz`` holds
  the four modalities as one 4-D volume (channels FLAIR, T1w, T1gd, T2w, or as ``dataset.json``
  names them), ``labelsTr/BRATS_001.nii.gz`` the labels (1 oedema, 2 non-enhancing, 3 enhancing);
  ``imagesTs/`` holds unlabelled cases.

``src`` may be a whole dataset (cases directly inside it or one folder further down, e.g.
``MICCAI_BraTS2020_TrainingData/BraTS20_Training_001``), a single case folder, or for MSD the task
folder or its ``imagesTr``/``imagesTs`` folder, so ``tumorseg predict`` can point at any of them.

Files are read once: the compressed bytes are hashed (sha256) as they are read and decompressed in
memory, which is faster than ``nibabel.load`` on a ``.nii.gz`` and gives ingest the checksum for free.
Every problem with a file is raised (or, for ingest, collected) as a one-line message naming the file.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from tumorseg.data.conventions import (
    CANONICAL_MODALITIES,
    LAYOUTS,
    MSD_CHANNEL_ORDER,
    get_convention,
)
from tumorseg.data.manifest import FILE_KEYS
from tumorseg.errors import DataError, first_line

NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")

BRATS2021_CASE_NAME = re.compile(r"^BraTS\d{2}(?:\d{2})?_(?:[A-Za-z]+_)?\d+$")
"""``BraTS2021_00001``, ``BraTS20_Training_001``, ``BraTS20_Validation_001``."""

BRATS2023_CASE_NAME = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-(?P<timepoint>\d+)$")
"""``BraTS-GLI-00001-000`` (patient ``BraTS-GLI-00001``, time point ``000``)."""

MSD_IMAGE_FOLDERS: tuple[str, ...] = ("imagesTr", "imagesTs")
MSD_LABEL_FOLDER = "labelsTr"

_MSD_NAME_TO_MODALITY: dict[str, str] = {
    "flair": "flair",
    "t2f": "flair",
    "t1": "t1",
    "t1w": "t1",
    "t1n": "t1",
    "t1gd": "t1ce",
    "t1ce": "t1ce",
    "t1c": "t1ce",
    "t2": "t2",
    "t2w": "t2",
}
"""``dataset.json`` modality names (lower-cased) -> canonical modality."""


# ---------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, before anything is read.

    Attributes:
        case_id: folder name (BraTS) or file name without extension (MSD).
        patient_id: BraTS 2023+: the case id without its time point; otherwise the case id.
        layout: ``brats2021``, ``brats2023`` or ``msd``.
        label_convention: name of the source label convention of ``seg``.
        case_dir: the case folder (BraTS) or the ``imagesTr``/``imagesTs`` folder (MSD).
        paths: ``t1``, ``t1ce``, ``t2``, ``flair``, ``seg`` -> file, or None when absent. For MSD
            every modality names the same 4-D file.
        missing: names of expected modality files that do not exist. A missing ``seg`` is not listed:
            a case without segmentation is an unlabelled case (inference, MSD ``imagesTs``).
        channel_order: MSD only: canonical modality of each channel of the 4-D image.
    """

    case_id: str
    patient_id: str
    layout: str
    label_convention: str
    case_dir: Path
    paths: dict[str, Path | None]
    missing: list[str] = field(default_factory=list)
    channel_order: tuple[str, ...] = ()

    @property
    def has_seg(self) -> bool:
        return self.paths.get("seg") is not None

    def unique_files(self) -> dict[Path, list[str]]:
        """Each existing file once, with the keys it provides (an MSD image provides four)."""
        files: dict[Path, list[str]] = {}
        for key in FILE_KEYS:
            path = self.paths.get(key)
            if path is not None:
                files.setdefault(path, []).append(key)
        return files


@dataclass
class CaseVolumes:
    """One case in memory, in its source geometry.

    Attributes:
        case_id, patient_id, layout: as in :class:`CaseFiles`.
        image: float32 ``(4, X, Y, Z)``, channels in canonical order (t1, t1ce, t2, flair).
        labels: canonical uint8 ``(X, Y, Z)`` (0 bg, 1 NCR, 2 ED, 3 ET), or None without ``seg``.
        affine: 4x4 voxel-to-world (mm) of the reference modality (T1).
        spacing: voxel size in mm along the three array axes.
        orientation: nibabel axis codes of the affine, e.g. ``("R", "A", "S")`` -> ``"RAS"``.
        label_convention: convention the source ``seg`` used (needed to write predictions back).
        sha256: file key -> sha256 of the file as read (MSD modalities share one digest).
    """

    case_id: str
    patient_id: str
    layout: str
    image: np.ndarray
    labels: np.ndarray | None
    affine: np.ndarray
    spacing: tuple[float, float, float]
    orientation: str
    label_convention: str
    sha256: dict[str, str] = field(default_factory=dict)


@dataclass
class NiftiFile:
    """One decoded NIfTI file.

    Attributes:
        path: the file.
        data: voxel array with scaling applied, dtype as stored (or float when scaled), any ndim.
        affine: 4x4 voxel-to-world in mm.
        sha256: hex digest of the bytes on disk.
        size: bytes on disk.
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray
    sha256: str
    size: int


@dataclass
class LoadedCase:
    """All files of a case decoded as far as possible; the common ground of ingest and :func:`read_case`.

    Attributes:
        case: the files.
        files: file key -> decoded file (MSD modalities share one object).
        volumes: file key -> 3-D array of that key (an MSD channel is a view of the 4-D array); only
            keys whose file decoded with the expected dimensionality.
        sha256: file key -> digest of every file that could be read from disk (decoded or not).
        unreadable: file key -> why the file did not decode (truncated, not NIfTI, ...).
        problems: one-line reasons why the case cannot be used, in the order found: missing files,
            unreadable files, wrong dimensionality, shapes that differ. Empty when the case reads.
    """

    case: CaseFiles
    files: dict[str, NiftiFile] = field(default_factory=dict)
    volumes: dict[str, np.ndarray] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def reference_key(self) -> str | None:
        """T1 when usable, else the first usable modality: its geometry stands for the case."""
        for key in CANONICAL_MODALITIES:
            if key in self.volumes:
                return key
        return None


# ---------------------------------------------------------------------------- file reading
def read_bytes(path: Path, *, chunk_bytes: int = 8 << 20, sha256: bool = True) -> tuple[bytearray, str]:
    """Read a file into one buffer, hashing each chunk as it arrives.

    Returns:
        The bytes and their sha256 hex digest ("" with ``sha256=False``: prediction needs no provenance).

    Raises:
        DataError: naming the file when it is missing or cannot be read.
    """
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        buffer = bytearray(size)
        view = memoryview(buffer)
        pos = 0
        with path.open("rb") as fh:
            while pos < size:
                n = fh.readinto(view[pos : pos + chunk_bytes])
                if not n:
                    break
                if sha256:
                    digest.update(view[pos : pos + n])
                pos += n
        view.release()
    except FileNotFoundError:
        raise DataError(f"{path.name} does not exist ({path})") from None
    except IsADirectoryError:
        raise DataError(f"{path.name} is a folder, not a NIfTI file ({path})") from None
    except OSError as exc:
        raise DataError(f"{path.name} cannot be read ({exc.strerror or exc}): {path}") from None
    if pos < size:
        raise DataError(f"{path.name} shrank while being read; is something writing it? ({path})")
    return buffer, digest.hexdigest() if sha256 else ""


def decode_nifti(buffer: bytes | bytearray, path: Path, sha256: str = "") -> NiftiFile:
    """Decode the bytes of a ``.nii`` or ``.nii.gz`` file (gzip is recognised by its magic bytes).

    Args:
        buffer: the file's bytes, as on disk.
        path: the file, for messages.
        sha256: digest of ``buffer`` (stored on the result).

    Returns:
        The decoded file; ``data`` keeps the stored dtype (scaled to float when the header says so).

    Raises:
        DataError: naming the file: truncated, corrupt gzip, not NIfTI, unreadable header.
    """
    name = path.name
    raw = _inflate(buffer, name)
    image_class = _nifti_class(raw, name)
    try:
        image = image_class.from_bytes(raw)
        header = image.header
        shape = header.get_data_shape()
        expected = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
        if len(raw) < expected:
            raise DataError(
                f"{name} is truncated (the header promises {expected} bytes, the file holds {len(raw)}); "
                "re-download or re-export it"
            )
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except DataError:
        raise
    except (ImageFileError, HeaderDataError, ValueError, TypeError, EOFError, OSError, struct.error) as exc:
        raise DataError(f"{name} is not a readable NIfTI file ({first_line(exc, 10_000)}): {path}") from None
    if not np.all(np.isfinite(affine)):
        raise DataError(f"{name} has a non-finite affine (sform/qform); fix its header: {path}")
    return NiftiFile(path=path, data=data, affine=affine, sha256=sha256, size=len(buffer))


def read_nifti(path: Path, *, chunk_bytes: int = 8 << 20, sha256: bool = True) -> NiftiFile:
    """Read one ``.nii``/``.nii.gz`` file once: hash the bytes while reading, decode in memory.

    Why not ``nibabel.load``: it streams the gzip through Python file objects, and we would read
    the file a second time to hash it. Here the compressed bytes are read once into one buffer
    (``chunk_bytes`` at a time, each chunk hashed as it arrives), inflated by zlib in one call and
    parsed by nibabel's own header/array code, so the format rules stay nibabel's.

    Raises:
        DataError: naming the file: missing, unreadable, truncated, corrupt gzip, not NIfTI.
    """
    buffer, digest = read_bytes(path, chunk_bytes=chunk_bytes, sha256=sha256)
    return decode_nifti(buffer, path, digest)


def _inflate(buffer: bytearray, name: str) -> bytes | bytearray:
    """Decompress a gzip stream (any number of members); pass plain ``.nii`` bytes through.

    python-isal's ``igzip`` (Intel ISA-L) is a drop-in for :func:`gzip.decompress` that inflates
    about 2-3x faster; gzip decoding is most of the time it takes to read a BraTS volume.
    """
    from isal import igzip, isal_zlib

    if buffer[:2] != b"\x1f\x8b":
        return buffer
    try:
        # One gzip member (what every NIfTI writer produces) inflates in a single call, ~20 % faster
        # than igzip.decompress's member loop; anything else (several members, a truncated
        # stream) goes through igzip, which reads every member and reports truncation.
        inflater = isal_zlib.decompressobj(wbits=31)
        raw = inflater.decompress(buffer)
        if inflater.eof and not inflater.unused_data:
            return raw
        return igzip.decompress(buffer)
    except EOFError:
        raise DataError(
            f"{name} is truncated (gzip stream ended early); re-download or re-export it"
        ) from None
    except (gzip.BadGzipFile, zlib.error, isal_zlib.error, OSError) as exc:
        raise DataError(
            f"{name} is a corrupt gzip file ({first_line(exc, 10_000)}); re-download it"
        ) from None


def _nifti_class(raw: bytes | bytearray, name: str) -> type[nib.Nifti1Image] | type[nib.Nifti2Image]:
    """NIfTI-1 or NIfTI-2 from ``sizeof_hdr`` and the magic string (either byte order)."""
    if len(raw) >= 348:
        for order in ("<", ">"):
            (sizeof_hdr,) = struct.unpack_from(f"{order}i", raw, 0)
            if sizeof_hdr == 348 and bytes(raw[344:347]) in (b"n+1", b"ni1"):
                return nib.Nifti1Image
            if sizeof_hdr == 540 and len(raw) >= 540 and bytes(raw[4:7]) in (b"n+2", b"ni2"):
                return nib.Nifti2Image
    raise DataError(f"{name} is not a NIfTI file (no NIfTI-1/2 header); replace it with the real volume")


def squeeze_trailing(data: np.ndarray, ndim: int) -> np.ndarray:
    """Drop trailing length-1 axes beyond ``ndim`` (``(240, 240, 155, 1)`` is still 3-D)."""
    while data.ndim > ndim and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def shape_text(shape: tuple[int, ...]) -> str:
    """``(240, 240, 155)`` -> ``"240x240x155"`` (the manifest's shape format)."""
    return "x".join(str(int(s)) for s in shape)


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis: the lengths of the affine's first three columns."""
    return tuple(float(v) for v in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def orientation_code(affine: np.ndarray) -> str:
    """nibabel axis codes of an affine as one string, e.g. ``"RAS"`` or ``"LPS"``."""
    return "".join(code or "?" for code in nib.aff2axcodes(np.asarray(affine)))


# ---------------------------------------------------------------------------- detection
def _nifti_file(folder: Path, stem: str) -> Path | None:
    for ext in NIFTI_EXTENSIONS:
        candidate = folder / f"{stem}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _suffixes(layout: str) -> dict[str, str]:
    spec = LAYOUTS[layout]
    return {**spec.modality_suffixes, "seg": spec.seg_suffix}


def _brats_case_layout(folder: Path) -> str | None:
    """The BraTS layout of a case folder (by its name, else by its files), or None."""
    if BRATS2023_CASE_NAME.match(folder.name):
        return "brats2023"
    if BRATS2021_CASE_NAME.match(folder.name):
        return "brats2021"
    for layout in ("brats2023", "brats2021"):
        if any(_nifti_file(folder, folder.name + suffix) for suffix in _suffixes(layout).values()):
            return layout
    return None


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None


def _is_msd_root(folder: Path) -> bool:
    return any((folder / sub).is_dir() for sub in MSD_IMAGE_FOLDERS)


def _msd_images(folder: Path) -> list[Path]:
    """NIfTI files of an MSD images folder, skipping hidden/AppleDouble ``._BRATS_001.nii.gz``."""
    try:
        return sorted(
            p
            for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.endswith(NIFTI_EXTENSIONS)
        )
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None


def _scan(src: Path) -> dict[str, list[Path]]:
    """Where the cases of each layout are.

    Returns:
        layout -> folders: case folders for BraTS layouts, image folders (``imagesTr``/``imagesTs``)
        for MSD. Only layouts that were found are keys.
    """
    if not src.exists():
        raise DataError(f"{src}: no such folder; pass the dataset folder (e.g. data/synth)")
    if not src.is_dir():
        raise DataError(f"{src}: is a file; pass the folder that holds the cases")

    # MSD: the task folder, its parent, or an imagesTr/imagesTs folder itself.
    if _is_msd_root(src):
        return {"msd": [src / sub for sub in MSD_IMAGE_FOLDERS if (src / sub).is_dir()]}
    if src.name in MSD_IMAGE_FOLDERS and _msd_images(src):
        return {"msd": [src]}

    # BraTS: src is one case folder, or holds case folders, or holds a folder that holds them.
    own = _brats_case_layout(src)
    if own is not None:
        return {own: [src]}
    children = _subfolders(src)
    found: dict[str, list[Path]] = {}
    for child in children:
        layout = _brats_case_layout(child)
        if layout is not None:
            found.setdefault(layout, []).append(child)
    if found:
        return found
    msd_roots = [child for child in children if _is_msd_root(child)]
    if msd_roots:
        return {"msd": [r / sub for r in msd_roots for sub in MSD_IMAGE_FOLDERS if (r / sub).is_dir()]}
    for child in children:
        for grandchild in _subfolders(child):
            layout = _brats_case_layout(grandchild)
            if layout is not None:
                found.setdefault(layout, []).append(grandchild)
    return found


_NO_LAYOUT_HINT = (
    "expected BraTS 2020/2021 case folders (BraTS2021_00001/BraTS2021_00001_t1.nii.gz), "
    "BraTS 2023+ case folders (BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz) "
    "or an MSD Task01 folder (imagesTr/BRATS_001.nii.gz)"
)


def detect_layout(src: Path) -> str:
    """Name the layout of a dataset folder or of one case folder.

    Args:
        src: dataset folder, one case folder, or an MSD task/images folder.

    Returns:
        ``"brats2021"``, ``"brats2023"`` or ``"msd"``.

    Raises:
        DataError: the folder does not exist, is empty, matches no layout, or mixes layouts.
    """
    src = Path(src)
    found = _scan(src)
    if not found:
        if not any(p for p in src.iterdir() if not p.name.startswith(".")):
            raise DataError(f"{src}: folder is empty; put a dataset there (or set data.source: synth)")
        raise DataError(f"{src}: no known dataset layout found; {_NO_LAYOUT_HINT}")
    if len(found) > 1:
        counts = ", ".join(f"{k} ({len(v)}, first {_first_file(v)})" for k, v in sorted(found.items()))
        raise DataError(
            f"{src}: mixes dataset layouts: {counts}; keep one layout per folder or pass --layout"
        )
    return next(iter(found))


def _first_file(folders: list[Path]) -> Path:
    """The first image file of a layout's folders (for error messages)."""
    for folder in sorted(folders):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if files:
            return files[0]
    return sorted(folders)[0]


# ---------------------------------------------------------------------------- discovery
def discover_cases(src: Path, layout: str | None = None) -> list[CaseFiles]:
    """List the cases under ``src`` without reading any image.

    Args:
        src: dataset folder, one case folder, or an MSD task/images folder.
        layout: force a layout (``None`` or ``"auto"`` detects it). In a folder that mixes layouts,
            only the cases of this layout are listed.

    Returns:
        Cases sorted by case id; cases with missing modality files are included (see ``missing``).

    Raises:
        DataError: no cases of the layout, or the same case id twice.
    """
    src = Path(src)
    if layout in (None, "auto"):
        layout = detect_layout(src)
    elif layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; use one of auto, {', '.join(LAYOUTS)}")
    found = _scan(src).get(layout, [])
    if not found:
        raise DataError(f"{src}: no {layout} cases found; {_NO_LAYOUT_HINT}")

    cases = _msd_cases(found) if layout == "msd" else [_brats_case(folder, layout) for folder in found]
    if not cases:
        raise DataError(f"{src}: no {layout} cases found; {_NO_LAYOUT_HINT}")
    seen: dict[str, CaseFiles] = {}
    for case in cases:
        if case.case_id in seen:
            raise DataError(
                f"case id {case.case_id} appears twice ({seen[case.case_id].case_dir} and {case.case_dir}); "
                "remove one copy"
            )
        seen[case.case_id] = case
    return sorted(cases, key=lambda c: c.case_id)


def _brats_case(folder: Path, layout: str) -> CaseFiles:
    case_id = folder.name
    paths: dict[str, Path | None] = {}
    missing: list[str] = []
    for key, suffix in _suffixes(layout).items():
        path = _nifti_file(folder, case_id + suffix)
        paths[key] = path
        if path is None and key != "seg":
            missing.append(f"{case_id}{suffix}.nii.gz")
    patient_id = case_id
    if layout == "brats2023":
        match = BRATS2023_CASE_NAME.match(case_id)
        if match:
            patient_id = match["patient"]
    return CaseFiles(
        case_id=case_id,
        patient_id=patient_id,
        layout=layout,
        label_convention=LAYOUTS[layout].label_convention,
        case_dir=folder,
        paths={key: paths[key] for key in FILE_KEYS},
        missing=missing,
    )


def msd_channel_order(task_dir: Path) -> tuple[str, ...]:
    """Canonical modality of each channel of the MSD 4-D images, from ``dataset.json`` if present.

    Args:
        task_dir: the folder holding ``dataset.json`` and ``imagesTr``.

    Raises:
        DataError: ``dataset.json`` is unreadable or names modalities other than T1, T1ce, T2, FLAIR.
    """
    meta = task_dir / "dataset.json"
    if not meta.is_file():
        return MSD_CHANNEL_ORDER
    try:
        modality = json.loads(meta.read_text()).get("modality")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise DataError(f"{meta}: not a readable dataset.json ({first_line(exc, 10_000)})") from None
    if not modality:
        return MSD_CHANNEL_ORDER
    try:
        names = [str(modality[k]) for k in sorted(modality, key=int)]
    except (TypeError, ValueError, KeyError):
        raise DataError(
            f'{meta}: \'modality\' must map channel numbers to names, e.g. {{"0": "FLAIR"}}'
        ) from None
    order = tuple(_MSD_NAME_TO_MODALITY.get(n.strip().lower(), "") for n in names)
    if sorted(order) != sorted(CANONICAL_MODALITIES):
        raise DataError(
            f"{meta}: modalities {names} are not T1, T1ce (T1gd), T2 and FLAIR, one each; "
            "tumorseg needs exactly those four channels"
        )
    return order


def _msd_cases(image_folders: list[Path]) -> list[CaseFiles]:
    cases: list[CaseFiles] = []
    for folder in image_folders:
        labels = folder.parent / MSD_LABEL_FOLDER if folder.name == "imagesTr" else None
        order = msd_channel_order(folder.parent)
        for image in _msd_images(folder):
            case_id = image.name.removesuffix(".gz").removesuffix(".nii")
            seg = _nifti_file(labels, case_id) if labels is not None else None
            paths: dict[str, Path | None] = {key: image for key in CANONICAL_MODALITIES}
            paths["seg"] = seg
            cases.append(
                CaseFiles(
                    case_id=case_id,
                    patient_id=case_id,
                    layout="msd",
                    label_convention=LAYOUTS["msd"].label_convention,
                    case_dir=folder,
                    paths=paths,
                    missing=[],
                    channel_order=order,
                )
            )
    return cases


def case_from_manifest_row(row: Mapping[str, str]) -> CaseFiles:
    """Rebuild the :class:`CaseFiles` of a manifest row (absolute paths; empty path = absent)."""
    paths: dict[str, Path | None] = {
        key: Path(row[f"path_{key}"]) if row.get(f"path_{key}") else None for key in FILE_KEYS
    }
    missing = [f"{key} (no path in manifest.csv)" for key in CANONICAL_MODALITIES if paths[key] is None]
    case_dir = Path(row["case_dir"])
    order = msd_channel_order(case_dir.parent) if row["layout"] == "msd" else ()
    return CaseFiles(
        case_id=row["case_id"],
        patient_id=row["patient_id"],
        layout=row["layout"],
        label_convention=row["label_convention"],
        case_dir=case_dir,
        paths=paths,
        missing=missing,
        channel_order=order,
    )


# ---------------------------------------------------------------------------- reading a case
def load_case(case: CaseFiles, *, chunk_bytes: int = 8 << 20) -> LoadedCase:
    """Decode every file of a case once and collect, rather than raise, what is wrong with it.

    This is where a case is judged *readable*: missing modality files, files that do not decode
    (truncated, corrupt, not NIfTI), wrong dimensionality (3-D per BraTS file, 4-D with 4 channels
    for MSD) and shapes that differ between the files. Content checks (NaN, empty modality, label
    values, spacing) are not made here; they belong to validation.

    Args:
        case: the files.
        chunk_bytes: read/hash block size.

    Returns:
        The decoded volumes and the problems found (empty when the case can be used).
    """
    loaded = LoadedCase(case=case)
    for name in case.missing:
        loaded.problems.append(f"missing modality file {name}")
    files = case.unique_files()
    # The files decode in threads: gzip inflation and hashing release the GIL, so the four
    # modalities of a case overlap on a multi-core machine (a third of predict's wall time otherwise).
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda path: _read_and_decode(path, chunk_bytes), files))
    for (path, keys), (nifti, digest, error) in zip(files.items(), results, strict=True):
        if digest:
            for key in keys:
                loaded.sha256[key] = digest
        if nifti is None:
            for key in keys:
                loaded.unreadable[key] = error
            loaded.problems.append(error)
            continue
        for key in keys:
            loaded.files[key] = nifti
        if case.layout == "msd" and keys != ["seg"]:
            _split_msd_channels(loaded, nifti, keys)
        else:
            data = squeeze_trailing(nifti.data, 3)
            if data.ndim != 3:
                loaded.problems.append(
                    f"{path.name} is {data.ndim}-D ({shape_text(data.shape)}); expected a 3-D volume"
                )
            else:
                loaded.volumes[keys[0]] = data

    shapes = {key: loaded.volumes[key].shape for key in FILE_KEYS if key in loaded.volumes}
    reference = loaded.reference_key
    if reference is not None:
        for key, shape in shapes.items():
            if shape != shapes[reference]:
                loaded.problems.append(
                    f"shapes differ: {reference} {shape_text(shapes[reference])} vs {key} {shape_text(shape)}"
                )
    return loaded


def _read_and_decode(path: Path, chunk_bytes: int) -> tuple[NiftiFile | None, str, str]:
    """One file of a case: ``(decoded file or None, sha256 or "", problem or "")``; never raises DataError."""
    digest = ""
    try:
        buffer, digest = read_bytes(path, chunk_bytes=chunk_bytes)
        return decode_nifti(buffer, path, digest), digest, ""
    except DataError as exc:
        return None, digest, str(exc)


def _split_msd_channels(loaded: LoadedCase, nifti: NiftiFile, keys: list[str]) -> None:
    data = squeeze_trailing(nifti.data, 4)
    order = loaded.case.channel_order or MSD_CHANNEL_ORDER
    if data.ndim != 4 or data.shape[3] != len(order):
        loaded.problems.append(
            f"{nifti.path.name} is {shape_text(data.shape)}; expected a 4-D MSD image with "
            f"{len(order)} channels ({', '.join(order)})"
        )
        return
    for channel, modality in enumerate(order):
        loaded.volumes[modality] = data[..., channel]


def label_counts(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a label volume and their voxel counts.

    Label maps hold a handful of small integers, so one comparison per value in ``[min, max]``
    (memory-order friendly, no int64 copy) beats ``np.unique``'s sort of millions of voxels by an
    order of magnitude; anything else (floats, wide ranges) falls back to ``np.unique``.
    """
    if seg.dtype.kind in "iub" and seg.size:
        low, high = int(seg.min()), int(seg.max())
        if high - low < 64:
            found = [(v, int(np.count_nonzero(seg == v))) for v in range(low, high + 1)]
            found = [(v, c) for v, c in found if c]
            return np.array([v for v, _ in found]), np.array([c for _, c in found], dtype=np.int64)
    return np.unique(seg, return_counts=True)


def encode_labels(seg: np.ndarray, convention_name: str) -> np.ndarray:
    """Source label volume -> canonical uint8 codes, keeping the array's memory order.

    Same rules and messages as :meth:`LabelConvention.encode`, which handles the unusual inputs
    (float-typed segmentations); integer volumes take a lookup table directly.

    Raises:
        ValueError: values outside the convention.
    """
    convention = get_convention(convention_name)
    if seg.dtype.kind not in "iub":
        return convention.encode(seg)
    values = label_counts(seg)[0].tolist()
    unknown = sorted(set(values) - convention.allowed_values)
    if unknown:
        raise ValueError(
            f"label values {unknown} are not in the {convention.name} convention {sorted(convention.allowed_values)}"
        )
    table = np.zeros(max(max(convention.to_canonical), max(values, default=0)) + 1, dtype=np.uint8)
    for source, canonical in convention.to_canonical.items():
        table[source] = canonical
    return table[seg]


def read_case(case: CaseFiles, *, chunk_bytes: int = 8 << 20) -> CaseVolumes:
    """Read a case into canonical arrays in its source geometry.

    Args:
        case: the files (from :func:`discover_cases` or :func:`case_from_manifest_row`).
        chunk_bytes: read/hash block size.

    Returns:
        float32 image ``(4, X, Y, Z)`` in t1, t1ce, t2, flair order (each channel Fortran-ordered,
        as NIfTI stores it); canonical uint8 labels
        ``(X, Y, Z)`` or None; the T1 affine, spacing and orientation.

    Raises:
        DataError: the first problem found (missing/unreadable file, wrong dimensionality,
            shapes that differ, label values outside the case's convention), naming the file.
    """
    loaded = load_case(case, chunk_bytes=chunk_bytes)
    if loaded.problems:
        raise DataError(f"{case.case_id}: {loaded.problems[0]}")
    reference = loaded.files["t1"]
    shape = loaded.volumes["t1"].shape
    # NIfTI stores voxels column-major, so each decoded volume is Fortran-ordered. Giving every
    # channel the same layout makes this a streaming copy instead of a transposing one (4x faster
    # on a 240x240x155 case); preprocessing resamples in that layout and returns C-ordered arrays.
    image = np.moveaxis(np.empty((*shape, len(CANONICAL_MODALITIES)), dtype=np.float32, order="F"), -1, 0)
    for channel, key in enumerate(CANONICAL_MODALITIES):
        image[channel] = loaded.volumes[key]

    labels = None
    if "seg" in loaded.volumes:
        try:
            labels = encode_labels(loaded.volumes["seg"], case.label_convention)
        except ValueError as exc:
            seg_name = loaded.files["seg"].path.name
            raise DataError(f"{case.case_id}: {seg_name}: {exc}") from None
    return CaseVolumes(
        case_id=case.case_id,
        patient_id=case.patient_id,
        layout=case.layout,
        image=image,
        labels=labels,
        affine=reference.affine,
        spacing=spacing_from_affine(reference.affine),
        orientation=orientation_code(reference.affine),
        label_convention=case.label_convention,
        sha256=dict(loaded.sha256),
    )
