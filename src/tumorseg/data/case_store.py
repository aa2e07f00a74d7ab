"""Preprocessed cases read out of core: one patch per draw from a memory-mapped ``.npz``.

Training memory must not grow with the dataset (1,251 BraTS cases at 1 mm are ~30 GB as float16).
Members of an *uncompressed* ``.npz`` are plain ``.npy`` at fixed offsets, so a draw copies out only
its own voxels; centres come from *sample locations* written by preprocessing (as nnU-Net's
``class_locations``), so no draw scans a volume. ``data_loader.cache_mb`` MiB of cases may stay in
memory. ``docs/decisions/0002-out-of-core-patches.md``: why not MONAI's caching datasets.
"""

from __future__ import annotations

import mmap
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tumorseg.data.manifest import atomic_output
from tumorseg.errors import DataError

FOREGROUND_LOCATIONS = "loc_fg"
"""Sample of tumour voxel coordinates ``(N, 3)`` (any non-zero label)."""
LOCATION_PREFIX = "loc_"
"""``loc_<code>``: sample of the voxels of one label code; ``loc_0`` holds brain background only."""

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"


def location_key(code: int) -> str:
    return f"{LOCATION_PREFIX}{int(code)}"


def sample_locations(
    label: np.ndarray, brain: np.ndarray, *, max_per_class: int, seed: int
) -> dict[str, np.ndarray]:
    """At most ``max_per_class`` random voxel coordinates per class to centre patches on.

    Returns ``loc_fg`` (tumour voxels of ``label`` ``(X, Y, Z)``) and ``loc_<code>`` for every code
    present (``loc_0``: non-tumour voxels of the bool ``brain``), each ``(N, 3)`` uint16 in C order.
    """
    rng = np.random.default_rng(seed)
    flat_label = label.reshape(-1)
    groups: dict[str, np.ndarray] = {FOREGROUND_LOCATIONS: np.flatnonzero(flat_label)}
    for code in np.unique(flat_label):
        if code == 0:
            groups[location_key(0)] = np.flatnonzero((flat_label == 0) & brain.reshape(-1))
        else:
            groups[location_key(code)] = np.flatnonzero(flat_label == code)
    out: dict[str, np.ndarray] = {}
    for key, indices in groups.items():
        if indices.size > max_per_class:
            indices = np.sort(rng.choice(indices, size=max_per_class, replace=False))
        out[key] = np.stack(np.unravel_index(indices, label.shape), axis=1).astype(np.uint16)
    return out


def save_case(
    path: str | Path,
    *,
    image: np.ndarray,
    label: np.ndarray,
    brain: np.ndarray,
    max_locations: int = 10000,
    compress: bool = False,
) -> None:
    """Write one preprocessed case (arrays + sample locations seeded by the file name) atomically."""
    path = Path(path)
    locations = sample_locations(
        label, brain, max_per_class=max_locations, seed=zlib.crc32(path.stem.encode())
    )
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        write_npz(fh, {"image": image, "label": label, "brain": brain, **locations}, compress=compress)


ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""The time stamp of every member of the ``.npz`` files tumorseg writes (the earliest a zip holds)."""


def write_npz(fh: BinaryIO, arrays: dict[str, np.ndarray], *, compress: bool = False) -> None:
    """What ``np.savez`` writes (``<key>.npy`` members, zip64), but byte-identical for identical arrays:
    numpy stamps each member with the current time, so a rerun would change the file (and its DVC hash)
    though nothing in it changed."""
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(fh, mode="w", compression=method, allowZip64=True) as archive:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_EPOCH)
            info.compress_type = method
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


@dataclass(frozen=True)
class MemberLayout:
    """Where one stored ``.npy`` member of an ``.npz`` lies: byte offset, shape, dtype, order."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class NpzLayout:
    """The members of an uncompressed ``.npz`` as memory-mappable arrays (a DataError otherwise)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.members: dict[str, MemberLayout] = {}
        try:
            with zipfile.ZipFile(self.path) as archive, open(self.path, "rb") as fh:
                for info in archive.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        raise DataError(
                            f"{self.path}: compressed .npz members cannot be read out of core; set "
                            "preprocess.compress_npz: false and rerun `tumorseg preprocess`"
                        )
                    self.members[info.filename.removesuffix(".npy")] = _member_layout(fh, info)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DataError(
                f"{self.path}: not a readable preprocessed case ({exc}); rerun preprocess"
            ) from None

    def map_all(self) -> dict[str, np.ndarray]:
        """Every member as a read-only array over one memory map, released with the last array."""
        with open(self.path, "rb") as fh:
            mapping = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return {
            name: np.ndarray(
                m.shape, m.dtype, buffer=mapping, offset=m.offset, order="F" if m.fortran else "C"
            )
            for name, m in self.members.items()
        }


def _member_layout(fh: Any, info: zipfile.ZipInfo) -> MemberLayout:
    fh.seek(info.header_offset)
    header = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))
    if header[0] != _LOCAL_SIGNATURE:
        raise ValueError(f"bad zip local header for {info.filename}")
    name_length, extra_length = header[-2], header[-1]
    fh.seek(info.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    return MemberLayout(fh.tell(), tuple(int(n) for n in shape), np.dtype(dtype), bool(fortran))


class CaseReader:
    """One preprocessed case (``image (C, X, Y, Z)``, ``label (X, Y, Z)``, ``loc_*``): patches out of
    core, or from memory once :meth:`load` was called."""

    def __init__(self, path: str | Path) -> None:
        self.layout = NpzLayout(path)
        missing = [key for key in ("image", "label", FOREGROUND_LOCATIONS) if key not in self.layout.members]
        if missing:
            raise DataError(
                f"{path}: lacks {missing[0]!r}; the case was preprocessed by an older tumorseg, "
                "rerun `tumorseg preprocess`"
            )
        self.shape: tuple[int, int, int] = self.layout.members["label"].shape  # type: ignore[assignment]
        self._memory: dict[str, np.ndarray] | None = None

    @property
    def path(self) -> Path:
        return self.layout.path

    @property
    def nbytes(self) -> int:
        """Bytes :meth:`load` keeps in memory (image, label and sample locations, as stored)."""
        return sum(m.nbytes for k, m in self.layout.members.items() if k != "brain")

    @property
    def cached(self) -> bool:
        return self._memory is not None

    def load(self) -> None:
        """Keep the case in memory (as stored); later draws read no file."""
        mapped = self.layout.map_all()
        self._memory = {key: np.array(value) for key, value in mapped.items() if key != "brain"}

    def arrays(self) -> dict[str, np.ndarray]:
        """The members: the in-memory copies when cached, else views of one fresh memory map."""
        return self._memory if self._memory is not None else self.layout.map_all()

    def patch(self, start: Sequence[int], size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Copy one patch (:func:`cut_patch`); only its voxels are read."""
        return cut_patch(self.arrays(), start, size)

    def draw(
        self,
        rng: np.random.RandomState,
        size: Sequence[int],
        *,
        sampler: str,
        foreground_fraction: float,
        class_ratios: Sequence[float],
    ) -> tuple[np.ndarray, np.ndarray]:
        """One random training patch (:func:`choose_centre`, :func:`crop_start`, :func:`cut_patch`)
        through a single mapping of the file."""
        arrays = self.arrays()
        centre = choose_centre(
            arrays,
            self.shape,
            rng,
            sampler=sampler,
            foreground_fraction=foreground_fraction,
            class_ratios=class_ratios,
            where=self.path,
        )
        return cut_patch(arrays, crop_start(centre, size, self.shape), size)


