"""Tiny preprocessed datasets for model and training tests (imported by tests and by ``conftest.py``).

A uniquely named module, not ``conftest``: several test folders have a ``conftest.py``, and
processes that DDP spawns re-import test modules, where ``from conftest import`` could find another.

Cases follow the preprocessing contract (``cases/<case_id>.npz`` with ``image`` float16
``(4, X, Y, Z)``, ``label`` uint8 canonical codes, ``brain`` bool; ``index.csv``; ``split.json``)
but are ~32^3 ellipsoid "brains" with one spherical tumour each: an oedema shell (bright on
T2/FLAIR), an enhancing rim (bright on T1ce) and a necrotic core (dark on T1ce). Big enough
for a 4-8-16 U-Net to learn something in a few dozen steps, small enough to train in seconds.

Tests override the real params.yaml (:func:`tiny_overrides`) instead of keeping a second config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.data.case_store import save_case

REPO_ROOT = Path(__file__).resolve().parents[2]


def _tiny_case(rng: np.random.Generator, shape: tuple[int, int, int], tumour: bool) -> dict[str, np.ndarray]:
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = np.array(shape, dtype=np.float32)[:, None, None, None] / 2
    radii = np.array(shape, dtype=np.float32)[:, None, None, None] * 0.42
    brain = (((grid - centre) / radii) ** 2).sum(0) <= 1.0
    label = np.zeros(shape, dtype=np.uint8)
    if tumour:
        c = np.array([rng.uniform(0.35, 0.65) * n for n in shape], dtype=np.float32)[:, None, None, None]
        r = np.sqrt(((grid - c) ** 2).sum(0))
        outer = rng.uniform(6.0, 8.0)
        label[(r <= outer) & brain] = 2
        label[(r <= outer * 0.6) & brain] = 3
        label[(r <= outer * 0.35) & brain] = 1
    # tissue contrast per channel (t1, t1ce, t2, flair) for bg-brain, NCR, ED, ET
    means = np.array(
        [
            [0.0, -1.0, 0.3, 0.2],  # t1
            [0.0, -1.2, 0.4, 2.5],  # t1ce
            [0.0, 2.0, 1.5, 1.0],  # t2
            [0.0, 1.0, 2.2, 1.2],  # flair
        ],
        dtype=np.float32,
    )
    image = means[:, label] + rng.normal(0, 0.35, size=(4, *shape)).astype(np.float32)
    image[:, ~brain] = 0.0
    return {"image": image.astype(np.float16), "label": label, "brain": brain}


def write_tiny_dataset(
    root: Path,
    *,
    n_train: int = 6,
    n_val: int = 2,
    n_test: int = 2,
    shape: tuple[int, int, int] = (32, 32, 32),
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``root/preprocessed`` (cases + index.csv) and ``root/split.json``; return the paths."""
    rng = np.random.default_rng(seed)
    pre = root / "preprocessed"
    (pre / "cases").mkdir(parents=True, exist_ok=True)
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    rows = []
    counts = {"train": n_train, "val": n_val, "test": n_test}
    index = 0
    for name, count in counts.items():
        for k in range(count):
            case_id = f"Tiny_{index:03d}"
            # vary the shape a little, and make one training case tumour-free
            case_shape = tuple(int(n + rng.integers(0, 3)) for n in shape)
            tumour = not (name == "train" and k == count - 1)
            arrays = _tiny_case(rng, case_shape, tumour)
            save_case(pre / "cases" / f"{case_id}.npz", **arrays)
            split[name].append(case_id)
            rows.append(
                {
                    "case_id": case_id,
                    "patient_id": case_id,
                    "npz": f"cases/{case_id}.npz",
                    "shape": "x".join(map(str, case_shape)),
                    "has_tumour": str(tumour),
                }
            )
            index += 1
    pd.DataFrame(rows).to_csv(pre / "index.csv", index=False)
    split_file = root / "split.json"
    split_file.write_text(json.dumps(split))
    return {"preprocessed": pre, "split": split_file}


def tiny_overrides(root: Path, **extra: Any) -> dict[str, Any]:
    """Overrides that point the real params.yaml at a tiny dataset under ``root`` and shrink the run."""
    overrides: dict[str, Any] = {
        "paths.preprocessed": str(root / "preprocessed"),
        "paths.split": str(root / "split.json"),
        "paths.reports": str(root / "reports"),
        "paths.mlruns": str(root / "mlruns"),
        "train.out_dir": str(root / "models"),
        "train.max_epochs": 1,
        "train.steps_per_epoch": 4,
        "train.checkpoint_every_n_steps": 2,
        "train.val_every_n_epochs": 1,
        "train.warmup_epochs": 0,
        "train.score_test": True,
        "data_loader.mode": "3d",
        "data_loader.patch_size": [16, 16, 16],
        "data_loader.patch_size_2d": [16, 16],
        "data_loader.batch_size": 2,
        "data_loader.num_workers": 0,
        "model.name": "unet",
        "model.unet.channels": [4, 8, 16],
        "model.unet.strides": [2, 2],
        "model.unet.num_res_units": 1,
        "sliding_window.sw_batch_size": 2,
        "sliding_window.overlap": 0.25,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.strategy": "auto",
        "trainer.precision": "32-true",
        "mlflow.enabled": False,
        "mlflow.overlays": 1,
    }
    overrides.update(extra)
    return overrides
