"""2-D prediction: ``predict_planar()`` for one image, and the ``tumorseg predict`` / ``detect`` writers.

One path for every caller (CLI, evaluation, pyfunc, serving): preprocess as in training, segment and
classify, clean the mask on the preprocessed grid, restore it to the input's ``(H, W)``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tumorseg.data.planar import TUMOUR_TYPES, preprocess_planar, read_planar, restore_planar_mask
from tumorseg.data.readers import image_inputs
from tumorseg.errors import DataError
from tumorseg.models.planar_package import PlanarModel

DETECT_COLUMNS: tuple[str, ...] = ("case_id", "probability", "label")


@dataclass
class PlanarPrediction:
    """The 2-D model's answer for one image.

    ``mask`` is uint8 ``(H, W)`` 0/1 at the input's size; ``tumour_type`` None when ``label`` is false;
    ``area_px`` counts predicted tumour pixels on the preprocessed grid (what the area rule reads).
    """

    case_id: str
    mask: np.ndarray
    probability: float
    label: bool
    tumour_type: str | None
    type_probabilities: dict[str, float] = field(default_factory=dict)
    area_px: int = 0


def score_preprocessed(
    model: PlanarModel, images: np.ndarray, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """``(tumour_probability (N, S, S), class_probability (N, 4))`` of preprocessed float32 ``(N, S, S)``;
    class column 0 is the tumour probability (sigmoid), columns 1-3 the types (softmax)."""
    import torch

    maps, classes = [], []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(np.asarray(images[start : start + batch_size], dtype=np.float32))[:, None]
            seg, logits = model.network(batch)
            maps.append(torch.sigmoid(seg[:, 0]).numpy())
            classes.append(
                torch.cat([torch.sigmoid(logits[:, :1]), torch.softmax(logits[:, 1:], dim=1)], dim=1).numpy()
            )
    size = images.shape[-1] if len(images) else 0
    return (
        np.concatenate(maps) if maps else np.zeros((0, size, size), np.float32),
        np.concatenate(classes) if classes else np.zeros((0, 4), np.float32),
    )


def binary_mask(probability: np.ndarray, threshold: float, min_component_px: int) -> np.ndarray:
    """uint8 ``(S, S)``: pixels above ``threshold`` minus 8-connected components < ``min_component_px``."""
    mask = probability > threshold
    if min_component_px > 0 and mask.any():
        from scipy import ndimage as ndi

        labels, n = ndi.label(mask, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        keep = sizes >= min_component_px
        keep[0] = False
        mask = keep[labels]
    return mask.astype(np.uint8)


def predict_planar(
    image: str | Path | np.ndarray, model: PlanarModel, *, case_id: str | None = None
) -> PlanarPrediction:
    """Segment and classify one 2-D image: a ``.mat``/image file, or an ``(H, W)`` / ``(H, W, 3|4)`` array.
    DataError for an unreadable file or an array that is not a 2-D image."""
    if isinstance(image, (str, Path)):
        read = read_planar(Path(image))
        pixels, case_id = read.image, case_id or read.case_id
    else:
        pixels = np.asarray(image)
        if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) < 2:
            raise DataError(f"image array of shape {pixels.shape}: expected (H, W) or (H, W, channels)")
        case_id = case_id or "image"
    prepared, geometry = preprocess_planar(pixels, model.preprocess)
    tumour_map, classes = score_preprocessed(model, prepared[None])
    settings = model.settings
    small = binary_mask(tumour_map[0], settings.mask_threshold, settings.min_component_px)
    area = int(small.sum())
    probability = float(model.detector.probability(classes[:, 0], np.array([area]))[0])
    label = probability >= model.detector.threshold
    types = {name: float(p) for name, p in zip(TUMOUR_TYPES, classes[0, 1:], strict=True)}
    tumour_type = max(types, key=types.get) if label else None
    mask = restore_planar_mask(small, geometry)
    return PlanarPrediction(str(case_id), mask, probability, bool(label), tumour_type, types, area)


def mask_png_bytes(mask: np.ndarray) -> bytes:
    """A 0/1 mask as an 8-bit grayscale PNG with values 0 and 255."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def predict_images(
    source: str | Path,
    out_dir: str | Path,
    model: PlanarModel,
    *,
    on_image: Callable[[PlanarPrediction, Path], None] | None = None,
) -> list[PlanarPrediction]:
    """``tumorseg predict`` for 2-D input: ``<out_dir>/<case_id>_mask.png`` (0/255, input size) per image."""
    out = Path(out_dir)
    results = []
    for path in image_inputs(source):
        prediction = predict_planar(path, model)
        target = out / f"{prediction.case_id}_mask.png"
        _atomic_write_bytes(target, mask_png_bytes(prediction.mask))
        results.append(prediction)
        if on_image is not None:
            on_image(prediction, target)
    return results


def detect_images(source: str | Path, out_csv: str | Path, model: PlanarModel) -> list[PlanarPrediction]:
    """``tumorseg detect``: one CSV row per image: ``case_id, probability, label`` (``yes``/``no``)."""
    from tumorseg.data.manifest import atomic_write_text

    results = [predict_planar(path, model) for path in image_inputs(source)]
    rows = [(r.case_id, round(r.probability, 6), "yes" if r.label else "no") for r in results]
    table = pd.DataFrame(rows, columns=list(DETECT_COLUMNS))
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, table.to_csv(index=False))
    return results
