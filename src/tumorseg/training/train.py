"""``train()``: the one training entry point (CLI ``tumorseg train [--dims 2]``, DVC, Prefect, tests).

Volumes (``dims=3``: ``model:``, ``train:``) or images (``dims=2``: the segmenter + classifier of
``model_2d:``, ``train_2d:``). Params and data are checked first (one-line ConfigError/DataError);
rank 0 writes, under ``out_dir``: ``checkpoints/best.ckpt`` (best validation mean Dice, what later
stages load), ``checkpoints/last.ckpt`` (for resuming), ``logs/metrics.csv``, ``config.yaml``,
``learning_curves.png`` and, 3-D only, ``overlays/<case_id>.png``, test scores and the MLflow model.
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
from tumorseg.errors import ConfigError, DataError, disk_full, first_line, is_disk_full
from tumorseg.params import as_params
from tumorseg.runtime import resolve_precision
from tumorseg.training.config import (
    PlanarTrainingConfig,
    TrainingConfig,
    load_planar_training_config,
    load_training_config,
)

log = logging.getLogger(__name__)

TRAIN_METRICS_FILE = "train_metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"

Records = dict[str, list[dict[str, Any]]]


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

    def set_best(self, row: Any) -> None:
        """Per-region validation Dice of the CSV log's best row (a pandas Series), mean last."""
        names = [str(k).removeprefix("val_dice_") for k in row.index if str(k).startswith("val_dice_")]
        names = [n for n in names if n != "mean"] + ["mean"]
        self.best_val_dice = {name: float(row[f"val_dice_{name}"]) for name in names}
        self.best_epoch = int(row["epoch"])

    def summary(self) -> dict[str, Any]:
        """``train_metrics.json``: numbers only, DVC shows it as metrics (``dvc metrics show``)."""
        progress = {k: getattr(self, k) for k in ("best_epoch", "epochs", "global_step")}
        timing = {"train_time_s": round(self.train_time_s, 1), "patches_per_s": round(self.patches_per_s, 2)}
        return {"best_val_dice": self.best_val_dice, **progress, **timing}

    def final_metrics(self) -> dict[str, float]:
        """Run-level MLflow metrics logged after training."""
        final = {f"best_val_dice_{k}": v for k, v in self.best_val_dice.items() if not math.isnan(v)}
        final["train_time_s"] = self.train_time_s
        final["train_patches_per_s_total"] = self.patches_per_s
        for key, value in (self.test_dice or {}).items():
            if key.startswith("dice_") and not math.isnan(value):
                final[f"test_{key}"] = value
        return final


@dataclass
class PlanarTrainResult(TrainResult):
    """What a 2-D training run produced: ``best_val`` holds ``val_dice_mean``, ``val_detect_auc`` and
    ``val_type_accuracy`` (where defined) at the best epoch; ``n_train``, ``n_val`` count images."""

    best_val: dict[str, float] = field(default_factory=dict)
    n_train: int = 0
    n_val: int = 0

    def one_line(self) -> str:
        scores = ", ".join(f"{k.removeprefix('val_')} {v:.3f}" for k, v in self.best_val.items())
        return (
            f"trained 2-D models {self.epochs} epochs ({self.global_step} steps, {self.train_time_s:.0f} s) on "
            f"{self.n_train} images; best val {scores or 'n/a'} -> {self.best_checkpoint}"
        )

    def set_best(self, row: Any) -> None:
        keys = ("val_dice_mean", "val_detect_auc", "val_type_accuracy")
        self.best_val = {k: float(row[k]) for k in keys if k in row and not math.isnan(float(row[k]))}
        self.best_epoch = int(row["epoch"])

    def summary(self) -> dict[str, Any]:
        summary = {"best_val": self.best_val, **super().summary()}
        del summary["best_val_dice"], summary["patches_per_s"]
        return {**summary, "n_train": self.n_train, "n_val": self.n_val}

    def final_metrics(self) -> dict[str, float]:
        return {"train_time_s": self.train_time_s, **{f"best_{k}": v for k, v in self.best_val.items()}}


