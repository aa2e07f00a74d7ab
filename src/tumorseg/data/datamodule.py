"""LightningDataModule over preprocessed cases: cached volumes, random patches, whole-volume validation.

Which cases belong to which split comes from ``data/split.json`` (``{"train": [...], "val":
[...], "test": [...]}``); each case is ``<preprocessed>/cases/<case_id>.npz`` (see
:mod:`tumorseg.data.transforms` for the array layout).

Training epochs have a fixed length (``patches_per_epoch`` draws, nnU-Net style) rather than
"one patch per case": with ~25 training volumes an epoch of 25 patches would make
validation, checkpointing and logging dominate the run. Each draw picks a case and a fresh
random patch from the in-memory cache.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from torch.utils.data import Dataset

from tumorseg.data.transforms import (
    CASE_INDEX_KEY,
    AugmentConfig,
    DataLoaderConfig,
    cache_transforms,
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


def case_records(preprocessed_dir: str | Path, case_ids: Sequence[str]) -> list[dict[str, Any]]:
    """One record per case for the MONAI datasets: ``{"case_id", "case_index", "path"}``.

    The ``.npz`` path comes from ``index.csv``'s ``npz`` column (relative to ``preprocessed_dir``)
    when there is one, else ``cases/<case_id>.npz``.

    Raises:
        DataError: a case listed in the split has no preprocessed ``.npz``.
    """
    root = Path(preprocessed_dir)
    npz_of: dict[str, str] = {}
    index_file = root / INDEX_NAME
    if index_file.is_file():
        import pandas as pd

        index = pd.read_csv(index_file, dtype=str, keep_default_na=False)
        if {"case_id", "npz"} <= set(index.columns):
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


def volume_shape(record: dict[str, Any]) -> tuple[int, int, int]:
    """Spatial shape ``(X, Y, Z)`` of a case (reads only its small label array)."""
    with np.load(record["path"]) as npz:
        return tuple(int(s) for s in npz["label"].shape)


def smallest_shape(records: Sequence[dict[str, Any]]) -> tuple[int, int, int]:
    """Per-axis minimum ``(X, Y, Z)`` over cases: the largest patch every case can provide."""
    shapes = np.array([volume_shape(r) for r in records])
    return tuple(int(s) for s in shapes.min(axis=0))


class RepeatedDraws(Dataset):
    """Index ``i`` draws from case ``i % n``: a fixed-length epoch of random patches.

    Hand-written because neither torch nor MONAI has a "virtual length" wrapper that keeps
    a :class:`~monai.data.CacheDataset`'s random transforms (``ConcatDataset`` would need a
    whole number of repeats; a sampler with replacement would be replaced under DDP).
    """

    def __init__(self, base: Dataset, length: int) -> None:
        self.base = base
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.base[index % len(self.base)]


class SegmentationDataModule(L.LightningDataModule):
    """Train on random patches (3-D) or axial slices (2-D); validate on whole volumes.

    Batches:
        train: ``image`` float32 ``(B, 4, *patch)``, ``label`` uint8 ``(B, 1, *patch)``.
        val: ``image`` ``(1, 4, X, Y, Z)``, ``label`` ``(1, 1, X, Y, Z)``, ``case_index`` ``(1,)``
        (whole volumes differ in shape, so one per batch; no random work, so no workers).

    Args:
        train_records: :func:`case_records` of the training split.
        val_records: :func:`case_records` of the validation split.
        loader: ``data_loader:`` section.
        augment: ``augment:`` section.
        patches_per_epoch: draws per training epoch (steps per epoch x batch size).
        seed: base seed of the augmentation streams (offset by the DDP rank).
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
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Fill the in-memory caches once per process (Lightning may call this repeatedly)."""
        from monai.data import CacheDataset
        from monai.transforms import Compose

        # Tumour-free cases have no foreground to centre patches on; MONAI warns once per case.
        warnings.filterwarnings("ignore", message="Num foregrounds 0", category=UserWarning)
        if self.train_set is None and stage in (None, "fit"):
            random_part = train_transforms(self.loader, self.augment)
            rank = self.trainer.global_rank if self.trainer is not None else 0
            random_part.set_random_state(seed=self.seed + rank)
            cached = CacheDataset(
                self.train_records,
                Compose([*cache_transforms(self.loader, train=True).transforms, *random_part.transforms]),
                cache_rate=1.0,
                num_workers=self.loader.cache_num_workers or None,
                progress=False,
            )
            self.train_set = RepeatedDraws(cached, self.patches_per_epoch)
            log.info("cached %d training cases", len(self.train_records))
        if self.val_set is None and stage in (None, "fit", "validate"):
            self.val_set = CacheDataset(
                self.val_records,
                cache_transforms(self.loader, train=False),
                cache_rate=1.0,
                num_workers=self.loader.cache_num_workers or None,
                progress=False,
            )

    def train_dataloader(self) -> Any:
        from monai.data import DataLoader

        workers = self.loader.num_workers
        return DataLoader(
            self.train_set,
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
