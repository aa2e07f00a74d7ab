"""``train()``: the one training entry point (CLI ``tumorseg train``, the DVC stage, Prefect, tests).

Params and data are checked before anything runs (a one-line :class:`ConfigError` naming the key);
rank 0 then writes plots, overlays, test scores and the MLflow artefacts. Outputs under
``train.out_dir``::

    checkpoints/best.ckpt   best validation mean Dice (what evaluation and export load)
    checkpoints/last.ckpt   latest state, refreshed every train.checkpoint_every_n_steps
    logs/metrics.csv        per-epoch metrics (Lightning CSVLogger)
    config.yaml             the resolved training sections
    learning_curves.png, overlays/<case_id>.png
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tumorseg.config import apply_overrides
from tumorseg.data.conventions import get_label_set
from tumorseg.errors import ConfigError, first_line
from tumorseg.training.config import TrainingConfig, load_training_config

log = logging.getLogger(__name__)

TRAIN_METRICS_FILE = "train_metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"


@dataclass
class TrainResult:
    """What a training run produced (complete on rank 0; other DDP ranks only fill the paths).

    Attributes:
        best_val_dice: ``{"WT", "TC", "ET", "mean"}`` at the best validation (0-based ``best_epoch``).
        train_time_s: wall time of ``Trainer.fit`` in this call (a resumed run counts only its part).
        patches_per_s: training patches per second (training phase only, all ranks together).
        test_dice: :func:`~tumorseg.training.scoring.score_split` summary of the test split, if scored.
    """

    out_dir: Path
    best_checkpoint: Path | None = None
    last_checkpoint: Path | None = None
    best_val_dice: dict[str, float] = field(default_factory=dict)
    best_epoch: int | None = None
    epochs: int = 0
    global_step: int = 0
    train_time_s: float = 0.0
    patches_per_s: float = 0.0
    mlflow_run_id: str | None = None
    test_dice: dict[str, Any] | None = None
    global_rank: int = 0

    def one_line(self) -> str:
        from tumorseg.training.reporting import format_dice

        if self.global_rank != 0:
            return f"rank {self.global_rank} finished; rank 0 reports the results"

        text = (
            f"trained {self.epochs} epochs ({self.global_step} steps, {self.train_time_s:.0f} s, "
            f"{self.patches_per_s:.1f} patches/s); best val Dice {format_dice(self.best_val_dice)}"
        )
        if self.test_dice:
            test = {k.removeprefix("dice_"): v for k, v in self.test_dice.items() if k.startswith("dice_")}
            text += f"; test Dice {format_dice(test)}"
        return f"{text} -> {self.best_checkpoint}"


def train(
    params: dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    source: str = "params.yaml",
    tracking_uri: str | None = None,
) -> TrainResult:
    """Train a segmentation network as params.yaml describes.

    Args:
        overrides: dotted keys applied on top (``{"train.max_epochs": 1}``).
        resume: continue from ``<out_dir>/checkpoints/last.ckpt`` if there is one (same epochs,
            optimiser and scheduler state, same MLflow run); otherwise start afresh.
        callbacks: extra Lightning callbacks (tests use them to interrupt or inspect a run).
        source: params file name used in error messages.
        tracking_uri: MLflow store; default ``mlflow.tracking_uri``, ``$MLFLOW_TRACKING_URI``,
            then SQLite under ``paths.mlruns``.

    Raises:
        ConfigError: bad params or an empty split, before any training starts.
    """
    params = apply_overrides(params, overrides)
    cfg = load_training_config(params, source=source)
    train_records, val_records = split_records(cfg, source)
    check_patch_fits(cfg, train_records, source)
    cfg = with_data_label_set(cfg)

    if cfg.mlflow.enabled:
        from tumorseg.tracking import disable_telemetry

        disable_telemetry()
    import lightning as L
    import torch

    from tumorseg.training.callbacks import build_callbacks

    out_dir = Path(cfg.train.out_dir)
    ckpt_path = _resume_checkpoint(out_dir, resume)
    metrics_csv = out_dir / LOG_DIR / "metrics.csv"
    # Lightning's CSVLogger starts a new file; keep the rows logged before the interruption.
    earlier_log = _log_before_checkpoint(metrics_csv, ckpt_path) if ckpt_path else None

    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module, datamodule = _module_and_data(cfg, train_records, val_records)

    roles = build_callbacks(
        cfg.train, out_dir / CHECKPOINT_DIR, progress_lines=not cfg.trainer.enable_progress_bar
    )
    loggers, mlflow_logger, tracking_uri = _loggers(cfg, out_dir, tracking_uri, ckpt_path, module)
    trainer = _make_trainer(cfg, source, [*roles.values(), *callbacks], loggers, out_dir)
    if mlflow_logger is not None and ckpt_path is None and _is_rank_zero():
        _log_run_provenance(mlflow_logger, cfg)

    result = _fit(trainer, module, datamodule, ckpt_path, out_dir, mlflow_logger)
    if not trainer.is_global_zero:
        return result
    if earlier_log is not None:
        _prepend_log(metrics_csv, earlier_log)
    result.best_val_dice, result.best_epoch = best_validation(metrics_csv)
    if result.global_step == 0:  # ddp_spawn/ddp_fork: the loops ran in worker processes
        result.epochs, result.global_step = progress_from_log(metrics_csv)
    result.patches_per_s = float(trainer.callback_metrics.get("train_patches_per_s", math.nan))
    _finish_run(cfg, result, metrics_csv, params, source, tracking_uri)
    log.info(result.one_line())
    return result


def _resume_checkpoint(out_dir: Path, resume: bool) -> str | None:
    """``last.ckpt`` when resuming from one; otherwise None, and the previous run's files are cleared."""
    last = out_dir / CHECKPOINT_DIR / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    if resume and ckpt_path is None:
        log.info("no %s to resume from; starting a new run", last)
    if ckpt_path is None:
        clear_previous_run(out_dir)
    return ckpt_path


