"""params.yaml sections of training, and the one place that validates them together.

Sections (each a pydantic model, unknown keys rejected with a one-line error naming the key):

- ``data_loader:``, ``augment:`` — :mod:`tumorseg.data.transforms`
- ``model:`` — :mod:`tumorseg.models.networks`
- ``loss:`` — :mod:`tumorseg.models.losses`
- ``sliding_window:`` — :mod:`tumorseg.models.inference`
- ``train:``, ``trainer:``, ``mlflow:`` — here

Each section model lives next to the code that reads it; :data:`tumorseg.config.SECTION_MODELS`
names them all, so ``tumorseg.config.section("train", params)`` works whatever was imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from tumorseg.config import PathsConfig, PreprocessConfig, Section, section
from tumorseg.data.transforms import AugmentConfig, DataLoaderConfig
from tumorseg.errors import ConfigError
from tumorseg.models.inference import SlidingWindowConfig
from tumorseg.models.losses import LossConfig
from tumorseg.models.networks import ModelConfig, check_patch_size


class TrainConfig(Section):
    """``train:`` the optimisation loop (``dvc exp run -S train.lr=...``).

    Attributes:
        seed: seeds torch, numpy, Python and the augmentation streams.
        out_dir: checkpoints, CSV log, plots and resolved config of the run.
        max_epochs: training epochs; an epoch is ``steps_per_epoch`` optimiser steps.
        steps_per_epoch: steps per epoch on one device (DDP splits them across ranks).
        optimizer: ``adam``, ``adamw``, ``sgd`` (Nesterov momentum) or ``novograd``.
        lr, weight_decay, momentum, nesterov: optimiser settings (momentum/nesterov: SGD).
        scheduler: ``cosine`` (with linear warm-up), ``poly`` (nnU-Net), ``plateau`` (halve the LR
            when validation Dice stalls) or ``none``.
        warmup_epochs: linear warm-up length for ``cosine`` and ``poly`` (capped at the run length).
        min_lr: floor of the cosine schedule.
        poly_power: exponent of ``poly``.
        plateau_factor, plateau_patience: ``plateau`` LR factor and patience (validation checks).
        val_every_n_epochs: validate (and maybe checkpoint the best model) every n epochs.
        early_stopping_patience: stop after this many validations without a better mean Dice
            (0 turns early stopping off).
        early_stopping_min_delta: smallest Dice gain that counts as better.
        checkpoint_every_n_steps: how often ``last.ckpt`` is refreshed (resume granularity).
        dice_ignore_empty: MONAI DiceMetric ``ignore_empty``; False is the BraTS convention
            (empty region predicted empty scores 1, a false positive on it scores 0).
        score_test: also score the test split with the best checkpoint and write
            ``reports/metrics.json`` (off in the pipeline, where the evaluate stage owns that file).
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


class TrainerConfig(Section):
    """``trainer:`` hardware and Lightning Trainer flags.

    Attributes:
        accelerator: ``cpu``, ``gpu``/``cuda``, ``mps`` or ``auto``.
        devices: devices per node (int, list of ids or ``auto``).
        strategy: ``auto``, ``ddp`` (one process per device; the CLI, torchrun and SLURM),
            ``ddp_spawn`` (from Python/notebooks), ``ddp_find_unused_parameters_true``...
        num_nodes: machines (multi-node via torchrun or SLURM; see the README).
        precision: ``32-true`` (CPU default), ``bf16-mixed`` / ``16-mixed`` on GPU.
        deterministic: ``torch.use_deterministic_algorithms``; ``warn`` only warns where CUDA
            has no deterministic kernel.
        benchmark: cuDNN autotuning (GPU; faster, not bit-reproducible).
        gradient_clip_val: clip the gradient norm (null: off).
        accumulate_grad_batches: steps accumulated per optimiser update.
        log_every_n_steps: Lightning's logging interval.
        num_threads: torch intra-op CPU threads (0: torch's default, one per core).
        enable_progress_bar: Lightning's progress bar (off for logs and DVC).
    """

    accelerator: str = "auto"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    num_nodes: int = Field(1, ge=1)
    precision: Literal["32-true", "32", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"] = (
        "32-true"
    )
    deterministic: bool | Literal["warn"] = "warn"
    benchmark: bool = False
    gradient_clip_val: float | None = Field(None, gt=0.0)
    accumulate_grad_batches: int = Field(1, ge=1)
    log_every_n_steps: int = Field(10, ge=1)
    num_threads: int = Field(0, ge=0)
    enable_progress_bar: bool = False


class MlflowConfig(Section):
    """``mlflow:`` experiment tracking.

    Attributes:
        enabled: track the run in MLflow.
        tracking_uri: null: ``MLFLOW_TRACKING_URI`` if set, else a SQLite store under ``paths.mlruns``.
        experiment: experiment name.
        run_name: null: MLflow picks one.
        log_model: log the best network as an MLflow PyTorch model.
        overlays: validation overlay PNGs logged per run.
    """

    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "tumorseg-segmentation"
    run_name: str | None = None
    log_model: bool = True
    overlays: int = Field(3, ge=0)


TRAINING_SECTIONS: tuple[str, ...] = (
    "paths",
    "preprocess",
    "data_loader",
    "augment",
    "model",
    "loss",
    "sliding_window",
    "train",
    "trainer",
    "mlflow",
)
"""Sections a training run reads (the DVC stage's ``params:`` list)."""


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


def load_training_config(params: dict[str, Any], *, source: str = "params.yaml") -> TrainingConfig:
    """Validate every training section and the rules that span sections.

    Raises:
        ConfigError: one line naming the params.yaml key, e.g.
            ``params.yaml: model.name: Input should be 'unet', ...`` or
            ``data_loader.patch_size: [60, 64, 64] is not divisible by [8, 8, 8] ...``.
    """
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
