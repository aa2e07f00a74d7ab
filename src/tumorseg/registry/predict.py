"""``tumorseg predict`` as a function: resolve the model, then segment a folder in its source geometry.

Two engines give the same label maps: ONNX Runtime with numpy steps
(:mod:`tumorseg.models.onnx_predictor`, no torch, MONAI or MLflow import: a cold start costs a
second less than importing torch alone) and PyTorch with MONAI's inferer (every option).
``predict.engine`` picks one; ``auto`` takes ONNX Runtime whenever the model carries its ONNX
network and the options allow it (:func:`~tumorseg.models.onnx_predictor.onnx_refusal`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tumorseg.errors import ConfigError
from tumorseg.params import Params, as_params

log = logging.getLogger(__name__)


@dataclass
class PredictRun:
    """A finished ``tumorseg predict``: its :class:`~tumorseg.models.predictor.PredictSummary`, where
    the model came from (``models:/tumorseg@champion (version 3, run ...)``) and the engine that ran it
    (``onnxruntime`` or ``torch``)."""

    summary: Any
    model: str
    engine: str = "torch"
    drift: list[Any] = field(default_factory=list)
    """One :class:`~tumorseg.monitoring.drift.DriftCheck` per case (empty: no profile, or monitor off)."""
    drift_file: Path | None = None
    drift_note: str | None = None
    """Why no case was checked (the model has no profile, ``monitor.enabled`` is false)."""
    confidence_gated: bool = False
    """Whether the component-confidence threshold was left out for cases flagged by more than their grid
    (the model has a threshold; :attr:`DriftCheck.flagged_after_preprocessing`)."""

    def one_line(self) -> str:
        text = f"{self.summary.one_line()} with {self.model} on {self.engine}"
        if self.drift:
            flagged = sum(check.flagged for check in self.drift)
            text += (
                f"; drift: {flagged} of {len(self.drift)} cases outside the model's training profile "
                f"({self.drift_file})"
            )
            gated = sum(check.flagged_after_preprocessing for check in self.drift)
            if gated and self.confidence_gated:
                text += f"; no component dropped for low confidence in {gated} of them"
        elif self.drift_note:
            text += f"; drift not checked: {self.drift_note}"
        return text

    def drift_lines(self) -> list[str]:
        """One line per case outside the reference: what is outside and by how much."""
        return [f"drift: {c.case_id}: {'; '.join(c.outside)}" for c in self.drift if c.flagged]


def onnx_predictor(uri: str, tracking_uri: str, cfg: Any) -> tuple[Any, str, Any] | None:
    """The ONNX Runtime predictor of model ``uri`` with its description and drift profile (None: none
    stored), or None when ``cfg.engine`` (auto) should fall back to torch; ConfigError when
    ``engine: onnx`` cannot be honoured."""
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
            from tumorseg.monitoring.drift import load_profile

            profile = load_profile(files.artifacts)
            return OnnxSegmentationPredictor(package, cfg), files.description, profile
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
    from tumorseg.models.predictor import plan_cases
    from tumorseg.tracking import params_tracking_uri

    cfg: PredictConfig = params.predict
    cases = plan_cases(input_path, layout, labels)
    uri = params_tracking_uri(params, tracking_uri, source=source)
    model = model_uri or cfg.model
    if cfg.engine != "torch" and (fast := onnx_predictor(model, uri, cfg)) is not None:
        predictor, description, profile = fast
        engine = "onnxruntime"
    else:
        from tumorseg.models.predictor import SegmentationPredictor
        from tumorseg.registry.loading import load_model

        loaded = load_model(model, tracking_uri=uri)
        predictor, description, profile = (
            SegmentationPredictor(loaded.trained, cfg),
            loaded.description,
            loaded.drift_profile,
        )
        engine = "torch"
    run = PredictRun(None, description, engine)
    summary = _predict_checked(input_path, out_dir, predictor, cases, params, profile, run, on_case)
    run.summary = summary
    return run


def _predict_checked(
    input_path: str | Path,
    out_dir: str | Path,
    predictor: Any,
    cases: list[Any],
    params: Params,
    profile: Any,
    run: PredictRun,
    on_case: Callable[[Any, list[Path]], None] | None,
) -> Any:
    """:func:`predict_dataset` with each case checked against the model's drift ``profile`` once it has
    decoded (the features of its decoded modalities); ``out_dir/drift.json`` records the checks (also
    those of cases finished before a failure). With a component-confidence threshold, a case flagged by more than
    its grid (voxel size, field of view, orientation: ``GRID_FEATURES``) loses no component for low
    confidence, only small ones: the threshold was chosen on cases like the training ones (decision
    record 0030)."""
    from tumorseg.models.predictor import predict_dataset

    if profile is None or not params.monitor.enabled:
        run.drift_note = "the model has no drift profile" if profile is None else "monitor.enabled is false"
        return predict_dataset(input_path, out_dir, predictor, cases=cases, on_case=on_case)
    from tumorseg.monitoring.drift import (
        DriftMonitor,
        component_threshold,
        decoded_features,
        try_check,
        write_drift_file,
    )

    monitor = DriftMonitor.from_params(profile, params.monitor)
    checks: dict[str, Any] = {}
    run.confidence_gated = predictor.min_confidence > 0

    def check(case: Any, decoded: Any) -> float | None:
        """The case's drift check, kept for its prediction; its component-confidence threshold."""
        features = lambda: decoded_features(case.case_id, decoded)  # noqa: E731
        checks[case.case_id] = found = try_check(monitor, features, case.case_id)
        threshold = component_threshold(found) if run.confidence_gated else None
        if threshold is not None:
            log.debug(
                "%s: outside the model's training profile; no component dropped for low confidence (the "
                "threshold %.3f was chosen on in-distribution cases)",
                case.case_id,
                predictor.min_confidence,
            )
        return threshold

    def checked(prediction: Any, files: list[Path]) -> None:
        found = checks.pop(prediction.case_id, None)
        if found is not None:
            found.volumes_ml = {k: round(float(v), 3) for k, v in prediction.volumes_ml.items()}
            run.drift.append(found)
        if on_case is not None:
            on_case(prediction, files)

    try:
        return predict_dataset(
            input_path, out_dir, predictor, cases=cases, on_case=checked, threshold_for=check
        )
    finally:
        if run.drift:
            run.drift_file = write_drift_file(Path(out_dir), run.model, monitor, run.drift)


