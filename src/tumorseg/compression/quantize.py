"""INT8 quantization of ONNX models: static (ONNX Runtime QDQ), dynamic and weight-only.

Static quantization fixes each activation's range from calibration windows: training-patch-sized
windows of preprocessed validation volumes (never test cases) at seeded random brain positions, or
whole preprocessed validation images for the 2-D model. Dynamic quantization (``ConvInteger``)
quantizes each activation from its own range at run time: no calibration.
:func:`quantize_weights_int8` stores int8 conv weights only (about 4x smaller) and computes in
float32, for CPUs without fast 3-D INT8 kernels.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.compression.config import QuantizationConfig
from tumorseg.data.manifest import atomic_output
from tumorseg.errors import ConfigError, DataError, first_line
from tumorseg.faults import write_point

log = logging.getLogger(__name__)


@dataclass
class QuantizationStats:
    """What quantization changed: layers quantized / left in float by ONNX operator type; calibration data."""

    quantized_nodes: dict[str, int]
    float_nodes: dict[str, int]
    calibration_windows: int
    calibration_cases: list[str]


def supported_op_types() -> list[str]:
    """ONNX operator types ONNX Runtime can quantize in QDQ format."""
    from onnxruntime.quantization.registry import QDQRegistry

    return sorted(QDQRegistry)


def check_op_types(cfg: QuantizationConfig, source: str = "params.yaml") -> None:
    """ConfigError unless ONNX Runtime can quantize every ``compress.quantization.op_types`` entry."""
    supported = supported_op_types()
    for op_type in cfg.op_types:
        if op_type not in supported:
            raise ConfigError(
                f"{source}: compress.quantization.op_types: {op_type} has no INT8 (QDQ) kernel in ONNX Runtime; "
                f"use some of {', '.join(supported)}"
            )


def calibration_windows(
    preprocessed_dir: str | Path,
    case_ids: list[str],
    roi_size: tuple[int, ...],
    cfg: QuantizationConfig,
    *,
    split_file: str | Path = "split.json",
) -> tuple[list[np.ndarray], list[str]]:
    """Random training-patch windows ``(1, 4, *roi)`` float32, zero-padded, from the first
    ``cfg.calibration_cases`` of ``case_ids`` (DataError naming ``split_file`` if none); a 2-D model's
    ``roi_size`` gives ``(1, 4, X, Y)`` axial slices."""
    from tumorseg.data.datamodule import case_records

    _require_calibration_cases(case_ids, cfg, split_file)
    rng = np.random.default_rng(cfg.seed)
    windows: list[np.ndarray] = []
    used: list[str] = []
    for record in case_records(preprocessed_dir, case_ids[: cfg.calibration_cases]):
        with np.load(record["path"]) as npz:
            image = np.asarray(npz["image"], dtype=np.float32)
            brain = np.asarray(npz["brain"], dtype=bool) if "brain" in npz.files else image.any(0)
        used.append(record["case_id"])
        for _ in range(cfg.patches_per_case):
            windows.append(_random_window(image, brain, roi_size, rng))
    return windows, used


def planar_calibration_images(
    preprocessed_dir: str | Path,
    case_ids: list[str],
    cfg: QuantizationConfig,
    *,
    split_file: str | Path = "split_2d.json",
) -> tuple[list[np.ndarray], list[str]]:
    """The 2-D model's calibration inputs: the first ``cfg.calibration_cases`` preprocessed images of
    ``case_ids`` whole, ``(1, 1, S, S)`` float32 (the network sees whole images, not patches)."""
    from tumorseg.data.datamodule import load_sample, planar_records

    _require_calibration_cases(case_ids, cfg, split_file)
    records = planar_records(preprocessed_dir, case_ids[: cfg.calibration_cases])
    return [load_sample(r)["image"][None] for r in records], [r["case_id"] for r in records]


def _require_calibration_cases(case_ids: list[str], cfg: QuantizationConfig, split_file: str | Path) -> None:
    if not case_ids:
        raise DataError(
            f"{split_file}: no {cfg.calibration_split!r} cases to calibrate INT8 quantization on; "
            f"rerun `tumorseg split` with a {cfg.calibration_split} share or drop the int8 variants"
        )


@contextmanager
def _root_notes_dropped() -> Iterator[None]:
    """ONNX Runtime's quantizers log a note per tensor on the root logger at INFO: dropped while they run
    (a filter on the root logger sees only records logged on it, not those of named loggers)."""
    root = logging.getLogger()

    def keep(record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO

    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _random_window(
    image: np.ndarray, brain: np.ndarray, roi_size: tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """One ``(1, 4, *roi)`` window centred on a random brain voxel (zero padding past the edges)."""
    if len(roi_size) == 2:  # 2-D network: a random axial slice, windowed in-plane
        z = int(rng.integers(image.shape[3]))
        return _random_window(image[..., z], brain[..., z], roi_size, rng)
    voxels = np.argwhere(brain)
    centre = voxels[rng.integers(len(voxels))] if len(voxels) else np.array(image.shape[1:]) // 2
    window = np.zeros((4, *roi_size), dtype=np.float32)
    src, dst = [], []
    for axis, size in enumerate(roi_size):
        start = int(centre[axis]) - size // 2
        lo, hi = max(start, 0), min(start + size, image.shape[axis + 1])
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    window[(slice(None), *dst)] = image[(slice(None), *src)]
    return window[None]


def _calibration_reader(input_name: str, windows: list[np.ndarray]) -> Any:
    """An ONNX Runtime ``CalibrationDataReader`` (imported lazily) over ``(1, 4, *roi)`` windows."""
    from onnxruntime.quantization import CalibrationDataReader

    class WindowCalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._next = iter(windows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            window = next(self._next, None)
            return None if window is None else {input_name: window}

        def rewind(self) -> None:
            self._next = iter(windows)

    return WindowCalibrationReader()


def quantize_int8(
    fp32_onnx: str | Path,
    out_path: str | Path,
    windows: list[np.ndarray],
    cfg: QuantizationConfig,
    *,
    calibration_cases: list[str] | None = None,
    what: str = "network",
) -> QuantizationStats:
    """Write the INT8 (QDQ) version of ``fp32_onnx`` to ``out_path``, calibrated on ``windows``.

    ``quantize_static`` puts Quantize/DequantizeLinear pairs around the ``cfg.op_types`` layers, which
    ONNX Runtime fuses into INT8 kernels on load; normalisation and activations stay float. DataError:
    no calibration windows, no layer of a quantizable type, or ONNX Runtime failed.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not windows:
        raise DataError(f"INT8 quantization of the {what}: no calibration windows; it needs validation cases")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    graph = onnx.load(str(fp32_onnx))
    present = Counter(node.op_type for node in graph.graph.node)
    targets = [op for op in cfg.op_types if present.get(op)]
    if not targets:
        raise DataError(
            f"INT8 quantization of the {what}: none of its layers ({', '.join(sorted(present))}) is one of "
            f"compress.quantization.op_types ({', '.join(cfg.op_types)})"
        )
    input_name = graph.graph.input[0].name
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[cfg.calibrate_method]
    with tempfile.TemporaryDirectory(prefix="tumorseg-int8-", dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        staged = Path(tmp) / out_path.name
        try:
            # Shape inference + graph optimisation first, as ONNX Runtime recommends; the symbolic
            # pass cannot resolve the dynamic spatial axes through every layer, so it is skipped.
            quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
            quantize_static(
                str(prepared),
                str(staged),
                _calibration_reader(input_name, windows),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(targets),
                per_channel=cfg.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
            )
        except Exception as exc:  # ONNX Runtime's quantizer raises plain exceptions
            raise DataError(
                f"INT8 quantization of the {what} failed ({type(exc).__name__}: {first_line(exc)})"
            ) from None
        write_point(out_path)
        os.replace(staged, out_path)
    done, left = _quantized_layers(onnx.load(str(out_path)), targets)
    if not done:
        raise DataError(f"INT8 quantization of the {what}: ONNX Runtime quantized none of its layers")
    return QuantizationStats(dict(done), dict(left), len(windows), list(calibration_cases or []))


def _quantized_layers(quantized: Any, targets: list[str]) -> tuple[Counter[str], Counter[str]]:
    """Layers of a QDQ graph by type, ``(quantized, left in float)``, read from the written graph: a
    quantized layer has an input that comes out of a ``DequantizeLinear``."""
    dequantized_inputs = {
        node.output[0] for node in quantized.graph.node if node.op_type == "DequantizeLinear"
    }
    done: Counter[str] = Counter()
    left: Counter[str] = Counter()
    for node in quantized.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if node.op_type in targets and any(name in dequantized_inputs for name in node.input):
            done[node.op_type] += 1
        else:
            left[node.op_type] += 1
    return done, left


def quantize_dynamic_int8(
    float_onnx: str | Path, out_path: str | Path, cfg: QuantizationConfig, *, what: str = "network"
) -> QuantizationStats:
    """Write the dynamic INT8 version of ``float_onnx``: ``Conv`` layers become ONNX Runtime
    ``ConvInteger`` (int8 weights, per channel if ``cfg.per_channel``) whose input is quantized per run
    from its own range; no calibration. ``ConvTranspose`` has no integer kernel and stays float.
    DataError: no ``Conv`` layer, or ONNX Runtime failed.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    present = Counter(node.op_type for node in onnx.load(str(float_onnx)).graph.node)
    if not present.get("Conv"):
        raise DataError(f"dynamic INT8 of the {what}: no Conv layer ({', '.join(sorted(present))})")
    with tempfile.TemporaryDirectory(prefix="tumorseg-int8-", dir=out_path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        staged = Path(tmp) / out_path.name
        try:
            quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)  # as quantize_int8
            # The quantizer re-infers shapes and fails on some recorded ones (the dynamo exporter's
            # after a Flatten); they are optional annotations, so it gets the graph without them.
            graph = onnx.load(str(prepared))
            del graph.graph.value_info[:]
            onnx.save(graph, str(prepared))
            with _root_notes_dropped():
                quantize_dynamic(
                    str(prepared),
                    str(staged),
                    op_types_to_quantize=["Conv"],
                    per_channel=cfg.per_channel,
                    weight_type=QuantType.QInt8,
                )
        except Exception as exc:  # ONNX Runtime's quantizer raises plain exceptions
            raise DataError(
                f"dynamic INT8 of the {what} failed ({type(exc).__name__}: {first_line(exc)})"
            ) from None
        write_point(out_path)
        os.replace(staged, out_path)
    after = Counter(node.op_type for node in onnx.load(str(out_path)).graph.node)
    done = Counter({"Conv": after.get("ConvInteger", 0)})
    left = Counter({op: n for op, n in after.items() if op in ("Conv", "ConvTranspose")})
    return QuantizationStats(dict(done), dict(left), 0, [])


WEIGHT_ONLY_OP_AXES: dict[str, int] = {"Conv": 0, "ConvTranspose": 1}
"""Operator -> output-channel axis of its weight (Conv ``(O, I/g, *k)``, ConvTranspose ``(I, O/g, *k)``)."""


def quantize_weights_int8(
    float_onnx: str | Path, out_path: str | Path, *, what: str = "network"
) -> QuantizationStats:
    """Write a weight-only INT8 version of ``float_onnx``: INT8 conv weights in the file, float32 compute.

    Each conv weight ``W`` becomes ``round(W / s)`` in int8, one symmetric scale ``s = max|W| / 127``
    per output channel, then ``Cast`` and ``Mul`` by ``s``: no calibration, error at most ``s / 2``.
    Not ``DequantizeLinear``: ONNX Runtime's constant folding skips it (keeping QDQ pairs for INT8
    fusion), whereas ``Cast`` + ``Mul`` of initializers fold at session creation into the float32
    graph. Hand-written: ONNX Runtime's weight-only quantizers cover MatMul and Gather only.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(float_onnx))
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    dequantize: list[Any] = []
    done: Counter[str] = Counter()
    left: Counter[str] = Counter()
    for node in graph.node:
        axis = WEIGHT_ONLY_OP_AXES.get(node.op_type)
        name = node.input[1] if axis is not None and len(node.input) > 1 else None
        if name is None or name not in initializers or uses[name] != 1:
            left[node.op_type] += 1
            continue
        weight = numpy_helper.to_array(initializers[name]).astype(np.float32)
        shape = [1] * weight.ndim
        shape[axis] = -1
        others = tuple(a for a in range(weight.ndim) if a != axis)
        scale = np.abs(weight).max(axis=others) / 127.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32).reshape(shape)
        quantized = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
        graph.initializer.remove(initializers[name])
        graph.initializer.extend(
            [
                numpy_helper.from_array(quantized, f"{name}_int8"),
                numpy_helper.from_array(scale, f"{name}_scale"),
            ]
        )
        cast = helper.make_node(
            "Cast", [f"{name}_int8"], [f"{name}_cast"], to=TensorProto.FLOAT, name=f"{name}_cast"
        )
        mul = helper.make_node(
            "Mul", [f"{name}_cast", f"{name}_scale"], [f"{name}_dequantized"], name=f"{name}_mul"
        )
        dequantize += [cast, mul]
        node.input[1] = f"{name}_dequantized"
        done[node.op_type] += 1
    if not done:
        raise DataError(f"weight-only INT8 of the {what}: no Conv/ConvTranspose layer with a constant weight")
    # The new nodes read only initializers: putting them first keeps the graph topologically sorted.
    nodes = [*dequantize, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    with atomic_output(out_path, ".onnx") as tmp:
        onnx.save(model, str(tmp))
    return QuantizationStats(dict(done), dict(left), 0, [])
