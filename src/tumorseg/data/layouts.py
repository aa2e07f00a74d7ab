"""Detect and read the public dataset layouts (:data:`LAYOUT_NAMES`); file naming in docs/data.md.

BraTS 2020/21 and 2023+ case folders; MSD Task01 (4-D ``imagesTr/BRATS_001.nii.gz``, ``labelsTr/``);
nnU-Net v2/v1 raw (``dataset.json``, ``imagesTr/CASE_0000.nii.gz``: 4-digit channel index, not MSD);
a MONAI datalist (``training``/``validation``/``testing`` entries, wins over BraTS folders beside it).
Convention: ``ingest.labels``, else the layout's, the BraTS 2023+ prefix (PED must be named) or the
JSON's ``labels``. Files are hashed while read and inflated in memory; a bad file is a one-line DataError.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from tumorseg.data.conventions import (
    AMBIGUOUS_BRATS_PREFIXES,
    BRATS_PREFIX_CONVENTIONS,
    CANONICAL_MODALITIES,
    LABEL_CONVENTIONS,
    LAYOUTS,
    MSD_CHANNEL_ORDER,
    LabelConvention,
    get_convention,
)
from tumorseg.data.manifest import FILE_KEYS
from tumorseg.errors import DataError, first_line

NIFTI_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")

LAYOUT_NAMES: tuple[str, ...] = ("brats2021", "brats2023", "msd", "nnunet", "monai")
"""Every layout :func:`discover_cases` reads (``ingest.layout`` besides ``auto``)."""

BRATS2021_CASE_NAME = re.compile(r"^BraTS\d{2}(?:\d{2})?_(?:[A-Za-z]+_)?\d+$")
"""``BraTS2021_00001``, ``BraTS20_Training_001``, ``BraTS20_Validation_001``."""

BRATS2023_CASE_NAME = re.compile(r"^(?P<patient>BraTS-[A-Za-z]+-\d+)-(?P<timepoint>\d+)$")
"""``BraTS-GLI-00001-000`` (patient ``BraTS-GLI-00001``, time point ``000``)."""

BRATS_CHALLENGE = re.compile(r"^BraTS-(?P<challenge>[A-Za-z]+)-\d+(?:-\d+)?$", re.IGNORECASE)
"""A BraTS 2023+ case id and its sub-challenge: ``BraTS-GoAT-00001-000`` -> ``GoAT``."""

_CHALLENGE_CONVENTIONS: dict[str, str] = {k.lower(): v for k, v in BRATS_PREFIX_CONVENTIONS.items()}
"""BraTS 2023+ sub-challenge (lower case) -> its convention; any other prefix but PED -> ``brats2023``."""

MSD_IMAGE_FOLDERS: tuple[str, ...] = ("imagesTr", "imagesTs")
MSD_LABEL_FOLDER = "labelsTr"

NNUNET_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
"""An nnU-Net image file name without its ending: ``BraTS2021_00001_0003`` -> case, channel 3."""

DATALIST_SUBSETS: dict[str, str] = {
    **{k: k for k in ("training", "validation", "testing")},
    "test": "testing",
}
"""MONAI datalist keys -> :attr:`CaseFiles.subset` (MSD's ``dataset.json`` says ``test``)."""

_CHANNEL_NAME_TO_MODALITY: dict[str, str] = {
    **dict.fromkeys(("t1", "t1n", "t1w", "t1native"), "t1"),
    **dict.fromkeys(("t1ce", "t1c", "t1gd", "t1post", "t1contrast"), "t1ce"),
    **dict.fromkeys(("t2", "t2w"), "t2"),
    **dict.fromkeys(("flair", "t2f", "t2flair"), "flair"),
}
"""``dataset.json`` channel names (lower case, without ``-``, ``_``, blanks) -> canonical modality."""

_MODALITY_TOKEN = re.compile(
    r"(?:^|(?<=[_\-. ]))(t1native|t1post|t1ce|t1gd|t1n|t1w|t1c|t2flair|t2w|t2f|flair|t1|t2)(?=$|[_\-. ])",
    re.IGNORECASE,
)
"""A modality token in a file name (``_t1ce``, ``-t2f``, ``_FLAIR``), longest spellings first."""

_LABEL_MEANINGS: dict[str, str] = {
    "core": "ncr|netc|net|ncr net|necrosis|necrotic|necrotic core|necrotic tumor core|necrotic tumor|"
    "non enhancing tumor core|non enhancing tumor|non enhancing core|necrotic and non enhancing tumor core|"
    "necrotic non enhancing tumor core",
    "edema": "ed|snfh|edema|peritumoral edema|surrounding non enhancing flair hyperintensity|"
    "non enhancing flair hyperintensity|flair hyperintensity",
    "enhancing": "et|enhancing tumor|enhancing|enhancing tissue",
    "cavity": "rc|resection cavity|cavity",
    "cyst": "cc|cyst|cystic component|cystic",
    "WT": "wt|whole tumor|whole|complete tumor",
    "TC": "tc|tumor core",
}
"""Meaning (a tumour part or nested region) -> the names a ``dataset.json`` may give it (:func:`_label_key`)."""

_LABEL_MEANING: dict[str, str] = {
    name: meaning for meaning, names in _LABEL_MEANINGS.items() for name in names.split("|")
}


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, before anything is read.

    Attributes:
        patient_id: BraTS 2023+: the case id without its time point; otherwise the case id.
        case_dir: the case folder (BraTS), ``imagesTr``/``imagesTs`` (MSD, nnU-Net), the datalist's folder.
        paths: file key -> file or None; a 4-D image (MSD, MONAI) is named by every modality.
        missing: expected files that do not exist (``seg`` only where a datalist names it).
        channel_order, subset, fold: 4-D channel modalities; MONAI's list and ``fold``.
    """

    case_id: str
    patient_id: str
    layout: str
    label_convention: str
    case_dir: Path
    paths: dict[str, Path | None]
    missing: list[str] = field(default_factory=list)
    channel_order: tuple[str, ...] = ()
    subset: str = ""
    fold: int | None = None

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
    """One case in memory, in its source geometry: float32 ``image`` ``(4, X, Y, Z)`` (canonical channel
    order), uint8 internal ``labels`` ``(X, Y, Z)`` or None, T1's 4x4 ``affine`` (mm), the source
    ``seg``'s ``label_convention`` (to write predictions back), ``sha256`` per file key."""

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
    """One decoded file: ``data`` as stored (float when scaled), 4x4 ``affine`` in mm, ``size`` on disk."""

    path: Path
    data: np.ndarray
    affine: np.ndarray
    sha256: str
    size: int


@dataclass
class LoadedCase:
    """A case's files decoded as far as possible (ingest and :func:`read_case`): ``volumes`` (file key ->
    3-D array of the right dimensionality; MSD channels are views), ``sha256`` of every file read,
    ``problems`` (one-line reasons the case cannot be used, empty when it reads)."""

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


def read_bytes(path: Path, *, chunk_bytes: int = 8 << 20, sha256: bool = True) -> tuple[bytearray, str]:
    """A file's bytes and their sha256 hex digest, hashed chunk by chunk while read ("" without ``sha256``)."""
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
    """Decode ``.nii``/``.nii.gz`` bytes (gzip by its magic); DataError for a truncated or bad file."""
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
    """Read a NIfTI file once, hashing while reading and inflating in one call (``nibabel.load`` streams
    gzip through Python file objects and would need a second read to hash)."""
    buffer, digest = read_bytes(path, chunk_bytes=chunk_bytes, sha256=sha256)
    return decode_nifti(buffer, path, digest)


def _inflate(buffer: bytearray, name: str) -> bytes | bytearray:
    """Inflate a gzip stream (any members) with python-isal, 2-3x faster than :mod:`gzip`; plain passes."""
    from isal import igzip, isal_zlib

    if buffer[:2] != b"\x1f\x8b":
        return buffer
    try:
        # One member (every NIfTI writer) in one call; several or a truncated stream through igzip.
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


def _listing(folder: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """Sorted entries of ``folder`` that ``keep`` accepts, skipping hidden ones (``._BRATS_001.nii.gz``)."""
    try:
        return sorted(p for p in folder.iterdir() if keep(p) and not p.name.startswith("."))
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror or exc})") from None


