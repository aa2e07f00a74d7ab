"""``tumorseg compress``: build the deployment variants, measure them side by side, gate, register ``edge``.

One function, :func:`run_compress_stage`, is what the CLI, the DVC ``compress`` stage and the
Prefect task call. Steps:

1. load the fp32 model (``compress.model``, default ``predict.model``: the champion) and check
   every input before any work: the test split (Dice), the calibration split (INT8), the
   quantizable operator types;
2. build each variant of ``compress.variants`` (:mod:`~tumorseg.compression.config`): pruning
   followed by a fine-tune (the training recipe, optionally distilled from the fp32 network,
   weights chosen on the validation split: :mod:`~tumorseg.compression.fine_tune`), ONNX export
   checked against PyTorch, INT8 quantization, bfloat16 ``torch.export`` programs;
3. measure every variant with the same code, cases and threads: the whole ``predict`` path
   (:class:`~tumorseg.models.predictor.SegmentationPredictor`) timed on BraTS-size cases on CPU
   (each variant alternating case by case with fp32, so drifting machine load affects both alike),
   and Dice WT/TC/ET on the test split in the source geometry
   (:func:`~tumorseg.evaluation.pipeline_stage.evaluate_cases`);
4. gate (mean Dice drop <= ``compress.dice_tolerance``), choose the edge model (the accepted
   variant meeting ``compress.target_speedup`` and ``compress.target_size_ratio``, fastest then
   smallest; else the fastest accepted one), write
   ``<out_dir>/<variant>.onnx`` (or ``.pt2``), ``reports/compression.json`` and ``reports/compression.md``;
5. log the report to MLflow and register the edge model as a new version of ``registry.model_name``
   with alias ``compress.alias`` and a ``compression.variant`` tag. Existing versions and aliases
   (the fp32 champion) are never modified; any failure before this step leaves the registry as it was.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.compression.config import CompressConfig
from tumorseg.compression.report import (
    BASELINE,
    EDGE_RUNTIMES,
    VariantResult,
    apply_gate,
    choose_edge,
    report_dict,
    report_json,
    report_markdown,
)
from tumorseg.config import section
from tumorseg.data.manifest import atomic_output, atomic_write_text
from tumorseg.errors import DataError

if TYPE_CHECKING:  # torch-heavy; imported where the fine-tune runs
    from tumorseg.compression.fine_tune import FineTuneResult

log = logging.getLogger(__name__)

REPORT_JSON = "compression.json"
REPORT_MD = "compression.md"
VARIANT_SUFFIXES = (".onnx", ".pt2")
"""Files ``tumorseg compress`` keeps in ``compress.out_dir``: ONNX models and torch.export programs."""
RUNTIME_NAMES = {"onnxruntime": "ONNX Runtime", "torch.export": "PyTorch, torch.export program"}
RUNTIME_ARTIFACTS = {"onnxruntime": "onnx", "torch.export": "program"}
"""The pyfunc artifact key of each deployable runtime's file (what ``models.package.load_artifacts`` reads)."""
ONNX_SOURCES: dict[str, str] = {
    "int8": "onnx_fp32",
    "pruned_unstructured_int8": "pruned_unstructured",
    "pruned_structured_int8": "pruned_structured",
}
"""INT8 variant -> the float ONNX variant it quantizes."""
WEIGHT_ONLY_SOURCES: dict[str, str] = {
    "onnx_fp32_wint8": "onnx_fp32",
    "pruned_structured_wint8": "pruned_structured",
}
"""Weight-only INT8 variant -> the float ONNX variant whose weights it stores in int8."""
BFLOAT16_SOURCES: dict[str, str] = {
    "bf16": BASELINE,
    "pruned_structured_bf16": "pruned_structured",
}
"""bfloat16 variant -> the float variant whose PyTorch network it stores in bfloat16 (torch.export)."""


