"""params.yaml sections of training, and the one place that validates them together (3-D and 2-D).

``train:``/``train_2d:``, ``trainer:`` and ``mlflow:`` live here; every other section's model lives
next to the code that reads it (``data_loader:``/``augment:`` in :mod:`tumorseg.data.transforms`,
``model:`` in :mod:`tumorseg.models.networks`, ``loss:``, ``sliding_window:`` in :mod:`tumorseg.models`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal

from pydantic import Field, model_validator

from tumorseg.config import PathsConfig, PreprocessConfig, Section, section
from tumorseg.data.transforms import AugmentConfig, DataLoaderConfig, PlanarAugmentConfig
from tumorseg.errors import ConfigError
from tumorseg.models.config import LossConfig, PlanarModelConfig, SlidingWindowConfig
from tumorseg.models.networks import ModelConfig, check_patch_size


class TrainConfig(Section):
    """``train:`` the optimisation loop (each key is described beside it in params.yaml).

    ``cosine`` (down to ``min_lr``) and ``poly`` (nnU-Net's) warm up linearly for ``warmup_epochs``,
    capped at the run length; ``plateau`` multiplies the LR by ``plateau_factor`` after ``plateau_patience``
    validations without a better Dice. ``dice_ignore_empty: false`` is the BraTS rule: an empty
    region predicted empty scores 1, any false positive on it 0. ``init_from`` starts from another
    model's weights (:mod:`tumorseg.training.transfer`), with its first ``freeze_encoder_stages``
    encoder levels fixed and the others at ``encoder_lr_scale`` times the learning rate.
    """

    seed: int = 42
    out_dir: str = "models"
    max_epochs: int = Field(24, ge=1)
    steps_per_epoch: int = Field(50, ge=1)
    optimizer: Literal["adam", "adamw", "sgd", "novograd"] = "adamw"
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    momentum: float = Field(0.99, ge=0.0, lt=1.0)
    nesterov: bool = True
    scheduler: Literal["none", "cosine", "poly", "plateau"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    poly_power: float = Field(0.9, gt=0.0)
    plateau_factor: float = Field(0.5, gt=0.0, lt=1.0)
    plateau_patience: int = Field(3, ge=0)
    val_every_n_epochs: int = Field(1, ge=1)
    early_stopping_patience: int = Field(0, ge=0)
    early_stopping_min_delta: float = Field(0.0, ge=0.0)
    checkpoint_every_n_steps: int = Field(50, ge=1)
    dice_ignore_empty: bool = False
    score_test: bool = False
    init_from: str | None = None
    freeze_encoder_stages: int = Field(0, ge=0)
    encoder_lr_scale: float = Field(1.0, gt=0.0, le=1.0)


class TrainerConfig(Section):
    """``trainer:`` hardware and Lightning flags; every key but ``num_threads`` is a ``Trainer`` argument.

    ``deterministic: warn`` only warns where CUDA has no deterministic kernel; ``benchmark`` (cuDNN
    autotuning) is faster but not bit-reproducible. ``precision: auto`` is bfloat16 only where the
    hardware computes it natively (:func:`tumorseg.runtime.resolve_precision`); ``channels_last``
    stores 3-D activations channels-last (``torch.channels_last_3d``), which oneDNN's CPU
    convolutions run faster.
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: Literal[
        "auto", "32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"
    ] = "32-true"
    channels_last: bool = False
    deterministic: bool | Literal["warn"] = "warn"
    benchmark: bool = False
    gradient_clip_val: float | None = Field(None, gt=0.0)
    accumulate_grad_batches: int = Field(1, ge=1)
    log_every_n_steps: int = Field(10, ge=1)
    num_threads: int = Field(0, ge=0)
    enable_progress_bar: bool = False


class MlflowConfig(Section):
    """``mlflow:`` experiment tracking (keys described in params.yaml; see :mod:`tumorseg.tracking`)."""

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "tumorseg-segmentation"
    run_name: str | None = None
    log_model: bool = True
    overlays: int = Field(3, ge=0)


@dataclass(frozen=True)
class TrainingConfig:
    """All sections a training run reads, validated together."""

    paths: PathsConfig
    preprocess: PreprocessConfig
    data_loader: DataLoaderConfig
    augment: AugmentConfig
    model: ModelConfig
    loss: LossConfig
    sliding_window: SlidingWindowConfig
    train: TrainConfig
    trainer: TrainerConfig
    mlflow: MlflowConfig

    def to_dict(self) -> dict[str, Any]:
        """The resolved sections as plain YAML-able data (stored in checkpoints, logged to MLflow)."""
        return {name: getattr(self, name).model_dump(mode="json") for name in TRAINING_SECTIONS}


TRAINING_SECTIONS: tuple[str, ...] = tuple(field.name for field in fields(TrainingConfig))
"""Sections a training run reads (the DVC stage's ``params:`` list), in :class:`TrainingConfig` order."""


def load_training_config(params: dict[str, Any], *, source: str = "params.yaml") -> TrainingConfig:
    """Validate every training section and the rules that span sections; a ConfigError is one line
    naming the key (``params.yaml: data_loader.patch_size: [60, 64, 64] is not divisible by ...``)."""
    cfg = TrainingConfig(**{name: section(name, params, source=source) for name in TRAINING_SECTIONS})
    if cfg.loss.name == "bce" and cfg.model.output != "regions":
        raise ConfigError(f"{source}: loss.name: bce needs model.output: regions; use ce or dice_ce")
    if cfg.loss.name == "ce" and cfg.model.output != "labels":
        raise ConfigError(f"{source}: loss.name: ce needs model.output: labels; use bce or dice_ce")
    try:
        check_patch_size(
            cfg.model,
            cfg.data_loader.network_patch,
            key=cfg.data_loader.patch_key(),
            spacing=cfg.preprocess.target_spacing_mm,
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return cfg


class PlanarTrainConfig(TrainConfig):
    """``train_2d:`` the ``train:`` keys (2-D defaults) plus batch, loss, task weights and augmentation.

    ``loss`` (the ``loss:`` keys) applies to the one tumour channel; ``detection_weight`` and
    ``type_weight`` weigh the classifier terms (:class:`tumorseg.models.lightning_module.ClassifierHeads`).
    """

    out_dir: str = "models/2d"
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
                "the 2-D test split is scored by `tumorseg evaluate-model --dims 2`, not during training; set false"
            )
        return self


PLANAR_TRAINING_SECTIONS: tuple[str, ...] = ("preprocess_2d", "model_2d", "train_2d", "trainer", "mlflow")
"""Sections a 2-D training run reads and stores with its model, in :class:`PlanarTrainingConfig` order."""


@dataclass(frozen=True)
class PlanarPaths:
    """The 2-D branch's folders (``paths.*_2d`` keys) plus the shared reports and MLflow folders."""

    preprocessed: str
    split: str
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

    def to_dict(self) -> dict[str, Any]:
        sections = (self.preprocess, self.model, self.train, self.trainer, self.mlflow)
        return {
            name: values.model_dump(mode="json")
            for name, values in zip(PLANAR_TRAINING_SECTIONS, sections, strict=True)
        }


def load_planar_training_config(
    params: dict[str, Any], *, source: str = "params.yaml"
) -> PlanarTrainingConfig:
    """Validate the 2-D training sections and the rules that span them; a one-line ConfigError names
    the key (an image size the network cannot halve often enough, a classifier deeper than it allows)."""
    paths = section("paths", params, source=source)  # a Params or a mapping
    cfg = PlanarTrainingConfig(
        PlanarPaths(paths.preprocessed_2d, paths.split_2d, paths.reports_2d, paths.mlruns),
        *(section(name, params, source=source) for name in PLANAR_TRAINING_SECTIONS),
    )
    size = cfg.model.input_size
    try:
        check_patch_size(cfg.model, (size, size), key="model_2d.input_size")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc} (model_2d.name={cfg.model.name})") from None
    reduction = math.prod(cfg.model.classifier.strides)
    if len(cfg.model.classifier.strides) != len(cfg.model.classifier.channels):
        raise ConfigError(f"{source}: model_2d.classifier.strides: needs one entry per channels entry")
    if size < reduction:
        raise ConfigError(
            f"{source}: model_2d.classifier.strides: downsample by {reduction}, more than model_2d.input_size {size}"
        )
    return cfg