def _subfolders(folder: Path) -> list[Path]:
    return _listing(folder, Path.is_dir)


def _visible_files(folder: Path, endings: tuple[str, ...] = NIFTI_EXTENSIONS) -> list[Path]:
    return _listing(folder, lambda p: p.is_file() and p.name.endswith(endings))


def _read_json(path: Path) -> Any:
    """A JSON file's content; one-line DataError naming the file when it is not readable JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg}); fix the file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read ({first_line(exc)}); fix or remove the file") from None


def _image_folders(root: Path) -> list[Path]:
    """``imagesTr``/``imagesTs`` of an MSD or nnU-Net folder (none: not such a folder)."""
    return [root / sub for sub in MSD_IMAGE_FOLDERS if (root / sub).is_dir()]


def _root_layout(root: Path) -> str:
    """``nnunet`` or ``msd`` for a folder holding ``imagesTr``/``imagesTs``."""
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return "msd"
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: must be a JSON object (with modality/channel_names and labels)")
    ending = meta.get("file_ending", ".nii.gz")
    names = meta.get("channel_names") if "channel_names" in meta else meta.get("modality")
    if not isinstance(ending, str) or not isinstance(names, dict) or not names:
        return "msd"
    if "channel_names" in meta and ending not in NIFTI_EXTENSIONS:
        raise DataError(
            f"{meta_path}: file_ending {ending!r} is not NIfTI; tumorseg reads .nii.gz and .nii, "
            "convert the images (nnUNetv2 can export NIfTI)"
        )
    files = [f for folder in _image_folders(root) for f in _visible_files(folder, (ending,))]
    stems = [NNUNET_CHANNEL_FILE.match(f.name[: -len(ending)]) for f in files]
    if not files or not all(stems):
        return "msd"
    if "channel_names" in meta:
        return "nnunet"
    # nnU-Net v1 (modality, _0000 files): the channel indices are exactly 0..N-1 of N > 1 modalities.
    channels = {int(m["channel"]) for m in stems if m}
    return "nnunet" if len(names) > 1 and channels == set(range(len(names))) else "msd"


def _image_root_scan(src: Path) -> dict[str, list[Path]]:
    """MSD / nnU-Net: ``src`` is the task/dataset folder or its ``imagesTr``/``imagesTs`` folder."""
    if folders := _image_folders(src):
        return {_root_layout(src): folders}
    if src.name in MSD_IMAGE_FOLDERS and _visible_files(src):
        return {_root_layout(src.parent): [src]}
    return {}


def _child_image_roots(children: list[Path]) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for child in children:
        if folders := _image_folders(child):
            found.setdefault(_root_layout(child), []).extend(folders)
    return found


def is_datalist(data: Any) -> bool:
    """Whether parsed JSON is a MONAI datalist: a ``training`` (or other) list of ``{"image": ...}``."""
    return isinstance(data, dict) and any(
        isinstance(data.get(key), list) and any(isinstance(e, dict) and "image" in e for e in data[key])
        for key in DATALIST_SUBSETS
    )


def _datalists(folder: Path) -> tuple[list[Path], list[DataError]]:
    """The MONAI datalists among a folder's ``*.json`` files, and the JSON files that do not parse."""
    found: list[Path] = []
    broken: list[DataError] = []
    for path in _visible_files(folder, (".json", ".JSON")):
        try:
            data = _read_json(path)
        except DataError as exc:
            broken.append(exc)
            continue
        if is_datalist(data):
            found.append(path)
    return found, broken


