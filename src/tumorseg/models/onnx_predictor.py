"""``tumorseg predict`` without torch: the fp32 network on ONNX Runtime, every other step in numpy/scipy.

A cold ``predict`` spends most of its time importing torch (1 s) and MONAI (2.8 s) before it touches a
case (docs/decisions/0013). This strategy object runs the same steps as
:class:`~tumorseg.models.predictor.SegmentationPredictor` and gives the same label maps (checked in
tests/model/test_onnx_predictor.py): trilinear resampling with torch's ``align_corners=False``
sampling positions, the z-score cast to the stored dtype, MONAI's sliding window (window positions,
zero padding, gaussian importance map with ``sigma_scale`` 0.125, blending by the summed weights),
sigmoid and threshold, regions nested into labels and small 26-connected components dropped as
MONAI's ``RemoveSmallObjects`` does. Restoring to the source grid and writing are shared with the
torch path. Nothing here imports torch, MONAI, Lightning or MLflow: MONAI's inferer and transforms
are reimplemented because importing them is the cost being removed.

What it cannot do (TTA, probability and uncertainty maps, CUDA, 2-D networks, label outputs) is
named by :func:`onnx_refusal`; the caller then takes the torch path.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.config import PreprocessConfig, without_retired
from tumorseg.data.conventions import CANONICAL_MODALITIES, LabelSet, get_label_set
from tumorseg.data.grid import SourceGrid, resize
from tumorseg.data.preprocessed_case import (
    DecodedCase,
    PreprocessedCase,
    crop_and_normalise,
    ras_float32,
    source_fields,
)
from tumorseg.data.transforms import DataLoaderConfig
from tumorseg.errors import DataError, first_line
from tumorseg.models.config import PredictConfig, SlidingWindowConfig
from tumorseg.models.networks import ModelConfig
from tumorseg.models.postprocess import resolve_min_confidence
from tumorseg.models.predictor import SegmentationPredictor

log = logging.getLogger(__name__)

ONNX_FILE = "network.onnx"
"""The fp32 network a model package carries for this path (:func:`~tumorseg.models.package.save_onnx`)."""
ONNX_ARTIFACT = "network_onnx"
"""Its MLflow pyfunc artifact key (not ``onnx``: that key makes a compressed variant's only network)."""
SIGMA_SCALE = 0.125
"""MONAI's default gaussian importance-map width, as a fraction of the window side."""


@dataclass(frozen=True)
class OnnxPackage:
    """What the ONNX path needs of a model package: the network file and its ``config.json`` sections,
    read without torch (a TrainedNetwork holds a torch module)."""

    onnx_file: Path
    config: dict[str, Any]
    model: ModelConfig
    data_loader: DataLoaderConfig
    sliding_window: SlidingWindowConfig

    @classmethod
    def read(cls, onnx_file: str | Path, config_file: str | Path) -> OnnxPackage:
        """DataError naming the file when either is missing or the config was not written by tumorseg."""
        onnx_file, config_file = Path(onnx_file), Path(config_file)
        for path in (onnx_file, config_file):
            if not path.is_file():
                raise DataError(f"{path}: missing from the model package")
        try:
            config = json.loads(config_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{config_file}: not a readable model config ({type(exc).__name__})") from None
        missing = [key for key in ("model", "data_loader", "preprocess") if key not in config]
        if missing:
            raise DataError(f"{config_file}: lacks the sections {missing}; it was not written by tumorseg")
        return cls(
            onnx_file,
            config,
            ModelConfig.model_validate(config["model"]),
            DataLoaderConfig.model_validate(without_retired("data_loader", config["data_loader"])),
            SlidingWindowConfig.model_validate(config.get("sliding_window", {})),
        )

    @property
    def roi_size(self) -> tuple[int, ...]:
        return self.data_loader.network_patch

    @property
    def label_set(self) -> LabelSet:
        return get_label_set(self.model.label_set)


def cuda_present() -> bool:
    """Whether the NVIDIA driver lists a GPU (``predict.device: auto`` then means CUDA, which the torch
    path runs), found without importing torch."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def onnx_refusal(cfg: PredictConfig, package: OnnxPackage | None) -> str | None:
    """Why the ONNX path cannot run ``cfg`` with ``package`` (None: it can). The single place that
    decides; ``predict.engine: auto`` takes the torch path on any reason, ``onnx`` reports it."""
    if package is None:
        return f"the model package has no {ONNX_FILE} (registered before it was exported, or a checkpoint)"
    preprocess = package.config.get("preprocess", {})
    reasons = {
        "predict.tta is on (mirrored passes run on the torch path)": cfg.tta,
        "predict.probabilities is on": cfg.probabilities,
        "predict.uncertainty is on": cfg.uncertainty,
        "predict.device is cuda": cfg.device == "cuda",
        "predict.device is auto and a CUDA GPU is present": cfg.device == "auto" and cuda_present(),
        "the model is 2-D (slice inferer)": len(package.roi_size) != 3,
        "the model outputs labels, not regions": package.model.output != "regions",
        "the model resamples with spline interpolation": preprocess.get("image_interpolation_order", 1) > 1,
    }
    return next((reason for reason, applies in reasons.items() if applies), None)


# ---------------------------------------------------------------------------- preprocessing
def _linear_axis(volume: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear resampling of one axis of a float32 array, edges aligned: output ``j`` samples
    ``(j + 0.5) * n_in / n_out - 0.5`` clamped at 0, in float32 as torch's ``interpolate`` computes it."""
    n_in = volume.shape[axis]
    if n_in == n_out:
        return volume
    scale = np.float32(n_in / n_out)
    source = np.maximum((np.arange(n_out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    lower = source.astype(np.intp)  # floor: source >= 0
    upper = np.minimum(lower + 1, n_in - 1)
    weight = (source - lower.astype(np.float32)).astype(np.float32)
    shape = [1] * volume.ndim
    shape[axis] = n_out
    weight = weight.reshape(shape)
    step = int(lower[1] - lower[0]) if n_out > 1 else 1
    if (
        step > 0
        and np.array_equal(lower, lower[0] + step * np.arange(n_out))
        and np.array_equal(upper, lower + 1)
    ):
        # evenly spaced samples (2 mm from 1 mm): strided views instead of two gathered copies
        index: list[Any] = [slice(None)] * volume.ndim
        index[axis] = slice(int(lower[0]), int(lower[-1]) + 1, step)
        low = volume[tuple(index)]
        index[axis] = slice(int(lower[0]) + 1, int(lower[-1]) + 2, step)
        high = volume[tuple(index)]
    else:
        low, high = np.take(volume, lower, axis=axis), np.take(volume, upper, axis=axis)
    return low * (np.float32(1.0) - weight) + high * weight


def resize_linear(volume: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear resampling of ``(X, Y, Z)`` float32 to ``shape`` (torch's ``align_corners=False``
    trilinear, one axis at a time, shrinking axes first so later passes touch fewer voxels); values
    agree with torch to float32 rounding."""
    out = np.asarray(volume, dtype=np.float32)
    order = sorted(range(3), key=lambda axis: shape[axis] / max(out.shape[axis], 1))
    for axis in order:
        out = _linear_axis(out, axis, int(shape[axis]))
    return np.ascontiguousarray(out)


def preprocess_decoded(decoded: DecodedCase, cfg: PreprocessConfig) -> PreprocessedCase:
    """Steps 1-4 of :mod:`tumorseg.data.preprocess` on a decoded case, without torch; the image and the
    geometry entries that restoring needs equal what ``DecodedCase.preprocess`` gives."""
    if decoded.volumes is not None:  # a case the threaded reader declined (MSD 4-D image...)
        volumes = decoded.volumes
        grid = SourceGrid.of(volumes.affine, volumes.image.shape[1:], cfg)
        channels = [
            ras_float32(volumes.image[c], grid, case_id=volumes.case_id, modality=m)
            for c, m in enumerate(CANONICAL_MODALITIES)
        ]
        source = source_fields(volumes, volumes.orientation, volumes.spacing, volumes.sha256)
    else:
        assert decoded.grid is not None
        grid, source = decoded.grid, decoded.source
        channels = [decoded.channels.pop(modality) for modality in CANONICAL_MODALITIES]
    shape, order = grid.resampled_shape, cfg.image_interpolation_order
    resampled = np.stack(
        [resize_linear(c, shape) if order == 1 else resize(c, shape, order) for c in channels]
    )
    del channels
    return crop_and_normalise(resampled, grid, source, None, cfg)  # steps 3-4, shared with the torch path


# ---------------------------------------------------------------------------- sliding window
def importance_map(roi_size: tuple[int, ...], mode: str) -> np.ndarray:
    """MONAI's ``compute_importance_map`` ``(*roi_size)`` float32: ones, or the separable gaussian with
    sigma ``0.125 * side`` (its window centre at ``(side - 1) / 2``), clamped below at its minimum
    (at least 1e-3) so every voxel keeps a weight."""
    if mode == "constant":
        return np.ones(roi_size, dtype=np.float32)
    weights: np.ndarray | None = None
    for axis, side in enumerate(roi_size):
        x = np.arange(-(side - 1) / 2.0, (side - 1) / 2.0 + 1, dtype=np.float32)
        sigma = side * SIGMA_SCALE
        x = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
        weights = x if weights is None else weights[..., None] * x.reshape((1,) * axis + (side,))
    assert weights is not None
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis as MONAI places them: every ``int(roi * (1 - overlap))`` voxels (at
    least 1), the last shifted back to end at the border; one window when the axis is the window."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next((d + 1 for d in range(-(-size // interval)) if d * interval + roi >= size), 1)
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def sliding_window_logits(
    image: np.ndarray,
    run: Callable[[np.ndarray], np.ndarray],
    roi_size: tuple[int, ...],
    sliding_window: SlidingWindowConfig,
) -> np.ndarray:
    """Blended logits ``(C, X, Y, Z)`` float32 of ``image`` ``(4, X, Y, Z)``, as MONAI's
    ``sliding_window_inference`` with constant (0) padding: axes shorter than the window are padded
    (half before), windows batched ``sw_batch_size`` at a time through ``run`` (``(B, 4, *roi)`` ->
    ``(B, C, *roi)``), each weighted by the importance map, the sum divided by the summed weights."""
    size = image.shape[1:]
    pad = [
        (max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(size, roi_size, strict=True)
    ]
    if any(before or after for before, after in pad):
        image = np.pad(image, [(0, 0), *pad])
    padded = image.shape[1:]
    starts = [window_starts(n, r, sliding_window.overlap) for n, r in zip(padded, roi_size, strict=True)]
    windows = [
        tuple(slice(s, s + r) for s, r in zip((a, b, c), roi_size, strict=True))
        for a in starts[0]
        for b in starts[1]
        for c in starts[2]
    ]
    weight = importance_map(roi_size, sliding_window.blend_mode)
    count = np.zeros(padded, dtype=np.float32)
    for window in windows:
        count[window] += weight
    out: np.ndarray | None = None
    step = sliding_window.sw_batch_size
    for first in range(0, len(windows), step):
        batch = windows[first : first + step]
        logits = run(np.stack([image[(slice(None), *w)] for w in batch]).astype(np.float32, copy=False))
        if out is None:
            out = np.zeros((logits.shape[1], *padded), dtype=np.float32)
        for window, window_logits in zip(batch, logits, strict=True):
            out[(slice(None), *window)] += window_logits * weight
    assert out is not None
    out /= count
    return out[(slice(None), *(slice(b, b + n) for (b, _), n in zip(pad, size, strict=True)))]


# ---------------------------------------------------------------------------- labels
def regions_to_labels(regions: np.ndarray, label_set: LabelSet) -> np.ndarray:
    """Boolean train regions ``(R, X, Y, Z)`` -> uint8 internal labels ``(X, Y, Z)``, each region kept
    inside its parent and painted in order (:func:`tumorseg.models.inference.regions_to_labels`)."""
    out = np.zeros(regions.shape[1:], dtype=np.uint8)
    kept: list[np.ndarray] = []
    for index, region in enumerate(label_set.train_regions):
        mask = regions[index]
        if region.parent >= 0:
            mask = mask & kept[region.parent]
        kept.append(mask)
        out[mask] = region.paint
    return out


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """float32 logistic of ``logits``, in place."""
    np.negative(logits, out=logits)
    np.exp(logits, out=logits)
    logits += np.float32(1.0)
    return np.reciprocal(logits, out=logits)


# ---------------------------------------------------------------------------- the strategy
def open_session(path: str | Path, *, threads: int = 0, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session on ``path`` (``threads`` 0: one per core); DataError when it cannot load.
    Idle workers sleep instead of spinning, leaving the cores to the numpy steps between batches."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no ONNX model file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3  # warnings about unused initialisers are noise for users
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        raise DataError(f"{path}: ONNX Runtime cannot load it ({first_line(exc, 10_000)})") from None


class OnnxSegmentationPredictor(SegmentationPredictor):
    """:class:`SegmentationPredictor` with the network on ONNX Runtime and numpy steps (module
    docstring): same inputs, same files written, no torch. Build it only when :func:`onnx_refusal`
    gives None for ``cfg``."""

    def __init__(self, package: OnnxPackage, cfg: PredictConfig | None = None) -> None:
        self.cfg = cfg or PredictConfig()
        reason = onnx_refusal(self.cfg, package)
        if reason is not None:
            raise ValueError(f"the ONNX path cannot run this prediction: {reason}")
        if self.cfg.keep_freed_memory:
            from tumorseg.runtime import keep_freed_memory

            keep_freed_memory()
        self.package = package
        self.trained = package
        self.device = "cpu"
        updates = {
            key: value
            for key, value in (("overlap", self.cfg.overlap), ("sw_batch_size", self.cfg.sw_batch_size))
            if value is not None
        }
        self.sliding_window = package.sliding_window.model_copy(update=updates)
        self.preprocess_cfg = PreprocessConfig.model_validate(package.config["preprocess"])
        self.min_confidence = resolve_min_confidence(self.cfg.min_component_confidence, package.config)
        self.output = package.model.output
        self.label_set = package.label_set
        self.channels = self.label_set.region_names
        self.session = open_session(package.onnx_file)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def can_read_ahead(self) -> bool:
        """A reading thread fits beside inference only when ONNX Runtime leaves a core free (it takes one
        thread per core unless told otherwise)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = self.session.get_session_options().intra_op_num_threads or cores
        return cores > threads

    def run_windows(self, windows: np.ndarray) -> np.ndarray:
        """Logits ``(B, C, *roi)`` float32 of windows ``(B, 4, *roi)`` float32."""
        (logits,) = self.session.run([self.output_name], {self.input_name: windows})
        return logits

    def preprocess(
        self, decoded: DecodedCase, seconds: dict[str, float]
    ) -> tuple[PreprocessedCase, dict[str, float]]:
        """:func:`preprocess_decoded`: resample, crop and z-score in numpy."""
        start = time.perf_counter()
        preprocessed = preprocess_decoded(decoded, self.preprocess_cfg)
        return preprocessed, {**seconds, "preprocess": time.perf_counter() - start}

    def infer(self, image: np.ndarray) -> tuple[np.ndarray, None]:
        """Sigmoid probabilities ``(C, x, y, z)`` float32 of a preprocessed ``(4, x, y, z)`` image."""
        logits = sliding_window_logits(
            np.asarray(image, dtype=np.float32), self.run_windows, self.package.roi_size, self.sliding_window
        )
        return sigmoid(logits), None

    def labels_from_probabilities(
        self, probabilities: np.ndarray, spacing_mm: tuple[float, ...], min_confidence: float | None = None
    ) -> np.ndarray:
        """uint8 internal labels ``(x, y, z)``: regions above the threshold, nested, small and unconfident
        components dropped."""
        labels = regions_to_labels(probabilities > np.float32(self.sliding_window.threshold), self.label_set)
        return self.filter_components(labels, probabilities, spacing_mm, min_confidence)


def package_from_artifacts(artifacts: Mapping[str, str | Path]) -> OnnxPackage | None:
    """The :class:`OnnxPackage` of a model's files by artifact key (None without the ONNX file)."""
    if ONNX_ARTIFACT not in artifacts or "config" not in artifacts:
        return None
    return OnnxPackage.read(artifacts[ONNX_ARTIFACT], artifacts["config"])
