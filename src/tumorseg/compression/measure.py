"""Measuring the variants with the same code, cases and threads: Dice on the test split, CPU latency.
Every variant runs the whole ``predict`` path: what is measured is what a deployment runs.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from tumorseg.compression.config import CompressConfig
from tumorseg.compression.report import BASELINE, VariantResult
from tumorseg.compression.variants import VariantBuilder


def trained_variant(builder: VariantBuilder, result: VariantResult, threads: int) -> Any:
    """The variant as a :class:`~tumorseg.models.checkpoint.TrainedNetwork` the predictor can run."""
    import dataclasses

    from tumorseg.models.onnx_network import OnnxRuntimeNetwork
    from tumorseg.models.program_network import ExportedProgramNetwork

    if result.runtime == "pytorch":
        return builder.trained
    if result.runtime == "torch.export":  # loaded from its file, as a deployment loads it
        return dataclasses.replace(builder.trained, network=ExportedProgramNetwork(result.file))
    return dataclasses.replace(builder.trained, network=OnnxRuntimeNetwork(result.file, threads=threads))


def measure_latencies(
    predictors: dict[str, Any], cases: list[Any], warmup: int, repeats: int, *, baseline: str = BASELINE
) -> dict[str, tuple[float, float, list[float], float | None]]:
    """Median whole-``predict`` CPU time per case of each variant, timed in alternation with the baseline.

    Machine load drifts over minutes, so each variant gets its own block of ``repeats`` rounds
    alternating baseline and variant on every case; not one round-robin over all variants, where a run
    would depend on the runtime run before it (arenas, freed memory), unlike a one-model deployment.

    Returns:
        ``{name: (whole-predict s, sliding-window s, every run, baseline s)}``: per-case medians averaged
        over cases; ``baseline s``: the baseline's time in the variant's block (None for the baseline,
        which pools every block).
    """
    for predictor in predictors.values():
        for case in cases:
            for _ in range(warmup):
                predictor.predict_case(case)

    def timed(predictor: Any, case: Any) -> tuple[float, float]:
        start = time.perf_counter()
        prediction = predictor.predict_case(case)
        return time.perf_counter() - start, prediction.seconds.get("inference", float("nan"))

    def summary(by_case: dict[int, list[tuple[float, float]]]) -> tuple[float, float, list[float]]:
        totals = [statistics.median(t for t, _ in case_runs) for case_runs in by_case.values()]
        inference = [statistics.median(i for _, i in case_runs) for case_runs in by_case.values()]
        every = [t for case_runs in by_case.values() for t, _ in case_runs]
        return statistics.fmean(totals), statistics.fmean(inference), every

    reference = predictors.get(baseline)
    pooled: dict[int, list[tuple[float, float]]] = {}
    timings: dict[str, tuple[float, float, list[float], float | None]] = {}
    for name, predictor in predictors.items():
        if name == baseline and len(predictors) > 1:
            continue
        runs: dict[int, list[tuple[float, float]]] = {}
        alongside: dict[int, list[tuple[float, float]]] = {}
        for _ in range(repeats):
            for index, case in enumerate(cases):
                if reference is not None and name != baseline:
                    alongside.setdefault(index, []).append(timed(reference, case))
                runs.setdefault(index, []).append(timed(predictor, case))
        for index, case_runs in alongside.items():
            pooled.setdefault(index, []).extend(case_runs)
        timings[name] = (*summary(runs), summary(alongside)[0] if alongside else None)
    if reference is not None and pooled:
        timings[baseline] = (*summary(pooled), None)
    return timings


def measure_dice(predictor: Any, cases: list[Any], eval_cfg: Any, work: Path, name: str) -> tuple[dict, dict]:
    """Mean Dice per scored region (+ ``mean``), and each case's mean over them (source geometry)."""
    from tumorseg.evaluation.pipeline_stage import evaluate_cases
    from tumorseg.evaluation.summary import region_order

    folder = work / f"eval_{name}"
    folder.mkdir(parents=True, exist_ok=True)
    result = evaluate_cases(
        predictor,
        cases,
        folder / "per_case.csv",
        cfg=eval_cfg,
        summary_path=folder / "summary.json",
        make_plots=False,
    )
    regions = region_order(result.per_case)
    wide = result.per_case.pivot(index="case_id", columns="region", values="dice")[regions]
    per_case = wide.mean(axis=1)
    dice = {region: float(wide[region].mean()) for region in regions}
    dice["mean"] = float(per_case.mean())
    return dice, {str(k): float(v) for k, v in per_case.items()}


def latency_cases(cfg: CompressConfig, work: Path) -> tuple[list[Any], str]:
    """The cases to time: ``compress.latency.case_dir``, or one synthetic BraTS-size case made here."""
    from tumorseg.config import SynthConfig
    from tumorseg.models.predictor import plan_cases

    folder = cfg.latency.case_dir
    if folder is None:
        from tumorseg.data.synth import synthesize_dataset

        folder = str(work / "latency_cases")
        synthesize_dataset(folder, SynthConfig(cases=1, spacing_mm=cfg.latency.synth_spacing_mm, seed=7))
    cases = plan_cases(folder)
    import nibabel as nib

    shape = "x".join(str(n) for n in nib.load(str(cases[0].paths["t1"])).shape[:3])
    return cases, shape


def cuda_onnxruntime() -> bool:
    """Whether ONNX Runtime here can run on a GPU (where the ``fp16`` variant is meant to run)."""
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()