@dataclass
class CompressionResult:
    """What ``tumorseg compress`` did.

    Attributes:
        variants: every variant, measured and gated (fp32 first).
        edge: the chosen variant (None: none passed the gate).
        report: the JSON report.
        files: files written (reports, ONNX models), by name.
        registered: ``{"name", "version", "alias", "uri"}`` of the registered edge version, or None.
        run_id: MLflow run holding the report (None without MLflow).
    """

    variants: list[VariantResult]
    edge: VariantResult | None
    report: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)
    registered: dict[str, str] | None = None
    run_id: str | None = None

    def one_line(self) -> str:
        if self.edge is None:
            return "compress: no variant passed the Dice gate; nothing registered (fp32 unchanged)"
        r = self.report["edge_vs_fp32"]
        text = (
            f"compress: edge = {self.edge.name}: {r['speedup']:.2f}x faster, {r['size_ratio']:.2f}x smaller, "
            f"mean Dice drop {r['dice_drop']:+.4f} (report {self.files.get('report_md')})"
        )
        if self.registered:
            text += f"; registered {self.registered['uri']} as @{self.registered['alias']}"
        return text


# ---------------------------------------------------------------------------- building
class VariantBuilder:
    """Builds variants on demand, reusing what they share (the fp32 export feeds ``int8``...).

    Args:
        trained: the fp32 :class:`~tumorseg.models.checkpoint.TrainedNetwork`.
        cfg: ``compress`` section.
        params: params dict (data paths for fine-tuning).
        work: temporary folder for the files.
        calibration: ``(windows, case ids)`` for INT8, or None when no INT8 variant is built.
        source: params file name for messages.
    """

    def __init__(
        self,
        trained: Any,
        cfg: CompressConfig,
        params: dict[str, Any],
        work: Path,
        calibration: tuple[list[Any], list[str]] | None,
        source: str,
    ) -> None:
        import torch

        self.trained = trained
        self.cfg = cfg
        self.params = params
        self.work = work
        self.calibration = calibration
        self.source = source
        generator = torch.Generator().manual_seed(0)
        self.example = torch.randn((2, 4, *trained.roi_size), generator=generator)
        self.window = self.example[:1]
        self.torch_networks: dict[str, Any] = {BASELINE: trained.network}
        self.results: dict[str, VariantResult] = {}

    def build(self, name: str) -> VariantResult:
        """The variant's result row with its file and static facts (not yet measured)."""
        if name not in self.results:
            self.results[name] = getattr(self, f"_build_{_kind(name)}")(name)
        return self.results[name]

    def _build_fp32(self, name: str) -> VariantResult:
        from tumorseg.compression.pruning import conv_sparsity, count_nonzero, count_parameters, gmacs
        from tumorseg.models.package import save_package

        files = save_package(self.trained, self.work / name)
        network = self.trained.network
        return VariantResult(
            name=name,
            runtime="pytorch",
            file=str(files["weights"]),
            file_mb=_mib(files["weights"]),
            parameters=count_parameters(network),
            nonzero_parameters=count_nonzero(network),
            sparsity=conv_sparsity(network),
            gmacs_per_window=gmacs(network, self.window),
        )

    def _build_float_onnx(self, name: str) -> VariantResult:
        from tumorseg.compression.onnx_export import export_onnx, max_abs_difference
        from tumorseg.compression.pruning import conv_sparsity, count_nonzero, count_parameters, gmacs

        network, details = self._torch_network(name)
        path = export_onnx(
            network,
            self.work / f"{name}.onnx",
            self.example,
            opset=self.cfg.onnx_opset,
            exporter=self.cfg.exporter,
            what=f"{name} network",
        )
        diff = max_abs_difference(network, path, self.example)
        if diff > self.cfg.parity_tolerance:
            raise DataError(
                f"{name}: ONNX Runtime output differs from PyTorch by {diff:.2e} (> compress.parity_tolerance "
                f"{self.cfg.parity_tolerance:g}); try compress.exporter: torchscript"
            )
        return VariantResult(
            name=name,
            runtime="onnxruntime",
            file=str(path),
            file_mb=_mib(path),
            parameters=count_parameters(network),
            nonzero_parameters=count_nonzero(network),
            sparsity=conv_sparsity(network),
            gmacs_per_window=gmacs(network, self.window),
            onnx_max_abs_diff=diff,
            details=details,
        )

    def _build_int8(self, name: str) -> VariantResult:
        from tumorseg.compression.quantize import quantize_int8

        float_name = ONNX_SOURCES[name]
        base = self.build(float_name)
        assert self.calibration is not None  # checked before building (needs_calibration)
        windows, cases = self.calibration
        path = self.work / f"{name}.onnx"
        stats = quantize_int8(
            base.file, path, windows, self.cfg.quantization, calibration_cases=cases, what=f"{name} network"
        )
        return self._requantized(
            name, base, path, {"quantization": stats.__dict__, "quantized_from": float_name}
        )

    def _build_wint8(self, name: str) -> VariantResult:
        from tumorseg.compression.quantize import quantize_weights_int8

        float_name = WEIGHT_ONLY_SOURCES[name]
        base = self.build(float_name)
        path = self.work / f"{name}.onnx"
        stats = quantize_weights_int8(base.file, path, what=f"{name} network")
        return self._requantized(
            name, base, path, {"weight_only_int8": stats.__dict__, "quantized_from": float_name}
        )

    def _requantized(
        self, name: str, base: VariantResult, path: Path, details: dict[str, Any]
    ) -> VariantResult:
        """The variant stored at ``path``: ``base``'s network in another number format."""
        from tumorseg.compression.onnx_export import max_abs_difference
        from tumorseg.models.onnx_network import OnnxRuntimeNetwork

        # Quantization error, measured against the float ONNX graph it came from.
        diff = max_abs_difference(OnnxRuntimeNetwork(base.file), path, self.example)
        return _converted(name, base, path, "onnxruntime", diff, details)

    def _build_fp16(self, name: str) -> VariantResult:
        import torch

        from tumorseg.compression.onnx_export import ReducedPrecision, export_onnx
        from tumorseg.compression.pruning import count_parameters

        network = ReducedPrecision(copy.deepcopy(self.trained.network), torch.float16).eval()
        path = export_onnx(
            network,
            self.work / f"{name}.onnx",
            self.example,
            opset=self.cfg.onnx_opset,
            exporter=self.cfg.exporter,
            what=f"{name} network",
        )
        return VariantResult(
            name=name,
            runtime="onnxruntime",
            file=str(path),
            file_mb=_mib(path),
            parameters=count_parameters(network),
            details={"precision": "float16 weights and activations, float32 input/output"},
        )

    def _build_bf16(self, name: str) -> VariantResult:
        import torch

        from tumorseg.compression.onnx_export import ReducedPrecision
        from tumorseg.compression.program_export import export_program
        from tumorseg.models.program_network import ExportedProgramNetwork, native_bfloat16

        float_name = BFLOAT16_SOURCES[name]
        base = self.build(float_name)
        network = self.torch_networks[float_name] if float_name != BASELINE else self.trained.network
        path = export_program(
            ReducedPrecision(copy.deepcopy(network), torch.bfloat16).eval(),
            self.work / f"{name}.pt2",
            self.example,
            what=f"{name} network",
        )
        with torch.no_grad():  # rounding error of bfloat16, against the float32 network it came from
            diff = float((ExportedProgramNetwork(path)(self.example) - network(self.example)).abs().max())
        details = {
            "precision": "bfloat16 weights and activations, float32 input/output (torch.export program)",
            "native_bfloat16": native_bfloat16(),
            "converted_from": float_name,
        }
        return _converted(name, base, path, "torch.export", diff, details)

    def _torch_network(self, name: str) -> tuple[Any, dict[str, Any]]:
        """The PyTorch network behind a float variant: the original, or a pruned and fine-tuned copy."""
        from dataclasses import asdict

        from tumorseg.compression import pruning

        if name == "onnx_fp32":
            return self.trained.network, {}
        if name in self.torch_networks:
            return self.torch_networks[name], {}
        network = copy.deepcopy(self.trained.network).eval()
        before = pruning.count_parameters(network)
        gmacs_before = pruning.gmacs(network, self.window)
        p = self.cfg.pruning
        start = time.perf_counter()
        tunes: list[FineTuneResult] = []
        if name == "pruned_unstructured":
            pruning.prune_unstructured(network, p.unstructured_amount)
            tunes.append(self._fine_tune(network, p.unstructured_fine_tune_steps))
            rounds = 1
        else:
            rounds = p.structured_rounds
            shares = _split_steps(p.fine_tune_steps, rounds)
            for number in pruning.prune_channels_in_rounds(
                network,
                p.structured_ratio,
                self.window,
                self.trained.model.out_channels,
                rounds=rounds,
                channel_multiple=p.channel_multiple,
            ):
                tunes.append(self._fine_tune(network, shares[number - 1]))
        tune_s = time.perf_counter() - start
        pruning.make_permanent(network)
        network.eval()
        stats = pruning.PruneStats(
            method=name.removeprefix("pruned_"),
            parameters_before=before,
            parameters_after=pruning.count_parameters(network),
            nonzero_after=pruning.count_nonzero(network),
            conv_sparsity=pruning.conv_sparsity(network),
            gmacs_before=gmacs_before,
            gmacs_after=pruning.gmacs(network, self.window),
            rounds=rounds,
            fine_tune_steps=sum(t.steps for t in tunes),
            fine_tune_loss=tunes[-1].train_loss,
            fine_tune=[asdict(t) for t in tunes],
        )
        self.torch_networks[name] = network
        return network, {"pruning": {**asdict(stats), "fine_tune_s": round(tune_s, 2)}}

    def _fine_tune(self, network: Any, steps: int) -> FineTuneResult:
        """``compress.pruning``'s fine-tune of ``network`` in place (the fp32 network as distillation teacher)."""
        from tumorseg.compression.fine_tune import fine_tune

        p = self.cfg.pruning
        return fine_tune(
            network,
            self.trained,
            self.params,
            steps=steps,
            lr=p.fine_tune_lr,
            schedule=p.fine_tune_schedule,
            val_every=p.val_every,
            val_cases=p.val_cases,
            teacher=self.trained.network,
            distill_weight=p.distill_weight,
            distill_loss=p.distill_loss,
            distill_temperature=p.distill_temperature,
            tumour_free_repeat=p.tumour_free_repeat,
            source=self.source,
        )


