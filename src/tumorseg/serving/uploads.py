"""Uploaded files -> one case folder on disk, checked before anything is extracted or decoded.

``POST /predict`` takes the modality files of one case, named as in any supported layout, or one
``.zip`` of such a case; they are staged in a private per-request folder and discovered with
:func:`tumorseg.models.predictor.plan_cases`, so the server accepts exactly what ``tumorseg predict``
does. Only NIfTI, ``dataset.json`` and ``.zip`` are accepted, names are reduced to a short safe
alphabet, and every stream (zip member, upload, the gzip in a ``.nii.gz``) is inflated in bounded
chunks against one byte budget per request (zip and gzip bombs). Hand-written rather than
``ZipFile.extractall``, which silently sanitises ``..`` and absolute names instead of refusing them
and trusts the sizes in the zip directory.
"""

from __future__ import annotations

import gzip
import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from isal import igzip, isal_zlib

from tumorseg.data.conventions import LAYOUTS
from tumorseg.data.layouts import MSD_IMAGE_FOLDERS
from tumorseg.errors import DataError, first_line

CHUNK_BYTES = 1 << 20
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
MSD_METADATA = "dataset.json"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# macOS resource forks, hidden files and Windows thumbnails zip tools add: skipped, not refused.
IGNORED_MEMBERS = re.compile(r"(^|/)(__MACOSX|\.[^/]*)(/|$)|(^|/)(Thumbs\.db|desktop\.ini)$")
UNSAFE_CHARACTERS = "has characters other than letters, digits, '.', '_' and '-'; rename it"
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
    """Caps for one request (``serve.max_files``, ``max_members``, ``max_uncompressed_mb`` in bytes)."""

    max_files: int
    max_members: int
    max_uncompressed_bytes: int


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


def nifti_stem(name: str) -> str:
    """``BraTS2021_00001_t1.nii.gz`` -> ``BraTS2021_00001_t1``."""
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _peek(stream: BinaryIO, count: int) -> bytes:
    position = stream.tell()
    head = stream.read(count)
    stream.seek(position)
    return head


def _is_zip(name: str, stream: BinaryIO) -> bool:
    return name.lower().endswith(".zip") or _peek(stream, 4) == b"PK\x03\x04"


# ---------------------------------------------------------------------------- streams
def _write_chunks(reader: BinaryIO, target: Path, budget: ByteBudget, label: str) -> None:
    """Copy ``reader`` to a new file, charging each chunk before it is written."""
    with target.open("xb") as out:
        while block := reader.read(CHUNK_BYTES):  # GzipFile.read(n) inflates at most n bytes
            budget.charge(len(block), label)
            out.write(block)


def copy_inflated(stream: BinaryIO, folder: Path, name: str, budget: ByteBudget) -> Path:
    """Write one NIfTI stream (seekable, at its start) into ``folder``, a gzip one inflated as ``.nii``.

    Raises:
        UploadTooLarge: the budget ran out (the partial file is removed).
        UploadRejected: a corrupt or truncated gzip stream, or a name given twice.
    """
    gzipped = _peek(stream, 2) == b"\x1f\x8b"
    target = folder / (f"{nifti_stem(name)}.nii" if gzipped or is_nifti_name(name) else name)
    # python-isal's GzipFile is gzip's API on Intel ISA-L (twice as fast).
    reader: BinaryIO = igzip.GzipFile(fileobj=stream, mode="rb") if gzipped else stream  # type: ignore[assignment]
    try:
        _write_chunks(reader, target, budget, name)
    except FileExistsError:
        raise UploadRejected(f"{name}: uploaded twice (or as both .nii and .nii.gz); send it once") from None
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
def member_parts(raw_name: str, archive: str) -> tuple[str, ...]:
    """Path components of a zip member; :class:`UploadRejected` for an absolute path, a drive letter,
    ``..`` or a component that is not a safe name."""
    name = raw_name.replace("\\", "/")
    member = f"{archive}: member {raw_name[:80]!r}"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UploadRejected(f"{member} has an absolute path; zip the case folder itself")
    parts = tuple(part for part in PurePosixPath(name).parts if part not in ("", "."))
    if ".." in parts:
        raise UploadRejected(f"{member} points outside the archive ('..'); refused")
    if not all(SAFE_NAME.match(part) for part in parts):
        raise UploadRejected(f"{member} {UNSAFE_CHARACTERS}")
    return parts


