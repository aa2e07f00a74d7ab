"""params.yaml sections of the 2-D branch: ``model_2d``, ``train_2d``, ``detect``, ``predict_2d``, ``evaluate_2d``.

The 2-D models reuse the 3-D building blocks by subclassing their section models: the
segmentation network is a :class:`~tumorseg.models.networks.ModelConfig` with one sigmoid output
(tumour) and smaller default widths, and the training loop is a
:class:`~tumorseg.training.config.TrainConfig` (same optimisers, schedules and checkpoint rules)
plus the 2-D batch, loss, augmentation and multi-task weights. Hardware comes from the shared
``trainer:`` section and tracking from ``mlflow:``, so one machine setting serves both branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from tumorseg.config import Section, section
from tumorseg.errors import ConfigError
from tumorseg.models.losses import LossConfig
from tumorseg.models.networks import ModelConfig, UNetConfig, check_patch_size
from tumorseg.training.config import MlflowConfig, TrainConfig, TrainerConfig


class ClassifierConfig(Section):
    """``model_2d.classifier:`` the small CNN that predicts tumour presence and tumour type.

    A :class:`monai.networks.nets.Classifier` (strided residual conv units, then one linear layer)
    with ``1 + len(TUMOUR_TYPES)`` outputs: a tumour-present logit and the type logits.

    Attributes:
        channels: widths of the conv stages.
        strides: stride of each stage (one per channel entry).
        num_res_units: residual units per stage.
        dropout: dropout before the linear layer.
    """

    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = Field(1, ge=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class PlanarModelConfig(ModelConfig):
    """``model_2d:`` the 2-D segmentation network by name, and the classifier.

    Same networks and keys as ``model:`` (``unet``, ``attention_unet``, ``flexible_unet``...), built
    with ``spatial_dims=2`` and one input channel; ``output`` is fixed to ``binary``: one sigmoid
    channel, tumour vs. background.

    ``input_size``: the networks run on ``(input_size, input_size)`` images, resized (area
    averaging) from the preprocessed ``preprocess_2d.size``; probabilities are resized back
    (bilinear) before thresholding. 128 keeps a CPU training run within minutes; set it to
    ``preprocess_2d.size`` to train at full resolution on a GPU.

    ``foreground_prior``: the segmenter's output bias starts at ``log(p / (1 - p))`` (the prior
    initialisation of Lin et al., RetinaNet), so training starts from "little tumour everywhere"
    instead of a probability of 0.5 per pixel, which Adam's per-step moves of about ``lr`` take
    thousands of steps to unlearn.
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


class PlanarAugmentConfig(Section):
    """``train_2d.augment:`` random augmentation per image (MONAI dictionary transforms)."""

    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    affine_prob: float = Field(0.3, ge=0.0, le=1.0)
    rotate_deg: float = Field(10.0, ge=0.0, le=180.0)
    scale_range: float = Field(0.1, ge=0.0, lt=1.0)
    intensity_scale_prob: float = Field(0.3, ge=0.0, le=1.0)
    intensity_scale: float = Field(0.1, ge=0.0)
    intensity_shift_prob: float = Field(0.3, ge=0.0, le=1.0)
    intensity_shift: float = Field(0.1, ge=0.0)
    noise_prob: float = Field(0.1, ge=0.0, le=1.0)
    noise_std: float = Field(0.05, ge=0.0)


class PlanarTrainConfig(TrainConfig):
    """``train_2d:`` the 2-D optimisation loop (the ``train:`` keys, 2-D defaults) plus batch, loss and tasks.

    Attributes:
        batch_size: images per optimiser step.
        num_workers: DataLoader worker processes.
        loss: segmentation loss (the ``loss:`` keys), on the one tumour channel.
        detection_weight: weight of the tumour-present BCE term (every image).
        type_weight: weight of the tumour-type cross-entropy (images with a known type only).
        augment: random augmentation.
        experiment: MLflow experiment of 2-D runs.

    ``dice_ignore_empty`` sets the validation Dice rule as in 3-D; ``score_test`` must stay false
    (``tumorseg evaluate-2d`` owns the test split).
    """

    out_dir: str = "models/planar"
    max_epochs: int = Field(12, ge=1)
    steps_per_epoch: int = Field(20, ge=1)
    warmup_epochs: float = Field(0.5, ge=0.0)
    batch_size: int = Field(8, ge=1)
    num_workers: int = Field(0, ge=0)
    loss: LossConfig = LossConfig()
    detection_weight: float = Field(0.5, ge=0.0)
    type_weight: float = Field(0.5, ge=0.0)
    augment: PlanarAugmentConfig = PlanarAugmentConfig()
    experiment: str = "tumorseg-planar"

    @model_validator(mode="after")
    def _no_test_scoring(self) -> PlanarTrainConfig:
        if self.score_test:
            raise ValueError(
                "the 2-D test split is scored by `tumorseg evaluate-2d`, not during training; set false"
            )
        return self


