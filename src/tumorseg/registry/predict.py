"""``tumorseg predict`` as a function: resolve the model, then segment a folder in its source geometry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.params import Params, as_params


@dataclass
class PredictRun:
    """A finished ``tumorseg predict``: its :class:`~tumorseg.models.predictor.PredictSummary` and where
    the model came from (``models:/tumorseg@champion (version 3, run ...)``)."""

    summary: Any
    model: str

    def one_line(self) -> str:
        return f"{self.summary.one_line()} with {self.model}"


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
    each case is written.
    """
    params = as_params(params, source)
    from tumorseg.models.config import PredictConfig
    from tumorseg.models.predictor import SegmentationPredictor, plan_cases, predict_dataset
    from tumorseg.registry.loading import load_model
    from tumorseg.tracking import params_tracking_uri

    cfg: PredictConfig = params.predict
    cases = plan_cases(input_path, layout, labels)
    uri = params_tracking_uri(params, tracking_uri, source=source)
    loaded = load_model(model_uri or cfg.model, tracking_uri=uri)
    predictor = SegmentationPredictor(loaded.trained, cfg)
    summary = predict_dataset(input_path, out_dir, predictor, cases=cases, on_case=on_case)
    return PredictRun(summary, loaded.description)