def _brats_scan(src: Path, children: list[Path], *, depth: int) -> dict[str, list[Path]]:
    """BraTS case folders: ``src`` itself and its children (depth 1), or its grandchildren (depth 2)."""
    found: dict[str, list[Path]] = {}
    if depth == 1:
        own = _brats_case_layout(src)
        if own is not None:
            return {own: [src]}
        folders = children
    else:
        folders = [grandchild for child in children for grandchild in _subfolders(child)]
    for folder in folders:
        layout = _brats_case_layout(folder)
        if layout is not None:
            found.setdefault(layout, []).append(folder)
    return found


def _scan(src: Path, layout: str | None = None) -> dict[str, list[Path]]:
    """Found layout -> its case folders (BraTS), image folders (MSD, nnU-Net) or datalists.

    Detection order: ``src`` is an MSD/nnU-Net (images) folder; holds or is a datalist; BraTS case
    folders in ``src`` or its children; MSD/nnU-Net children; BraTS folders one level further down.
    """
    if not src.exists():
        raise DataError(f"{src}: no such folder; pass the dataset folder (e.g. data/synth)")
    if src.is_file():
        if src.name.lower().endswith(".json") and layout in (None, "monai"):
            if is_datalist(_read_json(src)):
                return {"monai": [src]}
            raise DataError(
                f"{src}: not a MONAI datalist (no 'training' list of {{'image': ..., 'label': ...}} "
                "entries); pass the dataset folder or the datalist"
            )
        raise DataError(f"{src}: is a file; pass the folder that holds the cases")

    if layout in ("msd", "nnunet"):
        roots = _image_root_scan(src) or _child_image_roots(_subfolders(src))
        folders = [folder for found in roots.values() for folder in found]
        return {layout: folders} if folders else {}
    if layout == "monai":
        lists, broken = _datalists(src)
        if broken:
            raise broken[0]
        return {"monai": lists} if lists else {}
    if layout is not None:
        children = _subfolders(src)
        found = _brats_scan(src, children, depth=1) or _brats_scan(src, children, depth=2)
        return {layout: found[layout]} if layout in found else {}

    own = _image_root_scan(src)
    if own:
        return own
    lists, broken = _datalists(src)
    if lists:
        if broken:
            raise broken[0]
        return {"monai": lists}
    children = _subfolders(src)
    found = _brats_scan(src, children, depth=1) or _child_image_roots(children)
    found = found or _brats_scan(src, children, depth=2)
    if not found and broken:
        raise broken[0]
    return found


_NO_LAYOUT_HINT = (
    "expected BraTS 2020/2021 case folders (BraTS2021_00001/BraTS2021_00001_t1.nii.gz), "
    "BraTS 2023+ case folders (BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz), "
    "an MSD Task01 folder (imagesTr/BRATS_001.nii.gz), "
    "an nnU-Net dataset (dataset.json, imagesTr/CASE_0000.nii.gz ... CASE_0003.nii.gz) "
    "or a MONAI datalist (a .json with a 'training' list of image/label entries)"
)


def detect_layout(src: Path) -> str:
    """The layout of a dataset, case, task or images folder or datalist; DataError when the folder is
    missing or empty, or matches no layout or several."""
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
        if folder.is_file():
            return folder
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if files:
            return files[0]
    return sorted(folders)[0]


def _explicit_convention(labels: str | None) -> str | None:
    """``labels`` validated (None for ``None``/``""``/``"auto"``)."""
    if labels in (None, "", "auto"):
        return None
    try:
        return get_convention(str(labels)).name
    except ValueError as exc:
        raise DataError(f"ingest.labels (--labels): {exc}") from None


def brats_name_convention(case_id: str) -> str | None:
    """The convention a BraTS case id implies (2023+: the sub-challenge's, unknown -> brats2023; PED, coded
    differently in 2023 and 2024, raises DataError), None for other names."""
    if BRATS2021_CASE_NAME.match(case_id):
        return "brats2021"
    match = BRATS_CHALLENGE.match(case_id)
    if not match:
        return None
    challenge = match["challenge"].lower()
    if challenge == "ped":
        raise DataError(
            f"{case_id}: BraTS-PED cases use different codes in 2023 and 2024; "
            "set ingest.labels (or --labels) to brats2023-ped or brats2024-ped"
        )
    return _CHALLENGE_CONVENTIONS.get(challenge, "brats2023")


