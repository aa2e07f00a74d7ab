"""``tumorseg compress [--dims 2]``: build the deployment variants, measure them side by side, gate,
register ``edge``; the volume model or the 2-D one (:mod:`tumorseg.compression.dims`), same rules.

Every input is checked before any variant is built, so a failure before registration leaves the
registry as it was.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tumorseg.compression.config import CompressConfig
from tumorseg.compression.dims import MODEL_KINDS, ModelKind
from tumorseg.compression.measure import cuda_onnxruntime, measure_latencies, trained_variant
from tumorseg.compression.register import log_compress_run
from tumorseg.compression.report import (
    BASELINE,
    CompressionResult,
    VariantResult,
    apply_gate,
    choose_edge,
    publish,
    report_dict,
)
from tumorseg.compression.variants import BFLOAT16_SOURCES, ONNX_SOURCES, VariantBuilder
from tumorseg.params import Params, as_params
from tumorseg.runtime import native_bf16_cpu

log = logging.getLogger(__name__)

FP16_NOT_MEASURED = "FP16 runs on GPU (CUDAExecutionProvider); no GPU here, built but not measured"
"""Why ``fp16`` has no Dice or latency where ONNX Runtime has no CUDA provider."""
BF16_NOT_MEASURED = (
    "this CPU has no native bfloat16 (AVX512-BF16, AMX or Arm BF16); built but not measured "
    "(compress.emulated_bf16: skip)"
)
"""Why a bfloat16 variant has no Dice or latency on a CPU that would emulate it."""


@dataclass
class _StageInputs:
    """Everything the stage reads, loaded and checked first; ``run_cfg``: the inference settings every
    variant runs with (``predict`` on CPU, labels only; ``predict_2d``); ``calibration``: ``(windows, case
    ids)`` for INT8, or None."""

    cfg: CompressConfig
    kind: ModelKind
    params: Params
    run_cfg: Any
    reports: Path
    mlflow_cfg: Any
    uri: str
    test_cases: list[Any]
    loaded: Any
    calibration: tuple[list[Any], list[str]] | None
    threads: int
    started: float


def run_compress_stage(
    params: dict[str, Any],
    *,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    model_uri: str | None = None,
    dims: int = 3,
) -> CompressionResult:
    """Build, measure and gate the variants of the ``dims``-D model; write the reports; register the edge.

    ``compress:`` as :meth:`~tumorseg.compression.config.CompressConfig.for_dims` reads it; ``model_uri``
    overrides its ``model``. ConfigError or DataError (one line naming the cause) leave the registry
    untouched.
    """
    params = as_params(params, source)
    inputs = _load_inputs(params, source, tracking_uri, model_uri, MODEL_KINDS[dims])
    cfg = inputs.cfg
    out_dir = Path(cfg.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".compress-", dir=out_dir.parent) as tmp:
        work = Path(tmp)
        builder = VariantBuilder(
            inputs.loaded.trained, cfg, params, work, inputs.calibration, source, inputs.kind
        )
        timed_cases, shape = inputs.kind.latency_cases(cfg, work)
        results, predictors = _build_and_score(builder, inputs, work)
        _time_variants(results, predictors, timed_cases, cfg)
        apply_gate(results, cfg.dice_tolerance, cfg.detection_tolerance)
        edge = choose_edge(
            results, speedup=cfg.target_speedup, size_ratio=cfg.target_size_ratio, speed_tie=cfg.speed_tie
        )
        context = _report_context(inputs, results, shape, len(timed_cases))
        report = report_dict(results, edge, tolerance=cfg.dice_tolerance, context=context)
        files = publish(
            results,
            report,
            out_dir,
            inputs.reports,
            context | {"dice_tolerance": cfg.dice_tolerance},
            edge,
        )
        outcome = CompressionResult(results, edge, report, files)
        if inputs.mlflow_cfg.enabled:
            outcome.run_id, outcome.registered = log_compress_run(
                outcome,
                inputs.loaded.trained,
                inputs.run_cfg,
                params,
                cfg,
                inputs.uri,
                source,
                inputs.kind,
                drift_profile=inputs.loaded.drift_profile,
            )
    log.debug(outcome.one_line())  # the command prints it; Prefect tasks publish it
    return outcome


def _load_inputs(
    params: Params, source: str, tracking_uri: str | None, model_uri: str | None, kind: ModelKind
) -> _StageInputs:
    """Read the sections, test cases, fp32 model and INT8 calibration inputs: bad inputs fail here, early."""
    import torch

    from tumorseg.compression.quantize import check_op_types
    from tumorseg.tracking import params_tracking_uri

    started = time.perf_counter()
    cfg: CompressConfig = params.compress.for_dims(kind.dims)
    uri = params_tracking_uri(params, tracking_uri, source=source)

    needs_int8 = any(name in ONNX_SOURCES for name in cfg.variants)
    if needs_int8:
        check_op_types(cfg.quantization, source)
    test_cases = kind.test_cases(params, source)
    loaded = kind.load(model_uri or cfg.model or kind.default_model(params), uri)
    calibration = kind.calibration(params, loaded.trained) if needs_int8 else None
    threads = cfg.latency.threads
    if threads:
        torch.set_num_threads(threads)
    return _StageInputs(
        cfg=cfg,
        kind=kind,
        params=params,
        run_cfg=kind.run_settings(params),
        reports=kind.reports(params),
        mlflow_cfg=params.mlflow,
        uri=uri,
        test_cases=test_cases,
        loaded=loaded,
        calibration=calibration,
        threads=threads,
        started=started,
    )


def _build_and_score(
    builder: VariantBuilder, inputs: _StageInputs, work: Path
) -> tuple[list[VariantResult], dict[str, Any]]:
    """Build every variant (fp32 first) and score each one that can run here on the test split; returns
    a row per variant and each scored one's predictor (timed next: Dice and latency measure the same)."""
    kind = inputs.kind
    results: list[VariantResult] = []
    names = [BASELINE, *(n for n in inputs.cfg.variants if n != BASELINE)]
    predictors: dict[str, Any] = {}
    for name in names:
        log.info("compress: building %s", name)
        result = builder.build(name)
        results.append(result)
        if name == "fp16" and not cuda_onnxruntime():
            result.reason = FP16_NOT_MEASURED
            continue
        if name in BFLOAT16_SOURCES and inputs.cfg.emulated_bf16 == "skip" and not native_bf16_cpu():
            result.reason = BF16_NOT_MEASURED
            continue
        log.info("compress: scoring %s", name)
        predictors[name] = kind.predictor(trained_variant(builder, result, inputs.threads), inputs.run_cfg)
        result.dice, result.case_dice_mean = kind.score(
            predictors[name], inputs.test_cases, inputs.params, work, name
        )
        result.detection_accuracy = result.dice.pop("detection_accuracy", None)
        log.info("compress: %s Dice mean %.4f", name, result.dice["mean"])
    return results, predictors