def cut_patch(
    arrays: Mapping[str, np.ndarray], start: Sequence[int], size: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """``image`` float32 ``(C, *size)`` and ``label`` uint8 ``(1, *size)`` at ``start``, as copies
    (a view of a memory map is read-only, one of the cache would alias it)."""
    window = tuple(slice(int(a), int(a) + int(n)) for a, n in zip(start, size, strict=True))
    image = np.array(arrays["image"][(slice(None), *window)], dtype=np.float32, copy=True)
    label = np.array(arrays["label"][window], dtype=np.uint8, copy=True)[None]
    return image, label


def crop_start(centre: Sequence[int], size: Sequence[int], shape: Sequence[int]) -> tuple[int, ...]:
    """First voxel of a ``size`` patch centred on ``centre`` (at ``size // 2``), shifted to lie inside
    ``shape``: MONAI's ``correct_crop_centers`` + ``SpatialCrop`` rule."""
    return tuple(
        int(min(max(int(c) - int(n) // 2, 0), int(s) - int(n)))
        for c, n, s in zip(centre, size, shape, strict=True)
    )


def choose_centre(
    arrays: Mapping[str, np.ndarray],
    shape: Sequence[int],
    rng: np.random.RandomState,
    *,
    sampler: str,
    foreground_fraction: float,
    class_ratios: Sequence[float],
    where: str | Path = "case",
) -> tuple[int, int, int]:
    """A patch centre as MONAI's ``RandCropByPosNegLabeld`` / ``RandCropByLabelClassesd`` draw it.

    ``pos_neg``: a tumour voxel with probability ``foreground_fraction`` (always a brain voxel
    without tumour), else a brain voxel. ``label_classes``: a label by ``class_ratios`` (0 for labels
    absent from the case), then one of its voxels.
    """
    empty = np.empty((0, 3), dtype=np.uint16)
    if sampler == "pos_neg":
        foreground = arrays.get(FOREGROUND_LOCATIONS, empty)
        background = arrays.get(location_key(0), empty)
        use_fg = len(foreground) > 0 and (len(background) == 0 or rng.rand() < foreground_fraction)
        pool = foreground if use_fg else background
    else:
        pools = [arrays.get(location_key(code), empty) for code in range(len(class_ratios))]
        weights = np.array([r if len(p) else 0.0 for r, p in zip(class_ratios, pools, strict=True)])
        if weights.sum() <= 0:
            raise DataError(f"{where}: no voxel of any sampled label; check data_loader.class_ratios")
        pool = pools[int(rng.choice(len(pools), p=weights / weights.sum()))]
    if len(pool) == 0:
        # no brain and no tumour voxel: the volume's centre (validation rejects brainless cases)
        return tuple(int(n) // 2 for n in shape)  # type: ignore[return-value]
    return tuple(int(v) for v in pool[rng.randint(len(pool))])  # type: ignore[return-value]


def open_cases(paths: Sequence[str | Path], *, cache_bytes: int) -> list[CaseReader]:
    """Readers for ``paths``, loaded into memory in order while they fit ``cache_bytes``; a path listed
    twice (a case drawn more often) shares one reader, cached once."""
    unique = {key: CaseReader(key) for key in dict.fromkeys(str(path) for path in paths)}
    budget = int(cache_bytes)
    for reader in unique.values():
        if reader.nbytes > budget:
            break
        reader.load()
        budget -= reader.nbytes
    return [unique[str(path)] for path in paths]


def cached_bytes(readers: Sequence[CaseReader]) -> int:
    """Bytes held in memory by ``readers`` (a shared reader counted once)."""
    return sum(reader.nbytes for reader in {id(r): r for r in readers}.values() if reader.cached)