class PredictPlanarConfig(Section):
    """``predict_2d:`` inference settings, stored with the registered models.

    Attributes:
        model: default ``--model`` of ``tumorseg predict`` for 2-D input.
        detect_model: default ``--model`` of ``tumorseg detect``.
        mask_threshold: sigmoid probability of a tumour pixel.
        min_component_px: drop predicted tumour components smaller than this (preprocessed grid);
            0 keeps all.
    """

    model: str = "models:/tumorseg-2d@champion"
    detect_model: str = "models:/tumorseg-detect@champion"
    mask_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    min_component_px: int = Field(20, ge=0)


class DetectConfig(Section):
    """``detect:`` how the tumour / no-tumour detector is chosen on the validation split.

    Attributes:
        method: ``auto`` (the better of the two on validation), ``classifier`` (the CNN's tumour
            probability) or ``area_rule`` (the segmentation's predicted tumour area).
        selection_metric: what ``auto`` compares on validation: ``auc`` (ties: accuracy) or ``accuracy``.
        threshold: ``youden`` (the validation threshold maximising sensitivity + specificity) or
            ``fixed`` (``fixed_threshold`` on the probability).
        fixed_threshold: probability threshold with ``threshold: fixed``.
        model_name: registered model name of the detector.
    """

    method: Literal["auto", "classifier", "area_rule"] = "auto"
    selection_metric: Literal["auc", "accuracy"] = "auc"
    threshold: Literal["youden", "fixed"] = "youden"
    fixed_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    model_name: str = Field("tumorseg-detect", min_length=1, max_length=256)


class EvaluatePlanarConfig(Section):
    """``evaluate_2d:`` held-out test metrics of the 2-D models and their registration.

    Attributes:
        bootstrap_resamples: patient-level percentile-bootstrap resamples for every CI.
        ci_level: CI level.
        seed: bootstrap seed.
        register_models: register both models as ``challenger`` versions.
        model_name: registered model name of the segmentation model.
    """

    bootstrap_resamples: int = Field(2000, ge=100)
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 42
    register_models: bool = True
    model_name: str = Field("tumorseg-2d", min_length=1, max_length=256)


PLANAR_TRAINING_SECTIONS: tuple[str, ...] = ("preprocess_2d", "model_2d", "train_2d", "trainer", "mlflow")
"""Sections a 2-D training run reads and stores with its model."""


@dataclass(frozen=True)
class PlanarPaths:
    """The 2-D branch's folders (``paths.*_2d`` keys) plus the shared reports and MLflow folders."""

    preprocessed: str
    split: str
    validated: str
    reports: str
    mlruns: str


@dataclass(frozen=True)
class PlanarTrainingConfig:
    """Every section a 2-D training run reads, validated together."""

    paths: PlanarPaths
    preprocess: Any
    model: PlanarModelConfig
    train: PlanarTrainConfig
    trainer: TrainerConfig
    mlflow: MlflowConfig

    @property
    def image_size(self) -> int:
        """Side of the preprocessed square images (``preprocess_2d.size``)."""
        return int(self.preprocess.size)

    def to_dict(self) -> dict[str, Any]:
        """Resolved sections as plain data (stored with the model, logged to MLflow)."""
        return {
            "preprocess_2d": self.preprocess.model_dump(mode="json"),
            "model_2d": self.model.model_dump(mode="json"),
            "train_2d": self.train.model_dump(mode="json"),
            "trainer": self.trainer.model_dump(mode="json"),
            "mlflow": self.mlflow.model_dump(mode="json"),
        }


def planar_paths(params: dict[str, Any], *, source: str = "params.yaml") -> PlanarPaths:
    """The ``paths:`` keys of the 2-D branch (validated by the ``paths`` section model)."""
    paths = section("paths", params, source=source)
    return PlanarPaths(
        preprocessed=paths.preprocessed_2d,
        split=paths.split_2d,
        validated=paths.validated_2d,
        reports=paths.reports,
        mlruns=paths.mlruns,
    )


def load_preprocess_config(params: dict[str, Any], *, source: str = "params.yaml") -> Any:
    """The ``preprocess_2d:`` section (:class:`tumorseg.data.planar.PlanarPreprocessConfig`)."""

    return section("preprocess_2d", params, source=source)


def load_planar_training_config(
    params: dict[str, Any], *, source: str = "params.yaml"
) -> PlanarTrainingConfig:
    """Validate the 2-D training sections and the rules that span them.

    Raises:
        ConfigError: one line naming the key (an unknown network, an image size the network
            cannot halve often enough, a classifier deeper than the image allows).
    """
    cfg = PlanarTrainingConfig(
        paths=planar_paths(params, source=source),
        preprocess=load_preprocess_config(params, source=source),
        model=section("model_2d", params, source=source),
        train=section("train_2d", params, source=source),
        trainer=section("trainer", params, source=source),
        mlflow=section("mlflow", params, source=source),
    )
    size = cfg.model.input_size
    try:
        check_patch_size(cfg.model, (size, size), key="model_2d.input_size")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc} (model_2d.name={cfg.model.name})") from None
    reduction = 1
    for stride in cfg.model.classifier.strides:
        reduction *= stride
    if len(cfg.model.classifier.strides) != len(cfg.model.classifier.channels):
        raise ConfigError(f"{source}: model_2d.classifier.strides: needs one entry per channels entry")
    if size < reduction:
        raise ConfigError(
            f"{source}: model_2d.classifier.strides: downsample by {reduction}, more than model_2d.input_size {size}"
        )
    return cfg
