"""``tumorseg predict`` as a function: resolve the model, then segment a folder in its source geometry.

The model defaults to ``predict.model`` (``models:/tumorseg@champion``) in the project's MLflow store
(``mlflow.tracking_uri``, ``$MLFLOW_TRACKING_URI``, else ``<paths.mlruns>/mlflow.db``); any checkpoint
path or MLflow model URI is accepted (:mod:`tumorseg.registry.loading`). Inference settings come from
params.yaml's ``predict:`` section.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.config import section


@dataclass
class PredictRun:
    """A finished ``tumorseg predict``.

    Attributes:
        summary: the :class:`~tumorseg.models.predictor.PredictSummary` (cases, files, time).
        model: where the model came from (``models:/tumorseg@champion (version 3, run ...)``).
    """

    summary: Any
    model: str

    def one_line(self) -> str:
        return f"{self.summary.one_line()} with {self.model}"


def predict_folder(
    input_path: str | Path,
    out_dir: str | Path,
    params: dict[str, Any],
    *,
    model_uri: str | None = None,
    layout: str | None = None,
    labels: str | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    on_case: Callable[[Any, list[Path]], None] | None = None,
) -> PredictRun:
    """Segment every case of ``input_path`` into ``out_dir/<case_id>.nii.gz``.

    Input problems are found before the model is loaded (a missing modality costs no model load),
    and ``out_dir`` is only created once a case is ready to be written.

    Args:
        input_path: dataset folder in any supported layout, or one case folder.
        out_dir: output folder.
        params: params dict (``predict``, ``paths``, ``mlflow`` sections).
        model_uri: checkpoint path or MLflow model URI; default ``predict.model``.
        layout: force a layout (None: detect).
        labels: the input's label convention, which the predictions are written in (None: detect).
        source: params file name for error messages.
        tracking_uri: MLflow store; see the module docstring for the default.
        on_case: called after each case is written (the CLI prints its volumes).

    Raises:
        DataError: bad input or unknown model (one line).
    """
    from tumorseg.models.predictor import PredictConfig, SegmentationPredictor, plan_cases, predict_dataset
    from tumorseg.registry.loading import load_model
    from tumorseg.tracking import params_tracking_uri

    cfg: PredictConfig = section("predict", params, source=source)
    cases = plan_cases(input_path, layout, labels)
    uri = params_tracking_uri(params, tracking_uri, source=source)
    loaded = load_model(model_uri or cfg.model, tracking_uri=uri)
    predictor = SegmentationPredictor(loaded.trained, cfg)
    summary = predict_dataset(input_path, out_dir, predictor, cases=cases, on_case=on_case)
    return PredictRun(summary, loaded.description)
