"""What ``tumorseg compress`` does differently for volumes (``--dims 3``) and for the 2-D model
(``--dims 2``): the model it loads, the cases it scores and times, how a variant runs, which part of
the network is pruned, and how the edge version is logged. The variants, the gate, the edge choice,
the reports and the registration are shared (:mod:`tumorseg.compression.stage`).

The 2-D model is compressed whole (segmenter and classifier in one graph, two outputs) and gated on
the segmenter's Dice; pruning removes segmenter weights only, so the detector's classifier keeps its
fp32 weights in every pruned variant (the INT8 and reduced-precision variants convert both).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tumorseg.errors import DataError
from tumorseg.params import Params

if TYPE_CHECKING:
    import torch
    from torch import nn

    from tumorseg.compression.config import CompressConfig
    from tumorseg.registry.loading import LoadedModel

CLASS_OUTPUT_NAME = "class_logits"
"""Second output of a 2-D variant's ONNX graph (the first is the segmentation ``logits``)."""
DETECTOR_FILE = "detector.json"


class ModelKind(Protocol):
    """The dims-specific steps of ``tumorseg compress``; ``dims``: 3 or 2."""

    dims: int
    export_options: dict[str, Any]
    """Extra :func:`~tumorseg.compression.onnx_export.export_onnx` arguments (output names, axes)."""

    def default_model(self, params: Params) -> str:
        """The fp32 model to compress when neither ``--model`` nor ``compress.model`` names one."""
        ...

    def load(self, uri: str, tracking_uri: str) -> LoadedModel:
        """The fp32 model with its origin, registered version and drift profile."""
        ...

    def run_settings(self, params: Params) -> Any:
        """The inference settings every variant runs with and the edge version stores."""
        ...

    def test_cases(self, params: Params, source: str) -> list[Any]:
        """The held-out test cases the variants are scored on; DataError when there are none."""
        ...

    def calibration(self, params: Params, trained: Any) -> tuple[list[Any], list[str]]:
        """Static INT8 calibration inputs and their case ids (``compress.quantization``)."""
        ...

    def example(self, trained: Any) -> torch.Tensor:
        """A random ``(2, C, *spatial)`` network input: traced by the exporters, compared across variants."""
        ...

    def prunable(
        self, network: nn.Module, trained: Any, window: torch.Tensor
    ) -> tuple[nn.Module, torch.Tensor, int]:
        """``(module to prune, its (1, C, *spatial) input, output channels to keep)`` of a copy of the fp32
        ``trained`` network whose input ``window`` is."""
        ...

    def predictor(self, trained: Any, settings: Any) -> Any:
        """The whole ``predict`` path of a variant: ``predict_case(case)`` is what the latency loop times."""
        ...

    def score(
        self, predictor: Any, cases: list[Any], params: Params, work: Path, name: str
    ) -> tuple[dict[str, float], dict[str, float]]:
        """``(mean Dice per scored region and "mean", each case's mean)`` of a predictor on ``cases``."""
        ...

    def latency_cases(self, cfg: CompressConfig, work: Path) -> tuple[list[Any], str]:
        """The inputs to time (``cfg.latency.case_dir``'s, or one made in ``work``) and their shape in words."""
        ...

    def reports(self, params: Params) -> Path: ...

    def model_name(self, params: Params) -> str:
        """The registered model whose ``compress.alias`` the edge version gets."""
        ...

    def experiment(self, params: Params) -> str:
        """The MLflow experiment of the ``compress`` run."""
        ...

    def log_edge_model(
        self, artifacts: dict[str, str], trained: Any, settings: Any, folder: Path, packages: tuple[str, ...]
    ) -> Any:
        """Write the model's own files into ``folder``, log the pyfunc with ``artifacts`` into the active run
        (``packages`` added to its requirements); its ``ModelInfo``."""
        ...


def _settings_json(settings: Any) -> dict[str, Any]:
    return settings.model_dump(mode="json")


