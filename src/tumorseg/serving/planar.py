"""2-D images in the service: the optional 2-D model, upload checks before decoding, and the job.

A 2-D upload (Figshare ``.mat`` v7.3/v5, or ``.png``/``.jpg``/``.tif``/``.bmp``) is copied against the
same byte budget as a 3-D case, then checked *before* its pixels are decoded, since a few-kB file can
declare billions of pixels (image headers against ``serve.max_image_pixels``), point HDF5 at other
files on the server (MATLAB v7.3) or inflate without bound in :func:`scipy.io.loadmat` (MATLAB v5).
Decoding and prediction are those of ``tumorseg predict`` / ``tumorseg detect``; nothing is unpickled.
Without a 2-D model the service still runs for 3-D cases, and 2-D requests get 503.
"""

from __future__ import annotations

import logging
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from tumorseg.errors import DataError, TumorsegError, first_line
from tumorseg.serving.uploads import ByteBudget, UploadRejected, UploadTooLarge, copy_plain

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAT_V5_HEADER_BYTES = 128
MI_COMPRESSED = 15
INFLATE_CHUNK = 1 << 20


class PlanarModelMissing(TumorsegError):
    """A 2-D upload while no 2-D model is loaded (HTTP 503)."""

    status_code = 503


# ---------------------------------------------------------------------------- the optional model
@dataclass(frozen=True)
class PlanarSlot:
    """The 2-D model (a ``PlanarModel``) asked for as ``uri`` (None: disabled), or the one-line
    ``error`` saying why it could not be loaded."""

    uri: str | None
    model: Any = None
    error: str | None = None

    def require(self) -> Any:
        """The model, or :class:`PlanarModelMissing` with what to do."""
        if self.model is None:
            if not self.uri:
                why = "serve.model_2d is null"
            else:  # load errors usually name the URI already
                why = self.error if self.error and self.uri in self.error else f"{self.uri}: {self.error}"
            raise PlanarModelMissing(
                f"no 2-D model is available ({why}); restart `tumorseg serve` with --model-2d <a 2-D "
                "model folder, a 2-D best.ckpt or models:/tumorseg-2d@champion>, or set "
                "serve.model_2d in params.yaml"
            )
        return self.model

    def info(self) -> dict[str, Any]:
        """What ``/health`` reports: name, version, alias, uri, detector, or the load error."""
        if self.model is None:
            return {"available": False, "uri": self.uri, "error": self.error or "serve.model_2d is null"}
        from tumorseg.registry.loading import MODELS_URI

        uri = str(self.uri)
        match = MODELS_URI.match(uri)
        version = re.search(r"\(version (\d+)\)", self.model.description or "")
        if match:
            name, alias = match["name"], match["alias"]
            number = match["version"] or (version.group(1) if version else None)
        else:
            name, alias, number = Path(uri.rstrip("/")).name or uri, None, None
        return {
            "available": True,
            "name": str(name),
            "version": number,
            "alias": alias,
            "uri": uri,
            "description": self.model.description,
            "detector": {"method": self.model.detector.method, "threshold": self.model.detector.threshold},
            "input_size": int(self.model.preprocess.size),
        }


def load_planar_slot(uri: str | None, tracking_uri: str) -> PlanarSlot:
    """Load the 2-D model ``uri`` names; on any failure log one warning and return an empty slot (the
    optional 2-D model may never stop the 3-D service from starting)."""
    if not uri:
        return PlanarSlot(None)
    from tumorseg.registry.loading import load_planar_model

    try:
        model = load_planar_model(uri, tracking_uri=tracking_uri)
    except Exception as exc:
        message = first_line(exc, 10_000)
        if not isinstance(exc, TumorsegError):
            message = f"{type(exc).__name__}: {message}"
        log.warning("no 2-D model: %s; 2-D uploads get 503 (set serve.model_2d or --model-2d)", message)
        return PlanarSlot(uri, error=message)
    log.info("serving 2-D %s", model.description or uri)
    return PlanarSlot(uri, model)


# ---------------------------------------------------------------------------- checks before decoding
def stage_planar_upload(name: str, stream: BinaryIO, workdir: Path, budget: ByteBudget) -> Path:
    """Copy one 2-D upload into ``workdir/upload/<name>`` against ``budget`` (a fixed folder name, so
    :func:`~tumorseg.data.planar.source_of` never takes an upload for a Kaggle ``yes``/``no`` image)."""
    (workdir / "upload").mkdir()
    target = workdir / "upload" / name
    copy_plain(stream, target, budget, name)
    return target


def check_planar_file(path: Path, max_pixels: int, budget: ByteBudget) -> None:
    """Refuse a 2-D file whose decoded pixels would exceed the caps, reading headers only.

    Raises:
        UploadTooLarge: more pixels or bytes than allowed (HTTP 413).
        UploadRejected: a MATLAB file that points outside itself.
        DataError: an image PIL cannot identify, or a corrupt MATLAB v7.3 file.
    """
    if path.suffix.lower() == ".mat":
        with path.open("rb") as fh:
            head = fh.read(2048 + 8)
        if any(head[o : o + 8] == HDF5_SIGNATURE for o in (0, 512, 1024, 2048)):
            _check_mat_v73(path, max_pixels, budget)
        else:
            _check_mat_v5(path, budget)
        return
    _check_image_header(path, max_pixels)