def _pick_convention(group: list[str], case_id: str) -> str:
    """The member of a group of twin conventions (same codes) a case's BraTS prefix names, else the first."""
    match = BRATS_CHALLENGE.match(case_id)
    if match:
        challenge = match["challenge"].lower()
        ped = challenge == "ped"
        named = AMBIGUOUS_BRATS_PREFIXES["PED"] if ped else (_CHALLENGE_CONVENTIONS.get(challenge),)
        for name in named:
            if name in group:
                return name
    return group[0]


def _label_key(name: str) -> list[str]:
    """Normalised spellings of a label name to look up: whole, inside and outside parentheses."""
    text = str(name).lower().replace("tumour", "tumor").replace("oedema", "edema")
    text = text.replace("nonenhancing", "non enhancing").replace("non-enhancing", "non enhancing")
    spellings = [text]
    inner = re.search(r"\(([^)]*)\)", text)
    if inner:
        spellings += [inner.group(1), text[: inner.start()] + text[inner.end() :]]
    return [" ".join(re.split(r"[\s_\-/,+&()]+", s)).strip() for s in spellings]


def label_meaning(name: str) -> str | None:
    """A label or region name's meaning (``"NETC"`` -> ``core``, ``"whole tumour"`` -> ``WT``), or None."""
    for key in _label_key(name):
        if key in _LABEL_MEANING:
            return _LABEL_MEANING[key]
    return None


def _convention_meanings(convention: LabelConvention) -> dict[str, frozenset[int]]:
    """Meaning -> the file values it covers in a convention (labels, then its scored regions)."""
    out: dict[str, frozenset[int]] = {}
    for name, value in convention.source_codes().items():
        meaning = label_meaning(name)
        if meaning is not None:
            out[meaning] = frozenset({value})
    for region in convention.scored:
        meaning = label_meaning(region.name)
        if meaning is not None and meaning not in out:
            out[meaning] = frozenset(s for s, c in convention.to_canonical.items() if s and c in region.codes)
    return out


def declared_labels(raw: Any, where: str) -> dict[str, frozenset[int]]:
    """A JSON ``labels`` entry as name -> file values without background: nnU-Net v2 ``{"edema": 1}``,
    its regions ``{"whole tumor": [1, 2, 3]}``, MSD/v1 ``{"1": "edema"}``; else DataError."""
    if not isinstance(raw, dict) or not raw:
        raise DataError(f'{where} must map label names to values, e.g. {{"background": 0, "NCR": 1}}')
    if all(str(k).strip().isdigit() for k in raw) and all(isinstance(v, str) for v in raw.values()):
        raw = {v: int(k) for k, v in raw.items()}  # MSD / nnU-Net v1: {"1": "edema"}
    out: dict[str, frozenset[int]] = {}
    for name, value in raw.items():
        values = value if isinstance(value, list | tuple) else [value]
        if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise DataError(
                f"{where}[{name!r}] must be a label value or a list of them (a region), got {value!r}"
            )
        if set(values) != {0}:
            out[str(name)] = frozenset(values)
    return out


def conventions_matching_labels(declared: dict[str, frozenset[int]]) -> list[list[str]]:
    """Conventions whose labels or regions have the declared values, in groups of twins (same codes,
    ``brats2023`` first); exact matches win over conventions with more values. Dataset137's WT [1,2,3],
    TC [2,3], ET [3] -> ``msd``."""
    meanings = {name: label_meaning(name) for name in declared}
    if not declared or None in meanings.values():
        return []
    values = frozenset().union(*declared.values())
    exact: list[str] = []
    wider: list[str] = []
    for convention in LABEL_CONVENTIONS.values():
        have = _convention_meanings(convention)
        if all(have.get(meanings[name]) == codes for name, codes in declared.items()):
            nonzero = convention.allowed_values - {0}
            if values == nonzero:
                exact.append(convention.name)
            elif values < nonzero:
                wider.append(convention.name)
    groups: dict[tuple[str, tuple[tuple[int, int], ...]], list[str]] = {}
    for name in exact or wider:
        convention = LABEL_CONVENTIONS[name]
        groups.setdefault(
            (convention.label_set.name, tuple(sorted(convention.to_canonical.items()))), []
        ).append(name)
    return [sorted(group, key=lambda n: n != "brats2023") for group in groups.values()]


def _labels_group(raw: Any, path: Path, key: str, explicit: str | None) -> list[str]:
    """The conventions a JSON's ``labels`` allows (``explicit`` checked against it); DataError unless one."""
    declared = declared_labels(raw, f"{path}: {key}")
    shown = first_line(json.dumps(raw), 160)
    if explicit is not None:
        allowed = get_convention(explicit).allowed_values
        extra = sorted(frozenset().union(*declared.values()) - allowed) if declared else []
        if extra:
            raise DataError(
                f"{path}: {key} {shown} declare values {extra} that convention {explicit} (ingest.labels) "
                f"does not have ({sorted(allowed)}); set ingest.labels to the dataset's convention"
            )
        return [explicit]
    groups = conventions_matching_labels(declared)
    if len(groups) == 1:
        return groups[0]
    unknown = [name for name in declared if label_meaning(name) is None]
    if not groups:
        why = f" (unknown name {unknown[0]!r})" if unknown else ""
        raise DataError(
            f"{path}: {key} {shown} match no known convention{why}; set ingest.labels (or --labels) "
            f"to one of {', '.join(LABEL_CONVENTIONS)}"
        )
    several = ", ".join(group[0] for group in groups)
    raise DataError(
        f"{path}: {key} {shown} match several conventions ({several}); "
        "set ingest.labels (or --labels) to one of them"
    )