class _Volumes:
    """``dims=3``: the sections of :func:`load_training_config`, volumes, DDP-capable."""

    patch_throughput = True

    def prepare(self, params: dict[str, Any], source: str) -> tuple[TrainingConfig, Records]:
        """The config, ``model.label_set`` taken from the data (the output channels follow it), and records."""
        from tumorseg.data.datamodule import dataset_label_set

        cfg = load_training_config(params, source=source)
        train_records, val_records = split_records(cfg, source)
        check_patch_fits(cfg, train_records, source)
        data = cfg.paths.preprocessed
        label_set = dataset_label_set(data)
        if label_set.name != cfg.model.label_set:
            names = label_set.region_names if cfg.model.output == "regions" else label_set.label_names
            log.info("label set %s (from %s): output channels %s", label_set.name, data, ", ".join(names))
        cfg = dataclasses.replace(cfg, model=cfg.model.model_copy(update={"label_set": label_set.name}))
        return cfg, {"train": train_records, "val": val_records}

    parent: Any = None
    """The :class:`~tumorseg.training.transfer.Parent` of a run with ``train.init_from``."""

    def with_parent(self, cfg: TrainingConfig, tracking_uri: str | None, source: str) -> TrainingConfig:
        """Load ``train.init_from`` and train its network: its ``model:`` section, this data's label set."""
        from tumorseg import tracking
        from tumorseg.training.transfer import load_parent

        uri = tracking.resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns)
        self.parent = load_parent(cfg.train.init_from, uri)
        model = self.parent.model_config.model_copy(update={"label_set": cfg.model.label_set})
        if model != cfg.model:
            log.info("init_from: training the parent's network (%s), not model: in %s", model.name, source)
        return dataclasses.replace(cfg, model=model)

    def module_and_data(self, cfg: TrainingConfig, records: Records) -> tuple[Any, Any]:
        """The LightningModule (network by name and its loss) and the DataModule of the split."""
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
        lr_scales = self._start_from_parent(network, cfg) if self.parent is not None else None
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
            channels_last=cfg.trainer.channels_last and loader.spatial_dims == 3,
            lr_scales=lr_scales,
        )
        datamodule = SegmentationDataModule(
            records["train"],
            records["val"],
            loader,
            cfg.augment,
            patches_per_epoch=cfg.train.steps_per_epoch * loader.batch_size,
            seed=cfg.train.seed,
        )
        return module, datamodule

    def _start_from_parent(self, network: Any, cfg: TrainingConfig) -> dict[str, float]:
        """Copy the parent's weights into ``network``, freeze its first encoder levels; the learning-rate
        factors of the other encoder parameters."""
        from tumorseg.data.conventions import CANONICAL_MODALITIES
        from tumorseg.training.transfer import encoder_levels, freeze_levels, transfer_weights

        log.info(transfer_weights(network, self.parent.network).one_line(self.parent))
        train = cfg.train
        if not train.freeze_encoder_stages and train.encoder_lr_scale == 1.0:
            return {}
        levels = encoder_levels(network, cfg.data_loader.network_patch, len(CANONICAL_MODALITIES))
        freeze_levels(network, levels, train.freeze_encoder_stages)
        trainable = {n for n, p in network.named_parameters() if p.requires_grad}
        return {name: train.encoder_lr_scale for name in levels if name in trainable}

    def result(self, out_dir: Path, records: Records) -> TrainResult:
        return TrainResult(out_dir=out_dir)

    def experiment(self, cfg: TrainingConfig) -> str:
        return cfg.mlflow.experiment

    def trainer_args(self, cfg: TrainingConfig) -> dict[str, Any]:
        args = cfg.trainer.model_dump(exclude={"num_threads", "channels_last"})
        return {**args, "precision": resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)}

    def provenance(self, cfg: TrainingConfig) -> tuple[dict[str, str], dict[str, str]]:
        """MLflow ``(tags, params)``: system info, the data's DVC hash and the git commit."""
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

        from tumorseg import tracking

        data = tracking.data_version(cfg.paths.preprocessed)
        tags = {f"system.{k}": v for k, v in tracking.system_info().items()}
        tags.update({f"data.{k}": v for k, v in data.items()})
        if self.parent is not None:
            from tumorseg.tracking import PARENT_TAG

            tags[PARENT_TAG] = self.parent.description[:5000]
        commit = tracking.git_commit()
        if commit:
            tags[MLFLOW_GIT_COMMIT] = commit
        return tags, {"data.md5": data["data_md5"], "git.commit": commit or "none"}

    def evaluate(
        self, cfg: TrainingConfig, result: TrainResult, params: dict[str, Any], source: str
    ) -> tuple[Any, list[Path]]:
        """The best network, ``overlays/<case_id>.png`` of the first ``mlflow.overlays`` validation
        cases and (``train.score_test``) the test scores."""
        from tumorseg.data.datamodule import case_records, read_split
        from tumorseg.models.checkpoint import load_trained_network
        from tumorseg.training.reporting import plot_overlay
        from tumorseg.training.scoring import predict_cases, score_split, write_split_metrics

        if result.best_checkpoint is None:
            return None, []
        trained = load_trained_network(result.best_checkpoint)
        split = read_split(cfg.paths.split)
        records = case_records(cfg.paths.preprocessed, split["val"])[: cfg.mlflow.overlays]
        overlays = [
            plot_overlay(
                case["image"],
                case["label"][0],
                pred,
                result.out_dir / "overlays" / f"{record['case_id']}.png",
                title=record["case_id"],
                label_set=trained.label_set,
            )
            for record, case, pred in predict_cases(trained, records)
        ]
        if cfg.train.score_test:
            if split.get("test"):
                result.test_dice = score_split(trained, "test", params=params, source=source)
                write_split_metrics(result.test_dice, cfg.paths.reports, "test")
            else:
                log.warning("%s has no test cases; reports/metrics.json not written", cfg.paths.split)
        return trained, overlays