def _too_many_pixels(name: str, shape: tuple[int, ...], max_pixels: int) -> UploadTooLarge:
    return UploadTooLarge(
        f"{name}: declares {' x '.join(str(n) for n in shape)} pixels, more than {max_pixels} "
        "(serve.max_image_pixels); upload one 2-D slice at its scanner resolution"
    )


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
        raise _too_many_pixels(path.name, (height, width), max_pixels)


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
                if not isinstance(group.get(key, getlink=True), h5py.HardLink):
                    raise UploadRejected(
                        f"{path.name}: cjdata field {key[:40]!r} is a link to another file or path; refused"
                    )
                item = group[key]
                if not isinstance(item, h5py.Dataset):
                    continue
                if item.external or item.is_virtual:
                    raise UploadRejected(
                        f"{path.name}: cjdata field {key[:40]!r} stores its data outside the file; refused"
                    )
                if key in ("image", "tumorMask") and item.size > max_pixels:
                    raise _too_many_pixels(path.name, tuple(reversed(item.shape)), max_pixels)
                budget.charge(int(item.size) * int(item.dtype.itemsize), path.name)
    except (UploadRejected, DataError):
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DataError(
            f"{path.name}: corrupt MATLAB v7.3 (HDF5) file ({type(exc).__name__}); re-export it"
        ) from None


def _check_mat_v5(path: Path, budget: ByteBudget) -> None:
    """Inflate each compressed top-level element of a MATLAB v5 file in chunks against ``budget``.

    Hand-written: :func:`scipy.io.loadmat` inflates an ``miCOMPRESSED`` element whole, with no cap.
    Layout per MATLAB's MAT-file format document (128-byte header, then 8-byte tags ``type, nbytes``);
    what this walk cannot follow is left to ``loadmat``, which refuses it.
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
                    budget.charge(len(inflater.decompress(pending, INFLATE_CHUNK)), path.name)
                    pending = inflater.unconsumed_tail
            except zlib.error:
                return  # loadmat reports the corrupt element
            position = body + nbytes
        else:
            position = body + nbytes + (-nbytes % 8)


# ---------------------------------------------------------------------------- the job
def predict_planar_file(
    path: Path, model: Any, *, max_pixels: int, pixel_size_mm: float | None
) -> dict[str, Any]:
    """Read one staged 2-D file and run the 2-D model (a ``PlanarModel``) on it, on a pool thread.

    Args:
        max_pixels: ``serve.max_image_pixels`` (checked again on the decoded array).
        pixel_size_mm: pixel side in mm, when the client knows it: Figshare ``cjdata`` stores none,
            and a PNG's or JPEG's DPI is a printing resolution, not the scanner's.

    Returns:
        ``summary`` (JSON-ready), ``mask_png`` (0/255 PNG bytes at the input size), ``file_name``,
        ``image`` (float32 ``(H, W)``), ``mask`` (uint8 ``(H, W)``), ``reference`` (``tumorMask`` or None).
    """
    from tumorseg.data.planar import read_planar
    from tumorseg.models.planar_predictor import mask_png_bytes, predict_planar

    start = time.perf_counter()
    read = read_planar(path)
    if read.image.size > max_pixels:
        raise _too_many_pixels(path.name, read.image.shape, max_pixels)
    read_s = time.perf_counter() - start
    prediction = predict_planar(read.image, model, case_id=read.case_id)
    predict_s = time.perf_counter() - start - read_s
    area_px = int(np.count_nonzero(prediction.mask))
    summary: dict[str, Any] = {
        "kind": "2d",
        "case_id": prediction.case_id,
        "source": read.source,
        "file_format": read.fmt,
        "shape": [int(n) for n in read.image.shape],
        "probability": round(prediction.probability, 6),
        "label": "yes" if prediction.label else "no",
        "tumour_type": prediction.tumour_type,
        "type_probabilities": {k: round(v, 6) for k, v in prediction.type_probabilities.items()},
        "detector": {"method": model.detector.method, "threshold": model.detector.threshold},
        "tumour_area_px": area_px,
        "pixel_size_mm": pixel_size_mm,
        "tumour_area_mm2": None if pixel_size_mm is None else round(area_px * pixel_size_mm**2, 3),
        "seconds": {"read": round(read_s, 3), "predict": round(predict_s, 3)},
    }
    if read.mask is not None:
        summary["dice"] = {"tumour": round(binary_dice(prediction.mask, read.mask), 4)}
    return {
        "summary": summary,
        "mask_png": mask_png_bytes(prediction.mask),
        "file_name": f"{prediction.case_id}_mask.png",
        "image": read.image,
        "mask": prediction.mask,
        "reference": read.mask,
    }


def binary_dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two 0/1 masks of one shape; both empty counts as 1.0 (as :func:`dice_per_region`)."""
    pred, ref = np.asarray(prediction) > 0, np.asarray(reference) > 0
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / total
