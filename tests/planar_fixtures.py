"""Tiny 2-D datasets for the planar model tests.

A preprocessed dataset follows the 2-D data contract (:mod:`tumorseg.data.planar` and
``tumorseg preprocess`` of 2-D data): ``<dir>/<case_id>.npz`` with ``image`` float32 ``(S, S)`` and
``mask`` uint8 ``(S, S)`` (absent for Kaggle-style ``yes`` images), ``<dir>/manifest.csv`` and a
patient-level split JSON. Images are 64 x 64 elliptical "heads" with one bright disc as the
tumour; tumour types differ in where the disc lies (meningioma at the edge, glioma in the
hemisphere, pituitary low in the middle), so a classifier has something to learn.

Tests override the real params.yaml (:func:`tiny_params`) instead of keeping a second config.
Test modules load this file with :func:`load_planar_fixtures` (the tests folders are not packages).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.config import apply_overrides, read_params

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
TYPES = ("meningioma", "glioma", "pituitary")
CENTRES = {"meningioma": (0.25, 0.3), "glioma": (0.45, 0.62), "pituitary": (0.7, 0.5)}

PLANAR_STAGES: tuple[str, ...] = ("source", "ingest", "validate", "preprocess", "split", "train", "evaluate")
"""The cached stages in pipeline order (``promote`` follows them and always runs); ``@2d`` in dvc.yaml."""

TINY_2D_OVERRIDES: dict[str, Any] = {
    "model_2d.input_size": 32,
    "model_2d.unet.channels": [4, 8, 16],
    "model_2d.unet.strides": [2, 2],
    "model_2d.classifier.channels": [4, 8],
    "model_2d.classifier.strides": [2, 2],
    "train_2d.max_epochs": 1,
    "train_2d.steps_per_epoch": 2,
    "train_2d.batch_size": 4,
    "evaluate_2d.bootstrap_resamples": 100,
}
"""params.yaml overrides for tiny 2-D networks and a one-epoch run (seconds on 2 CPU cores)."""

TINY_2D_DATA_OVERRIDES: dict[str, Any] = {
    "synth_2d.figshare_patients": 6,
    "synth_2d.slices_per_patient": 2,
    "synth_2d.kaggle_images": 8,
    "preprocess_2d.size": SIZE,
}
"""params.yaml overrides for a tiny embedded 2-D dataset, for the tests that run the whole branch."""


def head_image(
    rng: np.random.Generator, shape: tuple[int, int], kind: str | None
) -> tuple[np.ndarray, np.ndarray]:
    """A float32 head image and its uint8 0/1 tumour mask (all zero when ``kind`` is None)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    head = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.38 * w)) ** 2 <= 1.0
    image = np.where(head, 1.0, 0.0).astype(np.float32) + rng.normal(0, 0.05, shape).astype(np.float32)
    mask = np.zeros(shape, dtype=np.uint8)
    if kind is not None:
        cy, cx = CENTRES[kind]
        cy, cx = (cy + rng.uniform(-0.05, 0.05)) * h, (cx + rng.uniform(-0.05, 0.05)) * w
        radius = rng.uniform(0.07, 0.11) * min(h, w)
        mask[((yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2) & head] = 1
        image[mask > 0] += 1.5
    return image, mask


def write_preprocessed(
    folder: Path, n_patients: int = 12, seed: int = 0, kaggle_yes: int = 3, unmasked_in_test: bool = False
) -> tuple[Path, Path]:
    """A preprocessed 2-D dataset and its split; returns ``(folder, split_json)``.

    Patients: one in four tumour-free (Kaggle-style ``no``, an all-zero mask), the rest one type each
    with two images; ``kaggle_yes`` extra tumour images without masks (``unmasked_in_test``: the first
    of them in the test split).
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    patients: dict[str, list[str]] = {}

    def add(
        case_id: str, patient: str, source: str, kind: str | None, with_mask: bool, typed: bool = True
    ) -> None:
        image, mask = head_image(rng, (SIZE, SIZE), kind)
        image = (image - image.mean()) / image.std()
        arrays = {"image": image.astype(np.float32)}
        if with_mask:
            arrays["mask"] = mask
        np.savez(folder / f"{case_id}.npz", **arrays)
        rows.append(
            {
                "case_id": case_id,
                "patient_id": patient,
                "source": source,
                "has_tumour": kind is not None,
                "tumour_type": (kind if typed else "unknown") if kind else "empty",
                "has_mask": with_mask,
                "height": SIZE,
                "width": SIZE,
                "path": f"{case_id}.npz",
                "status": "ok",
            }
        )
        patients.setdefault(patient, []).append(case_id)

    for p in range(n_patients):
        patient = f"P{p:02d}"
        if p % 4 == 3:
            add(f"kaggle-no-{p:02d}", f"kaggle-no-{p:02d}", "kaggle", None, True)
            continue
        kind = TYPES[p % 3]
        for i in range(2):
            add(f"figshare-{p:02d}{i}", patient, "figshare", kind, True)
    for k in range(kaggle_yes):
        add(f"kaggle-yes-{k}", f"kaggle-yes-{k}", "kaggle", TYPES[k % 3], with_mask=False, typed=False)
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)

    names = sorted(patients)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    n_test = max(2, len(order) // 5)
    n_val = max(2, len(order) // 5)
    groups = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    # every split gets a tumour-free and a masked tumour patient so AUCs and Dice exist
    free = [p for p in names if p.startswith("kaggle-no")]
    masked = [p for p in names if p.startswith("P")]
    unmasked = ["kaggle-yes-0"] if unmasked_in_test and kaggle_yes else []
    for split_name, extra in (
        ("test", [free[0], masked[0], *unmasked]),
        ("val", [free[1 % len(free)], masked[1]]),
    ):
        for patient in extra:
            for other in groups.values():
                if patient in other:
                    other.remove(patient)
            groups[split_name].append(patient)
    split = {name: sorted(c for p in groups[name] for c in patients[p]) for name in ("train", "val", "test")}
    split["patients"] = {name: sorted(groups[name]) for name in groups}
    split_file = folder.parent / "split_2d.json"
    split_file.write_text(json.dumps(split, indent=1))
    return folder, split_file


def tiny_params(tmp_path: Path, preprocessed: Path, split_file: Path, **extra: Any) -> dict[str, Any]:
    """The project's params.yaml with every path in ``tmp_path`` and a tiny, fast 2-D training run."""
    params = read_params(REPO_ROOT / "params.yaml")
    overrides = {
        "paths.preprocessed_2d": str(preprocessed),
        "paths.split_2d": str(split_file),
        "paths.reports": str(tmp_path / "reports"),
        "paths.reports_2d": str(tmp_path / "reports" / "2d"),
        "paths.mlruns": str(tmp_path / "mlruns"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
        "preprocess_2d.size": SIZE,
        **TINY_2D_OVERRIDES,
        "train_2d.out_dir": str(tmp_path / "models" / "planar"),
        "trainer.accelerator": "cpu",
        "trainer.deterministic": False,
        **extra,
    }
    return apply_overrides(params, overrides)
