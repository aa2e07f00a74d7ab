"""Uploads (what ``tumorseg predict`` reads) -> one case folder, one DICOM study folder or one 2-D image on
disk, checked before anything is extracted or decoded: safe names only, every stream (zip member,
``.nii.gz``, MATLAB v5 element) inflated in chunks against one byte budget per request, image headers
checked against ``serve.max_image_pixels``. Hand-written rather than ``ZipFile.extractall``, which
sanitises ``..`` and absolute names instead of refusing them and trusts the sizes in the zip directory.

A zip is either a NIfTI case (``.nii``, ``.nii.gz``, ``dataset.json``; at most ``serve.max_members``
entries) or a DICOM study (``.dcm`` files, extension-less files, files with the ``DICM`` preamble; at
most ``serve.max_dicom_files`` entries). A DICOM member is stored under a numbered name in
:data:`DICOM_STUDY_DIR`: the import reads headers, never names, so only names that point outside the
archive are refused, not the spaces and other characters scanner exports put in folder names."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import shutil
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeVar

from isal import igzip, isal_zlib
from starlette.concurrency import run_in_threadpool

from tumorseg.data.conventions import LAYOUTS
from tumorseg.data.layouts import MSD_IMAGE_FOLDERS
from tumorseg.data.readers import IMAGE, VOLUME, name_dims
from tumorseg.errors import DataError, first_line

CHUNK_BYTES = 1 << 20
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
MSD_METADATA = "dataset.json"
DICOM_SUFFIX = ".dcm"
DICOMDIR = "DICOMDIR"
DICOM_STUDY_DIR = "dicom-study"
"""The folder a DICOM zip is extracted into: :func:`is_dicom_study` tells the job it is a study."""
DICM_OFFSET = 128
NIFTI_ZIP, DICOM_ZIP = "nifti", "dicom"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# macOS resource forks, hidden files and Windows thumbnails zip tools add: skipped, not refused.
IGNORED_MEMBERS = re.compile(r"(^|/)(__MACOSX|\.[^/]*)(/|$)|(^|/)(Thumbs\.db|desktop\.ini)$")
UNSAFE_CHARACTERS = "has characters other than letters, digits, '.', '_' and '-'; rename it"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAT_V5_HEADER_BYTES = 128
MI_COMPRESSED = 15
NAMING_HINT = (
    "name the files as in BraTS 2021 (<case>_t1.nii.gz, _t1ce, _t2, _flair), BraTS 2023+ "
    "(<case>-t1n.nii.gz, -t1c, -t2w, -t2f), or upload one 4-D MSD image"
)


class UploadRejected(DataError):
    """An upload refused before it is read as a case (HTTP 400, or :attr:`status_code`)."""

    status_code = 400


class UploadTooLarge(UploadRejected):
    """An upload over one of the size or count caps (HTTP 413)."""

    status_code = 413


@dataclass(frozen=True)
class UploadLimits:
    """Caps for one request (``serve.max_files``, ``max_members``, ``max_uncompressed_mb`` in bytes,
    ``max_image_pixels``, ``max_dicom_files``)."""

    max_files: int
    max_members: int
    max_uncompressed_bytes: int
    max_image_pixels: int = 25_000_000
    max_dicom_files: int = 4000


@dataclass
class ByteBudget:
    """Bytes left for one request; every inflated chunk is charged before it is written."""

    limit: int
    used: int = field(default=0)

    def charge(self, count: int, label: str) -> None:
        self.used += count
        if self.used > self.limit:
            raise UploadTooLarge(
                f"{label}: the upload expands to more than {self.limit / 2**20:.0f} MB "
                "(serve.max_uncompressed_mb); upload one case, or raise the limit"
            )


def safe_file_name(raw: str | None, field_name: str = "files") -> str:
    """The last component of an upload's name (clients may send ``../x`` or ``C:\\data\\x``), which must
    be a short name from ``A-Z a-z 0-9 . _ -`` (else :class:`UploadRejected`)."""
    name = re.split(r"[/\\]", raw or "")[-1].strip()
    if not name:
        raise UploadRejected(f"{field_name}: an uploaded file has no name; send each file with its file name")
    if not SAFE_NAME.match(name):
        raise UploadRejected(f"{field_name}: file name {name[:80]!r} {UNSAFE_CHARACTERS}")
    return name


def is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def is_dicom_name(name: str) -> bool:
    """A name a DICOM file may have: ``.dcm``, or no extension (``IM0001``, ``DICOMDIR``)."""
    return name.lower().endswith(DICOM_SUFFIX) or "." not in name


def is_dicom_study(path: Path) -> bool:
    """Whether a staged upload is a DICOM study (the folder :func:`stage_upload` extracts one into)."""
    return path.name == DICOM_STUDY_DIR and path.is_dir()


def has_dicm_preamble(head: bytes) -> bool:
    """Whether the first bytes of a file are a DICOM Part 10 preamble (``DICM`` after 128 bytes)."""
    return head[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"


def nifti_stem(name: str) -> str:
    """``BraTS2021_00001_t1.nii.gz`` -> ``BraTS2021_00001_t1``."""
    return re.sub(r"\.nii(\.gz)?$", "", name, flags=re.IGNORECASE)


def _peek(stream: BinaryIO, count: int) -> bytes:
    position = stream.tell()
    head = stream.read(count)
    stream.seek(position)
    return head


def _is_zip(name: str, stream: BinaryIO) -> bool:
    return name.lower().endswith(".zip") or _peek(stream, 4) == b"PK\x03\x04"


# ---------------------------------------------------------------------------- streams
def copy_plain(stream: BinaryIO, target: Path, budget: ByteBudget, label: str, twice: str = "") -> None:
    """Copy ``stream`` to a new file ``target``, charging each chunk to ``budget`` before it is written;
    ``twice`` completes the message when ``target`` exists already."""
    try:
        with target.open("xb") as out:
            while block := stream.read(CHUNK_BYTES):  # GzipFile.read(n) inflates at most n bytes
                budget.charge(len(block), label)
                out.write(block)
    except FileExistsError:
        raise UploadRejected(f"{label}: uploaded twice{twice}; send it once") from None


def copy_inflated(stream: BinaryIO, folder: Path, name: str, budget: ByteBudget) -> Path:
    """Write one NIfTI stream (seekable, at its start) into ``folder``, a gzip one inflated as ``.nii``;
    :class:`UploadTooLarge` (partial file removed) or :class:`UploadRejected` (corrupt, or sent twice)."""
    gzipped = _peek(stream, 2) == b"\x1f\x8b"
    target = folder / (f"{nifti_stem(name)}.nii" if gzipped or is_nifti_name(name) else name)
    # python-isal's GzipFile is gzip's API on Intel ISA-L (twice as fast).
    reader: BinaryIO = igzip.GzipFile(fileobj=stream, mode="rb") if gzipped else stream  # type: ignore[assignment]
    try:
        copy_plain(reader, target, budget, name, " (or as both .nii and .nii.gz)")
    except UploadTooLarge:
        target.unlink(missing_ok=True)
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error, isal_zlib.error, zipfile.BadZipFile, OSError) as exc:
        target.unlink(missing_ok=True)
        raise UploadRejected(
            f"{name}: corrupt or truncated ({first_line(exc, 160)}); re-export the file and upload it again"
        ) from None
    return target


# ---------------------------------------------------------------------------- zip archives
def member_path(raw_name: str, archive: str) -> tuple[str, ...]:
    """Path components of a zip member; :class:`UploadRejected` for an absolute path, a drive letter
    or ``..``."""
    name = raw_name.replace("\\", "/")
    member = f"{archive}: member {raw_name[:80]!r}"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UploadRejected(f"{member} has an absolute path; zip the case folder itself")
    parts = tuple(part for part in PurePosixPath(name).parts if part not in ("", "."))
    if ".." in parts:
        raise UploadRejected(f"{member} points outside the archive ('..'); refused")
    return parts


def member_parts(raw_name: str, archive: str) -> tuple[str, ...]:
    """:func:`member_path`, and :class:`UploadRejected` for a component that is not a safe name."""
    parts = member_path(raw_name, archive)
    if not all(SAFE_NAME.match(part) for part in parts):
        raise UploadRejected(f"{archive}: member {raw_name[:80]!r} {UNSAFE_CHARACTERS}")
    return parts


def _is_nifti_member(name: str) -> bool:
    return is_nifti_name(name) or name == MSD_METADATA


@contextlib.contextmanager
def _member_stream(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str) -> Iterator[BinaryIO]:
    """One member's stream; what the zip module cannot read in it is :class:`UploadRejected`."""
    try:
        with zf.open(info) as member:
            yield member
    except (NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise UploadRejected(
            f"{archive}: member {info.filename[:80]!r} cannot be extracted ({first_line(exc, 160)}); "
            "zip the case again with standard deflate compression"
        ) from None


def _checked_members(
    zf: zipfile.ZipFile, infos: list[zipfile.ZipInfo], archive: str, limits: UploadLimits
) -> tuple[str, list[tuple[zipfile.ZipInfo, tuple[str, ...]]]]:
    """The kind of the zip (:data:`NIFTI_ZIP` or :data:`DICOM_ZIP`) and the members to extract with their
    path parts (zip-tool clutter skipped, folders left out), the member count checked for that kind."""
    files = []
    for info in infos:
        parts = member_path(info.filename, archive)  # before the clutter test: ".." looks like a hidden name
        if IGNORED_MEMBERS.search(info.filename.replace("\\", "/")):
            continue
        member = f"{archive}: member {info.filename[:80]!r}"
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UploadRejected(f"{member} is a symbolic link; refused")
        if info.flag_bits & 0x1:
            raise UploadRejected(f"{member} is encrypted; zip it without a password")
        if info.is_dir() or not parts:
            continue
        files.append((info, parts))
    if not files:
        raise UploadRejected(
            f"{archive}: holds no NIfTI or DICOM file; zip the case folder with its modality files, "
            "or the DICOM study's files"
        )
    if any(_is_nifti_member(parts[-1]) for _, parts in files):
        return NIFTI_ZIP, _nifti_members(files, infos, archive, limits)
    return DICOM_ZIP, _dicom_members(zf, files, infos, archive, limits)


def _nifti_members(
    files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
    infos: list[zipfile.ZipInfo],
    archive: str,
    limits: UploadLimits,
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The members of a NIfTI case zip: safe names, NIfTI files and ``dataset.json`` only."""
    if len(infos) > limits.max_members:
        raise UploadTooLarge(
            f"{archive}: holds {len(infos)} entries, more than {limits.max_members} "
            "(serve.max_members); zip one case folder"
        )
    for info, parts in files:
        member_parts(info.filename, archive)
        if not _is_nifti_member(parts[-1]):
            raise UploadRejected(
                f"{archive}: member {info.filename[:80]!r} is not a NIfTI file (.nii, .nii.gz) or "
                f"{MSD_METADATA}; zip only the case's images"
            )
    return files


def _member_has_preamble(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str) -> bool:
    with _member_stream(zf, info, archive) as member:
        return has_dicm_preamble(member.read(DICM_OFFSET + 4))


def _dicom_members(
    zf: zipfile.ZipFile,
    files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
    infos: list[zipfile.ZipInfo],
    archive: str,
    limits: UploadLimits,
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The members of a DICOM study zip: ``.dcm`` or extension-less files, or any with the DICM
    preamble; a ``DICOMDIR`` index is left out (the import finds the series by their headers)."""
    if len(infos) > limits.max_dicom_files:
        raise UploadTooLarge(
            f"{archive}: holds {len(infos)} entries, more than {limits.max_dicom_files} "
            "(serve.max_dicom_files); zip one DICOM study, or raise the limit"
        )
    members = []
    for info, parts in files:
        name = parts[-1]
        if name.upper() == DICOMDIR:
            continue
        if not (is_dicom_name(name) or _member_has_preamble(zf, info, archive)):
            raise UploadRejected(
                f"{archive}: member {info.filename[:80]!r} is not a DICOM file (.dcm, no extension or the "
                "DICM preamble); zip only the study's DICOM files (or a case's NIfTI files)"
            )
        members.append((info, parts))
    return members


def extract_zip(stream: BinaryIO, archive: str, dest: Path, limits: UploadLimits, budget: ByteBudget) -> str:
    """Extract a case zip or a DICOM study zip into ``dest``, refusing too many members, a declared size
    over the budget, unsafe names, links and encryption before one byte is written
    (:class:`UploadTooLarge`, :class:`UploadRejected`); returns :data:`NIFTI_ZIP` or :data:`DICOM_ZIP`.
    DICOM members are written flat, numbered (``00001.dcm``...)."""
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise UploadRejected(
            f"{archive}: not a readable .zip archive ({first_line(exc, 160)}); zip the case folder again"
        ) from None
    with zf:
        infos = zf.infolist()
        most = max(limits.max_members, limits.max_dicom_files)
        if len(infos) > most:
            raise UploadTooLarge(
                f"{archive}: holds {len(infos)} entries, more than {most} (serve.max_members for a "
                "NIfTI case, serve.max_dicom_files for a DICOM study); zip one case or study"
            )
        declared = sum(info.file_size for info in infos)
        if declared > budget.limit - budget.used:
            raise UploadTooLarge(
                f"{archive}: expands to {declared / 2**20:.0f} MB, more than "
                f"{budget.limit / 2**20:.0f} MB (serve.max_uncompressed_mb); zip one case folder"
            )
        kind, members = _checked_members(zf, infos, archive, limits)
        if kind == DICOM_ZIP:
            _extract_dicom(zf, members, archive, dest, budget)
            return kind
        for info, parts in members:
            folder = dest.joinpath(*parts[:-1])
            folder.mkdir(parents=True, exist_ok=True)
            with _member_stream(zf, info, archive) as member:
                if parts[-1] == MSD_METADATA:
                    copy_plain(member, folder / MSD_METADATA, budget, info.filename)
                else:
                    copy_inflated(member, folder, parts[-1], budget)
    return kind


def _extract_dicom(
    zf: zipfile.ZipFile,
    members: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
    archive: str,
    dest: Path,
    budget: ByteBudget,
) -> None:
    """Write the members of a DICOM zip as ``dest/00001.dcm``...; :class:`UploadRejected` when none is
    a DICOM file (no ``DICM`` preamble)."""
    dicom_files = 0
    for number, (info, _) in enumerate(members, start=1):
        target = dest / f"{number:05d}{DICOM_SUFFIX}"
        with _member_stream(zf, info, archive) as member:
            copy_plain(member, target, budget, info.filename)
        with target.open("rb") as fh:
            dicom_files += has_dicm_preamble(fh.read(DICM_OFFSET + 4))
    if not dicom_files:
        raise UploadRejected(
            f"{archive}: holds no DICOM file (none starts with the DICM preamble); zip the study's DICOM "
            "files, or the NIfTI files of a case"
        )


# ---------------------------------------------------------------------------- loose files -> a case folder
def _match_brats(stems: Sequence[str]) -> tuple[str, str] | None:
    """``(layout, case_id)`` when every stem is ``<case_id><suffix>`` of one BraTS layout."""
    for layout in ("brats2023", "brats2021"):
        spec = LAYOUTS[layout]
        # longest first: "_t1ce" before "_t1"
        suffixes = sorted([*spec.modality_suffixes.values(), spec.seg_suffix], key=len, reverse=True)
        case_ids = set()
        for stem in stems:
            suffix = next((s for s in suffixes if stem.lower().endswith(s) and len(stem) > len(s)), None)
            if suffix is None:
                break
            case_ids.add(stem[: -len(suffix)])
        else:
            if len(case_ids) > 1:
                raise UploadRejected(
                    f"files belong to different cases ({', '.join(sorted(case_ids)[:4])}); upload one case per request"
                )
            return layout, case_ids.pop()
    return None


def arrange_case(loose: Path, dest: Path) -> Path:
    """Move the NIfTI files of ``loose`` into ``dest`` as ``plan_cases`` reads them: BraTS files to
    ``dest/<case_id>/``, one other file as a 4-D MSD image to ``dest/imagesTs/`` (``dataset.json`` beside)."""
    images = sorted(p for p in loose.iterdir() if p.is_file() and is_nifti_name(p.name))
    metadata = loose / MSD_METADATA
    if not images:
        raise UploadRejected(f"no NIfTI file (.nii, .nii.gz) in the upload; {NAMING_HINT}")
    found = _match_brats([nifti_stem(p.name) for p in images])
    dest.mkdir(parents=True, exist_ok=True)
    if found is not None:
        case_dir = dest / found[1]
        case_dir.mkdir()
        for path in images:
            path.rename(case_dir / path.name)
        return dest
    if len(images) == 1:
        images_dir = dest / MSD_IMAGE_FOLDERS[1]
        images_dir.mkdir()
        images[0].rename(images_dir / images[0].name)
        if metadata.is_file():
            metadata.rename(dest / MSD_METADATA)
        return dest
    unmatched = ", ".join(p.name for p in images[:4])
    raise UploadRejected(f"{unmatched}: names follow no supported layout; {NAMING_HINT}")


def _content_root(folder: Path) -> Path:
    """Descend through folders that hold exactly one folder and nothing else (``case.zip/case/...``)."""
    entries = list(folder.iterdir())
    while len(entries) == 1 and entries[0].is_dir() and entries[0].name not in MSD_IMAGE_FOLDERS:
        folder = entries[0]
        entries = list(folder.iterdir())
    return folder


# ---------------------------------------------------------------------------- 2-D images
def too_many_pixels(name: str, shape: tuple[int, ...], max_pixels: int) -> UploadTooLarge:
    return UploadTooLarge(
        f"{name}: declares {' x '.join(str(n) for n in shape)} pixels, more than {max_pixels} "
        "(serve.max_image_pixels); upload one 2-D slice at its scanner resolution"
    )


def check_image_file(path: Path, max_pixels: int, budget: ByteBudget) -> None:
    """Refuse, from headers alone, a 2-D file over the pixel or byte caps (:class:`UploadTooLarge`: a
    few-kB file can declare 10^9 pixels), a MATLAB file pointing outside itself (:class:`UploadRejected`)
    or an unreadable one (DataError)."""
    if path.suffix.lower() != ".mat":
        _check_image_header(path, max_pixels)
        return
    with path.open("rb") as fh:
        head = fh.read(2048 + 8)
    if any(head[o : o + 8] == HDF5_SIGNATURE for o in (0, 512, 1024, 2048)):
        _check_mat_v73(path, max_pixels, budget)
    else:
        _check_mat_v5(path, budget)


def _check_image_header(path: Path, max_pixels: int) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # reads the header, not the pixels
            width, height = img.size
    except Image.DecompressionBombError:  # over twice PIL's own MAX_IMAGE_PIXELS
        raise UploadTooLarge(
            f"{path.name}: declares more pixels than the image decoder allows (and more than "
            f"{max_pixels}, serve.max_image_pixels); upload one 2-D slice at its scanner resolution"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path.name}: not a readable image ({type(exc).__name__}); re-export it as PNG or JPEG"
        ) from None
    if width * height > max_pixels:
        raise too_many_pixels(path.name, (height, width), max_pixels)


def _check_mat_v73(path: Path, max_pixels: int, budget: ByteBudget) -> None:
    """Refuse links, external or virtual storage and oversized ``cjdata`` datasets of an HDF5 MAT file."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            link = fh.get("cjdata", getlink=True)
            if link is None:
                return  # read_planar says what is missing
            if not isinstance(link, h5py.HardLink):
                raise UploadRejected(f"{path.name}: cjdata is a link to another file or path; refused")
            group = fh["cjdata"]
            if not isinstance(group, h5py.Group):
                return
            for key in group:
                field_name = f"{path.name}: cjdata field {key[:40]!r}"
                if not isinstance(group.get(key, getlink=True), h5py.HardLink):
                    raise UploadRejected(f"{field_name} is a link to another file or path; refused")
                item = group[key]
                if not isinstance(item, h5py.Dataset):
                    continue
                if item.external or item.is_virtual:
                    raise UploadRejected(f"{field_name} stores its data outside the file; refused")
                if key in ("image", "tumorMask") and item.size > max_pixels:
                    raise too_many_pixels(path.name, tuple(reversed(item.shape)), max_pixels)
                budget.charge(int(item.size) * int(item.dtype.itemsize), path.name)
    except DataError:  # UploadRejected included: already one line for the client
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(
            f"{path.name}: corrupt MATLAB v7.3 (HDF5) file ({type(exc).__name__}); re-export it"
        ) from None


def _check_mat_v5(path: Path, budget: ByteBudget) -> None:
    """Inflate each compressed top-level element of a MATLAB v5 file in chunks against ``budget``.

    Hand-written: :func:`scipy.io.loadmat` inflates an ``miCOMPRESSED`` element whole, with no cap. Layout
    per MATLAB's MAT-file format (128-byte header, 8-byte tags ``type, nbytes``); what this walk cannot
    follow is left to ``loadmat``, which refuses it.
    """
    data = path.read_bytes()
    if len(data) < MAT_V5_HEADER_BYTES:
        return
    endian = "<" if data[126:128] == b"IM" else ">"
    position = MAT_V5_HEADER_BYTES
    while position + 8 <= len(data):
        kind, nbytes = struct.unpack_from(f"{endian}II", data, position)
        body = position + 8
        if kind >> 16:  # a small-element tag: 4 bytes of data inside the tag
            position += 8
            continue
        if body + nbytes > len(data):
            return
        if kind == MI_COMPRESSED:
            inflater = zlib.decompressobj()
            pending = data[body : body + nbytes]
            try:
                while pending:
                    budget.charge(len(inflater.decompress(pending, CHUNK_BYTES)), path.name)
                    pending = inflater.unconsumed_tail
            except zlib.error:
                return  # loadmat reports the corrupt element
            position = body + nbytes
        else:
            position = body + nbytes + (-nbytes % 8)


# ---------------------------------------------------------------------------- entry point
def upload_dims(names: Sequence[str]) -> int:
    """:data:`~tumorseg.data.readers.IMAGE` when the (safe) upload names hold a 2-D image, which must
    come alone (else :class:`UploadRejected`), else :data:`~tumorseg.data.readers.VOLUME`."""
    images = [name for name in names if name_dims(name) == IMAGE]
    if images and len(names) != 1:
        raise UploadRejected(
            f"{images[0]}: a 2-D image comes alone; upload one image per request ({len(names)} files sent)"
        )
    return IMAGE if images else VOLUME


def stage_upload(uploads: Sequence[tuple[str | None, BinaryIO]], workdir: Path, limits: UploadLimits) -> Path:
    """Write ``(client file name, seekable stream)`` uploads into ``workdir`` (private, empty, removed by
    the caller) and return a folder holding one case for :func:`~tumorseg.models.predictor.plan_cases`,
    the folder of a zipped DICOM study (:func:`is_dicom_study`), or the one 2-D image, checked
    (:func:`check_image_file`)."""
    if not uploads:
        raise UploadRejected(
            f"files: no file uploaded; send the case's modality files or one .zip ({NAMING_HINT})"
        )
    if len(uploads) > limits.max_files:
        raise UploadTooLarge(
            f"files: {len(uploads)} files, more than {limits.max_files} (serve.max_files); upload one case"
        )
    budget = ByteBudget(limits.max_uncompressed_bytes)
    named = [(safe_file_name(raw), stream) for raw, stream in uploads]
    first, first_stream = named[0]
    loose = workdir / "upload"  # a fixed name: source_of never takes an upload for a Kaggle yes/no image
    if upload_dims([name for name, _ in named]) == IMAGE:
        loose.mkdir()
        copy_plain(first_stream, loose / first, budget, first)
        check_image_file(loose / first, limits.max_image_pixels, budget)
        return loose / first
    zips = [name for name, stream in named if _is_zip(name, stream)]
    if zips:
        if len(named) > 1:
            raise UploadRejected(
                f"{zips[0]}: upload either one .zip of the case folder or its modality files, not both"
            )
        extracted = workdir / "extracted"
        extracted.mkdir()
        if extract_zip(first_stream, first, extracted, limits, budget) == DICOM_ZIP:
            return extracted.rename(workdir / DICOM_STUDY_DIR)
        root = _content_root(extracted)
        has_folders = any(p.is_dir() for p in root.iterdir())
        return root if has_folders else arrange_case(root, workdir / "case")
    loose.mkdir()
    for name, stream in named:
        if name == MSD_METADATA:
            copy_plain(stream, loose / MSD_METADATA, budget, name)
        elif is_nifti_name(name):
            copy_inflated(stream, loose, name, budget)
        elif name.lower().endswith(DICOM_SUFFIX):
            raise UploadRejected(
                f"{name}: one DICOM file is one slice; upload the whole study as one .zip of its DICOM "
                "files (T1, T1ce, T2 and FLAIR series)"
            )
        else:
            raise UploadRejected(
                f"{name}: not a NIfTI file (.nii, .nii.gz), a .zip or a 2-D image (.mat, .png, .jpg, .tif, "
                ".bmp); upload the case's modality files (model files, pickles and other formats are "
                "never accepted)"
            )
    return arrange_case(loose, workdir / "case")


def remove_tree(folder: Path) -> None:
    """Remove a request folder; never raises (cleanup must not mask the request's own outcome)."""
    shutil.rmtree(folder, ignore_errors=True)


T = TypeVar("T")


async def in_request_thread(workdir: Path, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a threadpool thread that writes into the request folder ``workdir``.

    A request cancelled meanwhile (``serve.request_timeout_s``) stops waiting, but the thread runs on:
    the caller's own cleanup may then remove ``workdir`` while the thread still creates files in it.
    So ``workdir`` is removed once more when the thread is done; what it wrote is never left behind."""
    task = asyncio.ensure_future(run_in_threadpool(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(lambda done: _remove_after(workdir, done))
        raise


def _remove_after(workdir: Path, done: asyncio.Future[Any]) -> None:
    """The done-callback of an abandoned :func:`in_request_thread`: its outcome is not wanted."""
    if not done.cancelled():
        done.exception()  # retrieved, so asyncio does not log it as never retrieved
    remove_tree(workdir)