def _channel_order(names: Any, path: Path, key: str) -> tuple[str, ...]:
    """Canonical modality of channels ``0..3`` from ``{"0": "FLAIR", ...}`` (DataError unless one each)."""
    try:
        ordered = [str(names[k]) for k in sorted(names, key=int)]
    except (TypeError, ValueError, KeyError, AttributeError):
        raise DataError(
            f'{path}: \'{key}\' must map channel numbers to names, e.g. {{"0": "FLAIR", "1": "T1w"}}'
        ) from None
    order = tuple(_CHANNEL_NAME_TO_MODALITY.get(re.sub(r"[\s_\-]+", "", n.lower()), "") for n in ordered)
    if sorted(order) != sorted(CANONICAL_MODALITIES):
        unknown = [n for n, m in zip(ordered, order, strict=True) if not m]
        why = f" ({unknown[0]!r} is not a known name)" if unknown else ""
        raise DataError(
            f"{path}: {key} {ordered} are not T1, T1ce (T1gd), T2 and FLAIR, one each{why}; "
            "tumorseg needs exactly those four channels: rename them in the file"
        )
    return order


def discover_cases(src: Path, layout: str | None = None, labels: str | None = None) -> list[CaseFiles]:
    """The cases under ``src``, sorted by id (missing files listed), without reading any image.

    ``layout`` (None/auto: detected) lists only its cases of a mixed folder; ``labels`` (None/auto:
    per case) is ``ingest.labels``. DataError for unknown names, no cases, an id twice, an
    undecidable convention or malformed JSON.
    """
    src = Path(src)
    explicit = _explicit_convention(labels)
    if layout in (None, "auto"):
        layout = detect_layout(src)
    elif layout not in LAYOUT_NAMES:
        raise DataError(f"unknown layout {layout!r}; use one of auto, {', '.join(LAYOUT_NAMES)}")
    found = _scan(src, layout).get(layout, [])
    if not found:
        raise DataError(f"{src}: no {layout} cases found; {_NO_LAYOUT_HINT}")

    if layout == "msd":
        cases = _msd_cases(found, explicit)
    elif layout == "nnunet":
        cases = _nnunet_cases(found, explicit)
    elif layout == "monai":
        if len(found) > 1:
            raise DataError(
                f"{src}: holds several MONAI datalists ({', '.join(p.name for p in found)}); "
                "keep one in the folder (or pass the one to use)"
            )
        cases = _monai_cases(found[0], explicit)
    else:
        cases = [_brats_case(folder, layout, explicit) for folder in found]
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


def _patient_id(case_id: str) -> str:
    match = BRATS2023_CASE_NAME.match(case_id)
    return match["patient"] if match else case_id


def _brats_case(folder: Path, layout: str, explicit: str | None = None) -> CaseFiles:
    case_id = folder.name
    paths: dict[str, Path | None] = {}
    missing: list[str] = []
    for key, suffix in _suffixes(layout).items():
        path = _nifti_file(folder, case_id + suffix)
        paths[key] = path
        if path is None and key != "seg":
            missing.append(f"{case_id}{suffix}.nii.gz")
    convention = explicit or LAYOUTS[layout].label_convention
    if explicit is None and layout == "brats2023":
        try:
            convention = brats_name_convention(case_id) or convention
        except DataError:
            raise DataError(
                f"{folder}: BraTS-PED cases use different codes in 2023 and 2024; "
                "set ingest.labels (or --labels) to brats2023-ped or brats2024-ped"
            ) from None
    return CaseFiles(
        case_id=case_id,
        patient_id=_patient_id(case_id) if layout == "brats2023" else case_id,
        layout=layout,
        label_convention=convention,
        case_dir=folder,
        paths={key: paths[key] for key in FILE_KEYS},
        missing=missing,
    )


def msd_channel_order(task_dir: Path) -> tuple[str, ...]:
    """Canonical modality of each channel of ``task_dir``'s MSD images, from its ``dataset.json`` if any."""
    meta = task_dir / "dataset.json"
    if not meta.is_file():
        return MSD_CHANNEL_ORDER
    data = _read_json(meta)
    if not isinstance(data, dict):
        raise DataError(f"{meta}: not a readable dataset.json (not a JSON object)")
    return datalist_channel_order(data, meta) or MSD_CHANNEL_ORDER


