"""``train_planar()``: the 2-D training entry point (``tumorseg train --dims 2``, the DVC stage, Prefect, tests).

Steps, as in the 3-D :func:`tumorseg.training.train.train`:

1. validate the 2-D sections (one-line :class:`ConfigError`) and the split (train and val cases,
   reference masks in both) before anything runs;
2. build the segmenter + classifier (:mod:`tumorseg.models.planar_network`), the segmentation loss
   (:func:`tumorseg.models.losses.build_loss`), the optimiser and schedule
   (:mod:`tumorseg.training.optim`) and the checkpoint callbacks (:mod:`tumorseg.training.callbacks`);
3. fit with Lightning, logging to a CSV file and MLflow (``train_2d.experiment``);
4. write ``<paths.reports_2d>/train_metrics.json`` and log the config and learning curves to the run.

Outputs under ``train_2d.out_dir`` (default ``models/2d``)::

    checkpoints/best.ckpt   best validation Dice (what ``tumorseg evaluate-model --dims 2`` reads)
    logs/metrics.csv        per-epoch metrics
    config.yaml             the resolved 2-D sections
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from tumorseg.config import apply_overrides, section
from tumorseg.data.planar_datamodule import PlanarAugmentConfig
from tumorseg.errors import ConfigError, DataError
from tumorseg.models.losses import LossConfig
from tumorseg.models.networks import check_patch_size
from tumorseg.models.planar_network import PlanarModelConfig
from tumorseg.training.config import MlflowConfig, TrainConfig, TrainerConfig

log = logging.getLogger(__name__)


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
    (``tumorseg evaluate-model --dims 2`` owns the test split).
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
        reports=paths.reports_2d,
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


TRAIN_METRICS_FILE = "train_metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"


@dataclass
class PlanarTrainResult:
    """What a 2-D training run produced.

    Attributes:
        out_dir: ``train_2d.out_dir``.
        best_checkpoint: ``checkpoints/best.ckpt`` (None if validation never ran).
        best_val: validation metrics at the best epoch (``val_dice_mean``, ``val_detect_auc``,
            ``val_type_accuracy`` where defined).
        best_epoch: 0-based epoch of the best validation Dice.
        epochs, global_step: work done.
        train_time_s: wall time of ``Trainer.fit``.
        n_train, n_val: training and validation images.
        mlflow_run_id: the MLflow run (None when tracking is off).
    """

    out_dir: Path
    best_checkpoint: Path | None = None
    best_val: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    epochs: int = 0
    global_step: int = 0
    train_time_s: float = 0.0
    n_train: int = 0
    n_val: int = 0
    mlflow_run_id: str | None = None

    def one_line(self) -> str:
        scores = ", ".join(f"{k.removeprefix('val_')} {v:.3f}" for k, v in self.best_val.items())
        return (
            f"trained 2-D models {self.epochs} epochs ({self.global_step} steps, {self.train_time_s:.0f} s) on "
            f"{self.n_train} images; best val {scores or 'n/a'} -> {self.best_checkpoint}"
        )


def planar_split_records(
    cfg: PlanarTrainingConfig, source: str = "params.yaml"
) -> dict[str, list[dict[str, Any]]]:
    """Records of each split; a split without training or validation masks is a DataError.

    Raises:
        DataError: an empty train/val split or one without reference masks (the segmentation and
            the best checkpoint need them), naming ``paths.split_2d``.
    """
    from tumorseg.data.planar_datamodule import planar_records, read_planar_split

    split = read_planar_split(cfg.paths.split)
    records = {name: planar_records(cfg.paths.preprocessed, ids) for name, ids in split.items()}
    for name in ("train", "val"):
        if not any(r["has_mask"] for r in records[name]):
            raise DataError(
                f"{source}: paths.split_2d: {cfg.paths.split} has no {name!r} images with a tumour mask; the 2-D "
                "segmentation needs masked images (Figshare .mat or generated data) in train and val"
            )
    return records


def train_planar(
    params: dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    source: str = "params.yaml",
    tracking_uri: str | None = None,
) -> PlanarTrainResult:
    """Train the 2-D segmentation + classification networks as params.yaml describes.

    Args:
        params: the params.yaml dict.
        overrides: dotted keys applied on top (``{"train_2d.max_epochs": 1}``).
        callbacks: extra Lightning callbacks.
        source: params file name used in error messages.
        tracking_uri: MLflow store (default ``mlflow.tracking_uri``, ``$MLFLOW_TRACKING_URI``, then
            SQLite under ``paths.mlruns``).

    Raises:
        ConfigError: bad 2-D params; DataError: a missing or unusable split.
    """
    params = apply_overrides(params, overrides)
    cfg = load_planar_training_config(params, source=source)
    records = planar_split_records(cfg, source)

    if cfg.mlflow.enabled:
        from tumorseg.tracking import disable_telemetry

        disable_telemetry()
    import lightning as L
    import torch
    from lightning.pytorch.loggers import CSVLogger

    from tumorseg.training.callbacks import build_callbacks

    train_cfg = cfg.train
    out_dir = Path(train_cfg.out_dir)
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    for stale in (
        checkpoint_dir / "best.ckpt",
        checkpoint_dir / "last.ckpt",
        out_dir / LOG_DIR / "metrics.csv",
    ):
        stale.unlink(missing_ok=True)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(train_cfg.seed, workers=True, verbose=False)

    module, datamodule = _module_and_data(cfg, records)
    roles = build_callbacks(train_cfg, checkpoint_dir, progress_lines=not cfg.trainer.enable_progress_bar)
    roles.pop("throughput")  # counts 3-D patches; the 2-D result reports wall time instead
    loggers: list[Any] = [CSVLogger(save_dir=str(out_dir), name=LOG_DIR, version="")]
    mlflow_logger = None
    if cfg.mlflow.enabled:
        mlflow_logger, tracking_uri = _mlflow_logger(cfg, tracking_uri)
        loggers.append(mlflow_logger)
        module.mlflow_run_id = mlflow_logger.run_id

    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_epochs=train_cfg.max_epochs,
        check_val_every_n_epoch=train_cfg.val_every_n_epochs,
        callbacks=[*roles.values(), *callbacks],
        logger=loggers,
        deterministic=cfg.trainer.deterministic,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        log_every_n_steps=min(cfg.trainer.log_every_n_steps, train_cfg.steps_per_epoch),
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    elapsed = time.perf_counter() - started

    metrics_csv = out_dir / LOG_DIR / "metrics.csv"
    best = checkpoint_dir / "best.ckpt"
    result = PlanarTrainResult(
        out_dir=out_dir,
        best_checkpoint=best if best.is_file() else None,
        epochs=int(trainer.current_epoch),
        global_step=int(trainer.global_step),
        train_time_s=elapsed,
        n_train=len(records["train"]),
        n_val=len(records["val"]),
        mlflow_run_id=mlflow_logger.run_id if mlflow_logger is not None else None,
    )
    result.best_val, result.best_epoch = best_planar_validation(metrics_csv)
    _finish_run(cfg, result, metrics_csv, tracking_uri)
    log.info(result.one_line())
    return result


def _module_and_data(cfg: PlanarTrainingConfig, records: dict[str, list[dict[str, Any]]]) -> tuple[Any, Any]:
    """The LightningModule (segmenter + classifier, multi-task loss) and the DataModule of the split."""
    from tumorseg.data.planar_datamodule import PlanarDataModule
    from tumorseg.models.losses import build_loss
    from tumorseg.models.planar_module import PlanarModule
    from tumorseg.models.planar_network import build_planar_network
    from tumorseg.training.optim import optimizer_factory, scheduler_factory

    train_cfg = cfg.train
    module = PlanarModule(
        build_planar_network(cfg.model),
        build_loss(train_cfg.loss, "regions"),  # one sigmoid channel: the regions (sigmoid) form of the loss
        optimizer_factory=optimizer_factory(train_cfg),
        scheduler_factory=scheduler_factory(train_cfg),
        detection_weight=train_cfg.detection_weight,
        type_weight=train_cfg.type_weight,
        dice_ignore_empty=train_cfg.dice_ignore_empty,
        config=cfg.to_dict(),
    )
    datamodule = PlanarDataModule(
        records["train"],
        records["val"],
        train_cfg.augment,
        batch_size=train_cfg.batch_size,
        draws_per_epoch=train_cfg.steps_per_epoch * train_cfg.batch_size,
        num_workers=train_cfg.num_workers,
        seed=train_cfg.seed,
    )
    return module, datamodule


def _mlflow_logger(cfg: PlanarTrainingConfig, tracking_uri: str | None) -> tuple[Any, str]:
    """An MLflow logger on ``train_2d.experiment`` (config, data version and commit tagged), and its store."""
    from lightning.pytorch.loggers import MLFlowLogger

    from tumorseg import tracking

    train_cfg = cfg.train
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns)
    tracking.ensure_experiment(tracking_uri, train_cfg.experiment)
    mlflow_logger = MLFlowLogger(
        experiment_name=train_cfg.experiment,
        run_name=cfg.mlflow.run_name,
        tracking_uri=tracking_uri,
        artifact_location=tracking.experiment_artifact_location(tracking_uri, train_cfg.experiment),
    )
    mlflow_logger.log_hyperparams(tracking.flatten(cfg.to_dict()))
    client, run_id = mlflow_logger.experiment, mlflow_logger.run_id
    client.set_tag(run_id, "tumorseg.branch", "2d")
    for key, value in tracking.data_version(cfg.paths.preprocessed).items():
        client.set_tag(run_id, f"data.{key}", value)
    client.set_tag(
        run_id, "mlflow.source.git.commit", tracking.git_commit(Path(__file__).resolve().parent) or "none"
    )
    return mlflow_logger, tracking_uri


def best_planar_validation(metrics_csv: Path) -> tuple[dict[str, float], int | None]:
    """Validation metrics at the epoch with the best ``val_dice_mean``, from the CSV log."""
    from tumorseg.training.train import best_validation_row

    row = best_validation_row(metrics_csv)
    if row is None:
        return {}, None
    keys = ("val_dice_mean", "val_detect_auc", "val_type_accuracy")
    best = {k: float(row[k]) for k in keys if k in row and not math.isnan(float(row[k]))}
    return best, int(row["epoch"])


def _finish_run(
    cfg: PlanarTrainingConfig, result: PlanarTrainResult, metrics_csv: Path, uri: str | None
) -> None:
    """Config file, learning curves, ``<paths.reports_2d>/train_metrics.json`` and the MLflow artefacts."""
    from tumorseg.data.manifest import atomic_write_text
    from tumorseg.training.reporting import plot_learning_curves

    artefacts = []
    config_file = result.out_dir / "config.yaml"
    atomic_write_text(config_file, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    artefacts.append(config_file)
    if metrics_csv.is_file():
        artefacts += [metrics_csv, plot_learning_curves(metrics_csv, result.out_dir / "learning_curves.png")]
    summary = {
        "best_val": {k: round(v, 6) for k, v in result.best_val.items()},
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "global_step": result.global_step,
        "train_time_s": round(result.train_time_s, 1),
        "n_train": result.n_train,
        "n_val": result.n_val,
    }
    metrics_file = Path(cfg.paths.reports) / TRAIN_METRICS_FILE
    atomic_write_text(metrics_file, json.dumps(summary, indent=2) + "\n")
    artefacts.append(metrics_file)
    if result.mlflow_run_id is None or uri is None:
        return
    import mlflow

    client = mlflow.MlflowClient(uri)
    for path in artefacts:
        client.log_artifact(result.mlflow_run_id, str(path))
    client.log_metric(result.mlflow_run_id, "train_time_s", result.train_time_s)
    for key, value in result.best_val.items():
        client.log_metric(result.mlflow_run_id, f"best_{key}", value)
