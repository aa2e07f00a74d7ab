"""``tumorseg predict`` as a function: resolve the model, then segment a folder in its source geometry.

Two engines give the same label maps: ONNX Runtime with numpy steps
(:mod:`tumorseg.models.onnx_predictor`, no torch, MONAI or MLflow import: a cold start costs a
second less than importing torch alone) and PyTorch with MONAI's inferer (every option).
``predict.engine`` picks one; ``auto`` takes ONNX Runtime whenever the model carries its ONNX
network and the options allow it (:func:`~tumorseg.models.onnx_predictor.onnx_refusal`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.errors import ConfigError
from tumorseg.params import Params, as_params


@dataclass
class PredictRun:
    """A finished ``tumorseg predict``: its :class:`~tumorseg.models.predictor.PredictSummary`, where
    the model came from (``models:/tumorseg@champion (version 3, run ...)``) and the engine that ran it
    (``onnxruntime`` or ``torch``)."""

    summary: Any
    model: str
    engine: str = "torch"

    def one_line(self) -> str:
        return f"{self.summary.one_line()} with {self.model} on {self.engine}"


def onnx_predictor(uri: str, tracking_uri: str, cfg: Any) -> tuple[Any, str] | None:
    """The ONNX Runtime predictor of model ``uri`` with its description, or None when ``cfg.engine``
    (auto) should fall back to torch; ConfigError when ``engine: onnx`` cannot be honoured."""
    from tumorseg.models.onnx_predictor import OnnxSegmentationPredictor, onnx_refusal, package_from_artifacts
    from tumorseg.registry.loading import model_files

    files = model_files(uri, tracking_uri=tracking_uri)
    if files is None:
        reason = (
            "its files are found only by loading it (a checkpoint, a run, a store other than local SQLite, "
            "or the model cache turned off)"
        )
    else:
        package = package_from_artifacts(files.artifacts)
        reason = onnx_refusal(cfg, package)
        if reason is None:
            return OnnxSegmentationPredictor(package, cfg), files.description
    if cfg.engine == "onnx":
        raise ConfigError(
            f"predict.engine: onnx cannot run {uri}: {reason}; set predict.engine: auto or torch"
        )
    return None


def predict_folder(
    input_path: str | Path,
    out_dir: str | Path,
    params: Params | dict[str, Any],
    *,
    model_uri: str | None = None,
    layout: str | None = None,
    labels: str | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    on_case: Callable[[Any, list[Path]], None] | None = None,
) -> PredictRun:
    """Segment every case of ``input_path`` (a dataset or one case folder) into ``out_dir/<case_id>.nii.gz``.

    Input problems are found before the model is loaded (a missing modality costs no model load).
    ``model_uri`` defaults to ``predict.model``; ``layout`` and ``labels`` force the input's layout and
    label convention, which the predictions are written in (None: detect); ``on_case`` is called after
    each case is written. The engine follows ``predict.engine`` (module docstring).
    """
    params = as_params(params, source)
    from tumorseg.models.config import PredictConfig
    from tumorseg.models.predictor import plan_cases, predict_dataset
    from tumorseg.tracking import params_tracking_uri

    cfg: PredictConfig = params.predict
    cases = plan_cases(input_path, layout, labels)
    uri = params_tracking_uri(params, tracking_uri, source=source)
    model = model_uri or cfg.model
    if cfg.engine != "torch" and (fast := onnx_predictor(model, uri, cfg)) is not None:
        predictor, description = fast
        summary = predict_dataset(input_path, out_dir, predictor, cases=cases, on_case=on_case)
        return PredictRun(summary, description, "onnxruntime")
    from tumorseg.models.predictor import SegmentationPredictor
    from tumorseg.registry.loading import load_model

    loaded = load_model(model, tracking_uri=uri)
    predictor = SegmentationPredictor(loaded.trained, cfg)
    summary = predict_dataset(input_path, out_dir, predictor, cases=cases, on_case=on_case)
    return PredictRun(summary, loaded.description, "torch")
