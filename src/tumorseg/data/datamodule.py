"""LightningDataModule over preprocessed cases: patches read out of core, whole-volume validation.

Splits come from ``split.json`` (``{"train": [...], "val": [...], "test": [...]}``); each case is
``<preprocessed>/cases/<case_id>.npz`` (layout: :mod:`tumorseg.data.transforms`). An epoch is a
fixed number of patch draws (nnU-Net style), not one patch per case, so validation and
checkpointing do not dominate short runs; each draw reads a fresh random patch out of core.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from monai.transforms import Randomizable
from monai.utils import MAX_SEED
from torch.utils.data import Dataset

from tumorseg.data.case_store import CaseReader, cached_bytes, open_cases
from tumorseg.data.conventions import LabelSet
from tumorseg.data.transforms import (
    CASE_INDEX_KEY,
    IMAGE_KEY,
    LABEL_KEY,
    AugmentConfig,
    DataLoaderConfig,
    load_preprocessed_case,
    train_transforms,
)
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

CASES_DIR = "cases"
INDEX_NAME = "index.csv"


def read_split(split_file: str | Path) -> dict[str, list[str]]:
    """Read ``split.json`` as ``{split name: [case_id, ...]}``."""
    path = Path(split_file)
    if not path.is_file():
        raise DataError(f"{path}: no split file; run `tumorseg split` first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path}: not valid JSON; rerun `tumorseg split`") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object of split name -> case ids")
    return {k: [str(c) for c in v] for k, v in data.items() if isinstance(v, list)}


def _read_index(preprocessed_dir: str | Path) -> Any | None:
    """``index.csv`` as a string table, or None when the dataset has none."""
    import pandas as pd

    index_file = Path(preprocessed_dir) / INDEX_NAME
    return pd.read_csv(index_file, dtype=str, keep_default_na=False) if index_file.is_file() else None


def case_records(preprocessed_dir: str | Path, case_ids: Sequence[str]) -> list[dict[str, Any]]:
    """One record per case: ``{"case_id", "case_index", "path"}``.

    The ``.npz`` path is ``index.csv``'s ``npz`` column (relative to ``preprocessed_dir``) where
    there is one, else ``cases/<case_id>.npz``.

    Raises:
        DataError: a case listed in the split has no preprocessed ``.npz``.
    """
    root = Path(preprocessed_dir)
    index = _read_index(root)
    npz_of: dict[str, str] = {}
    if index is not None and {"case_id", "npz"} <= set(index.columns):
        npz_of = dict(zip(index["case_id"], index["npz"], strict=True))
    records = []
    for position, case_id in enumerate(case_ids):
        path = root / npz_of.get(case_id, f"{CASES_DIR}/{case_id}.npz")
        if not path.is_file():
            raise DataError(
                f"{path}: missing preprocessed case listed in the split; rerun `tumorseg preprocess`"
            )
        records.append({"case_id": case_id, CASE_INDEX_KEY: position, "path": str(path)})
    return records


def dataset_label_set(preprocessed_dir: str | Path) -> LabelSet:
    """The label set of a preprocessed dataset, from ``index.csv``'s ``label_convention`` column.

    Without an index, or a column, it is ``glioma``.

    Raises:
        DataError: the cases mix label sets (their conventions code different tumour parts).
    """
    from tumorseg.data.conventions import GLIOMA, label_set_of

    index = _read_index(preprocessed_dir)
    if index is None:
        return GLIOMA
    try:
        return label_set_of(index.get("label_convention", []), where=str(Path(preprocessed_dir) / INDEX_NAME))
    except ValueError as exc:
        raise DataError(str(exc)) from None


def volume_shape(record: dict[str, Any]) -> tuple[int, int, int]:
    """Spatial shape ``(X, Y, Z)`` of a case (from the ``.npz`` headers; no voxel is read)."""
    return CaseReader(record["path"]).shape


def smallest_shape(records: Sequence[dict[str, Any]]) -> tuple[int, int, int]:
    """Per-axis minimum ``(X, Y, Z)`` over cases: the largest patch every case can provide."""
    shapes = np.array([volume_shape(r) for r in records])
    return tuple(int(s) for s in shapes.min(axis=0))


class PatchDataset(Dataset, Randomizable):
    """A fixed-length epoch of random training patches, each read out of core.

    Index ``i`` draws a patch from case ``i % n`` (:meth:`~tumorseg.data.case_store.CaseReader.draw`),
    then applies the random ``transform`` to ``{"image": (C, *crop), "label": (1, *crop)}``. Cases
    within ``cache_bytes`` are held in memory instead. Hand-written because MONAI's croppers and
    datasets read and cache whole volumes (see :mod:`tumorseg.data.case_store`).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        loader: DataLoaderConfig,
        transform: Any,
        *,
        length: int,
        cache_bytes: int = 0,
    ) -> None:
        self.readers = open_cases(paths, cache_bytes=cache_bytes)
        self.loader = loader
        self.transform = transform
        self.length = length

    def __len__(self) -> int:
        return self.length

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> PatchDataset:
        """Seed the centre draws and, from them, the augmentation (MONAI's worker_init_fn calls this)."""
        super().set_random_state(seed=seed, state=state)
        self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED)))
        return self

    def randomize(self, data: Any = None) -> None:
        """Randomizable's abstract method; the draws happen in ``__getitem__``."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.readers[index % len(self.readers)].draw(
            self.R,
            self.loader.crop_size,
            sampler=self.loader.sampler,
            foreground_fraction=self.loader.foreground_fraction,
            class_ratios=self.loader.class_ratios,
        )
        return self.transform({IMAGE_KEY: image, LABEL_KEY: label})


class WholeCases(Dataset):
    """Whole volumes (``image`` float32 ``(4, X, Y, Z)``, ``label`` uint8 ``(1, X, Y, Z)``), read per item."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        record = self.records[index]
        case = load_preprocessed_case(record["path"])
        return {
            IMAGE_KEY: torch.from_numpy(case[IMAGE_KEY]),
            LABEL_KEY: torch.from_numpy(case[LABEL_KEY]),
            CASE_INDEX_KEY: record[CASE_INDEX_KEY],
        }