def _module_and_data(
    cfg: TrainingConfig, train_records: list[dict[str, Any]], val_records: list[dict[str, Any]]
) -> tuple[Any, Any]:
    """The LightningModule (network by name and its loss) and the DataModule of the split.

    Called right after seeding: the network's initial weights are the run's first random draws.
    """
    from tumorseg.data.datamodule import SegmentationDataModule
    from tumorseg.models.lightning_module import SegmentationModule
    from tumorseg.models.losses import build_loss, with_deep_supervision
    from tumorseg.models.networks import build_network
    from tumorseg.training.optim import optimizer_factory, scheduler_factory

    loader = cfg.data_loader
    network = build_network(
        cfg.model,
        spatial_dims=loader.spatial_dims,
        patch_size=loader.network_patch,
        spacing=cfg.preprocess.target_spacing_mm,
    )
    loss = build_loss(cfg.loss, cfg.model.output)
    if cfg.model.name == "dynunet" and cfg.model.dynunet.deep_supervision:
        loss = with_deep_supervision(loss, cfg.loss.deep_supervision_weights)
    module = SegmentationModule(
        network,
        loss,
        output=cfg.model.output,
        roi_size=loader.network_patch,
        sliding_window=cfg.sliding_window,
        optimizer_factory=optimizer_factory(cfg.train),
        scheduler_factory=scheduler_factory(cfg.train),
        config=cfg.to_dict(),
        dice_ignore_empty=cfg.train.dice_ignore_empty,
        spacing_mm=cfg.preprocess.target_spacing_mm,
        label_set=get_label_set(cfg.model.label_set),
    )
    draws = cfg.train.steps_per_epoch * loader.batch_size
    datamodule = SegmentationDataModule(
        train_records, val_records, loader, cfg.augment, patches_per_epoch=draws, seed=cfg.train.seed
    )
    return module, datamodule


def _loggers(
    cfg: TrainingConfig, out_dir: Path, tracking_uri: str | None, ckpt_path: str | None, module: Any
) -> tuple[list[Any], Any, str | None]:
    """``(loggers, MLflow logger or None, tracking URI)``: the CSV log, plus MLflow when tracking is on.

    The URI is resolved when tracking is on; a resumed run continues its MLflow run.
    """
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out_dir), name=LOG_DIR, version="")]
    if not cfg.mlflow.enabled:
        return loggers, None, tracking_uri
    from tumorseg import tracking
    from tumorseg.models.lightning_module import RUN_ID_CHECKPOINT_KEY

    experiment = cfg.mlflow.experiment
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns)
    if _is_rank_zero():
        tracking.ensure_experiment(uri, experiment)
    mlflow_logger = MLFlowLogger(
        experiment_name=experiment,
        run_name=cfg.mlflow.run_name,
        tracking_uri=uri,
        run_id=_checkpoint_entry(ckpt_path, RUN_ID_CHECKPOINT_KEY) if ckpt_path else None,
        artifact_location=tracking.experiment_artifact_location(uri, experiment),
    )
    module.mlflow_run_id = mlflow_logger.run_id  # creates the run here, before any DDP spawn
    return [*loggers, mlflow_logger], mlflow_logger, uri