def _write_json(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return str(path)


class VolumeModels:
    """``--dims 3``: the volume champion, the test cases of ``paths.split``, the sliding-window predictor."""

    dims = 3
    export_options: dict[str, Any] = {}

    def default_model(self, params: Params) -> str:
        return params.predict.model

    def load(self, uri: str, tracking_uri: str) -> LoadedModel:
        from tumorseg.registry.loading import load_model

        return load_model(uri, tracking_uri=tracking_uri)

    def run_settings(self, params: Params) -> Any:
        """``predict`` on CPU, labels only."""
        return params.predict.model_copy(
            update={"device": "cpu", "probabilities": False, "uncertainty": False}
        )

    def test_cases(self, params: Params, source: str) -> list[Any]:
        from tumorseg.evaluation.pipeline_stage import split_cases

        return split_cases(params, "test", source=source)

    def calibration(self, params: Params, trained: Any) -> tuple[list[Any], list[str]]:
        """Training-patch windows of ``compress.quantization.calibration_split``'s volumes."""
        from tumorseg.compression.quantize import calibration_windows
        from tumorseg.data.datamodule import read_split

        paths, cfg = params.paths, params.compress.quantization
        return calibration_windows(
            paths.preprocessed,
            read_split(paths.split).get(cfg.calibration_split, []),
            trained.roi_size,
            cfg,
            split_file=paths.split,
        )

    def example(self, trained: Any) -> torch.Tensor:
        import torch

        return torch.randn((2, 4, *trained.roi_size), generator=torch.Generator().manual_seed(0))

    def prunable(
        self, network: nn.Module, trained: Any, window: torch.Tensor
    ) -> tuple[nn.Module, torch.Tensor, int]:
        """The whole network; its head keeps the output channels."""
        return network, window, trained.model.out_channels

    def predictor(self, trained: Any, settings: Any) -> Any:
        from tumorseg.models.predictor import SegmentationPredictor

        return SegmentationPredictor(trained, settings)

    def score(
        self, predictor: Any, cases: list[Any], params: Params, work: Path, name: str
    ) -> tuple[dict[str, float], dict[str, float]]:
        from tumorseg.compression.measure import measure_dice

        return measure_dice(predictor, cases, params.evaluate, work, name)

    def latency_cases(self, cfg: CompressConfig, work: Path) -> tuple[list[Any], str]:
        from tumorseg.compression.measure import latency_cases

        return latency_cases(cfg, work)

    def reports(self, params: Params) -> Path:
        return Path(params.paths.reports)

    def model_name(self, params: Params) -> str:
        return params.registry.model_name

    def experiment(self, params: Params) -> str:
        return params.mlflow.experiment

    def log_edge_model(
        self, artifacts: dict[str, str], trained: Any, settings: Any, folder: Path, packages: tuple[str, ...]
    ) -> Any:
        """The volume pyfunc: ``config.json`` and ``predict.json`` beside the edge file."""
        from tumorseg.registry.pyfunc import (
            MODEL_CODE,
            PREDICT_SETTINGS_FILE,
            RUNTIME_PACKAGES,
            log_code_model,
            model_signature,
        )

        values = _settings_json(settings)
        files = {
            "config": _write_json(folder / "config.json", trained.config),
            "predict": _write_json(folder / PREDICT_SETTINGS_FILE, values),
        }
        signature = model_signature(bool(values.get("tta")), float(values.get("min_component_mm3", 0)))
        return log_code_model(
            "model", MODEL_CODE, {**artifacts, **files}, signature, (*RUNTIME_PACKAGES, *packages)
        )


class ImageModels:
    """``--dims 2``: the 2-D champion (``tumorseg-2d``), the test images (Dice on the masked ones) of ``paths.split_2d``,
    the one-image ``predict`` path, the ``*_2d`` keys and folders."""

    dims = 2
    export_options: dict[str, Any] = {"output_names": ("logits", CLASS_OUTPUT_NAME), "dynamic_spatial": False}
    """Two outputs; spatial axes fixed: the network sees preprocessed ``preprocess_2d.size`` squares."""

    def default_model(self, params: Params) -> str:
        return params.predict_2d.model

    def load(self, uri: str, tracking_uri: str) -> LoadedModel:
        """As :func:`~tumorseg.registry.loading.load_planar_model`, keeping the version a URI resolved to."""
        from tumorseg.models.package import from_folder
        from tumorseg.registry.loading import (
            FIRST_STEPS_2D,
            LoadedModel,
            downloaded_model,
            is_mlflow_uri,
            load_planar_model,
        )

        version = None
        if is_mlflow_uri(uri):
            with downloaded_model(uri, tracking_uri, first_steps=FIRST_STEPS_2D) as found:
                model, version = from_folder(found.folder, found.description), found.version
        else:
            model = load_planar_model(uri, tracking_uri=tracking_uri)
        return LoadedModel(model, uri, model.description, version=version, drift_profile=model.drift_profile)

    def run_settings(self, params: Params) -> Any:
        """``predict_2d`` (mask threshold, smallest component)."""
        return params.predict_2d

    def test_cases(self, params: Params, source: str) -> list[Any]:
        """Every test image: Dice is scored on those with a reference mask (tumour-free ones included: an
        empty mask scores too), detection on all (Kaggle-style yes/no images have no mask)."""
        from tumorseg.data.datamodule import planar_records, read_planar_split

        paths = params.paths
        ids = read_planar_split(paths.split_2d)["test"]
        records = planar_records(paths.preprocessed_2d, ids)
        if not any(r["has_mask"] for r in records):
            raise DataError(
                f"{paths.split_2d}: no 'test' images with a reference mask to score the variants on; "
                "rerun `tumorseg split --dims 2` with a test share"
            )
        return records

    def calibration(self, params: Params, trained: Any) -> tuple[list[Any], list[str]]:
        """Whole preprocessed images of ``compress.quantization.calibration_split``."""
        from tumorseg.compression.quantize import planar_calibration_images
        from tumorseg.data.datamodule import read_planar_split

        paths, cfg = params.paths, params.compress.quantization
        return planar_calibration_images(
            paths.preprocessed_2d,
            read_planar_split(paths.split_2d)[cfg.calibration_split],
            cfg,
            split_file=paths.split_2d,
        )

    def example(self, trained: Any) -> torch.Tensor:
        import torch

        size = trained.preprocess.size
        return torch.randn((2, 1, size, size), generator=torch.Generator().manual_seed(0))

    def prunable(
        self, network: nn.Module, trained: Any, window: torch.Tensor
    ) -> tuple[nn.Module, torch.Tensor, int]:
        """The segmenter at the network's input size, its one tumour channel kept."""
        import torch

        side = network.input_size
        return (
            network.segmenter,
            torch.randn((1, 1, side, side), generator=torch.Generator().manual_seed(0)),
            1,
        )

    def predictor(self, trained: Any, settings: Any) -> Any:
        from tumorseg.compression.measure import PlanarPredictor

        return PlanarPredictor(dataclasses.replace(trained, predict_settings=_settings_json(settings)))

    def score(
        self, predictor: Any, cases: list[Any], params: Params, work: Path, name: str
    ) -> tuple[dict[str, float], dict[str, float]]:
        from tumorseg.compression.measure import measure_planar_dice

        return measure_planar_dice(predictor.model, cases)

    def latency_cases(self, cfg: CompressConfig, work: Path) -> tuple[list[Any], str]:
        from tumorseg.compression.measure import planar_latency_cases

        return planar_latency_cases(cfg, work)

    def reports(self, params: Params) -> Path:
        return Path(params.paths.reports_2d)

    def model_name(self, params: Params) -> str:
        return params.evaluate_2d.model_name

    def experiment(self, params: Params) -> str:
        return params.train_2d.experiment

    def log_edge_model(
        self, artifacts: dict[str, str], trained: Any, settings: Any, folder: Path, packages: tuple[str, ...]
    ) -> Any:
        """The image pyfunc: ``config.json`` and ``detector.json`` (the fp32 model's detector, the
        ``predict_2d`` settings) beside the edge file, read back by :func:`tumorseg.models.package.planar_edge_model`."""
        from tumorseg.registry.pyfunc import (
            MODEL_CODE,
            PLANAR_MODEL_CODE_NAME,
            PLANAR_RUNTIME_PACKAGES,
            log_code_model,
            planar_signature,
        )

        detector = {"detector": trained.detector.to_dict(), "predict_2d": _settings_json(settings)}
        files = {
            "config": _write_json(folder / "config.json", trained.config),
            "detector": _write_json(folder / DETECTOR_FILE, detector),
        }
        code = shutil.copyfile(MODEL_CODE, folder / PLANAR_MODEL_CODE_NAME)
        return log_code_model(
            "model", code, {**artifacts, **files}, planar_signature(), (*PLANAR_RUNTIME_PACKAGES, *packages)
        )


MODEL_KINDS: dict[int, ModelKind] = {3: VolumeModels(), 2: ImageModels()}
"""What ``compress`` does differently, by ``--dims``."""
