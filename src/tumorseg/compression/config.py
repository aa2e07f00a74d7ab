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
    "int8_dynamic",
    "pruned_structured_int8_dynamic",
    "bf16",
    "pruned_structured_bf16",
    "fp16",
]
"""Variants ``tumorseg compress`` can build.

- ``fp32``: the source PyTorch model, the baseline; ``onnx_fp32``: the same weights in ONNX.
- ``pruned_unstructured``: global magnitude pruning (zeros in dense kernels: smaller once
  compressed, not faster); ``pruned_structured``: channels removed (fewer parameters and FLOPs).
  Both fine-tuned, ONNX.
- ``int8``, ``pruned_*_int8``: static INT8 (ONNX Runtime QDQ), calibrated on validation patches.
- ``*_wint8``: weight-only INT8 (about 4x smaller file, float32 compute, no calibration).
- ``*int8_dynamic``: dynamic INT8 (ONNX Runtime ``ConvInteger``: int8 weights, activations quantized
  per run from their own range, no calibration).
- ``bf16``, ``pruned_structured_bf16``: bfloat16 ``torch.export`` programs run by PyTorch (ONNX
  Runtime has no bfloat16 convolution on CPU; oneDNN runs them natively on AVX512-BF16/AMX/Arm BF16).
- ``fp16``: half-precision ONNX for GPUs, measured only where CUDA is available.
"""

QDQ_OP_TYPES: tuple[str, ...] = ("Conv", "ConvTranspose")
"""Default layers quantized to INT8 (normalisation and activations stay float between them)."""


class PruningConfig(Section):
    """``compress.pruning``: the two pruning methods and the fine-tune that recovers accuracy after them.

    Each knob is explained beside its value in params.yaml. ``channel_multiple`` rounds the channels
    kept down to a multiple (oneDNN's bfloat16 kernels work on channel blocks).
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
    """``compress.quantization``: ONNX Runtime static INT8 (QDQ), calibrated on training-patch windows."""

    calibration_split: Literal["train", "val"] = "val"
    calibration_cases: int = Field(4, ge=1)
    patches_per_case: int = Field(2, ge=1)
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    op_types: tuple[str, ...] = QDQ_OP_TYPES
    seed: int = 0


class LatencyConfig(Section):
    """``compress.latency``: CPU latency of the whole ``predict`` path.

    ``case_dir`` null times one synthetic case at ``synth_spacing_mm`` (1.0: BraTS size, 240x240x155);
    ``case_dir_2d`` (``--dims 2``) a folder of images, null one synthetic Figshare-size 512x512 slice;
    ``threads`` applies to PyTorch and ONNX Runtime alike (0: one per core).
    """

    case_dir: str | None = None
    case_dir_2d: str | None = None
    synth_spacing_mm: float = Field(1.0, gt=0.2, le=4.0)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(5, ge=1)
    threads: int = Field(0, ge=0)


class CompressConfig(Section):
    """``compress:`` build, measure and gate the deployment variants of a trained model (see params.yaml).

    Attributes:
        dice_tolerance: a variant is accepted only if its mean Dice (cases x WT/TC/ET) is at most
            this much below fp32's, on the same test cases.
        detection_tolerance: 2-D: ... and only if its detection accuracy on the test images (the
            detector chosen on validation, as ``evaluate-model --dims 2`` calls it) is at most this
            much below fp32's.
        target_speedup, target_size_ratio: deployment targets (fp32 whole-``predict`` CPU latency,
            and file size, over the edge model's).
        speed_tie: variants whose speed-up over fp32 is within this share of the largest count as
            equally fast when the edge is chosen; the smallest file among them is the edge (timing
            noise between reruns of the stage is of this order).
        parity_tolerance: largest ONNX Runtime vs PyTorch logit difference accepted for an export.
        emulated_bf16: ``skip``: the bfloat16 variants are built but not scored or timed on a CPU
            without native bfloat16 (emulated, they take minutes and their latency says nothing about
            a CPU that has it); ``measure``: measure them anyway.
        model_2d, variants_2d, out_dir_2d, latency.case_dir_2d: ``tumorseg compress --dims 2``'s
            (:meth:`for_dims`; ``model_2d`` null: ``predict_2d.model``, ``variants_2d`` null:
            ``variants``); every other key applies to both.
    """

    model: str | None = None
    model_2d: str | None = None
    variants: tuple[VariantName, ...] = (
        "fp32",
        "onnx_fp32",
        "pruned_unstructured",
        "pruned_structured",
        "int8",
        "pruned_structured_int8",
    )
    dice_tolerance: float = Field(0.01, ge=0.0, le=1.0)
    detection_tolerance: float = Field(0.0, ge=0.0, le=1.0)
    onnx_opset: int = Field(18, ge=13, le=23)
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    out_dir: str = "models/compressed"
    out_dir_2d: str = "models/2d/compressed"
    variants_2d: tuple[VariantName, ...] | None = None
    target_speedup: float = Field(2.0, ge=0.0)
    target_size_ratio: float = Field(3.0, ge=0.0)
    speed_tie: float = Field(0.1, ge=0.0, lt=1.0)
    register_edge: bool = True
    alias: str = Field("edge", min_length=1)
    parity_tolerance: float = Field(1e-3, gt=0.0)
    emulated_bf16: Literal["skip", "measure"] = "skip"
    pruning: PruningConfig = PruningConfig()
    quantization: QuantizationConfig = QuantizationConfig()
    latency: LatencyConfig = LatencyConfig()

    @model_validator(mode="after")
    def _distinct(self) -> CompressConfig:
        for variants in (self.variants, self.variants_2d or ()):
            if len(set(variants)) != len(variants):
                raise ValueError("variants must not repeat")
        if self.alias in ("champion", "challenger"):
            raise ValueError("alias must differ from champion/challenger (those belong to promotion)")
        return self

    def for_dims(self, dims: int) -> CompressConfig:
        """This section as ``tumorseg compress --dims`` reads it: for 2, the ``*_2d`` keys in place of theirs."""
        if dims == 3:
            return self
        return self.model_copy(
            update={
                "model": self.model_2d,
                "variants": self.variants_2d or self.variants,
                "out_dir": self.out_dir_2d,
                "latency": self.latency.model_copy(update={"case_dir": self.latency.case_dir_2d}),
            }
        )
