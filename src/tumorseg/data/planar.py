"""2-D MRI slices: reading Figshare ``.mat`` files and plain images, preprocessing and its inverse.

- **Figshare** (Cheng et al., 3064 T1ce slices): a MATLAB struct ``cjdata`` per slice (``image``
  512 x 512 int16, ``tumorMask``, ``label`` 1..3, ``PID``, ``tumorBorder``); v7.3 (HDF5) files are
  read by content, since writers other than MATLAB omit the ``MATLAB_class`` attributes.
- **Kaggle** "brain MRI images for brain tumor detection": JPEG/PNG in ``yes/`` and ``no/``; no
  masks, no patient ids (each image is its own patient).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.config import PlanarPreprocessConfig
from tumorseg.errors import DataError, first_line

FIGSHARE_LABELS: dict[int, str] = {1: "meningioma", 2: "glioma", 3: "pituitary"}
"""Figshare ``cjdata.label`` -> tumour type."""

TUMOUR_TYPES: tuple[str, ...] = tuple(FIGSHARE_LABELS.values())

MAT_SUFFIX = ".mat"
BITMAP_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
IMAGE_LAYOUTS: tuple[str, ...] = ("figshare", "kaggle")
KAGGLE_CLASS_FOLDERS: dict[str, bool] = {"yes": True, "no": False}
"""Kaggle class folder (lower case) -> has_tumour."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


# ---------------------------------------------------------------------------- reading
@dataclass
class PlanarImage:
    """One 2-D slice as read: float32 ``(H, W)`` grayscale ``image`` in the file's units, uint8 0/1
    ``mask`` (Figshare only), labels (None when unknown) and ``case_id`` (``figshare-12``,
    ``kaggle-yes-Y1``); ``patient_id`` is the Figshare ``PID``, else the case id."""

    image: np.ndarray
    mask: np.ndarray | None
    tumour_type: str | None
    has_tumour: bool | None
    patient_id: str
    case_id: str
    source: str
    label_code: int | None = None
    border: np.ndarray | None = None
    fmt: str = ""
    channels: int = 1
    sha256: str = ""


@dataclass
class RawPlanar:
    """What a file holds, decoded but not judged (ingest measures it, :func:`read_planar` checks it)."""

    image: np.ndarray
    mask: np.ndarray | None
    label: float | None
    pid: str | None
    border: np.ndarray | None
    fmt: str
    sha256: str


def safe_id(text: str) -> str:
    """``text`` with runs of characters other than letters, digits, ``.``, ``_``, ``-`` replaced by ``_``."""
    cleaned = _UNSAFE.sub("_", text).strip("_.-")
    return cleaned or "x"


def source_of(path: Path) -> str:
    """``figshare`` (a ``.mat`` file), ``kaggle`` (an image in a ``yes``/``no`` folder) or ``image``."""
    path = Path(path)
    if path.suffix.lower() == MAT_SUFFIX:
        return "figshare"
    if path.parent.name.lower() in KAGGLE_CLASS_FOLDERS:
        return "kaggle"
    return "image"


def default_case_id(path: Path) -> str:
    """Case id of a file: ``figshare-<stem>``, ``kaggle-<yes|no>-<stem>`` or ``<stem>`` (made safe)."""
    path = Path(path)
    source = source_of(path)
    if source == "figshare":
        return f"figshare-{safe_id(path.stem)}"
    if source == "kaggle":
        return f"kaggle-{path.parent.name.lower()}-{safe_id(path.stem)}"
    return safe_id(path.stem)


