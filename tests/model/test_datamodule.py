"""The DataModule: out-of-core patches, foreground oversampling, 2-D slices, DDP shards, whole-volume validation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny_data import tiny_overrides

from tumorseg.config import apply_overrides
from tumorseg.data.datamodule import SegmentationDataModule, case_records, read_split, smallest_shape
from tumorseg.errors import DataError
from tumorseg.training.config import load_training_config


def _datamodule(
    root: Path, params: dict[str, Any], patches: int = 16, **extra: Any
) -> SegmentationDataModule:
    cfg = load_training_config(apply_overrides(params, tiny_overrides(root, **extra)))
    split = read_split(root / "split.json")
    dm = SegmentationDataModule(
        case_records(root / "preprocessed", split["train"]),
        case_records(root / "preprocessed", split["val"]),
        cfg.data_loader,
        cfg.augment,
        patches_per_epoch=patches,
        seed=0,
    )
    dm.setup("fit")
    return dm


def test_train_batches_are_plain_float_patches_with_canonical_labels(
    tiny_dataset: Path, real_params: dict
) -> None:
    dm = _datamodule(tiny_dataset, real_params)
    batches = list(dm.train_dataloader())
    assert len(batches) == 16 // 2  # patches_per_epoch / batch_size: fixed-length epochs
    batch = batches[0]
    assert batch["image"].shape == (2, 4, 16, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (2, 1, 16, 16, 16) and batch["label"].dtype == torch.uint8
    assert type(batch["image"]) is torch.Tensor  # no MetaTensor overhead in the network
    assert set(torch.unique(torch.cat([b["label"] for b in batches])).tolist()) <= {0, 1, 2, 3}


def test_foreground_fraction_controls_tumour_centred_patches(tiny_dataset: Path, real_params: dict) -> None:
    no_aug = {"augment.flip_prob": 0.0, "augment.affine_prob": 0.0}

    def tumour_share(fraction: float) -> float:
        dm = _datamodule(
            tiny_dataset, real_params, patches=60, **{"data_loader.foreground_fraction": fraction}, **no_aug
        )
        labels = torch.cat([b["label"] for b in dm.train_dataloader()])
        centre = labels[:, 0, 8, 8, 8]  # patch centre (16^3 patch, even size: one of the middle voxels)
        near_centre = labels[:, 0, 7:10, 7:10, 7:10].flatten(1)
        return float(((centre > 0) | (near_centre > 0).any(1)).float().mean())

    # 5 of 6 training cases have a tumour: with fraction 1 nearly every patch is centred on one
    assert tumour_share(1.0) > 0.75
    assert tumour_share(0.0) < 0.5


def test_label_classes_sampler_reaches_the_rare_labels(tiny_dataset: Path, real_params: dict) -> None:
    dm = _datamodule(
        tiny_dataset,
        real_params,
        patches=40,
        **{"data_loader.sampler": "label_classes", "data_loader.class_ratios": [0.1, 0, 0, 1]},
    )
    labels = torch.cat([b["label"] for b in dm.train_dataloader()])
    # 5 of 6 cases have ET and ~91 % of their patches are centred on it (ET is ~6 % of the brain)
    assert (labels == 3).flatten(1).any(1).float().mean() > 0.6


def test_2d_mode_yields_axial_slices(tiny_dataset: Path, real_params: dict) -> None:
    dm = _datamodule(tiny_dataset, real_params, **{"data_loader.mode": "2d", "data_loader.batch_size": 4})
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 4, 16, 16)
    assert batch["label"].shape == (4, 1, 16, 16)


def test_validation_yields_whole_volumes_with_their_index(tiny_dataset: Path, real_params: dict) -> None:
    dm = _datamodule(tiny_dataset, real_params)
    batches = list(dm.val_dataloader())
    assert [int(b["case_index"]) for b in batches] == [0, 1]
    for batch, record in zip(batches, dm.val_records, strict=True):
        with np.load(record["path"]) as npz:
            assert batch["image"].shape == (1, *npz["image"].shape)
            assert torch.equal(batch["label"][0, 0], torch.from_numpy(npz["label"]))


def test_augmentation_changes_patches_but_is_seeded(tiny_dataset: Path, real_params: dict) -> None:
    def first_images() -> torch.Tensor:
        torch.manual_seed(0)
        return next(iter(_datamodule(tiny_dataset, real_params).train_dataloader()))["image"]

    assert torch.equal(first_images(), first_images())


def test_missing_case_and_split_files_are_data_errors(tiny_dataset: Path) -> None:
    with pytest.raises(DataError, match="no split file"):
        read_split(tiny_dataset / "nope.json")
    from tumorseg.data.datamodule import read_planar_split

    listed = tiny_dataset / "listed.json"
    listed.write_text("[1, 2]")
    for reader in (read_split, read_planar_split):  # one line, no traceback, for 3-D and 2-D splits
        with pytest.raises(DataError, match=r"listed\.json: expected an object of split name -> case ids"):
            reader(listed)
    listed.write_text("{")
    with pytest.raises(DataError, match=r"listed\.json: not a readable split JSON \(JSONDecodeError\)"):
        read_planar_split(listed)
    listed.unlink()
    with pytest.raises(DataError, match=r"Ghost\.npz: missing preprocessed case"):
        case_records(tiny_dataset / "preprocessed", ["Ghost"])
    split = json.loads((tiny_dataset / "split.json").read_text())
    shapes = smallest_shape(case_records(tiny_dataset / "preprocessed", split["train"]))
    assert all(32 <= s <= 34 for s in shapes)


def test_worker_processes_draw_different_patches(tiny_dataset: Path, real_params: dict) -> None:
    dm = _datamodule(tiny_dataset, real_params, patches=8, **{"data_loader.num_workers": 2})
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    images = torch.cat([b["image"] for b in batches])
    # MONAI's worker_init_fn reseeds each worker's transforms: no two patches are identical
    flat = images.flatten(1)
    # (whole patches: a corner of a background-centred patch can be all zeros in two workers)
    assert len({row.numpy().tobytes() for row in flat}) == len(flat)


def test_a_ddp_rank_opens_only_its_shard_of_the_training_cases(tiny_dataset: Path, real_params: dict) -> None:
    from types import SimpleNamespace

    cfg = load_training_config(apply_overrides(real_params, tiny_overrides(tiny_dataset)))
    split = read_split(tiny_dataset / "split.json")
    train = case_records(tiny_dataset / "preprocessed", split["train"])
    dm = SegmentationDataModule(
        train,
        case_records(tiny_dataset / "preprocessed", split["val"]),
        cfg.data_loader,
        cfg.augment,
        patches_per_epoch=8,
    )
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)
    for record in train[0::2]:  # rank 0's shard: rank 1 must never open these files
        Path(record["path"]).unlink()
    dm.setup("fit")
    assert [str(r.path) for r in dm.train_set.readers] == [r["path"] for r in train[1::2]]
    assert len(dm.train_set) == 8  # the distributed sampler hands each rank half of the epoch
    assert dm.train_set[0]["image"].shape == (4, 16, 16, 16)


def test_cache_budget_holds_what_it_says_and_nothing_more(tiny_dataset: Path, real_params: dict) -> None:
    everything = _datamodule(tiny_dataset, real_params, **{"data_loader.cache_mb": 1024})
    assert all(reader.cached for reader in everything.train_set.readers)
    nothing = _datamodule(tiny_dataset, real_params)
    assert not any(reader.cached for reader in nothing.train_set.readers)
    # validation streams: a case is read when asked for, nothing was kept from setup
    Path(nothing.val_records[1]["path"]).unlink()
    assert nothing.val_set[0]["image"].shape[0] == 4
    with pytest.raises(FileNotFoundError):
        nothing.val_set[1]


def test_ddp_ranks_draw_different_patches(tiny_dataset: Path, real_params: dict) -> None:
    from types import SimpleNamespace

    cfg = load_training_config(apply_overrides(real_params, tiny_overrides(tiny_dataset)))
    split = read_split(tiny_dataset / "split.json")
    train = case_records(tiny_dataset / "preprocessed", split["train"])
    first: dict[int, torch.Tensor] = {}
    for rank in (0, 1):
        dm = SegmentationDataModule(
            [train[0]] * 2, [], cfg.data_loader, cfg.augment, patches_per_epoch=8, seed=0
        )  # both ranks' shards hold the same case: only the seed can tell their draws apart
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        dm.setup("fit")
        torch.manual_seed(0)  # what seed_everything does on every rank
        first[rank] = next(iter(dm.train_dataloader()))["image"]
    assert not torch.equal(first[0], first[1])