def _time_variants(
    results: list[VariantResult], predictors: dict[str, Any], timed_cases: list[Any], cfg: CompressConfig
) -> None:
    """Time every scored variant alternating with fp32 and store the times in its row."""
    log.info("compress: timing %s, each alternating with %s", ", ".join(predictors), BASELINE)
    timings = measure_latencies(predictors, timed_cases, cfg.latency.warmup, cfg.latency.repeats)
    for result in results:
        if result.name in timings:
            (result.latency_s, result.inference_s, result.latency_runs_s, result.baseline_latency_s) = (
                timings[result.name]
            )
            log.info("compress: %s latency %.2f s", result.name, result.latency_s)


def _report_context(
    inputs: _StageInputs, results: list[VariantResult], shape: str, n_timed: int
) -> dict[str, Any]:
    """The conditions of the measurement, stated in both reports (model, cases, threads, versions):
    ``test_cases`` the cases fp32's Dice was scored on (2-D: the images with a mask); where fp32 has a
    detection accuracy (2-D), ``detection_cases`` every test image and the gate's tolerance."""
    import torch

    cfg = inputs.cfg
    baseline = next(r for r in results if r.name == BASELINE)
    detects = baseline.detection_accuracy is not None  # as apply_gate decides whether to gate on it
    return {
        "source_model": inputs.loaded.description,
        "source_version": inputs.loaded.version,
        "test_cases": len(baseline.case_dice_mean),
        "detection_cases": len(inputs.test_cases) if detects else None,
        "detection_tolerance": cfg.detection_tolerance if detects else None,
        "latency_case_shape": shape,
        "latency_cases": n_timed,
        "repeats": cfg.latency.repeats,
        "threads": inputs.threads or torch.get_num_threads(),
        "exporter": cfg.exporter,
        "onnx_opset": cfg.onnx_opset,
        "torch_version": torch.__version__,
        "targets": {
            "speedup": cfg.target_speedup,
            "size_ratio": cfg.target_size_ratio,
            "speed_tie": cfg.speed_tie,
        },
        "build_and_measure_s": round(time.perf_counter() - inputs.started, 1),
    }