class _Images(_Volumes):
    """``dims=2``: the sections of :func:`load_planar_training_config`, images, one device."""

    def with_parent(self, cfg: Any, tracking_uri: str | None, source: str) -> Any:
        from tumorseg.errors import ConfigError

        raise ConfigError(
            f"{source}: train.init_from starts a 3-D model from another; the 2-D segmenter and classifier "
            "train from scratch (--dims 2 without --init-from)"
        )

    patch_throughput = False  # the throughput callback counts 3-D patches; 2-D reports wall time

    def prepare(self, params: dict[str, Any], source: str) -> tuple[PlanarTrainingConfig, Records]:
        cfg = load_planar_training_config(params, source=source)
        return cfg, planar_split_records(cfg, source)

    def module_and_data(self, cfg: PlanarTrainingConfig, records: Records) -> tuple[Any, Any]:
        """The LightningModule (segmenter + classifier heads, multi-task loss) and the DataModule."""
        from tumorseg.data.datamodule import PlanarDataModule
        from tumorseg.models.lightning_module import ClassifierHeads, SegmentationModule
        from tumorseg.models.losses import build_loss
        from tumorseg.models.planar_network import build_planar_network
        from tumorseg.training.optim import optimizer_factory, scheduler_factory

        train_cfg = cfg.train
        module = SegmentationModule(
            build_planar_network(cfg.model),
            build_loss(train_cfg.loss, "regions"),  # one tumour channel: the sigmoid form of the loss
            optimizer_factory=optimizer_factory(train_cfg),
            scheduler_factory=scheduler_factory(train_cfg),
            config=cfg.to_dict(),
            dice_ignore_empty=train_cfg.dice_ignore_empty,
            heads=ClassifierHeads(train_cfg.detection_weight, train_cfg.type_weight),
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

    def result(self, out_dir: Path, records: Records) -> PlanarTrainResult:
        return PlanarTrainResult(out_dir=out_dir, n_train=len(records["train"]), n_val=len(records["val"]))

    def experiment(self, cfg: PlanarTrainingConfig) -> str:
        return cfg.train.experiment

    def trainer_args(self, cfg: PlanarTrainingConfig) -> dict[str, Any]:
        """A single-device ``Trainer`` (the 2-D branch has no DDP path)."""
        shared = {"accelerator", "deterministic", "gradient_clip_val", "enable_progress_bar"}
        return {
            **cfg.trainer.model_dump(include=shared),
            "precision": resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator),
            "devices": 1,
            "log_every_n_steps": min(cfg.trainer.log_every_n_steps, cfg.train.steps_per_epoch),
        }

    def provenance(self, cfg: PlanarTrainingConfig) -> tuple[dict[str, str], dict[str, str]]:
        """MLflow ``(tags, params)``: the 2-D branch tag, the data's DVC hash and the git commit."""
        from tumorseg import tracking

        tags = {"tumorseg.branch": "2d"}
        tags.update({f"data.{k}": v for k, v in tracking.data_version(cfg.paths.preprocessed).items()})
        tags["mlflow.source.git.commit"] = tracking.git_commit(Path(__file__).resolve().parent) or "none"
        return tags, {}

    def evaluate(self, *args: Any) -> tuple[Any, list[Path]]:
        return None, []


