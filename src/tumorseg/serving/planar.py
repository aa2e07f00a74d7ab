"""2-D images in the service: the optional 2-D model, upload checks before decoding, and the prediction job.

A 2-D upload is one file: a Figshare MATLAB slice (``.mat``, v7.3 or v5) or an image (``.png``,
``.jpg``/``.jpeg``, ``.tif``/``.tiff``, ``.bmp``). It is copied into the request's private folder
against the same byte budget as a 3-D case, then checked *before* its pixels are decoded:

- images: the width and height in the header (PIL reads the header only on ``Image.open``) must not
  exceed ``serve.max_image_pixels``; a few-kB PNG or JPEG can declare billions of pixels;
- MATLAB v7.3 (HDF5): every ``cjdata`` field must be a plain dataset stored in this file (no
  external or soft links, no external raw storage, no virtual dataset: HDF5 would read other files
  on the server) and no bigger, decoded, than the pixel cap and the byte budget allow;
- MATLAB v5: every compressed element is inflated in bounded chunks against the byte budget
  before :func:`scipy.io.loadmat` (which inflates in one go) sees the file.

Then :func:`tumorseg.data.planar.read_planar` decodes it and
:func:`tumorseg.models.planar_predictor.predict_planar` runs the model, so the service answers exactly what
``tumorseg predict`` / ``tumorseg detect`` write. Nothing is unpickled (``scipy.io.loadmat`` of v5
files does not unpickle; ``.npy`` and ``.pkl`` are refused by name).

The 2-D model is optional: :func:`load_planar_slot` logs one warning when it cannot be loaded and
the service runs for 3-D cases; 2-D requests then get 503 naming how to provide one.
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
from tumorseg.serving.uploads import (
    ByteBudget,
    UploadRejected,
    UploadTooLarge,
    copy_plain,
)

log = logging.getLogger(__name__)

"""The 2-D inputs the service reads (those of :mod:`tumorseg.models.planar_predictor`)."""
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
    """The 2-D model the service holds, or why it holds none.

    Attributes:
        uri: what was asked for (``serve.model_2d`` / ``--model-2d``); None when disabled.
        model: the loaded :class:`~tumorseg.models.planar_package.PlanarModel`, or None.
        error: one line saying why it could not be loaded.
    """

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
    """Load the 2-D model ``uri`` names; on failure log one warning and return an empty slot.

    Any failure is caught, not only :class:`~tumorseg.errors.TumorsegError`: the 2-D model is
    optional, and nothing about it may stop the 3-D service from starting.
    """
    if not uri:
        return PlanarSlot(None)
    from tumorseg.models.planar_package import load_planar_model

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
    """Copy one 2-D upload into ``workdir/upload/<name>`` against ``budget``.

    The folder name is fixed so :func:`~tumorseg.data.planar.source_of` never mistakes an upload for
    a Kaggle ``yes``/``no`` image.
    """
    folder = workdir / "upload"
    folder.mkdir()
    target = folder / name
    copy_plain(stream, target, budget, name)
    return target


def check_planar_file(path: Path, max_pixels: int, budget: ByteBudget) -> None:
    """Refuse a 2-D file whose decoded pixels would exceed the caps, reading headers only.

    Args:
        path: the staged upload.
        max_pixels: ``serve.max_image_pixels``.
        budget: the request's byte budget (MATLAB elements are inflated against it).

    Raises:
        UploadTooLarge: more pixels or bytes than allowed (HTTP 413).
        UploadRejected: a MATLAB file that points outside itself, or an image PIL cannot identify.
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
    """Links, external storage and sizes of the ``cjdata`` datasets of an HDF5 MAT file."""
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

    Hand-written because :func:`scipy.io.loadmat` inflates an ``miCOMPRESSED`` element whole, with no
    cap. The layout (128-byte header, then 8-byte tags ``type, nbytes``) is MATLAB's MAT-file format
    document; anything this walk cannot follow is left to ``loadmat``, which refuses it.
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
    """Read one staged 2-D file and run the 2-D model on it (a pool thread runs this).

    Args:
        path: the staged upload.
        model: a :class:`~tumorseg.models.planar_package.PlanarModel`.
        max_pixels: ``serve.max_image_pixels`` (checked again on the decoded array).
        pixel_size_mm: in-plane pixel side in mm, when the client knows it (the supported formats do
            not store one: Figshare ``cjdata`` has no spacing field, and the DPI of a PNG or JPEG is
            a printing resolution, not the scanner's).

    Returns:
        ``summary`` (JSON-ready), ``mask_png`` (0/255 PNG bytes at the input size), ``file_name``
        (``<case_id>_mask.png``), ``image`` (float32 ``(H, W)``), ``mask`` (uint8 ``(H, W)``) and
        ``reference`` (the file's own ``tumorMask`` or None).

    Raises:
        DataError: an unreadable file, or a decoded image over the pixel cap.
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
