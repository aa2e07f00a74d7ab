"""Building the deployment variants of ``compress.variants`` from the fp32 model (a volume model or the
2-D model, as its :class:`~tumorseg.compression.dims.ModelKind` describes): each a file plus its static
facts (size, parameters, sparsity, GMACs, difference from its source), not yet measured.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tumorseg.compression.config import CompressConfig
from tumorseg.compression.report import BASELINE, VariantResult
from tumorseg.errors import DataError

if TYPE_CHECKING:  # torch-heavy; imported where the fine-tune runs
    from tumorseg.compression.dims import ModelKind
    from tumorseg.compression.fine_tune import FineTuneResult

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
DYNAMIC_SOURCES: dict[str, str] = {
    "int8_dynamic": "onnx_fp32",
    "pruned_structured_int8_dynamic": "pruned_structured",
}
"""Dynamic INT8 variant -> the float ONNX variant it quantizes."""
BFLOAT16_SOURCES: dict[str, str] = {
    "bf16": BASELINE,
    "pruned_structured_bf16": "pruned_structured",
}
"""bfloat16 variant -> the float variant whose PyTorch network it stores in bfloat16 (torch.export)."""


class VariantBuilder:
    """Builds variants on demand in ``work`` from the fp32 ``trained`` model of ``kind``, reusing what they
    share; ``calibration`` is ``(windows, case ids)`` for INT8, or None."""

    def __init__(
        self,
        trained: Any,
        cfg: CompressConfig,
        params: dict[str, Any],
        work: Path,
        calibration: tuple[list[Any], list[str]] | None,
        source: str,
        kind: ModelKind,
    ) -> None:
        self.trained = trained
        self.cfg = cfg
        self.params = params
        self.work = work
        self.calibration = calibration
        self.source = source
        self.kind = kind
        self.example = kind.example(trained)
        self.window = self.example[:1]
        self.torch_networks: dict[str, Any] = {BASELINE: trained.network}
        self.results: dict[str, VariantResult] = {}

    def build(self, name: str) -> VariantResult:
        """The variant's result row with its file and static facts (not yet measured)."""
        if name not in self.results:
            self.results[name] = getattr(self, f"_build_{_kind(name)}")(name)
        return self.results[name]

    def _row(self, name: str, runtime: str, path: Path, network: Any, **extra: Any) -> VariantResult:
        """The result row of ``network`` stored at ``path``, with its static facts."""
        from tumorseg.compression.pruning import conv_sparsity, count_nonzero, count_parameters, gmacs

        return VariantResult(
            name=name,
            runtime=runtime,
            file=str(path),
            file_mb=_mib(path),
            parameters=count_parameters(network),
            nonzero_parameters=count_nonzero(network),
            sparsity=conv_sparsity(network),
            gmacs_per_window=gmacs(network, self.window),
            **extra,
        )

    def _build_fp32(self, name: str) -> VariantResult:
        from tumorseg.models.package import save_package

        files = save_package(self.trained, self.work / name)
        return self._row(name, "pytorch", files["weights"], self.trained.network)

    def _export_onnx(self, network: Any, name: str) -> Path:
        from tumorseg.compression.onnx_export import export_onnx

        return export_onnx(
            network,
            self.work / f"{name}.onnx",
            self.example,
            opset=self.cfg.onnx_opset,
            exporter=self.cfg.exporter,
            what=f"{name} network",
            **self.kind.export_options,
        )

    def _build_float_onnx(self, name: str) -> VariantResult:
        from tumorseg.compression.onnx_export import max_abs_difference

        network, details = self._torch_network(name)
        path = self._export_onnx(network, name)
        diff = max_abs_difference(network, path, self.example)
        if diff > self.cfg.parity_tolerance:
            raise DataError(
                f"{name}: ONNX Runtime output differs from PyTorch by {diff:.2e} (> compress.parity_tolerance "
                f"{self.cfg.parity_tolerance:g}); try compress.exporter: torchscript"
            )
        return self._row(name, "onnxruntime", path, network, onnx_max_abs_diff=diff, details=details)

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

    def _build_int8_dynamic(self, name: str) -> VariantResult:
        from tumorseg.compression.quantize import quantize_dynamic_int8

        float_name = DYNAMIC_SOURCES[name]
        base = self.build(float_name)
        path = self.work / f"{name}.onnx"
        stats = quantize_dynamic_int8(base.file, path, self.cfg.quantization, what=f"{name} network")
        return self._requantized(
            name, base, path, {"dynamic_int8": stats.__dict__, "quantized_from": float_name}
        )

    def _requantized(
        self, name: str, base: VariantResult, path: Path, details: dict[str, Any]
    ) -> VariantResult:
        """The variant stored at ``path``: ``base``'s network in another number format."""
        from tumorseg.compression.onnx_export import OnnxRuntimeOutputs, max_abs_difference

        # Quantization error, measured against the float ONNX graph it came from.
        diff = max_abs_difference(OnnxRuntimeOutputs(base.file), path, self.example)
        return _converted(name, base, path, "onnxruntime", diff, details)

    def _build_fp16(self, name: str) -> VariantResult:
        import torch

        from tumorseg.compression.onnx_export import ReducedPrecision
        from tumorseg.compression.pruning import count_parameters

        network = ReducedPrecision(copy.deepcopy(self.trained.network), torch.float16).eval()
        path = self._export_onnx(network, name)
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

        from tumorseg.compression.onnx_export import ReducedPrecision, export_program, max_output_difference
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
            diff = max_output_difference(ExportedProgramNetwork(path)(self.example), network(self.example))
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
        target, window, out_channels = self.kind.prunable(network, self.trained, self.window)
        p = self.cfg.pruning
        start = time.perf_counter()
        tunes: list[FineTuneResult] = []
        if name == "pruned_unstructured":
            pruning.prune_unstructured(target, p.unstructured_amount)
            tunes.append(self._fine_tune(network, p.unstructured_fine_tune_steps))
            rounds = 1
        else:
            rounds = p.structured_rounds
            shares = _split_steps(p.fine_tune_steps, rounds)
            for number in pruning.prune_channels_in_rounds(
                target,
                p.structured_ratio,
                window,
                out_channels,
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
        """``compress.pruning``'s fine-tune of ``network``, the fp32 network as teacher."""
        from tumorseg.compression.fine_tune import fine_tune

        return fine_tune(
            network,
            self.trained,
            self.params,
            steps=steps,
            cfg=self.cfg.pruning,
            teacher=self.trained.network,
            source=self.source,
            dims=self.kind.dims,
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
    if name in DYNAMIC_SOURCES:
        return "int8_dynamic"
    if name in BFLOAT16_SOURCES:
        return "bf16"
    return "float_onnx"


def _mib(path: str | Path) -> float:
    return Path(path).stat().st_size / 2**20
