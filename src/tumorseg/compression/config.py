"""``compress:`` params.yaml section: which deployment variants to build and the accuracy gate."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tumorseg.config import Section

VariantName = Literal[
    "fp32",
    "onnx_fp32",
    "pruned_unstructured",
    "pruned_structured",
    "int8",
    "pruned_unstructured_int8",
    "pruned_structured_int8",
    "onnx_fp32_wint8",
    "pruned_structured_wint8",
    "bf16",
    "pruned_structured_bf16",
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
- ``onnx_fp32_wint8``, ``pruned_structured_wint8``: weight-only INT8 of the fp32 or channel-pruned
  ONNX model: int8 conv weights in the file (about 4x smaller), dequantized once when ONNX Runtime
  loads it, float32 compute (float speed, no calibration, weight rounding as the only error).
- ``bf16``, ``pruned_structured_bf16``: the fp32 or channel-pruned network in bfloat16 (weights
  and activations; float32 in and out), saved as a ``torch.export`` program (half the float32
  file) and run by PyTorch: ONNX Runtime has no bfloat16 convolution on CPU, while oneDNN runs
  them natively on CPUs with AVX512-BF16, AMX or Arm BF16 (about twice float32's speed there;
  emulated, slowly, elsewhere: the report says so).
- ``fp16``: half-precision ONNX for GPUs (float32 in and out); measured only where CUDA is available.
"""

QDQ_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose")
"""Default layers quantized to INT8 (normalisation and activations stay float between them)."""


class PruningConfig(Section):
    """``compress.pruning``: the two pruning methods and the fine-tune that recovers accuracy after them.

    Attributes:
        unstructured_amount: share of all conv weights zeroed by global L1 magnitude pruning.
        structured_ratio: share of channels removed from every prunable conv layer (the network's
            input and output layers keep theirs).
        channel_multiple: channels each pruned layer keeps are rounded down to a multiple of this
            (Torch-Pruning's ``round_to``; 1: no rounding). Reduced-precision kernels (oneDNN's
            bfloat16) work on channel blocks: 22 channels cost as much as 32, 16 half as much.
        structured_rounds: prune the channels in this many equal rounds (Torch-Pruning's
            ``iterative_steps``), each followed by its share of the fine-tune; 1 prunes in one shot.
        unstructured_fine_tune_steps: optimiser steps of training after magnitude pruning (0: none);
            zeroing half the weights costs little accuracy, so a short fine-tune suffices.
        fine_tune_steps: optimiser steps after channel pruning, over all rounds (0: none);
            removing half the channels costs much more, and the recovery takes hundreds of steps.
        fine_tune_lr: peak learning rate of that fine-tune.
        fine_tune_schedule: ``cosine`` (decays to 0 over the fine-tune) or ``constant``.
        val_every: score the validation split every this many steps (and before the first) and keep
            the best-scoring weights; 0 keeps the last weights without validating.
        val_cases: validation cases scored (the first ones of the split); 0: all of them.
        tumour_free_repeat: tumour-free training cases are drawn this many times as often in the
            fine-tune (hard negatives: pruned networks tend to see tumour in healthy brains); 1: as in
            training.
        distill_weight: weight of the knowledge-distillation term (the fp32 model is the teacher);
            0 fine-tunes on the task loss alone. Off by default: on the embedded data, logit-MSE
            distillation (weight 1) recovered more slowly per step than the task loss alone (validation
            Dice 0.958 vs 0.965 after 150 steps at ratio 0.5) and costs a teacher forward pass per step.
        distill_loss: ``mse`` (logit matching) or ``kl`` (temperature-softened KL divergence).
        distill_temperature: temperature of ``kl``.
    """

    unstructured_amount: float = Field(0.5, gt=0.0, lt=1.0)
    structured_ratio: float = Field(0.5, gt=0.0, lt=1.0)
    channel_multiple: int = Field(1, ge=1, le=64)
    structured_rounds: int = Field(1, ge=1, le=10)
    unstructured_fine_tune_steps: int = Field(20, ge=0)
    fine_tune_steps: int = Field(300, ge=0)
    fine_tune_lr: float = Field(1e-3, gt=0.0)
    fine_tune_schedule: Literal["cosine", "constant"] = "cosine"
    val_every: int = Field(50, ge=0)
    val_cases: int = Field(0, ge=0)
    tumour_free_repeat: int = Field(1, ge=1, le=100)
    distill_weight: float = Field(0.0, ge=0.0)
    distill_loss: Literal["mse", "kl"] = "mse"
    distill_temperature: float = Field(1.0, gt=0.0)


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
        repeats: timed predictions per variant and case, interleaved across variants; the median is reported.
        threads: CPU threads for PyTorch and ONNX Runtime alike (0: one per core).
    """

    case_dir: str | None = None
    synth_spacing_mm: float = Field(1.0, gt=0.2, le=4.0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(5, ge=1)
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
        target_speedup: deployment target: whole-``predict`` CPU latency of fp32 / the edge model's.
        target_size_ratio: deployment target: fp32 model file size / the edge model's.
            The edge model is the accepted variant meeting both targets, fastest first, then
            smallest; when none meets them, the fastest accepted variant (then smallest).
        register_edge: register the edge model as a new version with alias ``alias``.
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
    target_speedup: float = Field(2.0, ge=0.0)
    target_size_ratio: float = Field(3.0, ge=0.0)
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
