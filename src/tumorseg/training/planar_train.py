"""``train_planar()``: the 2-D training entry point (``tumorseg train --dims 2``, the DVC stage, Prefect, tests).

The steps and outputs of the 3-D :func:`tumorseg.training.train.train` (under ``train_2d.out_dir``,
MLflow experiment ``train_2d.experiment``) for the segmenter + classifier of
:mod:`tumorseg.models.planar_network`; the test split is scored by ``tumorseg evaluate-model --dims 2``.
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

from tumorseg.config import apply_overrides, section
from tumorseg.errors import ConfigError, DataError
from tumorseg.models.config import PlanarModelConfig
from tumorseg.models.networks import check_patch_size
from tumorseg.training.config import MlflowConfig, PlanarTrainConfig, TrainerConfig
from tumorseg.training.train import (
    CHECKPOINT_DIR,
    LOG_DIR,
    TRAIN_METRICS_FILE,
    best_validation_row,
    clear_previous_run,
    write_config_and_curves,
)

log = logging.getLogger(__name__)


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
        """Resolved sections as plain data (stored with the model, logged to MLflow)."""
        sections = (self.preprocess, self.model, self.train, self.trainer, self.mlflow)
        return {
            name: values.model_dump(mode="json")
            for name, values in zip(PLANAR_TRAINING_SECTIONS, sections, strict=True)
        }


def load_planar_training_config(
    params: dict[str, Any], *, source: str = "params.yaml"
) -> PlanarTrainingConfig:
    """Validate the 2-D training sections and the rules that span them.

    Raises:
        ConfigError: one line naming the key (an unknown network, an image size the network
            cannot halve often enough, a classifier deeper than the image allows).
    """
    paths = section("paths", params, source=source)
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


@dataclass
class PlanarTrainResult:
    """What a 2-D training run produced.

    Attributes:
        best_checkpoint: ``checkpoints/best.ckpt`` (None if validation never ran).
        best_val: validation metrics at the best epoch (``val_dice_mean``, ``val_detect_auc``,
            ``val_type_accuracy`` where defined).
        n_train, n_val: training and validation images.
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
    """Records of each split.

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

    Arguments as for :func:`tumorseg.training.train.train`; ConfigError for bad 2-D params, DataError
    for a missing or unusable split.
    """
    params = apply_overrides(params, overrides)
    cfg = load_planar_training_config(params, source=source)
    records = planar_split_records(cfg, source)

    if cfg.mlflow.enabled:
        from tumorseg.tracking import disable_telemetry

        disable_telemetry()
    import lightning as L
    import torch

    from tumorseg.training.callbacks import build_callbacks

    out_dir = Path(cfg.train.out_dir)
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    clear_previous_run(out_dir)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    module, datamodule = _module_and_data(cfg, records)
    roles = build_callbacks(cfg.train, checkpoint_dir, progress_lines=not cfg.trainer.enable_progress_bar)
    roles.pop("throughput")  # counts 3-D patches; the 2-D result reports wall time instead
    loggers, mlflow_logger, tracking_uri = _loggers(cfg, out_dir, tracking_uri, module)
    trainer = _planar_trainer(cfg, [*roles.values(), *callbacks], loggers, out_dir)
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


def _planar_trainer(
    cfg: PlanarTrainingConfig, callbacks: list[Any], loggers: list[Any], out_dir: Path
) -> Any:
    """A single-device Lightning ``Trainer`` (the 2-D branch has no DDP path)."""
    import lightning as L

    shared = {"accelerator", "precision", "deterministic", "gradient_clip_val", "enable_progress_bar"}
    return L.Trainer(
        **cfg.trainer.model_dump(include=shared),
        devices=1,
        max_epochs=cfg.train.max_epochs,
        check_val_every_n_epoch=cfg.train.val_every_n_epochs,
        callbacks=callbacks,
        logger=loggers,
        log_every_n_steps=min(cfg.trainer.log_every_n_steps, cfg.train.steps_per_epoch),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out_dir),
    )


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


def _loggers(
    cfg: PlanarTrainingConfig, out_dir: Path, tracking_uri: str | None, module: Any
) -> tuple[list[Any], Any, str | None]:
    """As in 3-D; the MLflow run is on ``train_2d.experiment``, tagged with data version and commit."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out_dir), name=LOG_DIR, version="")]
    if not cfg.mlflow.enabled:
        return loggers, None, tracking_uri
    from tumorseg import tracking

    experiment = cfg.train.experiment
    tracking_uri = tracking.resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns)
    tracking.ensure_experiment(tracking_uri, experiment)
    mlflow_logger = MLFlowLogger(
        experiment_name=experiment,
        run_name=cfg.mlflow.run_name,
        tracking_uri=tracking_uri,
        artifact_location=tracking.experiment_artifact_location(tracking_uri, experiment),
    )
    mlflow_logger.log_hyperparams(tracking.flatten(cfg.to_dict()))
    client, run_id = mlflow_logger.experiment, mlflow_logger.run_id
    client.set_tag(run_id, "tumorseg.branch", "2d")
    for key, value in tracking.data_version(cfg.paths.preprocessed).items():
        client.set_tag(run_id, f"data.{key}", value)
    client.set_tag(
        run_id, "mlflow.source.git.commit", tracking.git_commit(Path(__file__).resolve().parent) or "none"
    )
    module.mlflow_run_id = run_id
    return [*loggers, mlflow_logger], mlflow_logger, tracking_uri


def best_planar_validation(metrics_csv: Path) -> tuple[dict[str, float], int | None]:
    """Validation metrics at the epoch with the best ``val_dice_mean``, from the CSV log."""
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

    artefacts = write_config_and_curves(result.out_dir, cfg.to_dict(), metrics_csv)
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