def _converted(
    name: str, base: VariantResult, path: Path, runtime: str, diff: float, details: dict[str, Any]
) -> VariantResult:
    """The variant stored at ``path``: ``base``'s network in another number format (same parameters)."""
    return VariantResult(
        name=name,
        runtime=runtime,
        file=str(path),
        file_mb=_mib(path),
        parameters=base.parameters,
        nonzero_parameters=base.nonzero_parameters,
        sparsity=base.sparsity,
        gmacs_per_window=base.gmacs_per_window,
        onnx_max_abs_diff=diff,
        details={**base.details, **details},
    )


def _split_steps(total: int, rounds: int) -> list[int]:
    """``total`` fine-tune steps shared out over ``rounds`` (the first rounds take the remainder)."""
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


def _kind(name: str) -> str:
    if name == BASELINE:
        return "fp32"
    if name == "fp16":
        return "fp16"
    if name in ONNX_SOURCES:
        return "int8"
    if name in WEIGHT_ONLY_SOURCES:
        return "wint8"
    if name in BFLOAT16_SOURCES:
        return "bf16"
    return "float_onnx"


def _mib(path: str | Path) -> float:
    return Path(path).stat().st_size / 2**20


# ---------------------------------------------------------------------------- measuring
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

    Why: on a shared machine the load drifts over minutes, so each variant is timed in its own
    block of ``repeats`` rounds that alternate the baseline (fp32) and the variant on every case:
    both meet the same conditions, and the speed-up is the ratio within the block. Blocks, not one
    round-robin over every variant, because a variant's run then also depends on which other
    runtime ran just before it (ONNX Runtime's arenas, another model's freed memory), which a
    deployment (one model per process) never sees.

    Returns:
        ``{name: (median whole-predict s, median sliding-window s, every run, baseline s)}``
        (medians per case, averaged over cases); ``baseline s`` is the baseline's time within the
        variant's block (None for the baseline itself, whose times pool every block; and for every
        variant when there is no baseline, each then timed alone).
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
    """Mean Dice per scored region (+ ``mean``) and each case's mean over them, on ``cases`` (source geometry)."""
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


