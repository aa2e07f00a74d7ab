"""DDP with two CPU processes (gloo): it trains, and validation Dice is synced across ranks.

``ddp_spawn`` starts fresh workers (``ddp_fork`` crashed once torch and the other tests had started threads); the ``ddp`` strategy the CLI
uses launches the same LightningModule through Lightning's subprocess launcher.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from tiny_data import tiny_overrides, write_tiny_dataset

from tumorseg.training.train import train


class RecordValidation(L.Callback):
    """Each rank writes the validation Dice it logged (callback metrics) to its own file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_dice")}
        out = self.folder / f"rank{trainer.global_rank}-epoch{trainer.current_epoch}.json"
        out.write_text(json.dumps(metrics))


def test_ddp_two_cpu_processes_sync_validation_dice(tmp_path: Path, real_params: dict) -> None:
    # 3 validation cases on 2 ranks: the DistributedSampler pads one case in twice.
    write_tiny_dataset(tmp_path, n_val=3)
    records = tmp_path / "records"
    records.mkdir()
    ddp = {"trainer.strategy": "ddp_spawn", "trainer.devices": 2, "train.max_epochs": 2}
    result = train(
        real_params, overrides=tiny_overrides(tmp_path, **ddp), callbacks=[RecordValidation(records)]
    )

    assert result.best_checkpoint is not None and result.best_checkpoint.is_file()
    assert result.epochs == 2 and result.global_step == 4  # 8 patches/epoch over 2 ranks x batch 2
    for epoch in (0, 1):
        rank0 = json.loads((records / f"rank0-epoch{epoch}.json").read_text())
        rank1 = json.loads((records / f"rank1-epoch{epoch}.json").read_text())
        assert set(rank0) == {"val_dice_WT", "val_dice_TC", "val_dice_ET", "val_dice_mean"}
        assert rank0 == rank1

    # Same weights, one process: the synced, de-duplicated DDP Dice equals the single-process Dice.
    frozen = {"train.lr": 1e-12, "train.warmup_epochs": 0, "train.max_epochs": 1}
    two = train(
        real_params,
        overrides=tiny_overrides(tmp_path, **{**ddp, **frozen, "train.out_dir": str(tmp_path / "m2")}),
    )
    one = train(
        real_params, overrides=tiny_overrides(tmp_path, **{**frozen, "train.out_dir": str(tmp_path / "m1")})
    )
    for region in ("WT", "TC", "ET", "mean"):
        assert two.best_val_dice[region] == pytest.approx(one.best_val_dice[region], abs=1e-5)
