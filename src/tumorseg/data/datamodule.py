"""LightningDataModule over preprocessed cases, with a volume and an image strategy.

Volumes (:class:`VolumePatches`): an epoch is a fixed number of patches (nnU-Net style), each read
out of core from ``cases/<case_id>.npz``; validation on whole volumes. Images (:class:`ImageDraws`):
``<case_id>.npz`` beside ``manifest.csv``, few and small, so held in memory; a sample is::

    image     (1, S, S) float32
    mask      (1, S, S) float32   0/1; zeros where the image has no mask (has_mask = 0)
    has_mask  ()        float32   1 when the mask is a reference (segmentation loss applies)
    tumour    ()        float32   1 tumour, 0 no tumour (the detection target)
    type      ()        int64     index into TUMOUR_TYPES, -1 when unknown or no tumour
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from monai.transforms import Randomizable
from monai.utils import MAX_SEED
from torch.utils.data import Dataset

from tumorseg.data.case_store import CaseReader, cached_bytes, open_cases
from tumorseg.data.conventions import LabelSet
from tumorseg.data.planar import TUMOUR_TYPES
from tumorseg.data.transforms import (
    CASE_INDEX_KEY,
    IMAGE_KEY,
    LABEL_KEY,
    AugmentConfig,
    DataLoaderConfig,
    PlanarAugmentConfig,
    bias_field,
    load_preprocessed_case,
    train_transforms,
)
from tumorseg.errors import DataError

log = logging.getLogger(__name__)

CASES_DIR = "cases"
INDEX_NAME = "index.csv"
MASK_KEY = "mask"
MANIFEST_NAME = "manifest.csv"


def read_split(split_file: str | Path) -> dict[str, list[str]]:
    """Read ``split.json`` (3-D or 2-D) as ``{split name: [case_id, ...]}``; a DataError names the file."""
    path = Path(split_file)
    if not path.is_file():
        raise DataError(f"{path}: no split file; run `tumorseg split` first")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{path}: not a readable split JSON ({type(exc).__name__}); rerun `tumorseg split`"
        ) from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object of split name -> case ids; rerun `tumorseg split`")
    return {k: [str(c) for c in v] for k, v in data.items() if isinstance(v, list)}


def read_planar_split(split_file: str | Path) -> dict[str, list[str]]:
    """The ``train``/``val``/``test`` case ids of a 2-D split JSON (each present, maybe empty)."""
    split = read_split(split_file)
    return {name: split.get(name, []) for name in ("train", "val", "test")}


def _read_index(preprocessed_dir: str | Path) -> Any | None:
    """``index.csv`` as a string table, or None when the dataset has none."""
    import pandas as pd

    index_file = Path(preprocessed_dir) / INDEX_NAME
    return pd.read_csv(index_file, dtype=str, keep_default_na=False) if index_file.is_file() else None


def case_records(preprocessed_dir: str | Path, case_ids: Sequence[str]) -> list[dict[str, Any]]:
    """One volume record per case, ``{"case_id", "case_index", "path"}``; the path is ``index.csv``'s
    ``npz`` column where there is one, else ``cases/<case_id>.npz`` (a DataError when missing)."""
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


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def planar_records(
    preprocessed_dir: str | Path, case_ids: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Image records in the order of ``case_ids`` (all valid cases if None); ``height``/``width`` and
    ``source_path`` are the original image's, ``geometry`` maps the grid back onto it
    (:class:`~tumorseg.data.planar.PlanarGeometry` JSON). A DataError for a missing manifest, case or npz.
    """
    import pandas as pd

    folder = Path(preprocessed_dir)
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        raise DataError(f"{manifest_file}: not found; run `tumorseg preprocess` on the 2-D data first")
    table = pd.read_csv(manifest_file, dtype=str, keep_default_na=False)
    if "status" in table.columns:
        table = table[table["status"].str.lower().isin(("ok", "valid", "preprocessed", ""))]
    rows = {str(r["case_id"]): r for r in table.to_dict(orient="records")}
    records: list[dict[str, Any]] = []
    for case_id in list(case_ids) if case_ids is not None else sorted(rows):
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


def dataset_label_set(preprocessed_dir: str | Path) -> LabelSet:
    """The label set of ``index.csv``'s ``label_convention`` column (``glioma`` without one); a
    DataError when the cases mix label sets."""
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
    """A fixed-length epoch of random training patches: index ``i`` draws from case ``i % n``, then
    ``transform`` runs on ``{"image": (C, *crop), "label": (1, *crop)}``. Hand-written because MONAI's
    croppers and datasets read whole volumes (:mod:`tumorseg.data.case_store`)."""

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
        """Abstract in Randomizable; the draws happen in ``__getitem__``."""

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
    """This rank's training cases under DDP, every ``world_size``-th from ``rank`` (a DataError when
    there are fewer cases than ranks)."""
    if len(records) < world_size:
        raise DataError(
            f"{len(records)} training cases for {world_size} DDP ranks; each rank needs at least one case "
            "(lower trainer.devices/num_nodes or add cases)"
        )
    return list(records)[rank::world_size]


def load_sample(record: dict[str, Any]) -> dict[str, Any]:
    """Read one image record's npz into a sample dict (keys and shapes: the module docstring)."""
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
        ]
        # a receive-coil shading before the noise (which it does not scale); no step when off, so that
        # a run without it draws the same augmentations as before
        + bias_field(cfg.bias_field_prob, cfg.bias_field_strength)
        + [mt.RandGaussianNoised(IMAGE_KEY, prob=cfg.noise_prob, std=cfg.noise_std)]
        # contrast between scans and sequences (the Kaggle set mixes T1ce, T2, FLAIR)
        + (
            [mt.RandAdjustContrastd(IMAGE_KEY, prob=cfg.gamma_prob, gamma=cfg.gamma_range)]
            if cfg.gamma_prob
            else []
        )
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
        import torch

        sample = dict(self.samples[index])
        if self.transform is not None:
            sample = self.transform(sample)
        out: dict[str, Any] = {}
        for key, value in sample.items():
            tensor = torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
            out[key] = tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor  # MetaTensor -> Tensor
        out[MASK_KEY] = (out[MASK_KEY] > 0.5).float()
        return out