BRANCHES = {3: _Volumes, 2: _Images}
"""What differs between training on volumes and on images, by ``dims``: a new instance per run (a
run's ``init_from`` parent belongs to that run alone)."""


def train(
    params: dict[str, Any],
    *,
    dims: int = 3,
    overrides: dict[str, Any] | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    source: str = "params.yaml",
    tracking_uri: str | None = None,
) -> TrainResult:
    """Train the ``dims``-D networks as params.yaml (plus dotted ``overrides``) describes.

    Args:
        dims: 3 (volumes, :class:`TrainResult`) or 2 (images, :class:`PlanarTrainResult`).
        resume: continue from ``<out_dir>/checkpoints/last.ckpt`` if there is one (same epochs,
            optimiser and scheduler state, same MLflow run); otherwise start afresh.
        callbacks: extra Lightning callbacks (tests use them to interrupt or inspect a run).
        tracking_uri: MLflow store; default ``mlflow.tracking_uri``, ``$MLFLOW_TRACKING_URI``,
            then SQLite under ``paths.mlruns``.

    Raises:
        ConfigError, DataError: bad params, an empty split or (2-D) one without masks, before training.
    """
    params = as_params(params, source)
    branch = BRANCHES[dims]()
    params = apply_overrides(params, overrides)
    cfg, records = branch.prepare(params, source)
    if cfg.train.init_from:
        cfg = branch.with_parent(cfg, tracking_uri, source)

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
    module, datamodule = branch.module_and_data(cfg, records)

    roles = build_callbacks(
        cfg.train, out_dir / CHECKPOINT_DIR, progress_lines=not cfg.trainer.enable_progress_bar
    )
    if not branch.patch_throughput:
        roles.pop("throughput")
    loggers, mlflow_logger, tracking_uri = _loggers(cfg, branch, out_dir, tracking_uri, ckpt_path, module)
    trainer = _make_trainer(cfg, branch, source, [*roles.values(), *callbacks], loggers, out_dir)
    if mlflow_logger is not None and ckpt_path is None and _is_rank_zero():
        _log_run_provenance(mlflow_logger, cfg, branch)

    result = branch.result(out_dir, records)
    _fit(trainer, module, datamodule, ckpt_path, result)
    if not trainer.is_global_zero:
        return result
    if earlier_log is not None:
        _prepend_log(metrics_csv, earlier_log)
    row = best_validation_row(metrics_csv)
    if row is not None:
        result.set_best(row)
    if result.global_step == 0:  # ddp_spawn/ddp_fork: the loops ran in worker processes
        result.epochs, result.global_step = progress_from_log(metrics_csv)
    result.patches_per_s = float(trainer.callback_metrics.get("train_patches_per_s", math.nan))
    _finish_run(cfg, branch, result, metrics_csv, params, source, tracking_uri)
    log.debug(result.one_line())  # the command prints it; Prefect tasks publish it
    return result


