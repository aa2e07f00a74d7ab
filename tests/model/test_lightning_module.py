"""The LightningModule: whole-volume validation metrics, DDP de-duplication, and that it learns."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from tumorseg.models.config import LossConfig, SlidingWindowConfig
from tumorseg.models.inference import labels_to_regions
from tumorseg.models.lightning_module import SegmentationModule, aggregate_case_dice
from tumorseg.models.losses import build_loss
from tumorseg.models.networks import ModelConfig, build_network
from tumorseg.training.config import TrainConfig
from tumorseg.training.optim import make_optimizer


class RegionOracle(nn.Module):
    """Pretends to be a network: the image's first three channels *are* the WT/TC/ET masks."""

    def __init__(self, drop_et: bool = False) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.drop_et = drop_et

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x[:, :3] * self.scale - 10.0
        if self.drop_et:
            logits[:, 2] = -10.0
        return logits


def _labels(shape: tuple[int, int, int] = (20, 22, 18)) -> torch.Tensor:
    label = torch.zeros(1, 1, *shape, dtype=torch.uint8)
    label[..., 4:14, 5:15, 3:13] = 2
    label[..., 6:12, 7:13, 5:11] = 3
    label[..., 8:10, 9:11, 7:9] = 1
    return label


def _module(network: nn.Module, output: str = "regions", **kwargs: object) -> SegmentationModule:
    return SegmentationModule(
        network,
        build_loss(LossConfig(), output),
        output=output,
        roi_size=(16, 16, 16),
        sliding_window=SlidingWindowConfig(overlap=0.25, sw_batch_size=2, min_component_mm3=0.0),
        optimizer_factory=partial(make_optimizer, cfg=TrainConfig(lr=0.01)),
        **kwargs,
    )


def _validate(module: SegmentationModule, batches: list[dict]) -> dict[str, float]:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.validate(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_validation_scores_whole_volumes_per_region() -> None:
    label = _labels()
    image = torch.cat([labels_to_regions(label), torch.zeros_like(label, dtype=torch.float32)], dim=1)
    batch = {"image": image, "label": label, "case_index": torch.tensor([0])}
    perfect = _validate(_module(RegionOracle()), [batch])
    assert perfect["val_dice_WT"] == pytest.approx(1.0)
    assert perfect["val_dice_TC"] == pytest.approx(1.0)
    assert perfect["val_dice_ET"] == pytest.approx(1.0)
    assert perfect["val_dice_mean"] == pytest.approx(1.0)
    no_et = _validate(_module(RegionOracle(drop_et=True)), [batch])
    assert no_et["val_dice_WT"] == pytest.approx(1.0)
    assert no_et["val_dice_ET"] == pytest.approx(0.0)
    assert no_et["val_dice_mean"] == pytest.approx(2 / 3)
    # predicting ET as absent turns it into NCR inside TC, so TC is still perfect
    assert no_et["val_dice_TC"] == pytest.approx(1.0)


def test_brats_convention_for_empty_regions() -> None:
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.uint8)  # tumour-free case
    image = torch.zeros(1, 4, 16, 16, 16)
    batch = {"image": image, "label": label, "case_index": torch.tensor([0])}
    empty_ok = _validate(_module(RegionOracle()), [batch])
    assert empty_ok["val_dice_mean"] == pytest.approx(1.0)  # nothing predicted, nothing there
    ignored = _validate(_module(RegionOracle(), dice_ignore_empty=True), [batch])
    assert math.isnan(ignored.get("val_dice_mean", float("nan")))


def test_aggregate_counts_each_case_once() -> None:
    dice = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, float("nan")], [1.0, 1.0, 1.0]])
    index = torch.tensor([[0.0], [1.0], [0.0]])  # case 0 padded in twice by a DistributedSampler
    summary = aggregate_case_dice(dice, index)
    assert summary == {"WT": 0.5, "TC": 0.5, "ET": 1.0, "mean": pytest.approx(2 / 3)}


def test_training_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    label = _labels((16, 16, 16))
    image = torch.randn(1, 4, 16, 16, 16) * 0.3
    image[:, 3] += labels_to_regions(label)[:, 0] * 2  # FLAIR-like: whole tumour bright
    image[:, 1] += labels_to_regions(label)[:, 2] * 2  # T1ce-like: enhancing tumour bright
    batch = {"image": image.repeat(2, 1, 1, 1, 1), "label": label.repeat(2, 1, 1, 1, 1)}
    cfg = ModelConfig.model_validate({"unet": {"channels": [8, 16], "strides": [2], "num_res_units": 1}})
    module = _module(build_network(cfg, spatial_dims=3, patch_size=(16, 16, 16)))
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=40,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[Record()],
    )
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 40, batch_size=None))
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5