class PlanarDriftChecks:
    """2-D ``predict``: each image against the model's training profile (``drift.json`` in the output)."""

    def __init__(self, model: Any, params: Params, input_path: str | Path) -> None:
        from tumorseg.data.readers import image_inputs

        self.model = model
        self.checks: list[Any] = []
        self.monitor = None
        self.note = None
        profile = getattr(model, "drift_profile", None)
        if profile is None or not params.monitor.enabled:
            self.note = "the model has no drift profile" if profile is None else "monitor.enabled is false"
            return
        from tumorseg.data.planar import default_case_id
        from tumorseg.monitoring.drift import DriftMonitor

        self.monitor = DriftMonitor.from_params(profile, params.monitor)
        self.paths = {default_case_id(p): p for p in image_inputs(input_path)}

    def check(self, prediction: Any) -> None:
        if self.monitor is None or prediction.case_id not in self.paths:
            return
        from tumorseg.data.planar import read_planar
        from tumorseg.monitoring.drift import planar_features, try_check

        def features() -> Any:
            read = read_planar(self.paths[prediction.case_id])
            return planar_features(prediction.case_id, read.image, read.fmt)

        check = try_check(self.monitor, features, prediction.case_id)
        if check is not None:
            self.checks.append(check)

    def write(self, folder: Path) -> None:
        if self.checks:
            from tumorseg.monitoring.drift import write_drift_file

            write_drift_file(folder, self.model.description, self.monitor, self.checks)

    def lines(self) -> list[str]:
        return [f"drift: {c.case_id}: {'; '.join(c.outside)}" for c in self.checks if c.flagged]

    def one_line(self) -> str:
        if self.note:
            return f"drift not checked: {self.note}"
        flagged = sum(c.flagged for c in self.checks)
        return f"drift: {flagged} of {len(self.checks)} images outside the model's training profile"