def _checked_members(
    infos: list[zipfile.ZipInfo], archive: str
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """The members to extract with their path parts (zip-tool clutter skipped, folders left out)."""
    members = []
    for info in infos:
        if IGNORED_MEMBERS.search(info.filename.replace("\\", "/")):
            continue
        parts = member_parts(info.filename, archive)
        member = f"{archive}: member {info.filename[:80]!r}"
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UploadRejected(f"{member} is a symbolic link; refused")
        if info.flag_bits & 0x1:
            raise UploadRejected(f"{member} is encrypted; zip it without a password")
        if info.is_dir() or not parts:
            continue
        if not (is_nifti_name(parts[-1]) or parts[-1] == MSD_METADATA):
            raise UploadRejected(
                f"{member} is not a NIfTI file (.nii, .nii.gz) or {MSD_METADATA}; zip only the case's images"
            )
        members.append((info, parts))
    if not members:
        raise UploadRejected(f"{archive}: holds no NIfTI file; zip the case folder with its modality files")
    return members


def extract_zip(stream: BinaryIO, archive: str, dest: Path, limits: UploadLimits, budget: ByteBudget) -> None:
    """Extract a case zip into ``dest``, refusing too many members, a declared size over the budget,
    unsafe names, links and encryption before one byte is written (:class:`UploadTooLarge`,
    :class:`UploadRejected`)."""
    try:
        zf = zipfile.ZipFile(stream)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as exc:
        raise UploadRejected(
            f"{archive}: not a readable .zip archive ({first_line(exc, 160)}); zip the case folder again"
        ) from None
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise UploadTooLarge(
                f"{archive}: holds {len(infos)} entries, more than {limits.max_members} "
                "(serve.max_members); zip one case folder"
            )
        declared = sum(info.file_size for info in infos)
        if declared > budget.limit - budget.used:
            raise UploadTooLarge(
                f"{archive}: expands to {declared / 2**20:.0f} MB, more than "
                f"{budget.limit / 2**20:.0f} MB (serve.max_uncompressed_mb); zip one case folder"
            )
        for info, parts in _checked_members(infos, archive):
            folder = dest.joinpath(*parts[:-1])
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as member:
                    if parts[-1] == MSD_METADATA:
                        copy_plain(member, folder / MSD_METADATA, budget, info.filename)
                    else:
                        copy_inflated(member, folder, parts[-1], budget)
            except (NotImplementedError, RuntimeError, zipfile.BadZipFile, zlib.error, EOFError) as exc:
                raise UploadRejected(
                    f"{archive}: member {info.filename[:80]!r} cannot be extracted ({first_line(exc, 160)}); "
                    "zip the case again with standard deflate compression"
                ) from None


def copy_plain(stream: BinaryIO, target: Path, budget: ByteBudget, label: str) -> None:
    """Copy ``stream`` to a new file ``target`` as is, charging every chunk to ``budget``."""
    try:
        _write_chunks(stream, target, budget, label)
    except FileExistsError:
        raise UploadRejected(f"{label}: uploaded twice; send it once") from None


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
    """Move the NIfTI files of ``loose`` into ``dest`` in a layout ``plan_cases`` reads, and return ``dest``.

    BraTS files go to ``dest/<case_id>/``; one other NIfTI file is taken as a 4-D MSD image and goes
    to ``dest/imagesTs/`` (with ``dataset.json`` beside it when given).
    """
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


# ---------------------------------------------------------------------------- entry point
def stage_upload(uploads: Sequence[tuple[str | None, BinaryIO]], workdir: Path, limits: UploadLimits) -> Path:
    """Write ``(client file name, seekable stream)`` uploads into ``workdir`` (private, empty, removed by
    the caller) and return a folder holding one case for :func:`~tumorseg.models.predictor.plan_cases`."""
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
    zips = [name for name, stream in named if _is_zip(name, stream)]
    if zips:
        if len(named) > 1:
            raise UploadRejected(
                f"{zips[0]}: upload either one .zip of the case folder or its modality files, not both"
            )
        name, stream = named[0]
        extracted = workdir / "extracted"
        extracted.mkdir()
        extract_zip(stream, name, extracted, limits, budget)
        root = _content_root(extracted)
        has_folders = any(p.is_dir() for p in root.iterdir())
        return root if has_folders else arrange_case(root, workdir / "case")
    loose = workdir / "upload"
    loose.mkdir()
    for name, stream in named:
        if name == MSD_METADATA:
            copy_plain(stream, loose / MSD_METADATA, budget, name)
        elif is_nifti_name(name):
            copy_inflated(stream, loose, name, budget)
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
