"""Training throughput: our DataModule + LightningModule against a minimal PyTorch/MONAI loop.

Both sides train the same network (same factory, same seed, so the same initial weights),
on the same cases through the same patch reader and MONAI transforms, batch size, loss,
optimiser, LR schedule and precision. The plain loop is what one would write by hand: a
``DataLoader`` over the patch dataset and ``zero_grad / forward / backward / step``.

Timing starts after ``BenchTrainingSettings.warmup_steps`` steps (first-call allocations and
worker start-up are excluded) and covers ``BenchTrainingSettings.steps`` steps, data
loading included. Measurements come in ``repeats`` pairs, alternating which loop goes first,
and medians are reported, because the machines are shared and noisy.

Returns ``{"plain_patches_per_s", "lightning_patches_per_s", "ratio", ...}``; the target is
``ratio >= 0.9`` (Lightning overhead under 10 %). The same figures per CPU second of the process
(``cpu_ratio``) are reported too: on a machine shared with other jobs, wall-clock throughput
swings several-fold between measurements while CPU time barely moves.
"""

from __future__ import annotations

import itertools
import logging
import statistics
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tumorseg.config import apply_overrides
from tumorseg.training.config import TrainingConfig, load_training_config

log = logging.getLogger(__name__)


class BenchTrainingSettings(BaseModel):
    """How the two loops are timed (the benchmark's own settings, not the project's params).

    Attributes:
        steps: timed optimiser steps per measurement.
        warmup_steps: untimed steps before each measurement.
        repeats: measurement pairs (which loop goes first alternates); medians are reported.
        num_threads: torch CPU threads for both loops (0: ``trainer.num_threads``). One thread keeps
            the comparison stable on a machine shared with other jobs, where two OpenMP threads
            stall whenever either is descheduled.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(30, ge=1)
    warmup_steps: int = Field(5, ge=0)
    repeats: int = Field(4, ge=1)
    num_threads: int = Field(1, ge=0)


def _autocast(precision: str) -> Any:
    import contextlib

    import torch

    if precision.startswith("bf16"):
        return torch.autocast("cpu" if not torch.cuda.is_available() else "cuda", dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _build(cfg: TrainingConfig) -> tuple[Any, Any]:
    """Network and loss, seeded so both sides start from identical weights."""
    import lightning as L

    from tumorseg.models.losses import build_loss
    from tumorseg.models.networks import build_network

    L.seed_everything(cfg.train.seed, verbose=False)
    network = build_network(
        cfg.model,
        spatial_dims=cfg.data_loader.spatial_dims,
        patch_size=cfg.data_loader.network_patch,
        spacing=cfg.preprocess.target_spacing_mm,
    )
    return network, build_loss(cfg.loss, cfg.model.output)


def plain_loop_throughput(
    cfg: TrainingConfig, records: list[dict[str, Any]], steps: int, warmup: int
) -> tuple[float, float]:
    """Patches per wall-clock second and per CPU second of a hand-written loop.

    The loop is the same patch dataset (:class:`~tumorseg.data.datamodule.PatchDataset`) + a MONAI
    DataLoader feeding ``zero_grad / forward / backward / step``: only the Lightning machinery differs.
    """
    from monai.data import DataLoader

    from tumorseg.data.datamodule import PatchDataset
    from tumorseg.data.transforms import train_transforms
    from tumorseg.models.inference import labels_to_regions
    from tumorseg.training.optim import make_optimizer, make_scheduler

    loader_cfg = cfg.data_loader
    network, loss_fn = _build(cfg)
    dataset = PatchDataset(
        [record["path"] for record in records],
        loader_cfg,
        train_transforms(loader_cfg, cfg.augment),
        length=len(records),
        cache_bytes=loader_cfg.cache_mb << 20,
    )
    dataset.set_random_state(seed=cfg.train.seed)
    loader = DataLoader(
        dataset,
        batch_size=loader_cfg.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=loader_cfg.num_workers,
        persistent_workers=loader_cfg.num_workers > 0,
    )
    optimizer = make_optimizer(network.parameters(), cfg.train)
    total = warmup + steps
    schedule = make_scheduler(optimizer, total, cfg.train)
    scheduler = schedule["scheduler"] if schedule and schedule.get("interval") == "step" else None
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    network.train()
    started = cpu_started = 0.0
    for step in range(total):
        batch = next(batches)
        image, label = batch["image"], batch["label"]
        target = labels_to_regions(label) if cfg.model.output == "regions" else label
        optimizer.zero_grad(set_to_none=True)
        with _autocast(cfg.trainer.precision):
            logits = network(image)
        loss = loss_fn(logits.float(), target)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step == warmup - 1 or (warmup == 0 and step == 0):
            started, cpu_started = time.perf_counter(), time.process_time()
    patches = (steps if warmup > 0 else steps - 1) * loader_cfg.batch_size
    return patches / (time.perf_counter() - started), patches / (time.process_time() - cpu_started)


def lightning_throughput(
    cfg: TrainingConfig,
    train_records: list[dict[str, Any]],
    val_records: list[dict[str, Any]],
    steps: int,
    warmup: int,
) -> tuple[float, float]:
    """Patches per wall-clock and per CPU second of our LightningModule + DataModule under ``Trainer``."""
    import lightning as L

    from tumorseg.data.datamodule import SegmentationDataModule
    from tumorseg.models.lightning_module import SegmentationModule
    from tumorseg.training.optim import optimizer_factory, scheduler_factory

    class StepClock(L.Callback):
        def __init__(self) -> None:
            self.started = self.ended = self.cpu_started = self.cpu_ended = 0.0

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            if trainer.global_step == max(warmup, 1):
                self.started, self.cpu_started = time.perf_counter(), time.process_time()
            self.ended, self.cpu_ended = time.perf_counter(), time.process_time()

    network, loss_fn = _build(cfg)
    module = SegmentationModule(
        network,
        loss_fn,
        output=cfg.model.output,
        roi_size=cfg.data_loader.network_patch,
        sliding_window=cfg.sliding_window,
        optimizer_factory=optimizer_factory(cfg.train),
        scheduler_factory=scheduler_factory(cfg.train),
        config=cfg.to_dict(),
    )
    total = warmup + steps
    datamodule = SegmentationDataModule(
        train_records,
        val_records,
        cfg.data_loader,
        cfg.augment,
        patches_per_epoch=total * cfg.data_loader.batch_size,
        seed=cfg.train.seed,
    )
    clock = StepClock()
    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=total,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=datamodule)
    patches = (steps if warmup > 0 else steps - 1) * cfg.data_loader.batch_size
    return patches / (clock.ended - clock.started), patches / (clock.cpu_ended - clock.cpu_started)


def benchmark_training(
    params: dict[str, Any],
    *,
    settings: BenchTrainingSettings | None = None,
    overrides: dict[str, Any] | None = None,
    source: str = "params.yaml",
) -> dict[str, Any]:
    """Measure both loops in this process and return their throughputs and ratio.

    Args:
        params: params.yaml dict (the ``data_loader``, ``model``, ``loss``, ``train`` and ``trainer``
            sections are used; training data from ``paths``).
        settings: steps, warm-up, repeats and threads of the measurement (defaults when None).
        overrides: dotted-key overrides of ``params``.
        source: params file name for error messages.

    Returns:
        ``{"plain_patches_per_s", "lightning_patches_per_s", "ratio", "plain_patches_per_cpu_s",
        "lightning_patches_per_cpu_s", "cpu_ratio", "plain_runs", "lightning_runs", "steps",
        "warmup_steps", "batch_size", "patch_size", "network", "precision"}``.
    """
    from tumorseg.training.train import split_records

    params = apply_overrides(params, overrides)
    cfg = load_training_config(params, source=source)
    bench = settings or BenchTrainingSettings()
    train_records, val_records = split_records(cfg, source)
    threads = bench.num_threads or cfg.trainer.num_threads
    if threads:
        import torch

        torch.set_num_threads(threads)
    plain_runs: list[tuple[float, float]] = []
    lightning_runs: list[tuple[float, float]] = []
    for repeat in range(bench.repeats):
        # alternate which loop goes first, so neither always inherits the other's warm caches
        plain_first = repeat % 2 == 0
        if plain_first:
            plain_runs.append(plain_loop_throughput(cfg, train_records, bench.steps, bench.warmup_steps))
        lightning_runs.append(
            lightning_throughput(cfg, train_records, val_records, bench.steps, bench.warmup_steps)
        )
        if not plain_first:
            plain_runs.append(plain_loop_throughput(cfg, train_records, bench.steps, bench.warmup_steps))
        log.info(
            "bench repeat %d: plain %.2f, lightning %.2f patches/s (per CPU second: %.2f, %.2f)",
            repeat,
            plain_runs[-1][0],
            lightning_runs[-1][0],
            plain_runs[-1][1],
            lightning_runs[-1][1],
        )
    plain = statistics.median(wall for wall, _ in plain_runs)
    ours = statistics.median(wall for wall, _ in lightning_runs)
    plain_cpu = statistics.median(cpu for _, cpu in plain_runs)
    ours_cpu = statistics.median(cpu for _, cpu in lightning_runs)
    return {
        "plain_patches_per_s": round(plain, 3),
        "lightning_patches_per_s": round(ours, 3),
        "ratio": round(ours / plain, 4),
        # per CPU second of this process: far less sensitive to other processes on a shared machine
        "plain_patches_per_cpu_s": round(plain_cpu, 3),
        "lightning_patches_per_cpu_s": round(ours_cpu, 3),
        "cpu_ratio": round(ours_cpu / plain_cpu, 4),
        "plain_runs": [round(wall, 3) for wall, _ in plain_runs],
        "lightning_runs": [round(wall, 3) for wall, _ in lightning_runs],
        "steps": bench.steps,
        "warmup_steps": bench.warmup_steps,
        "batch_size": cfg.data_loader.batch_size,
        "patch_size": list(cfg.data_loader.network_patch),
        "network": cfg.model.name,
        "precision": cfg.trainer.precision,
        "threads": threads or None,
    }