# ---------------------------------------------------------------------------- the stage
def run_compress_stage(
    params: dict[str, Any],
    *,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    model_uri: str | None = None,
) -> CompressionResult:
    """Build, measure and gate the variants; write the reports; register the edge model.

    Args:
        params: the params.yaml dict (``compress``, ``predict``, ``evaluate``, ``paths``, ``mlflow``,
            ``registry`` sections).
        source: params file name for error messages.
        tracking_uri: MLflow store; default ``mlflow.tracking_uri``, ``$MLFLOW_TRACKING_URI``, then the
            SQLite store under ``paths.mlruns``.
        model_uri: overrides ``compress.model``.

    Returns:
        :class:`CompressionResult`.

    Raises:
        ConfigError / DataError: one line naming the cause (no test or calibration cases, an operator
            that cannot be quantized, a failed export or pruning); the registry is then untouched.
    """
    import torch

    import tumorseg.training.config  # noqa: F401  (registers the training sections)
    from tumorseg.compression.quantize import calibration_windows, check_op_types
    from tumorseg.config import EvaluateConfig
    from tumorseg.data.datamodule import read_split
    from tumorseg.evaluation.pipeline_stage import split_cases
    from tumorseg.models.predictor import PredictConfig, SegmentationPredictor
    from tumorseg.registry.loading import load_model
    from tumorseg.tracking import params_tracking_uri

    stage_start = time.perf_counter()
    cfg: CompressConfig = section("compress", params, source=source)
    predict_cfg: PredictConfig = section("predict", params, source=source)
    eval_cfg: EvaluateConfig = section("evaluate", params, source=source)
    paths = section("paths", params, source=source)
    mlflow_cfg = section("mlflow", params, source=source)
    uri = params_tracking_uri(params, tracking_uri, source=source)

    # 1. every input checked before any work
    needs_int8 = any(name in ONNX_SOURCES for name in cfg.variants)
    if needs_int8:
        check_op_types(cfg.quantization, source)
    test_cases = split_cases(params, "test", source=source)
    loaded = load_model(model_uri or cfg.model or predict_cfg.model, tracking_uri=uri)
    trained = loaded.trained
    calibration = None
    if needs_int8:
        split = read_split(paths.split)
        calibration = calibration_windows(
            paths.preprocessed,
            split.get(cfg.quantization.calibration_split, []),
            trained.roi_size,
            cfg.quantization,
            split_file=paths.split,
        )
    threads = cfg.latency.threads
    if threads:
        torch.set_num_threads(threads)
    run_cfg = predict_cfg.model_copy(update={"device": "cpu", "probabilities": False, "uncertainty": False})

    out_dir = Path(cfg.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    reports = Path(paths.reports)
    with tempfile.TemporaryDirectory(prefix=".compress-", dir=out_dir.parent) as tmp:
        work = Path(tmp)
        builder = VariantBuilder(trained, cfg, params, work, calibration, source)
        timed_cases, shape = latency_cases(cfg, work)
        results: list[VariantResult] = []
        names = [BASELINE, *(n for n in cfg.variants if n != BASELINE)]
        predictors: dict[str, Any] = {}
        for name in names:
            log.info("compress: building %s", name)
            result = builder.build(name)
            results.append(result)
            if name == "fp16" and not _cuda_onnxruntime():
                result.reason = (
                    "FP16 runs on GPU (CUDAExecutionProvider); no GPU here, built but not measured"
                )
                continue
            log.info("compress: scoring %s", name)
            predictors[name] = SegmentationPredictor(trained_variant(builder, result, threads), run_cfg)
            result.dice, result.case_dice_mean = measure_dice(
                predictors[name], test_cases, eval_cfg, work, name
            )
            log.info("compress: %s Dice mean %.4f", name, result.dice["mean"])
        log.info("compress: timing %s, each alternating with %s", ", ".join(predictors), BASELINE)
        timings = measure_latencies(predictors, timed_cases, cfg.latency.warmup, cfg.latency.repeats)
        for result in results:
            if result.name in timings:
                (result.latency_s, result.inference_s, result.latency_runs_s, result.baseline_latency_s) = (
                    timings[result.name]
                )
                log.info("compress: %s latency %.2f s", result.name, result.latency_s)
        apply_gate(results, cfg.dice_tolerance)
        edge = choose_edge(results, speedup=cfg.target_speedup, size_ratio=cfg.target_size_ratio)
        context = {
            "source_model": loaded.description,
            "source_version": loaded.version,
            "test_cases": len(test_cases),
            "latency_case_shape": shape,
            "latency_cases": len(timed_cases),
            "repeats": cfg.latency.repeats,
            "threads": threads or torch.get_num_threads(),
            "exporter": cfg.exporter,
            "onnx_opset": cfg.onnx_opset,
            "torch_version": torch.__version__,
            "targets": {"speedup": cfg.target_speedup, "size_ratio": cfg.target_size_ratio},
            "build_and_measure_s": round(time.perf_counter() - stage_start, 1),
        }
        report = report_dict(results, edge, tolerance=cfg.dice_tolerance, context=context)
        files = _publish(
            results, report, out_dir, reports, context | {"dice_tolerance": cfg.dice_tolerance}, edge
        )
        outcome = CompressionResult(results, edge, report, files)
        if mlflow_cfg.enabled:
            outcome.run_id, outcome.registered = _track(
                outcome, trained, run_cfg, params, cfg, uri, mlflow_cfg.experiment, source
            )
    log.info(outcome.one_line())
    return outcome


def _cuda_onnxruntime() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _publish(
    results: list[VariantResult],
    report: dict[str, Any],
    out_dir: Path,
    reports: Path,
    context: dict[str, Any],
    edge: VariantResult | None,
) -> dict[str, Path]:
    """Move the variants' files (``.onnx``, ``.pt2``) into ``out_dir`` (replacing the previous run's); write both reports."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for suffix in VARIANT_SUFFIXES:
        for stale in out_dir.glob(f"*{suffix}"):
            stale.unlink()
    files: dict[str, Path] = {}
    for result in results:
        if result.runtime not in EDGE_RUNTIMES or result.file is None:
            continue
        target = out_dir / f"{result.name}{Path(result.file).suffix}"
        with atomic_output(target) as tmp:
            shutil.copyfile(result.file, tmp)
        files[result.name] = target
    reports.mkdir(parents=True, exist_ok=True)
    for variant in report["variants"]:  # the report names the kept files, not the temporary ones
        if variant["name"] in files:
            variant["file"] = str(files[variant["name"]])
    files["report_json"] = reports / REPORT_JSON
    files["report_md"] = reports / REPORT_MD
    atomic_write_text(files["report_json"], report_json(report))
    atomic_write_text(files["report_md"], report_markdown(results, edge, context=context))
    return files


def _track(
    outcome: CompressionResult,
    trained: Any,
    run_cfg: Any,
    params: dict[str, Any],
    cfg: CompressConfig,
    uri: str,
    experiment: str,
    source: str,
) -> tuple[str, dict[str, str] | None]:
    """Log the report to a ``compress`` MLflow run; register the edge model (new version + alias)."""
    import mlflow

    from tumorseg import tracking

    tracking.disable_telemetry()
    experiment_id = tracking.ensure_experiment(uri, experiment)
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    run = client.create_run(experiment_id, run_name="compress", tags={"tumorseg.stage": "compress"})
    run_id = run.info.run_id
    for key, value in tracking.flatten(cfg.model_dump(mode="json"), "compress.").items():
        client.log_param(run_id, key, str(value)[:500])
    for result in outcome.variants:
        for metric, value in (
            ("latency_s", result.latency_s),
            ("fp32_alongside_latency_s", result.baseline_latency_s),
            ("inference_s", result.inference_s),
            ("file_mb", result.file_mb),
            ("parameters", result.parameters),
            ("dice_mean", result.dice.get("mean")),
            ("dice_drop", result.dice_drop),
            ("onnx_max_abs_diff", result.onnx_max_abs_diff),
        ):
            if value is not None:
                client.log_metric(run_id, f"{result.name}.{metric}", float(value))
    for key, value in outcome.report["edge_vs_fp32"].items():
        if value is not None:
            client.log_metric(run_id, f"edge.{key}", float(value))
    client.log_artifact(run_id, str(outcome.files["report_json"]))
    client.log_artifact(run_id, str(outcome.files["report_md"]))
    registered = None
    if cfg.register_edge and outcome.edge is not None:
        registered = _register_edge(outcome, trained, run_cfg, params, cfg, uri, run_id, source)
    client.set_terminated(run_id)
    return run_id, registered


def _register_edge(
    outcome: CompressionResult,
    trained: Any,
    run_cfg: Any,
    params: dict[str, Any],
    cfg: CompressConfig,
    uri: str,
    run_id: str,
    source: str,
) -> dict[str, str]:
    """Log the edge model (ONNX or torch.export file) as the tumorseg pyfunc and register it: a new version, alias, tags."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tumorseg.registry.config import RegistryConfig
    from tumorseg.registry.pyfunc import MODEL_CODE, PREDICT_SETTINGS_FILE, RUNTIME_PACKAGES, model_signature
    from tumorseg.tracking import fluent_store, model_pip_requirements

    edge = outcome.edge
    assert edge is not None
    registry: RegistryConfig = section("registry", params, source=source)
    settings = run_cfg.model_dump(mode="json")
    with tempfile.TemporaryDirectory(prefix="tumorseg-edge-") as tmp, fluent_store(uri):
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(trained.config, indent=1, sort_keys=True) + "\n")
        predict_file = Path(tmp) / PREDICT_SETTINGS_FILE
        predict_file.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        artifacts = {
            RUNTIME_ARTIFACTS[edge.runtime]: str(outcome.files[edge.name]),
            "config": str(config_file),
            "predict": str(predict_file),
            "compression": str(outcome.files["report_json"]),
        }
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                signature=model_signature(
                    bool(settings.get("tta")), float(settings.get("min_component_mm3", 0))
                ),
                pip_requirements=model_pip_requirements(
                    (*RUNTIME_PACKAGES, "onnxruntime") if edge.runtime == "onnxruntime" else RUNTIME_PACKAGES
                ),
            )
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    try:
        client.get_registered_model(registry.model_name)
    except MlflowException:
        client.create_registered_model(registry.model_name)
    ratio = outcome.report["edge_vs_fp32"]
    tags = {
        "compression.variant": edge.name,
        "compression.source": str(outcome.report.get("source_model")),
        "compression.speedup": f"{ratio['speedup']:.3f}",
        "compression.size_ratio": f"{ratio['size_ratio']:.3f}",
        "compression.dice_drop": f"{ratio['dice_drop']:.6f}",
        "runtime": edge.runtime,
        "test_dice_mean": f"{edge.dice['mean']:.6f}",
    }
    with fluent_store(uri):
        version = mlflow.register_model(info.model_uri, registry.model_name, tags=tags)
    number = str(version.version)
    client.update_model_version(
        registry.model_name,
        number,
        description=(
            f"Edge deployment of {outcome.report.get('source_model')}: variant {edge.name} "
            f"({RUNTIME_NAMES[edge.runtime]}), "
            f"{ratio['speedup']:.2f}x faster and {ratio['size_ratio']:.2f}x smaller on CPU, mean Dice drop "
            f"{ratio['dice_drop']:+.4f} on the test split. Not for clinical use."
        ),
    )
    client.set_registered_model_alias(registry.model_name, cfg.alias, number)
    client.set_tag(run_id, "tumorseg.registered_version", f"{registry.model_name}/{number}")
    return {
        "name": registry.model_name,
        "version": number,
        "alias": cfg.alias,
        "uri": f"models:/{registry.model_name}/{number}",
    }