def load_planar_raw(path: Path) -> RawPlanar:
    """Read, hash and decode a ``.mat`` or image file once; a DataError naming the file (and field)
    that cannot be read or decoded, and what to do."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc}); check the file") from None
    digest = hashlib.sha256(data).hexdigest()
    suffix = path.suffix.lower()
    if suffix == MAT_SUFFIX:
        return _decode_mat(path, data, digest)
    if suffix in BITMAP_SUFFIXES:
        return _decode_image(path, data, digest)
    raise DataError(
        f"{path}: not a supported 2-D file (use .mat or {', '.join(BITMAP_SUFFIXES)}); remove or convert it"
    )


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # at 0, or after a user block of 512 * 2**k bytes (MATLAB: 512)

_FIX: dict[str, str] = {
    "image": "store the slice's pixels as a 2-D numeric array (Figshare: int16)",
    "tumorMask": "store the mask as a 2-D 0/1 array (logical or uint8) of the image's size",
    "label": "store the tumour type as one number: 1 meningioma, 2 glioma or 3 pituitary",
    "PID": "store the patient id as text (a MATLAB char array, uint16) or as one number",
    "tumorBorder": "store the outline as a numeric vector, or leave the field out",
}
"""The Figshare ``cjdata`` fields, and what to do about one that is not what it should hold."""


@dataclass(frozen=True)
class _Stored:
    """One ``cjdata`` dataset as h5py reads it (transposed); ``matlab_class`` ``""`` when absent."""

    value: np.ndarray
    matlab_class: str
    empty: bool


def _decode_mat(path: Path, data: bytes, digest: str) -> RawPlanar:
    """Figshare ``cjdata`` from a v7.3 (HDF5) or v5 MAT file held in ``data``."""
    if _holds_hdf5(data):
        fields, fmt = _interpret_fields(path, _read_cjdata(path, data)), "mat-v7.3"
    else:
        fields, fmt = _read_mat_v5(path, data), "mat-v5"
    if fields.get("image") is None:
        raise DataError(f"{path}: MATLAB struct cjdata has no 'image' field; not a Figshare slice")
    stored = [fields.get(name) for name in ("tumorMask", "label", "PID", "tumorBorder")]
    return RawPlanar(fields["image"], *stored, fmt=fmt, sha256=digest)


def _holds_hdf5(data: bytes) -> bool:
    """True for a v7.3 MAT header or the HDF5 signature at offset 0, 512, 1024 or 2048."""
    at_block = any(data[offset : offset + 8] == _HDF5_SIGNATURE for offset in (0, 512, 1024, 2048))
    return at_block or data.startswith(b"MATLAB 7.3 MAT-file")


def _read_cjdata(path: Path, data: bytes) -> dict[str, _Stored]:
    """The Figshare fields of the ``cjdata`` group of HDF5 ``data``, as stored."""
    import h5py

    try:
        with h5py.File(io.BytesIO(data), "r") as fh:
            group = fh.get("cjdata")
            if not isinstance(group, h5py.Group):
                raise DataError(f"{path}: MATLAB file has no struct 'cjdata'; not a Figshare slice")
            stored: dict[str, _Stored] = {}
            for name in _FIX:
                if name not in group:
                    continue
                item = group.get(name)
                if not isinstance(item, h5py.Dataset):
                    what = "an HDF5 group" if isinstance(item, h5py.Group) else "not an HDF5 dataset"
                    raise DataError(f"{path}: cjdata.{name} is {what}, not an array; {_FIX[name]}")
                stored[name] = _read_dataset(path, name, item)
            return stored
    except DataError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(
            f"{path}: corrupt MATLAB v7.3 (HDF5) file ({type(exc).__name__}: {first_line(exc)})"
        ) from None


def _read_dataset(path: Path, name: str, item: Any) -> _Stored:
    """One dataset's value and MATLAB attributes; a value h5py cannot read names the field."""
    import h5py

    try:
        value = item[()]
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise DataError(
            f"{path}: cjdata.{name} cannot be read ({type(exc).__name__}: {first_line(exc)}); {_FIX[name]}"
        ) from None
    array = np.zeros((0,)) if isinstance(value, h5py.Empty) else np.asarray(value)
    matlab_class = _attribute_text(item.attrs.get("MATLAB_class", b""))
    try:
        flagged_empty = bool(np.asarray(item.attrs.get("MATLAB_empty", 0)).astype(bool).any())
    except (ValueError, TypeError):
        flagged_empty = False
    return _Stored(value=array, matlab_class=matlab_class, empty=flagged_empty or array.size == 0)


