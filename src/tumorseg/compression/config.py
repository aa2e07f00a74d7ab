"""``compress:`` params.yaml section: which deployment variants to build and the accuracy gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tumorseg.config import Section, register_section

VariantName = Literal[
    "fp32",
    "onnx_fp32",
    "pruned_unstructured",
    "pruned_structured",
    "int8",
    "pruned_unstructured_int8",
    "pruned_structured_int8",
    "fp16",
]
"""Variants ``tumorseg compress`` can build.

- ``fp32``: the source model in PyTorch, unchanged: the baseline every other variant is compared with.
- ``onnx_fp32``: the same weights exported to ONNX (ONNX Runtime's speed, no compression).
- ``pruned_unstructured``: global magnitude pruning (zeroed weights; dense kernels, so the file is
  only smaller once compressed, and inference is not faster), fine-tuned, ONNX.
- ``pruned_structured``: channel pruning (channels physically removed: fewer parameters and FLOPs),
  fine-tuned, ONNX.
- ``int8``, ``pruned_*_int8``: INT8 post-training static quantization (ONNX Runtime QDQ) of the
  fp32 or pruned ONNX model, calibrated on validation patches.
- ``fp16``: half-precision ONNX for GPUs (float32 in and out); measured only where CUDA is available.
"""

QDQ_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose")
"""Default layers quantized to INT8 (normalisation and activations stay float between them)."""


class PruningConfig(Section):
    """``compress.pruning``.

    Attributes:
        unstructured_amount: share of all conv weights zeroed by global L1 magnitude pruning.
        structured_ratio: share of channels removed from every prunable conv layer (the network's
            input and output layers keep theirs).
        fine_tune_steps: optimiser steps of training after pruning (0: none).
        fine_tune_lr: learning rate of that fine-tune (lower than training's: small corrections).
    """

    unstructured_amount: float = Field(0.5, gt=0.0, lt=1.0)
    structured_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    fine_tune_steps: int = Field(20, ge=0)
    fine_tune_lr: float = Field(2e-4, gt=0.0)


class QuantizationConfig(Section):
    """``compress.quantization``: ONNX Runtime static INT8 quantization (QDQ format).

    Attributes:
        calibration_split: split whose preprocessed cases calibrate the activation ranges.
        calibration_cases: cases used (the first ones of the split).
        patches_per_case: windows (training patch size) drawn per case.
        calibrate_method: ONNX Runtime calibration: ``minmax``, ``entropy`` or ``percentile``.
        per_channel: one weight scale per output channel (more accurate for conv layers).
        op_types: ONNX operator types to quantize.
        seed: seed of the window positions.
    """

    calibration_split: Literal["train", "val"] = "val"
    calibration_cases: int = Field(4, ge=1)
    patches_per_case: int = Field(2, ge=1)
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    op_types: tuple[str, ...] = QDQ_OP_TYPES
    seed: int = 0


class LatencyConfig(Section):
    """``compress.latency``: CPU latency of the whole ``predict`` path.

    Attributes:
        case_dir: folder of cases (any layout) to time; null synthesizes one BraTS-size case
            (``synth_spacing_mm`` 1.0 gives 240x240x155) in a temporary folder.
        synth_spacing_mm: spacing of that synthetic case.
        warmup: untimed predictions per variant (session and allocator start-up).
        repeats: timed predictions per variant and case; the median is reported.
        threads: CPU threads for PyTorch and ONNX Runtime alike (0: one per core).
    """

    case_dir: str | None = None
    synth_spacing_mm: float = Field(1.0, gt=0.2, le=4.0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)
    threads: int = Field(0, ge=0)


class CompressConfig(Section):
    """``compress:`` build, measure and gate the deployment variants of a trained model.

    Attributes:
        model: the fp32 model to compress (MLflow URI or checkpoint); null: ``predict.model``.
        variants: which variants to build and measure (``fp32`` is always measured: the baseline).
        dice_tolerance: a variant is accepted only if its mean Dice (cases x WT/TC/ET) is at most
            this much below fp32's, on the same test cases.
        onnx_opset: ONNX opset of the exports.
        exporter: ``dynamo`` (torch.export based, torch's default) or ``torchscript`` (legacy tracer).
        out_dir: where the variants' ONNX files are kept.
        register_edge: register the best accepted variant as a new version with alias ``alias``.
        alias: registry alias of that version.
        parity_tolerance: largest ONNX Runtime vs PyTorch logit difference accepted for an export.
        pruning, quantization, latency: see their sections.
    """

    model: str | None = None
    variants: tuple[VariantName, ...] = (
        "fp32",
        "onnx_fp32",
        "pruned_unstructured",
        "pruned_structured",
        "int8",
        "pruned_structured_int8",
    )
    dice_tolerance: float = Field(0.01, ge=0.0, le=1.0)
    onnx_opset: int = Field(18, ge=13, le=23)
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    out_dir: str = "models/compressed"
    register_edge: bool = True
    alias: str = Field("edge", min_length=1)
    parity_tolerance: float = Field(1e-3, gt=0.0)
    pruning: PruningConfig = PruningConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    latency: LatencyConfig = LatencyConfig()

    @model_validator(mode="after")
    def _distinct(self) -> CompressConfig:
        if len(set(self.variants)) != len(self.variants):
            raise ValueError("variants must not repeat")
        if self.alias in ("champion", "challenger"):
            raise ValueError("alias must differ from champion/challenger (those belong to promotion)")
        return self


register_section("compress", CompressConfig)