def _resume_checkpoint(out_dir: Path, resume: bool) -> str | None:
    """``last.ckpt`` when resuming from one; otherwise None, and the previous run's files are cleared."""
    last = out_dir / CHECKPOINT_DIR / "last.ckpt"
    ckpt_path = str(last) if resume and last.is_file() else None
    if resume and ckpt_path is None:
        log.info("no %s to resume from; starting a new run", last)
    if ckpt_path is None:  # a new run starts clean: old checkpoints would be compared against or resumed
        for stale in (f"{CHECKPOINT_DIR}/best.ckpt", f"{CHECKPOINT_DIR}/last.ckpt", f"{LOG_DIR}/metrics.csv"):
            (out_dir / stale).unlink(missing_ok=True)
    return ckpt_path


def _loggers(
    cfg: Any, branch: _Volumes, out_dir: Path, tracking_uri: str | None, ckpt_path: str | None, module: Any
) -> tuple[list[Any], Any, str | None]:
    """``(loggers, MLflow logger or None, tracking URI)``: the CSV log, plus MLflow (a resumed run
    continues its MLflow run) when tracking is on."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(out_dir), name=LOG_DIR, version="")]
    if not cfg.mlflow.enabled:
        return loggers, None, tracking_uri
    from tumorseg import tracking
    from tumorseg.models.lightning_module import RUN_ID_CHECKPOINT_KEY

    experiment = branch.experiment(cfg)
    uri = tracking.resolve_tracking_uri(tracking_uri or cfg.mlflow.tracking_uri, cfg.paths.mlruns)
    if _is_rank_zero():
        tracking.ensure_experiment(uri, experiment)
        tracking.reap_orphaned_runs(uri, experiment)  # runs of killed processes: FAILED
    mlflow_logger = MLFlowLogger(
        experiment_name=experiment,
        run_name=cfg.mlflow.run_name,
        tracking_uri=uri,
        run_id=_checkpoint_entry(ckpt_path, RUN_ID_CHECKPOINT_KEY) if ckpt_path else None,
        artifact_location=tracking.experiment_artifact_location(uri, experiment),
    )
    module.mlflow_run_id = mlflow_logger.run_id  # creates the run here, before any DDP spawn
    if _is_rank_zero():
        if ckpt_path:  # the killed run it resumes was marked FAILED above: it runs again
            mlflow_logger.experiment.update_run(mlflow_logger.run_id, status="RUNNING")
        tracking.tag_process(mlflow_logger.experiment, mlflow_logger.run_id)
    return [*loggers, mlflow_logger], mlflow_logger, uri


def _make_trainer(
    cfg: Any, branch: _Volumes, source: str, callbacks: list[Any], loggers: list[Any], out_dir: Path
) -> Any:
    """The ``Trainer`` of ``trainer:`` and ``train:``; a setting Lightning rejects is a ConfigError."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(
            **branch.trainer_args(cfg),
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