@dataclass(frozen=True)
class VolumePatches:
    """Random patches (3-D) or axial slabs (2-D mode) read out of core; whole volumes, one a batch,
    at validation. Under DDP each rank draws from its own shard, seeded ``seed + rank``."""

    loader: DataLoaderConfig
    augment: AugmentConfig
    patches_per_epoch: int

    def train_set(self, records: list[dict[str, Any]], seed: int, rank: int, world: int) -> PatchDataset:
        shard = rank_shard(records, rank, world)
        dataset = PatchDataset(
            [record["path"] for record in shard],
            self.loader,
            train_transforms(self.loader, self.augment),
            length=self.patches_per_epoch,
            cache_bytes=self.loader.cache_mb << 20,
        )
        dataset.set_random_state(seed=seed + rank)
        in_memory = sum(reader.cached for reader in dataset.readers)
        log.info(
            "training on %d cases (rank %d of %d): %d held in memory (%.0f MiB of data_loader.cache_mb %d), "
            "%d read out of core",
            len(shard),
            rank,
            world,
            in_memory,
            cached_bytes(dataset.readers) / 2**20,
            self.loader.cache_mb,
            len(shard) - in_memory,
        )
        return dataset

    def val_set(self, records: list[dict[str, Any]]) -> Dataset:
        return WholeCases(records)

    def train_loader(self, dataset: Dataset, seed: int, rank: int) -> Any:
        import torch
        from monai.data import DataLoader

        workers = self.loader.num_workers
        # MONAI's DataLoader reseeds the dataset (and its workers) from this generator: seeded per
        # rank, or every DDP rank would draw the same centres and augmentations.
        return DataLoader(
            dataset,
            generator=torch.Generator().manual_seed(seed + rank),
            batch_size=self.loader.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.loader.pin_memory,
        )

    def val_loader(self, dataset: Dataset) -> Any:
        from monai.data import DataLoader

        return DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)


@dataclass(frozen=True)
class ImageDraws:
    """In-memory images drawn with replacement, ``draws_per_epoch`` an epoch; ``seed`` seeds
    augmentation and sampling."""

    augment: PlanarAugmentConfig
    batch_size: int
    draws_per_epoch: int
    num_workers: int = 0

    def train_set(self, records: list[dict[str, Any]], seed: int, rank: int, world: int) -> PlanarDataset:
        return PlanarDataset([load_sample(r) for r in records], training_transforms(self.augment, seed))

    def val_set(self, records: list[dict[str, Any]]) -> Dataset:
        return PlanarDataset([load_sample({**r, "index": i}) for i, r in enumerate(records)])

    def train_loader(self, dataset: Dataset, seed: int, rank: int) -> Any:
        import torch
        from torch.utils.data import DataLoader, RandomSampler

        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(
            dataset, replacement=True, num_samples=self.draws_per_epoch, generator=generator
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_loader(self, dataset: Dataset) -> Any:
        from torch.utils.data import DataLoader

        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, num_workers=0)


class SegmentationDataModule(L.LightningDataModule):
    """``strategy`` (default :class:`VolumePatches` of ``loader``, ``augment``, ``patches_per_epoch``)
    decides what a sample is and how batches are drawn. Volume train batches: ``image`` float32
    ``(B, 4, *patch)``, ``label`` uint8 ``(B, 1, *patch)``; validation: one volume and its ``case_index``.
    """

    def __init__(
        self,
        train_records: Sequence[dict[str, Any]],
        val_records: Sequence[dict[str, Any]],
        loader: DataLoaderConfig | None = None,
        augment: AugmentConfig | None = None,
        *,
        patches_per_epoch: int = 0,
        seed: int = 0,
        strategy: VolumePatches | ImageDraws | None = None,
    ) -> None:
        super().__init__()
        self.train_records = list(train_records)
        self.val_records = list(val_records)
        self.strategy = strategy or VolumePatches(loader, augment, patches_per_epoch)  # type: ignore[arg-type]
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _rank(self) -> tuple[int, int]:
        """``(global rank, world size)``; ``(0, 1)`` outside a Trainer."""
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self.strategy.train_set(self.train_records, self.seed, *self._rank())
        if self.val_set is None and stage in (None, "fit", "validate"):
            self.val_set = self.strategy.val_set(self.val_records)

    def train_dataloader(self) -> Any:
        return self.strategy.train_loader(self.train_set, self.seed, self._rank()[0])

    def val_dataloader(self) -> Any:
        return self.strategy.val_loader(self.val_set)


def PlanarDataModule(  # noqa: N802 - the 2-D trainer's name for the image strategy
    train_records: list[dict[str, Any]],
    val_records: list[dict[str, Any]],
    augment: PlanarAugmentConfig,
    *,
    seed: int = 0,
    **options: int,
) -> SegmentationDataModule:
    """The DataModule of preprocessed 2-D images; ``options``: :class:`ImageDraws`' ``batch_size``,
    ``draws_per_epoch``, ``num_workers``."""
    strategy = ImageDraws(augment, **options)
    return SegmentationDataModule(train_records, val_records, seed=seed, strategy=strategy)