def _make_trainer(
    cfg: TrainingConfig, source: str, callbacks: list[Any], loggers: list[Any], out_dir: Path
) -> Any:
    """The ``Trainer`` of ``trainer:`` and ``train:``; a setting Lightning rejects is a ConfigError."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(
            **cfg.trainer.model_dump(exclude={"num_threads"}),
            max_epochs=cfg.train.max_epochs,
            check_val_every_n_epoch=cfg.train.val_every_n_epochs,
            callbacks=callbacks,
            logger=loggers,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=str(out_dir),
        )
    except (MisconfigurationException, ValueError, TypeError) as exc:
        message = first_line(exc, 10_000)
        key = next(
            (k for k in ("strategy", "accelerator", "devices", "precision", "num_nodes") if k in message), ""
        )
        raise ConfigError(f"{source}: trainer.{key or 'accelerator'}: {message}") from None


def _fit(
    trainer: Any, module: Any, datamodule: Any, ckpt_path: str | None, out_dir: Path, mlflow_logger: Any
) -> TrainResult:
    """Run ``Trainer.fit`` (resuming from ``ckpt_path``) and report what this process saw of it."""
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    elapsed = time.perf_counter() - started
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    return TrainResult(
        out_dir=out_dir,
        best_checkpoint=_existing(checkpoint_dir / "best.ckpt"),
        last_checkpoint=_existing(checkpoint_dir / "last.ckpt"),
        epochs=int(trainer.current_epoch),
        global_step=int(trainer.global_step),
        train_time_s=elapsed,
        mlflow_run_id=mlflow_logger.run_id if mlflow_logger is not None else None,
        global_rank=int(trainer.global_rank),
    )


def with_data_label_set(cfg: TrainingConfig) -> TrainingConfig:
    """``cfg`` with ``model.label_set`` taken from the preprocessed data (its output channels follow it)."""
    from tumorseg.data.datamodule import dataset_label_set

    label_set = dataset_label_set(cfg.paths.preprocessed)
    if label_set.name != cfg.model.label_set:
        log.info(
            "label set %s (from %s): output channels %s",
            label_set.name,
            cfg.paths.preprocessed,
            ", ".join(label_set.region_names if cfg.model.output == "regions" else label_set.label_names),
        )
    return dataclasses.replace(cfg, model=cfg.model.model_copy(update={"label_set": label_set.name}))


def split_records(cfg: TrainingConfig, source: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training and validation case records; an empty split is a ConfigError naming ``paths.split``."""
    from tumorseg.data.datamodule import case_records, read_split

    split = read_split(cfg.paths.split)
    for name, why in (("train", "nothing to train on"), ("val", "the best checkpoint is chosen on it")):
        if not split.get(name):
            raise ConfigError(
                f"{source}: paths.split: {cfg.paths.split} has no {name!r} cases ({why}); "
                "add cases or fix split.train/split.val and rerun `tumorseg split`"
            )
    return (
        case_records(cfg.paths.preprocessed, split["train"]),
        case_records(cfg.paths.preprocessed, split["val"]),
    )


def check_patch_fits(cfg: TrainingConfig, records: list[dict[str, Any]], source: str) -> None:
    """A training patch must fit inside every training volume (patches are cropped, never padded)."""
    from tumorseg.data.datamodule import smallest_shape

    loader = cfg.data_loader
    smallest = smallest_shape(records)
    crop = loader.crop_size
    if any(p > s for p, s in zip(crop, smallest, strict=True)):
        fits = [min(p, s) for p, s in zip(loader.network_patch, smallest, strict=False)]
        raise ConfigError(
            f"{source}: {loader.patch_key()}: {list(loader.network_patch)} is larger than the smallest training "
            f"volume {'x'.join(map(str, smallest))}; use at most {fits} (rounded down to the network's factor)"
        )