def rank_shard(records: Sequence[dict[str, Any]], rank: int, world_size: int) -> list[dict[str, Any]]:
    """This rank's training cases under DDP: every ``world_size``-th case from ``rank``.

    Raises:
        DataError: fewer training cases than ranks.
    """
    if len(records) < world_size:
        raise DataError(
            f"{len(records)} training cases for {world_size} DDP ranks; each rank needs at least one case "
            "(lower trainer.devices/num_nodes or add cases)"
        )
    return list(records)[rank::world_size]


class SegmentationDataModule(L.LightningDataModule):
    """Train on random patches (3-D) or axial slices (2-D); validate on whole volumes.

    Train batches: ``image`` float32 ``(B, 4, *patch)``, ``label`` uint8 ``(B, 1, *patch)``,
    ``patches_per_epoch`` draws an epoch. Validation batches hold one whole volume (shapes differ)
    and its ``case_index``. Under DDP each rank draws from, and caches, its own shard of the training
    cases (:func:`rank_shard`), seeded ``seed + rank``.
    """

    def __init__(
        self,
        train_records: Sequence[dict[str, Any]],
        val_records: Sequence[dict[str, Any]],
        loader: DataLoaderConfig,
        augment: AugmentConfig,
        *,
        patches_per_epoch: int,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_records = list(train_records)
        self.val_records = list(val_records)
        self.loader = loader
        self.augment = augment
        self.patches_per_epoch = patches_per_epoch
        self.seed = seed
        self.train_set: PatchDataset | None = None
        self.val_set: Dataset | None = None

    def _rank(self) -> tuple[int, int]:
        """``(global rank, world size)``; ``(0, 1)`` outside a Trainer."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        """Open this rank's training cases (and fill the bounded cache) once per process."""
        if self.train_set is None and stage in (None, "fit"):
            rank, world = self._rank()
            shard = rank_shard(self.train_records, rank, world)
            self.train_set = PatchDataset(
                [record["path"] for record in shard],
                self.loader,
                train_transforms(self.loader, self.augment),
                length=self.patches_per_epoch,
                cache_bytes=self.loader.cache_mb << 20,
            )
            self.train_set.set_random_state(seed=self.seed + rank)
            in_memory = sum(reader.cached for reader in self.train_set.readers)
            log.info(
                "training on %d cases (rank %d of %d): %d held in memory (%.0f MiB of data_loader.cache_mb %d), "
                "%d read out of core",
                len(shard),
                rank,
                world,
                in_memory,
                cached_bytes(self.train_set.readers) / 2**20,
                self.loader.cache_mb,
                len(shard) - in_memory,
            )
        if self.val_set is None and stage in (None, "fit", "validate"):
            self.val_set = WholeCases(self.val_records)

    def train_dataloader(self) -> Any:
        import torch
        from monai.data import DataLoader

        workers = self.loader.num_workers
        # MONAI's DataLoader reseeds the dataset (and its workers) from this generator: seeded per
        # rank, or every DDP rank would draw the same centres and augmentations.
        generator = torch.Generator().manual_seed(self.seed + self._rank()[0])
        return DataLoader(
            self.train_set,
            generator=generator,
            batch_size=self.loader.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.loader.pin_memory,
        )

    def val_dataloader(self) -> Any:
        from monai.data import DataLoader

        return DataLoader(self.val_set, batch_size=1, shuffle=False, num_workers=0)
