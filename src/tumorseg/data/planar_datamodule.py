"""Preprocessed 2-D images as training samples: records, MONAI dictionary augmentation, DataModule.

A preprocessed dataset (:mod:`tumorseg.data.planar`) is ``<dir>/<case_id>.npz`` (``image`` float32
``(S, S)`` and, where a mask exists, ``mask`` uint8 0/1 ``(S, S)``) plus ``<dir>/manifest.csv`` with
the case labels; its split JSON has the 3-D split's format. A sample is a dict of tensors::

    image     (1, S, S) float32
    mask      (1, S, S) float32   0/1; zeros where the image has no mask (has_mask = 0)
    has_mask  ()        float32   1 when the mask is a reference (segmentation loss applies)
    tumour    ()        float32   1 tumour, 0 no tumour (the detection target)
    type      ()        int64     index into TUMOUR_TYPES, -1 when unknown or no tumour

The images are few and small, so they are read once into memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from tumorseg.data.planar import TUMOUR_TYPES
from tumorseg.data.transforms import PlanarAugmentConfig
from tumorseg.errors import DataError

IMAGE_KEY = "image"
MASK_KEY = "mask"
MANIFEST_NAME = "manifest.csv"


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def read_planar_split(split_file: str | Path) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}`` case ids of a 2-D split JSON (or a DataError)."""
    path = Path(split_file)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{path}: no split file; run `tumorseg split` on the preprocessed 2-D data first"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable split JSON ({type(exc).__name__})") from None
    return {name: [str(c) for c in data.get(name) or []] for name in ("train", "val", "test")}


def planar_records(
    preprocessed_dir: str | Path, case_ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Case records of the preprocessed 2-D dataset, in the order of ``case_ids`` (all valid cases if None).

    ``height`` and ``width`` are the original size; ``source_path`` is the original file and
    ``geometry`` the :class:`~tumorseg.data.planar.PlanarGeometry` JSON mapping the grid back onto it.

    Raises:
        DataError: no manifest, a case missing from it, or a missing npz file.
    """
    folder = Path(preprocessed_dir)
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        raise DataError(f"{manifest_file}: not found; run `tumorseg preprocess` on the 2-D data first")
    table = pd.read_csv(manifest_file, dtype=str, keep_default_na=False)
    if "status" in table.columns:
        table = table[table["status"].str.lower().isin(("ok", "valid", "preprocessed", ""))]
    rows = {str(r["case_id"]): r for r in table.to_dict(orient="records")}
    wanted = list(case_ids) if case_ids is not None else sorted(rows)
    records: list[dict[str, Any]] = []
    for case_id in wanted:
        row = rows.get(case_id)
        if row is None:
            raise DataError(
                f"{manifest_file}: no valid case {case_id!r}; rerun `tumorseg split` on this dataset"
            )
        npz = folder / f"{case_id}.npz"
        if not npz.is_file():
            raise DataError(f"{npz}: missing; rerun `tumorseg preprocess` on the 2-D data")
        records.append(
            {
                "case_id": case_id,
                "patient_id": str(row.get("patient_id") or case_id),
                "source": str(row.get("source") or ""),
                "has_tumour": _truthy(row.get("has_tumour")),
                "tumour_type": str(row.get("tumour_type") or "empty"),
                "has_mask": _truthy(row.get("has_mask")),
                "height": int(float(row.get("height") or 0)),
                "width": int(float(row.get("width") or 0)),
                "npz": npz,
                "source_path": str(row.get("path") or ""),
                "geometry": str(row.get("geometry") or ""),
            }
        )
    return records


def load_sample(record: dict[str, Any]) -> dict[str, Any]:
    """Read one record's npz into a sample dict (keys and shapes: the module docstring)."""
    with np.load(record["npz"]) as data:
        image = np.asarray(data[IMAGE_KEY], dtype=np.float32)
        mask = np.asarray(data[MASK_KEY], dtype=np.float32) if MASK_KEY in data.files else None
    has_mask = bool(record["has_mask"]) and mask is not None
    if mask is None:
        mask = np.zeros_like(image)
    kind = record["tumour_type"]
    return {
        IMAGE_KEY: image[None],
        MASK_KEY: (mask > 0).astype(np.float32)[None],
        "has_mask": np.float32(has_mask),
        "tumour": np.float32(record["has_tumour"]),
        "type": np.int64(TUMOUR_TYPES.index(kind) if kind in TUMOUR_TYPES else -1),
        "case_index": np.int64(record.get("index", -1)),
    }


def training_transforms(cfg: PlanarAugmentConfig, seed: int) -> Any:
    """Random augmentation of ``image`` and ``mask`` ``(1, S, S)``; intensity changes touch the image only."""
    import math

    from monai import transforms as mt

    keys = [IMAGE_KEY, MASK_KEY]
    transforms = mt.Compose(
        [
            mt.RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=0),
            mt.RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=1),
            mt.RandAffined(
                keys,
                prob=cfg.affine_prob,
                rotate_range=math.radians(cfg.rotate_deg),
                scale_range=(cfg.scale_range, cfg.scale_range),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            mt.RandScaleIntensityd(IMAGE_KEY, factors=cfg.intensity_scale, prob=cfg.intensity_scale_prob),
            mt.RandShiftIntensityd(IMAGE_KEY, offsets=cfg.intensity_shift, prob=cfg.intensity_shift_prob),
            mt.RandGaussianNoised(IMAGE_KEY, prob=cfg.noise_prob, std=cfg.noise_std),
        ]
    )
    transforms.set_random_state(seed=seed)
    return transforms


class PlanarDataset(Dataset):
    """In-memory samples (:func:`load_sample`), augmented by ``transform`` (if any) on every access."""

    def __init__(self, samples: list[dict[str, Any]], transform: Any = None) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.samples[index])
        if self.transform is not None:
            sample = self.transform(sample)
        out: dict[str, Any] = {}
        for key, value in sample.items():
            tensor = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
            out[key] = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor  # MetaTensor -> Tensor
        out[MASK_KEY] = (out[MASK_KEY] > 0.5).float()
        return out


class PlanarDataModule(L.LightningDataModule):
    """Training draws (with replacement, ``draws_per_epoch`` an epoch) and whole-split validation.

    ``train_records`` and ``val_records`` come from :func:`planar_records`; ``seed`` seeds both the
    augmentation and the sampling.
    """

    def __init__(
        self,
        train_records: list[dict[str, Any]],
        val_records: list[dict[str, Any]],
        augment: PlanarAugmentConfig,
        *,
        batch_size: int,
        draws_per_epoch: int,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_records = train_records
        self.val_records = [{**r, "index": i} for i, r in enumerate(val_records)]
        self.augment = augment
        self.batch_size = batch_size
        self.draws_per_epoch = draws_per_epoch
        self.num_workers = num_workers
        self.seed = seed
        self._train: PlanarDataset | None = None
        self._val: PlanarDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = PlanarDataset(
                [load_sample(r) for r in self.train_records], training_transforms(self.augment, self.seed)
            )
            self._val = PlanarDataset([load_sample(r) for r in self.val_records])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(
            self._train, replacement=True, num_samples=self.draws_per_epoch, generator=generator
        )
        return DataLoader(
            self._train,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._val, batch_size=self.batch_size, shuffle=False, num_workers=0)
