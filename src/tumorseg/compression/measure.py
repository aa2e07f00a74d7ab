"""Measuring the variants with the same code, cases and threads: Dice on the test split, CPU latency.
Every variant runs the whole ``predict`` path: what is measured is what a deployment runs. Volumes
are scored as ``evaluate-model`` scores them, 2-D images as ``evaluate-model --dims 2`` does.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tumorseg.compression.config import CompressConfig
from tumorseg.compression.report import BASELINE, VariantResult
from tumorseg.compression.variants import VariantBuilder


def trained_variant(builder: VariantBuilder, result: VariantResult, threads: int) -> Any:
    """The variant as the fp32 model with its network: a :class:`~tumorseg.models.checkpoint.TrainedNetwork`
    or :class:`~tumorseg.models.checkpoint.PlanarModel` the predictor can run."""
    from tumorseg.compression.onnx_export import OnnxRuntimeOutputs
    from tumorseg.models.program_network import ExportedProgramNetwork

    if result.runtime == "pytorch":
        return builder.trained
    if result.runtime == "torch.export":  # loaded from its file, as a deployment loads it
        return dataclasses.replace(builder.trained, network=ExportedProgramNetwork(result.file))
    return dataclasses.replace(builder.trained, network=OnnxRuntimeOutputs(result.file, threads=threads))


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
        log_volumes=False,  # the evaluate stage logged them; once per variant would flood the console
    )
    regions = region_order(result.per_case)
    wide = result.per_case.pivot(index="case_id", columns="region", values="dice")[regions]
    per_case = wide.mean(axis=1)
    dice = {region: float(wide[region].mean()) for region in regions}
    dice["mean"] = float(per_case.mean())
    return dice, {str(k): float(v) for k, v in per_case.items()}


def measure_planar_dice(
    model: Any, records: list[dict[str, Any]]
) -> tuple[dict[str, float], dict[str, float]]:
    """Dice of each 2-D test image with a reference mask (a tumour-free one predicted empty scores 1),
    scored as ``evaluate-model --dims 2`` and the 2-D promotion gate score it (on the source image where
    it can be read), and their mean as ``tumour`` and ``mean``, plus ``detection_accuracy`` (every
    image's tumour / no-tumour call by the model's detector)."""
    from tumorseg.evaluation.planar_evaluate import _per_case_table, _run_split

    outputs = _run_split(model, records)
    probability = model.detector.probability(outputs["classes"][:, 0], outputs["areas"])
    table = _per_case_table(records, outputs, probability, probability >= model.detector.threshold)
    masked = table[table["has_mask"].astype(bool)]  # images without a mask count for detection only
    dice = masked.set_index("case_id")["dice"].astype(float)
    mean = float(dice.mean())
    scores = {"tumour": mean, "mean": mean, "detection_accuracy": float(table["correct"].mean())}
    return scores, {str(case): float(value) for case, value in dice.items()}


class PlanarPredictor:
    """``predict`` of one 2-D image file (read, preprocess, segment and classify, restore to its size) as
    the latency loop times it: ``predict_case`` returns the ``seconds`` of its network calls as
    ``inference``. ``model`` runs the same network (:func:`measure_planar_dice` scores it)."""

    def __init__(self, model: Any) -> None:
        self._network = model.network
        self._inference = 0.0
        self.model = dataclasses.replace(model, network=self._timed)

    def _timed(self, image: Any) -> Any:
        start = time.perf_counter()
        outputs = self._network(image)
        self._inference += time.perf_counter() - start
        return outputs

    def predict_case(self, path: Path) -> SimpleNamespace:
        from tumorseg.models.predictor import predict_planar

        self._inference = 0.0
        predict_planar(path, self.model)
        return SimpleNamespace(seconds={"inference": self._inference})


def planar_latency_cases(cfg: CompressConfig, work: Path) -> tuple[list[Path], str]:
    """The images to time: ``compress.latency.case_dir_2d``'s (``cfg.for_dims(2)``'s ``case_dir``), or one
    synthetic Figshare-size slice made here."""
    from tumorseg.data.planar import read_planar
    from tumorseg.data.readers import image_inputs

    folder = cfg.latency.case_dir
    if folder is None:
        from tumorseg.config import SynthPlanarConfig
        from tumorseg.data.planar_synth import synthesize_planar_dataset

        folder = str(work / "latency_images")
        synthesize_planar_dataset(
            Path(folder), "figshare", SynthPlanarConfig(figshare_patients=1, slices_per_patient=1, seed=7)
        )
    images = image_inputs(folder)
    return images, "x".join(str(n) for n in read_planar(images[0]).image.shape[:2])


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