def _msd_cases(image_folders: list[Path], explicit: str | None = None) -> list[CaseFiles]:
    cases: list[CaseFiles] = []
    for folder in image_folders:
        labels = folder.parent / MSD_LABEL_FOLDER if folder.name == "imagesTr" else None
        order = msd_channel_order(folder.parent)
        for image in _visible_files(folder):
            case_id = image.name.removesuffix(".gz").removesuffix(".nii")
            seg = _nifti_file(labels, case_id) if labels is not None else None
            cases.append(
                CaseFiles(
                    case_id=case_id,
                    patient_id=case_id,
                    layout="msd",
                    label_convention=explicit or LAYOUTS["msd"].label_convention,
                    case_dir=folder,
                    paths={**dict.fromkeys(CANONICAL_MODALITIES, image), "seg": seg},
                    channel_order=order,
                )
            )
    return cases


def _nnunet_cases(image_folders: list[Path], explicit: str | None = None) -> list[CaseFiles]:
    """The cases of one nnU-Net dataset (``imagesTr``/``imagesTs`` of one ``DatasetXXX`` folder)."""
    roots = sorted({folder.parent for folder in image_folders})
    if len(roots) > 1:
        raise DataError(
            f"{roots[0].parent}: holds several nnU-Net datasets ({', '.join(r.name for r in roots)}); "
            "pass one DatasetXXX folder"
        )
    root = roots[0]
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise DataError(
            f"{meta_path}: missing; an nnU-Net dataset needs dataset.json (channel_names, labels)"
        )
    meta = _read_json(meta_path)
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path}: must be a JSON object with channel_names and labels")
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_EXTENSIONS:
        raise DataError(
            f"{meta_path}: file_ending {ending!r} is not NIfTI; tumorseg reads .nii.gz and .nii, convert the images"
        )
    key = "channel_names" if "channel_names" in meta or "modality" not in meta else "modality"
    if not meta.get(key):
        raise DataError(
            f'{meta_path}: no channel_names; add e.g. "channel_names": {{"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}}'
        )
    order = _channel_order(meta[key], meta_path, key)
    if "labels" in meta or explicit is None:
        group = _labels_group(meta.get("labels"), meta_path, "labels", explicit)
    else:
        group = [explicit]

    cases: list[CaseFiles] = []
    for folder in image_folders:
        label_dir = root / ("labelsTr" if folder.name == "imagesTr" else "labelsTs")
        stems = [NNUNET_CHANNEL_FILE.match(f.name[: -len(ending)]) for f in _visible_files(folder, (ending,))]
        case_ids = sorted({match["case"] for match in stems if match})
        for case_id in case_ids:
            paths: dict[str, Path | None] = {}
            missing: list[str] = []
            for channel, modality in enumerate(order):
                path = folder / f"{case_id}_{channel:04d}{ending}"
                paths[modality] = path if path.is_file() else None
                if paths[modality] is None:
                    missing.append(path.name)
            seg = label_dir / f"{case_id}{ending}"
            paths["seg"] = seg if seg.is_file() else None
            cases.append(
                CaseFiles(
                    case_id=case_id,
                    patient_id=_patient_id(case_id),
                    layout="nnunet",
                    label_convention=_pick_convention(group, case_id),
                    case_dir=folder,
                    paths={k: paths[k] for k in FILE_KEYS},
                    missing=missing,
                )
            )
    return cases


def _file_modality(path: str) -> tuple[str, str]:
    """``(canonical modality or "", name without it)`` from the last modality token of a file name."""
    stem = _file_stem(Path(path).name)
    tokens = list(_MODALITY_TOKEN.finditer(stem))
    if not tokens:
        return "", stem
    last = tokens[-1]
    return _CHANNEL_NAME_TO_MODALITY[last.group(1).lower()], stem[: last.start()].rstrip("_-. ")