def _attribute_text(value: Any) -> str:
    """An HDF5 text attribute (bytes, str or a one-element array of either) as str; else ``""``."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.ravel()[0]
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace")
    return value if isinstance(value, str) else ""


def _interpret_fields(path: Path, stored: dict[str, _Stored]) -> dict[str, Any]:
    """``cjdata`` fields as :class:`RawPlanar` holds them, read by content (empty: None, ``PID`` ``""``);
    a DataError naming a field that is not what it should hold."""
    fields: dict[str, Any] = {}
    for name, item in stored.items():
        if item.empty:
            if name == "image":
                raise DataError(f"{path}: cjdata.image is empty; {_FIX['image']}")
            fields[name] = "" if name == "PID" else None
            continue
        array, char = item.value, item.matlab_class == "char"
        if name == "PID":
            pid = _text(array, char or (array.dtype.kind == "u" and array.dtype.itemsize == 2))
            if pid is None:
                raise DataError(f"{path}: cjdata.PID is {_describe(array)}, not a patient id; {_FIX['PID']}")
            fields[name] = pid
        elif name == "label":
            fields[name] = _one_number(array, char)
            if fields[name] is None:
                raise DataError(
                    f"{path}: cjdata.label is {_describe(array)}, not one number; {_FIX['label']}"
                )
        elif array.dtype.kind not in "biuf" or char:
            what = "numbers" if name != "tumorMask" else "a 0/1 mask"
            raise DataError(f"{path}: cjdata.{name} is {_describe(array)}, not {what}; {_FIX[name]}")
        elif name == "tumorBorder":
            fields[name] = np.asarray(array.T, dtype=np.float64).ravel()
        else:
            # MATLAB writes column-major: an (H, W) array is stored as (W, H).
            fields[name] = array.T
    return fields


def _text(array: np.ndarray, char_codes: bool) -> str | None:
    """Text stored as char codes (UTF-16 units), strings, uint8 bytes or one finite number; else None."""
    kind = array.dtype.kind
    try:
        if char_codes and kind in "iu":
            codes = array.ravel()
            if codes.size and (int(codes.min()) < 0 or int(codes.max()) > 0xFFFF):
                return None
            return codes[codes != 0].astype("<u2").tobytes().decode("utf-16-le")
        if kind in "SUO":
            parts = [p.decode("utf-8") if isinstance(p, bytes) else p for p in array.ravel().tolist()]
            if not all(isinstance(p, str) for p in parts):
                return None
            return "".join(parts).replace("\x00", "")
        if kind == "u" and array.dtype.itemsize == 1 and array.size > 1:
            return array.ravel().tobytes().decode("utf-8").replace("\x00", "")
    except UnicodeDecodeError:
        return None
    value = _one_number(array, char=False)
    if value is None or not np.isfinite(value):
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def _one_number(array: np.ndarray, char: bool) -> float | None:
    """The value of a one-element numeric array, or of text that is a number; else None."""
    if char or array.dtype.kind in "SUO":
        text = _text(array, char_codes=True)
        try:
            return None if text is None else float(text.strip())
        except ValueError:
            return None
    if array.dtype.kind in "iuf" and array.size == 1:
        return float(array.ravel()[0])
    return None


def _describe(array: np.ndarray) -> str:
    """``text (dtype S6)``, ``a float64 array of shape 2x3`` (MATLAB's order) or ``a uint8 scalar``."""
    if array.dtype.kind in "SUO":
        return f"text or objects (dtype {array.dtype.str.lstrip('<>|=')})"
    if array.ndim == 0:
        return f"a {array.dtype.name} scalar"
    return f"a {array.dtype.name} array of shape {'x'.join(map(str, array.shape[::-1]))}"


def _read_mat_v5(path: Path, data: bytes) -> dict[str, Any]:
    """``cjdata`` fields of a MATLAB v5 file (scipy returns MATLAB's own order); a DataError for an
    unreadable file, no ``cjdata`` struct, or a field that is not numeric."""
    import scipy.io

    try:
        content = scipy.io.loadmat(io.BytesIO(data), simplify_cells=True)
    except NotImplementedError:  # a v7.3 header without an HDF5 body
        raise DataError(f"{path}: MATLAB v7.3 header but no HDF5 content; the file is corrupt") from None
    except Exception as exc:  # scipy raises ValueError, TypeError, struct.error, zlib.error... on bad bytes
        raise DataError(
            f"{path}: not a readable MATLAB file ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    cjdata = content.get("cjdata")
    if not isinstance(cjdata, dict):
        raise DataError(f"{path}: MATLAB file has no struct 'cjdata'; not a Figshare slice")
    fields = dict(cjdata)
    try:
        label = fields.get("label")
        if label is not None:
            label = np.asarray(label, dtype=np.float64)
            fields["label"] = float(label.ravel()[0]) if label.size == 1 else None
        if fields.get("tumorBorder") is not None:
            fields["tumorBorder"] = np.asarray(fields["tumorBorder"], dtype=np.float64).ravel()
    except (ValueError, TypeError) as exc:  # a label or border that numpy cannot turn into numbers
        raise DataError(
            f"{path}: cjdata.label or cjdata.tumorBorder is not numeric ({type(exc).__name__}: "
            f"{first_line(exc)}); store label as 1, 2 or 3 and tumorBorder as a numeric vector"
        ) from None
    for name in ("image", "tumorMask"):
        if fields.get(name) is not None:
            fields[name] = np.asarray(fields[name])
            if fields[name].dtype.kind not in "biuf":
                raise DataError(
                    f"{path}: cjdata.{name} is {_describe(fields[name].T)}, not numbers; {_FIX[name]}"
                )
    pid = fields.get("PID")
    if pid is not None and not isinstance(pid, str):
        fields["PID"] = str(pid)
    return fields


def _decode_image(path: Path, data: bytes, digest: str) -> RawPlanar:
    """A JPEG/PNG/TIFF/BMP as an array: ``(H, W)`` for grayscale, ``(H, W, C)`` for colour."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or path.suffix.lstrip(".")).lower()
            img.load()  # decodes every byte: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)
            if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
            array = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(
            f"{path}: cannot decode the image ({type(exc).__name__}: {exc}); re-export it"
        ) from None
    return RawPlanar(image=array, mask=None, label=None, pid=None, border=None, fmt=fmt, sha256=digest)


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """float32 ``(H, W)`` from ``(H, W)``, ``(H, W, 1)``, RGB or RGBA ``(H, W, 3|4)`` (ITU-R 601 luma)."""
    array = np.asarray(image)
    if array.ndim == 2:
        return array.astype(np.float32, copy=False)
    if array.ndim == 3 and array.shape[-1] in (1, 2):  # gray, gray + alpha
        return array[..., 0].astype(np.float32)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return (array[..., :3].astype(np.float32) @ weights).astype(np.float32)
    raise ValueError(f"image of shape {array.shape} is neither grayscale nor RGB(A)")


def channels_of(image: np.ndarray) -> int:
    """Colour channels of a stored image array (1 for ``(H, W)``)."""
    return 1 if np.asarray(image).ndim == 2 else int(np.asarray(image).shape[-1])


def read_planar(path: Path) -> PlanarImage:
    """A Figshare ``.mat`` or an image file (Kaggle inside a ``yes``/``no`` folder), checked.

    Raises:
        DataError: unreadable file, no 2-D image, a mask of another shape or not binary, a Figshare
            label outside 1..3.
    """
    path = Path(path)
    raw = load_planar_raw(path)
    source = source_of(path)
    case_id = default_case_id(path)
    try:
        image = to_grayscale(raw.image)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}; expected one 2-D slice") from None
    if image.ndim != 2 or min(image.shape) < 1:
        raise DataError(f"{path}: image of shape {raw.image.shape} is not one 2-D slice")
    out = PlanarImage(
        image=image,
        mask=None,
        tumour_type=None,
        has_tumour=None,
        patient_id=case_id,
        case_id=case_id,
        source=source,
        border=raw.border,
        fmt=raw.fmt,
        channels=channels_of(raw.image),
        sha256=raw.sha256,
    )
    if source == "figshare":
        _add_figshare_labels(path, raw, out)
    elif source == "kaggle":
        out.has_tumour = KAGGLE_CLASS_FOLDERS[path.parent.name.lower()]
    if not np.isfinite(image).all():
        raise DataError(f"{path}: image has NaN or infinite pixels")
    return out


def _add_figshare_labels(path: Path, raw: RawPlanar, out: PlanarImage) -> None:
    """Set ``out``'s mask, label and patient id from a Figshare slice, checked."""
    if raw.mask is not None:
        if raw.mask.shape != out.image.shape:
            raise DataError(
                f"{path}: tumorMask shape {'x'.join(map(str, raw.mask.shape))} differs from image "
                f"{'x'.join(map(str, out.image.shape))}"
            )
        values = set(np.unique(raw.mask).tolist())
        if not values <= {0, 1}:
            raise DataError(f"{path}: tumorMask is not binary (values {sorted(values)[:5]})")
        out.mask = raw.mask.astype(np.uint8)
    if raw.label is not None:
        if raw.label not in FIGSHARE_LABELS:
            raise DataError(f"{path}: label {raw.label:g} is not 1, 2 or 3 (meningioma, glioma, pituitary)")
        out.label_code = int(raw.label)
        out.tumour_type = FIGSHARE_LABELS[out.label_code]
        out.has_tumour = True
    if raw.pid:
        out.patient_id = raw.pid.strip() or out.case_id


# ---------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class PlanarGeometry:
    """Where the ``(size, size)`` output lies on the ``(height, width)`` input: crop ``top:bottom``,
    ``left:right``, pad with ``pad_*`` pixels to a square, resize to ``size x size``."""

    height: int
    width: int
    top: int
    bottom: int
    left: int
    right: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int
    size: int

    @property
    def side(self) -> int:
        """Side of the padded square crop (input pixels)."""
        return self.bottom - self.top + self.pad_top + self.pad_bottom

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PlanarGeometry:
        data = json.loads(text)
        return cls(**{key: int(data[key]) for key in cls.__dataclass_fields__})


def otsu_crop_box(image: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the head: the largest Otsu-foreground component plus ``margin``
    (after an opening, so bright specks such as text labels do not stretch the box)."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    height, width = image.shape
    if float(image.max()) <= float(image.min()):
        return 0, height, 0, width
    foreground = image > threshold_otsu(image)
    opened = ndi.binary_opening(foreground, structure=np.ones((3, 3), dtype=bool))
    if opened.any():
        foreground = opened
    components, n = ndi.label(foreground)
    if n > 1:
        sizes = np.bincount(components.ravel())
        sizes[0] = 0
        foreground = components == int(sizes.argmax())
    rows = np.flatnonzero(foreground.any(axis=1))
    cols = np.flatnonzero(foreground.any(axis=0))
    if rows.size == 0:
        return 0, height, 0, width
    top = max(int(rows[0]) - margin, 0)
    bottom = min(int(rows[-1]) + 1 + margin, height)
    left = max(int(cols[0]) - margin, 0)
    right = min(int(cols[-1]) + 1 + margin, width)
    return top, bottom, left, right


def _geometry(shape: tuple[int, int], box: tuple[int, int, int, int], size: int) -> PlanarGeometry:
    top, bottom, left, right = box
    h, w = bottom - top, right - left
    side = max(h, w)
    pad_h, pad_w = side - h, side - w
    pads = (pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2)
    return PlanarGeometry(int(shape[0]), int(shape[1]), *box, *pads, size=int(size))


def _to_square(array: np.ndarray, geometry: PlanarGeometry, fill: float) -> np.ndarray:
    crop = array[geometry.top : geometry.bottom, geometry.left : geometry.right]
    return np.pad(
        crop,
        ((geometry.pad_top, geometry.pad_bottom), (geometry.pad_left, geometry.pad_right)),
        mode="constant",
        constant_values=fill,
    )


def _normalise(image: np.ndarray, cfg: PlanarPreprocessConfig) -> np.ndarray:
    if cfg.normalise == "zscore":
        std = float(image.std())
        return ((image - image.mean()) / std if std > 0 else image - image.mean()).astype(np.float32)
    if cfg.normalise == "percentile":
        low, high = np.percentile(image, [cfg.percentile_low, cfg.percentile_high])
        image = np.clip(image, low, high)
    else:
        low, high = float(image.min()), float(image.max())
    span = float(high - low)
    return ((image - low) / span if span > 0 else np.zeros_like(image)).astype(np.float32)


def preprocess_planar(image: np.ndarray, cfg: PlanarPreprocessConfig) -> tuple[np.ndarray, PlanarGeometry]:
    """The network input of one ``(H, W)`` or RGB(A) ``(H, W, 3|4)`` slice: grayscale, denoise, Otsu
    crop, pad square, resize, normalise; float32 ``(size, size)`` and the geometry to map masks."""
    from scipy import ndimage as ndi
    from skimage.transform import resize

    gray = to_grayscale(image)
    if cfg.denoise == "median":
        gray = ndi.median_filter(gray, size=cfg.median_size)
    elif cfg.denoise == "gaussian":
        gray = ndi.gaussian_filter(gray, sigma=cfg.gaussian_sigma)
    box = otsu_crop_box(gray, cfg.crop_margin_px) if cfg.otsu_crop else (0, gray.shape[0], 0, gray.shape[1])
    geometry = _geometry(gray.shape, box, cfg.size)
    square = _to_square(gray, geometry, fill=float(gray.min()))
    if square.shape != (cfg.size, cfg.size):
        # Anti-aliased when shrinking (a Gaussian of the scale factor first), bilinear.
        square = resize(square, (cfg.size, cfg.size), order=1, anti_aliasing=True, preserve_range=True)
    return _normalise(square.astype(np.float32), cfg), geometry


def apply_planar_geometry(mask: np.ndarray, geometry: PlanarGeometry) -> np.ndarray:
    """A mask on the input's ``(H, W)`` carried to the uint8 ``(size, size)`` grid: resized bilinearly
    as 0/1 float and thresholded at 0.5 (smoother than nearest neighbour when shrinking)."""
    from skimage.transform import resize

    mask = np.asarray(mask)
    if mask.shape != (geometry.height, geometry.width):
        raise ValueError(
            f"mask shape {mask.shape} is not the geometry's input {geometry.height}x{geometry.width}"
        )
    square = _to_square((mask > 0).astype(np.float32), geometry, fill=0.0)
    if square.shape != (geometry.size, geometry.size):
        square = resize(
            square, (geometry.size, geometry.size), order=1, anti_aliasing=False, preserve_range=True
        )
    return (square >= 0.5).astype(np.uint8)


def restore_planar_mask(mask: np.ndarray, geometry: PlanarGeometry) -> np.ndarray:
    """A ``(size, size)`` mask (0/1 or labels) back on the input's uint8 ``(H, W)``: resize undone
    (nearest neighbour), padding removed, 0 outside the crop box."""
    from skimage.transform import resize

    mask = np.asarray(mask)
    if mask.shape != (geometry.size, geometry.size):
        raise ValueError(f"mask shape {mask.shape} is not the preprocessed {geometry.size}x{geometry.size}")
    side = geometry.side
    square = mask.astype(np.uint8)
    if side != geometry.size:
        square = resize(square, (side, side), order=0, anti_aliasing=False, preserve_range=True)
        square = square.astype(np.uint8)
    crop = square[
        geometry.pad_top : side - geometry.pad_bottom, geometry.pad_left : side - geometry.pad_right
    ]
    out = np.zeros((geometry.height, geometry.width), dtype=np.uint8)
    out[geometry.top : geometry.bottom, geometry.left : geometry.right] = crop
    return out
