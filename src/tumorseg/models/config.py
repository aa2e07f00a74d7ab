"""Model-layer params.yaml sections: light pydantic models (no torch import), read by the root config."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tumorseg.config import Section
from tumorseg.models.networks import ModelConfig, UNetConfig

LossName = Literal["dice", "dice_ce", "dice_focal", "bce", "ce"]


class LossConfig(Section):
    """``loss:`` which loss and its weights (see params.yaml).

    ``dice_ce`` is Dice + BCE for regions, Dice + CE for labels; ``bce`` needs regions, ``ce`` labels.
    ``batch`` sums Dice over the batch before the ratio (stabler when a patch holds no ET).
    """

    name: LossName = "dice_ce"
    batch: bool = True
    include_background: bool = False
    squared_pred: bool = False
    smooth_nr: float = Field(1e-5, ge=0.0)
    smooth_dr: float = Field(1e-5, gt=0.0)
    lambda_dice: float = Field(1.0, ge=0.0)
    lambda_ce: float = Field(1.0, ge=0.0)
    focal_gamma: float = Field(2.0, ge=0.0)
    deep_supervision_weights: Literal["exp", "same", "two"] = "exp"


class SlidingWindowConfig(Section):
    """``sliding_window:`` whole-volume inference (validation, test scoring, serving).

    ``min_component_mm3`` removes small 26-connected whole-tumour components (0 keeps all): one stray
    voxel on a tumour-free scan scores Dice 0 for every region under the BraTS convention.
    """

    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_component_mm3: float = Field(1000.0, ge=0.0)


class ClassifierConfig(Section):
    """``model_2d.classifier:`` strided residual conv stages (a stride per channel), then a linear layer."""

    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = Field(1, ge=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class PlanarModelConfig(ModelConfig):
    """``model_2d:`` the ``model:`` keys for a one-channel 2-D segmenter, plus the classifier.

    ``output`` is fixed to ``binary``: one sigmoid channel, tumour vs. background.

    ``input_size``: both networks run on ``(input_size, input_size)`` images, resized from
    ``preprocess_2d.size``. 128 keeps a CPU run within minutes; ``preprocess_2d.size`` trains at
    full resolution.

    ``foreground_prior``: the segmenter's output bias starts at ``log(p / (1 - p))`` (RetinaNet's
    prior initialisation, Lin et al.), so training starts from "little tumour everywhere" rather
    than 0.5 per pixel, which Adam takes thousands of steps to unlearn.
    """

    output: Literal["binary"] = "binary"  # type: ignore[assignment]
    input_size: int = Field(
        128, ge=16, description="network input side; images are resized from preprocess_2d.size"
    )
    foreground_prior: float = Field(0.02, gt=0.0, lt=0.5, description="initial tumour probability of a pixel")
    unet: UNetConfig = UNetConfig(channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=1)
    classifier: ClassifierConfig = ClassifierConfig()

    @property
    def out_channels(self) -> int:
        return 1


class PredictConfig(Section):
    """``predict:`` whole-case inference (``tumorseg predict``, the evaluate stage, the served model).

    Each knob is explained beside its value in params.yaml; ``uncertainty`` (the TTA variance) needs
    ``tta``, and null ``overlap`` / ``sw_batch_size`` keep the model's ``sliding_window`` settings; a null
    ``min_component_confidence`` keeps the model's own (:mod:`tumorseg.models.postprocess`).
    ``engine`` (``tumorseg predict`` only): ``auto`` runs ONNX Runtime without torch when the model
    carries ``network.onnx`` and no option needs torch, ``onnx`` insists on it, ``torch`` never uses it.
    """

    model: str = "models:/tumorseg@champion"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tta: bool = False
    tta_axes: tuple[int, ...] = (0, 1, 2)
    min_component_mm3: float = Field(0.0, ge=0.0)
    min_component_confidence: float | None = Field(None, ge=0.0, le=1.0)
    probabilities: bool = False
    uncertainty: bool = False
    overlap: float | None = Field(None, ge=0.0, lt=1.0)
    sw_batch_size: int | None = Field(None, ge=1)
    keep_freed_memory: bool = True
    engine: Literal["auto", "torch", "onnx"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> PredictConfig:
        axes = self.tta_axes
        if not axes or len(set(axes)) != len(axes) or not set(axes) <= {0, 1, 2}:
            raise ValueError("tta_axes must be distinct axes among 0, 1, 2")
        if self.uncertainty and not self.tta:
            raise ValueError("uncertainty is the variance over TTA passes; set predict.tta: true")
        return self


class PredictPlanarConfig(Section):
    """``predict_2d:`` inference settings, stored with the registered models.

    Attributes:
        model, detect_model: default ``--model`` of ``tumorseg predict`` (2-D input) and ``tumorseg detect``.
        min_component_px: drop smaller predicted components (preprocessed grid pixels); 0 keeps all.
    """

    model: str = "models:/tumorseg-2d@champion"
    detect_model: str = "models:/tumorseg-detect@champion"
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_component_px: int = Field(20, ge=0)