def _file_stem(name: str) -> str:
    for ext in (*NIFTI_EXTENSIONS, ".gz"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _is_brats_name(name: str) -> bool:
    return bool(BRATS2021_CASE_NAME.match(name) or BRATS_CHALLENGE.match(name))


def datalist_channel_order(data: Mapping[str, Any], path: Path) -> tuple[str, ...] | None:
    """Channel order of a datalist's 4-D images from its ``modality``/``channel_names``, or None."""
    for key in ("modality", "channel_names"):
        if data.get(key):
            return _channel_order(data[key], path, key)
    return None


def _datalist_path(value: Any, base: Path, where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where} must be a file path (text), got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else base / path


def _existing(path: Path, key: str, missing: list[str]) -> Path | None:
    if path.is_file():
        return path
    missing.append(f"{key}: {path} {'is not a file' if path.exists() else 'does not exist'}")
    return None


def _monai_cases(datalist: Path, explicit: str | None = None) -> list[CaseFiles]:
    """The cases of a MONAI datalist; missing files are listed in ``missing``."""
    data = _read_json(datalist)
    if not is_datalist(data):
        raise DataError(f"{datalist}: not a MONAI datalist (no 'training' list of image/label entries)")
    base = datalist.parent
    group = _labels_group(data["labels"], datalist, "labels", explicit) if data.get("labels") else None
    order_4d = datalist_channel_order(data, datalist)
    cases: list[CaseFiles] = []
    where_of: dict[str, str] = {}
    for list_key, subset in DATALIST_SUBSETS.items():
        if list_key not in data:
            continue
        entries = data[list_key]
        if not isinstance(entries, list):
            raise DataError(
                f"{datalist}: {list_key} must be a list of {{'image': ..., 'label': ...}} entries"
            )
        for index, entry in enumerate(entries):
            key = f"{list_key}[{index}]"
            case = _monai_case(entry, key, subset, datalist, base, order_4d)
            if case.case_id in where_of:
                raise DataError(
                    f"{datalist}: case id {case.case_id} appears twice ({where_of[case.case_id]} and {key}); "
                    "remove one entry"
                )
            where_of[case.case_id] = key
            convention = explicit
            if convention is None and group is not None:
                convention = _pick_convention(group, case.case_id)
            if convention is None:
                try:
                    convention = brats_name_convention(case.case_id)
                except DataError as exc:
                    raise DataError(f"{datalist}: {key}: {exc}") from None
            if convention is None:
                raise DataError(
                    f"{datalist}: {key}: case {case.case_id} is not BraTS-named and the datalist has no "
                    "'labels', so its label codes are unknown; set ingest.labels (or --labels) to one of "
                    f"{', '.join(LABEL_CONVENTIONS)}"
                )
            cases.append(replace(case, label_convention=convention))
    return cases


def _monai_case(
    entry: Any, key: str, subset: str, datalist: Path, base: Path, order_4d: tuple[str, ...] | None
) -> CaseFiles:
    """One datalist entry (``label_convention`` left empty for the caller)."""
    if isinstance(entry, str) and subset == "testing":
        entry = {"image": entry}  # MSD's dataset.json: "test": ["./imagesTs/BRATS_485.nii.gz"]
    if not isinstance(entry, dict) or "image" not in entry:
        raise DataError(
            f"{datalist}: {key} must be an object with 'image' (and 'label'), got {first_line(json.dumps(entry), 80)}"
        )
    images = entry["image"]
    if isinstance(images, list) and len(images) == 1:
        images = images[0]
    missing: list[str] = []
    paths: dict[str, Path | None] = {}
    order: tuple[str, ...] = ()
    names: list[str]
    if isinstance(images, str):
        if order_4d is None:
            raise DataError(
                f"{datalist}: {key}.image is one 4-D file but the datalist has no 'modality' (or "
                "'channel_names') naming its channels; add e.g. "
                '"modality": {"0": "FLAIR", "1": "T1w", "2": "T1gd", "3": "T2w"}'
            )
        image = _existing(_datalist_path(images, base, f"{datalist}: {key}.image"), f"{key}.image", missing)
        paths = dict.fromkeys(CANONICAL_MODALITIES, image)
        order = order_4d
        names = [images]
    elif isinstance(images, list) and len(images) == len(CANONICAL_MODALITIES):
        files = [_datalist_path(v, base, f"{datalist}: {key}.image[{i}]") for i, v in enumerate(images)]
        modalities = [_file_modality(str(f))[0] for f in files]
        if sorted(modalities) != sorted(CANONICAL_MODALITIES):
            raise DataError(
                f"{datalist}: {key}.image: cannot tell t1, t1ce, t2 and flair apart in "
                f"{[f.name for f in files]}; name each file with a modality token (_t1, _t1ce, _t2, _flair)"
            )
        for i, (file, modality) in enumerate(zip(files, modalities, strict=True)):
            paths[modality] = _existing(file, f"{key}.image[{i}]", missing)
        names = [str(v) for v in images]
    else:
        count = len(images) if isinstance(images, list) else type(images).__name__
        raise DataError(
            f"{datalist}: {key}.image must be 4 files (t1, t1ce, t2, flair) or one 4-D file, got {count}"
        )

    label = entry.get("label")
    if label is None and subset != "testing":
        raise DataError(
            f"{datalist}: {key} has no 'label'; {subset} entries need one (put unlabelled cases under 'testing')"
        )
    label_path = _datalist_path(label, base, f"{datalist}: {key}.label") if label is not None else None
    paths["seg"] = _existing(label_path, f"{key}.label", missing) if label_path is not None else None

    fold = entry.get("fold")
    if fold is not None:
        if isinstance(fold, str) and fold.strip().isdigit():
            fold = int(fold)
        if not isinstance(fold, int) or isinstance(fold, bool):
            raise DataError(f"{datalist}: {key}.fold must be a whole number, got {fold!r}")

    case_id = _monai_case_id(names, label_path)
    return CaseFiles(
        case_id=case_id,
        patient_id=_patient_id(case_id),
        layout="monai",
        label_convention="",
        case_dir=base,
        paths={k: paths[k] for k in FILE_KEYS},
        missing=missing,
        channel_order=order,
        subset=subset,
        fold=fold,
    )


def _monai_case_id(images: list[str], label: Path | None) -> str:
    """BraTS case id from an image name or its folder; else the label's (or the image's) file stem."""
    for image in images:
        base = _file_modality(image)[1]
        if _is_brats_name(base):
            return base
    folder = Path(images[0]).parent.name
    if _is_brats_name(folder):
        return folder
    if label is not None:
        stem = _file_stem(label.name)
        generic = stem.lower() in ("seg", "label", "labels", "mask", "segmentation")
        return label.parent.name if generic and label.parent.name else stem
    name = _file_modality(images[0])[1] if len(images) > 1 else _file_stem(Path(images[0]).name)
    return name or _file_stem(Path(images[0]).name)


def _fold_of(text: Any) -> int | None:
    value = str(text if text is not None else "").strip()
    if value.lower() in ("", "nan", "none"):
        return None
    try:
        return int(float(value))
    except ValueError:
        raise DataError(f"manifest.csv: fold {value!r} is not a whole number; run ingest again") from None


def case_from_manifest_row(row: Mapping[str, str]) -> CaseFiles:
    """The :class:`CaseFiles` of a manifest row (empty path = absent); 4-D channel order from the
    ``channel_order`` column (``flair;t1;t1ce;t2``), else the ``dataset.json`` or datalist."""
    paths: dict[str, Path | None] = {
        key: Path(row[f"path_{key}"]) if row.get(f"path_{key}") else None for key in FILE_KEYS
    }
    missing = [f"{key} (no path in manifest.csv)" for key in CANONICAL_MODALITIES if paths[key] is None]
    case_dir = Path(row["case_dir"])
    layout = row["layout"]
    order: tuple[str, ...] = ()
    shared = len({paths[key] for key in CANONICAL_MODALITIES if paths[key] is not None}) == 1
    stored = str(row.get("channel_order") or "").strip()
    if stored and stored.lower() != "nan" and shared:
        order = tuple(stored.split(";"))
    elif layout == "msd":
        order = msd_channel_order(case_dir.parent)
    elif layout == "monai" and shared and not missing:
        order = _monai_channel_order_of(case_dir)
    subset = str(row.get("subset") or "")
    return CaseFiles(
        case_id=row["case_id"],
        patient_id=row["patient_id"],
        layout=layout,
        label_convention=row["label_convention"],
        case_dir=case_dir,
        paths=paths,
        missing=missing,
        channel_order=order,
        subset="" if subset.lower() == "nan" else subset,
        fold=_fold_of(row.get("fold")),
    )


def _monai_channel_order_of(folder: Path) -> tuple[str, ...]:
    """Channel order of the 4-D images of the one datalist in ``folder`` (manifest rows)."""
    lists, _ = _datalists(folder) if folder.is_dir() else ([], [])
    if len(lists) != 1:
        raise DataError(
            f"{folder}: the MONAI datalist naming this case's 4-D image is gone (or there are several); "
            "run ingest again"
        )
    data = _read_json(lists[0])
    order = datalist_channel_order(data, lists[0])
    if order is None:
        raise DataError(
            f"{lists[0]}: no 'modality' naming the channels of its 4-D images; add it and run ingest again"
        )
    return order


def load_case(case: CaseFiles, *, chunk_bytes: int = 8 << 20) -> LoadedCase:
    """Decode every file of a case once, collecting (not raising) why it is unreadable: missing or
    undecodable files, wrong dimensionality, shapes that differ. Content checks are validation's."""
    loaded = LoadedCase(case=case)
    for name in case.missing:
        # MONAI entries already say what is missing ("training[3].image[1]: /x_t2.nii.gz does not exist").
        said = name.endswith((" does not exist", " is not a file"))
        loaded.problems.append(name if said else f"missing modality file {name}")
    files = case.unique_files()
    # Threads: gzip inflation and hashing release the GIL, so the modalities decode in parallel.
    with ThreadPoolExecutor(max_workers=max(1, min(len(files), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda path: _read_and_decode(path, chunk_bytes), files))
    for (path, keys), (nifti, digest, error) in zip(files.items(), results, strict=True):
        if digest:
            loaded.sha256.update(dict.fromkeys(keys, digest))
        if nifti is None:
            loaded.unreadable.update(dict.fromkeys(keys, error))
            loaded.problems.append(error)
            continue
        loaded.files.update(dict.fromkeys(keys, nifti))
        if (case.layout == "msd" or len(keys) > 1) and "seg" not in keys:
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
        kind = "MSD image" if loaded.case.layout == "msd" else "image"
        loaded.problems.append(
            f"{nifti.path.name} is {shape_text(data.shape)}; expected a 4-D {kind} with "
            f"{len(order)} channels ({', '.join(order)})"
        )
        return
    for channel, modality in enumerate(order):
        loaded.volumes[modality] = data[..., channel]


def label_counts(seg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a label volume and their voxel counts: one comparison per value of a small
    integer range beats ``np.unique``'s sort (its fallback for floats and wide ranges)."""
    if seg.dtype.kind in "iub" and seg.size:
        low, high = int(seg.min()), int(seg.max())
        if high - low < 64:
            found = [(v, int(np.count_nonzero(seg == v))) for v in range(low, high + 1)]
            found = [(v, c) for v, c in found if c]
            return np.array([v for v, _ in found]), np.array([c for _, c in found], dtype=np.int64)
    return np.unique(seg, return_counts=True)


def encode_labels(seg: np.ndarray, convention_name: str) -> np.ndarray:
    """Source labels -> internal uint8 codes in the same memory order; as :meth:`LabelConvention.encode`
    (floats go there), integers through a lookup table. ValueError for values outside the convention."""
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
    """A case as :class:`CaseVolumes` (channels Fortran-ordered as in NIfTI); DataError for the first
    problem :func:`load_case` found or label values outside the convention."""
    loaded = load_case(case, chunk_bytes=chunk_bytes)
    if loaded.problems:
        raise DataError(f"{case.case_id}: {loaded.problems[0]}")
    reference = loaded.files["t1"]
    shape = loaded.volumes["t1"].shape
    # Fortran-ordered channels like the decoded volumes: a streaming copy, not a transposing one.
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