def best_validation_row(metrics_csv: Path) -> Any | None:
    """The CSV log's per-epoch row (a pandas Series) with the best ``val_dice_mean``; None before any validation."""
    from tumorseg.training.reporting import epoch_metrics

    if not metrics_csv.is_file():
        return None
    frame = epoch_metrics(metrics_csv)
    if "val_dice_mean" not in frame or frame["val_dice_mean"].dropna().empty:
        return None
    return frame.loc[frame["val_dice_mean"].idxmax()]


def best_validation(metrics_csv: Path) -> tuple[dict[str, float], int | None]:
    """Per-region validation Dice at the epoch with the best mean, from the CSV log."""
    row = best_validation_row(metrics_csv)
    if row is None:
        return {}, None
    names = [str(k).removeprefix("val_dice_") for k in row.index if str(k).startswith("val_dice_")]
    names = [n for n in names if n != "mean"] + ["mean"]
    dice = {name: float(row[f"val_dice_{name}"]) for name in names}
    return dice, int(row["epoch"])


def progress_from_log(metrics_csv: Path) -> tuple[int, int]:
    """``(epochs, optimiser steps)`` completed, from the CSV log's epoch-end rows."""
    import pandas as pd

    if not metrics_csv.is_file():
        return 0, 0
    rows = pd.read_csv(metrics_csv).dropna(subset=["epoch"])
    if rows.empty:
        return 0, 0
    # Epoch-end rows are logged at step = global_step - 1.
    return int(rows["epoch"].max()) + 1, int(rows["step"].max()) + 1


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def clear_previous_run(out_dir: Path) -> None:
    """A new run starts clean: old checkpoints would otherwise be compared against or resumed."""
    for stale in (
        out_dir / CHECKPOINT_DIR / "best.ckpt",
        out_dir / CHECKPOINT_DIR / "last.ckpt",
        out_dir / LOG_DIR / "metrics.csv",
    ):
        stale.unlink(missing_ok=True)


def _is_rank_zero() -> bool:
    """Rank from the launcher's environment (``Trainer.is_global_zero`` is only right once fit starts)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _log_before_checkpoint(metrics_csv: Path, ckpt_path: str) -> Any:
    """Rows of the interrupted run's CSV log up to the checkpoint being resumed (None if no log)."""
    import pandas as pd

    if not metrics_csv.is_file():
        return None
    step = int(_checkpoint_entry(ckpt_path, "global_step", 0))
    frame = pd.read_csv(metrics_csv)
    return frame[frame["step"] < step] if "step" in frame else None


def _prepend_log(metrics_csv: Path, earlier: Any) -> None:
    import pandas as pd

    from tumorseg.data.manifest import atomic_write_text

    later = pd.read_csv(metrics_csv) if metrics_csv.is_file() else pd.DataFrame()
    merged = pd.concat([earlier, later], ignore_index=True)
    atomic_write_text(metrics_csv, merged.to_csv(index=False))


def _checkpoint_entry(ckpt_path: str, key: str, default: Any = None) -> Any:
    import torch

    return torch.load(ckpt_path, map_location="cpu", weights_only=False).get(key, default)