def _fit(trainer: Any, module: Any, datamodule: Any, ckpt_path: str | None, result: TrainResult) -> None:
    """``Trainer.fit`` (resuming from ``ckpt_path``); ``result`` gets what this process saw of it."""
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except OSError as exc:  # a checkpoint or log write on a full disk: the checkpoint folder is named
        if is_disk_full(exc):
            raise disk_full(exc.filename or result.out_dir / CHECKPOINT_DIR) from None
        raise
    result.train_time_s = time.perf_counter() - started
    best, last = (result.out_dir / CHECKPOINT_DIR / f"{name}.ckpt" for name in ("best", "last"))
    result.best_checkpoint = best if best.is_file() else None
    result.last_checkpoint = last if last.is_file() else None
    result.epochs = int(trainer.current_epoch)
    result.global_step = int(trainer.global_step)
    result.mlflow_run_id = module.mlflow_run_id
    result.global_rank = int(trainer.global_rank)


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


def planar_split_records(cfg: PlanarTrainingConfig, source: str = "params.yaml") -> Records:
    """Records of each 2-D split; DataError naming ``paths.split_2d`` if train or val has no masked image."""
    from tumorseg.data.datamodule import planar_records, read_planar_split

    split = read_planar_split(cfg.paths.split)
    records = {name: planar_records(cfg.paths.preprocessed, ids) for name, ids in split.items()}
    for name in ("train", "val"):
        if not any(r["has_mask"] for r in records[name]):
            raise DataError(
                f"{source}: paths.split_2d: {cfg.paths.split} has no {name!r} images with a tumour mask; the 2-D "
                "segmentation needs masked images (Figshare .mat or generated data) in train and val"
            )
    return records


def check_patch_fits(cfg: TrainingConfig, records: list[dict[str, Any]], source: str) -> None:
    """A training patch must fit inside every training volume (patches are cropped, never padded)."""
    from tumorseg.data.datamodule import smallest_shape

    loader = cfg.data_loader
    smallest = smallest_shape(records)
    if any(p > s for p, s in zip(loader.crop_size, smallest, strict=True)):
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


def _log_run_provenance(mlflow_logger: Any, cfg: Any, branch: _Volumes) -> None:
    """Flattened params, then the branch's provenance tags and params, at the start of a run."""
    from tumorseg import tracking

    mlflow_logger.log_hyperparams(tracking.flatten(cfg.to_dict()))
    tags, params = branch.provenance(cfg)
    # what `precision: auto` became on this machine, and why (the CPU's bfloat16 support)
    tags["tumorseg.precision"] = branch.trainer_args(cfg)["precision"]
    for key, value in tags.items():
        mlflow_logger.experiment.set_tag(mlflow_logger.run_id, key, value)
    if params:
        mlflow_logger.log_hyperparams(params)


def _finish_run(
    cfg: Any,
    branch: _Volumes,
    result: TrainResult,
    metrics_csv: Path,
    params: dict[str, Any],
    source: str,
    uri: str | None,
) -> None:
    """Rank-0 epilogue: config, plots, overlays, test scores, metrics JSON, MLflow artefacts and model."""
    import json

    from tumorseg.data.manifest import atomic_write_text
    from tumorseg.training.reporting import plot_learning_curves
    from tumorseg.training.scoring import json_ready

    artefacts = [result.out_dir / "config.yaml"]
    atomic_write_text(artefacts[0], yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if metrics_csv.is_file():
        artefacts += [metrics_csv, plot_learning_curves(metrics_csv, result.out_dir / "learning_curves.png")]
    trained, overlays = branch.evaluate(cfg, result, params, source)
    train_metrics = Path(cfg.paths.reports) / TRAIN_METRICS_FILE
    atomic_write_text(train_metrics, json.dumps(json_ready(result.summary()), indent=2) + "\n")
    artefacts.append(train_metrics)
    run_id = result.mlflow_run_id
    if run_id is None or uri is None:
        return
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from tumorseg import tracking

    client = mlflow.MlflowClient(uri)
    for path in artefacts:
        client.log_artifact(run_id, str(path))
    for path in overlays:
        client.log_artifact(run_id, str(path), artifact_path="overlays")
    for key, value in result.final_metrics().items():
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