def _log_run_provenance(mlflow_logger: Any, cfg: TrainingConfig) -> None:
    """Flattened params, system info, git commit and the data's DVC hash, at the start of a run."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    from tumorseg import tracking

    run_id = mlflow_logger.run_id
    client = mlflow_logger.experiment
    mlflow_logger.log_hyperparams(tracking.flatten(cfg.to_dict()))
    data = tracking.data_version(cfg.paths.preprocessed)
    tags = {f"system.{k}": v for k, v in tracking.system_info().items()}
    tags.update({f"data.{k}": v for k, v in data.items()})
    commit = tracking.git_commit()
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    mlflow_logger.log_hyperparams({"data.md5": data["data_md5"], "git.commit": commit or "none"})


def write_config_and_curves(out_dir: Path, config: dict[str, Any], metrics_csv: Path) -> list[Path]:
    """``config.yaml`` and, once there is a CSV log, ``learning_curves.png``; returns them and the log."""
    from tumorseg.data.manifest import atomic_write_text
    from tumorseg.training.reporting import plot_learning_curves

    config_file = out_dir / "config.yaml"
    atomic_write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    if not metrics_csv.is_file():
        return [config_file]
    return [config_file, metrics_csv, plot_learning_curves(metrics_csv, out_dir / "learning_curves.png")]


def _finish_run(
    cfg: TrainingConfig,
    result: TrainResult,
    metrics_csv: Path,
    params: dict[str, Any],
    source: str,
    tracking_uri: str | None,
) -> None:
    """Rank-0 epilogue: config, plots, overlays, test scores, metrics JSON, MLflow artefacts and model."""
    from tumorseg.data.manifest import atomic_write_text
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.training.scoring import score_split, write_split_metrics

    artefacts = write_config_and_curves(result.out_dir, cfg.to_dict(), metrics_csv)
    trained = load_trained_network(result.best_checkpoint) if result.best_checkpoint else None
    overlays = _write_overlays(cfg, trained, result.out_dir) if trained is not None else []
    if trained is not None and cfg.train.score_test:
        from tumorseg.data.datamodule import read_split

        if read_split(cfg.paths.split).get("test"):
            result.test_dice = score_split(trained, "test", params=params, source=source)
            write_split_metrics(result.test_dice, cfg.paths.reports, "test")
        else:
            log.warning("%s has no test cases; reports/metrics.json not written", cfg.paths.split)

    # numbers only: DVC shows this file as metrics (`dvc metrics show`, `dvc exp show`)
    summary = {
        "best_val_dice": result.best_val_dice,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "global_step": result.global_step,
        "train_time_s": round(result.train_time_s, 1),
        "patches_per_s": round(result.patches_per_s, 2),
    }
    train_metrics = Path(cfg.paths.reports) / TRAIN_METRICS_FILE
    atomic_write_text(train_metrics, _json(summary))
    artefacts.append(train_metrics)

    if result.mlflow_run_id is not None and tracking_uri is not None:
        _log_run_artefacts(cfg, result, tracking_uri, artefacts, overlays, trained)


def _write_overlays(cfg: TrainingConfig, trained: Any, out_dir: Path) -> list[Path]:
    """``overlays/<case_id>.png`` of the first ``mlflow.overlays`` validation cases."""
    from tumorseg.data.datamodule import case_records, read_split
    from tumorseg.training.reporting import plot_overlay
    from tumorseg.training.scoring import predict_cases

    if cfg.mlflow.overlays <= 0:
        return []
    split = read_split(cfg.paths.split)
    records = case_records(cfg.paths.preprocessed, split["val"])[: cfg.mlflow.overlays]
    return [
        plot_overlay(
            case["image"],
            case["label"][0],
            pred,
            out_dir / "overlays" / f"{record['case_id']}.png",
            title=record["case_id"],
            label_set=trained.label_set,
        )
        for record, case, pred in predict_cases(trained, records)
    ]


def _log_run_artefacts(
    cfg: TrainingConfig,
    result: TrainResult,
    uri: str,
    artefacts: list[Path],
    overlays: list[Path],
    trained: Any,
) -> None:
    """Artefacts, final metrics and the best network as an MLflow PyTorch model."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from tumorseg import tracking

    client = mlflow.MlflowClient(uri)
    run_id = result.mlflow_run_id
    for path in artefacts:
        client.log_artifact(run_id, str(path))
    for path in overlays:
        client.log_artifact(run_id, str(path), artifact_path="overlays")
    final = {f"best_val_dice_{k}": v for k, v in result.best_val_dice.items() if not math.isnan(v)}
    final["train_time_s"] = result.train_time_s
    final["train_patches_per_s_total"] = result.patches_per_s
    for key, value in (result.test_dice or {}).items():
        if key.startswith("dice_") and not math.isnan(value):
            final[f"test_{key}"] = value
    for key, value in final.items():
        client.log_metric(run_id, key, float(value))
    if trained is None or not cfg.mlflow.log_model:
        return
    dims = (-1,) * trained.data_loader.spatial_dims
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 4, *dims), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, trained.model.out_channels, *dims), "logits")]),
    )
    with tracking.fluent_store(uri), mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            trained.network,
            name="model",
            pip_requirements=tracking.model_pip_requirements(),
            signature=signature,
            serialization_format="pickle",  # "pt2" would need torch.export of every MONAI network
        )


def _json(data: Any) -> str:
    import json

    def clean(value: Any) -> Any:
        if isinstance(value, float):
            return None if math.isnan(value) else round(value, 6)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return value

    return json.dumps(clean(data), indent=2) + "\n"
