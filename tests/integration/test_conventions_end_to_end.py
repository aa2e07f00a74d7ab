"""Every convention and layout, end to end through the CLI.

Generated datasets (``tumorseg synth --layout L --labels C``) are ingested as valid with the right
convention, trained on (a short run: the network's outputs follow the label set), predicted and
written back in their own codes, and scored with their own regions.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tumorseg.cli import main
from tumorseg.config import apply_overrides, read_params
from tumorseg.data.conventions import get_convention

ROOT = Path(__file__).resolve().parents[2]


def _params(root: Path, layout: str, labels: str) -> Path:
    params = apply_overrides(
        read_params(ROOT / "params.yaml"),
        {
            "paths.ingested": str(root / "ingested"),
            "paths.validated": str(root / "validated"),
            "paths.preprocessed": str(root / "preprocessed"),
            "paths.split": str(root / "split.json"),
            "paths.reports": str(root / "reports"),
            "paths.mlruns": str(root / "mlruns"),
            "synth.layout": layout,
            "synth.labels": labels,
            "synth.cases": 8,
            "synth.spacing_mm": 4.0,
            "synth.tumour_free_fraction": 0.0,
            "synth.reoriented_fraction": 0.0,
            "ingest.labels": labels,
            "ingest.workers": 1,
            "preprocess.workers": 1,
            "preprocess.target_spacing_mm": [4.0, 4.0, 4.0],
            "train.out_dir": str(root / "models"),
            "train.max_epochs": 1,
            "train.steps_per_epoch": 2,
            "train.checkpoint_every_n_steps": 2,
            "train.warmup_epochs": 0,
            "train.score_test": False,
            "data_loader.patch_size": [16, 16, 16],
            "data_loader.batch_size": 2,
            "data_loader.num_workers": 0,
            "model.name": "unet",
            "model.unet.channels": [4, 8],
            "model.unet.strides": [2],
            "model.unet.num_res_units": 1,
            "sliding_window.sw_batch_size": 2,
            "sliding_window.min_component_mm3": 0.0,
            "trainer.accelerator": "cpu",
            "trainer.devices": 1,
            "trainer.strategy": "auto",
            "trainer.precision": "32-true",
            "trainer.enable_progress_bar": False,
            "mlflow.enabled": False,
            "mlflow.overlays": 0,
            "evaluate.plots": False,
            "evaluate.bootstrap_resamples": 50,
        },
    )
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _run(*argv: str) -> None:
    assert main(list(argv)) == 0, argv


@pytest.mark.parametrize(
    ("layout", "labels", "label_set", "regions_out"),
    [
        ("brats2023", "brats2024-gli", "glioma_post", ("WT", "TC", "ET", "RC")),
        ("brats2023", "brats2024-ped", "pediatric", ("WT", "TC", "CC", "ET")),
        ("nnunet", "auto", "glioma", ("WT", "TC", "ET")),
        ("monai", "brats2023-men", "glioma", ("WT", "TC", "ET")),
        ("msd", "auto", "glioma", ("WT", "TC", "ET")),
    ],
)
def test_generate_ingest_train_predict_score(
    tmp_path: Path, layout: str, labels: str, label_set: str, regions_out: tuple[str, ...]
) -> None:
    params = _params(tmp_path, layout, labels)
    raw = tmp_path / "raw"
    _run("synth", "--out", str(raw), "--params", str(params))
    _run("ingest", str(raw), "--params", str(params))
    _run("validate", "--params", str(params), "--out", str(tmp_path / "validated"))
    manifest = pd.read_csv(tmp_path / "validated" / "manifest.csv", dtype=str, keep_default_na=False)
    assert (manifest["status"] == "ok").all(), manifest[["case_id", "reason"]].to_string()
    conventions = set(manifest["label_convention"])
    assert len(conventions) == 1
    convention = get_convention(conventions.pop())
    if labels != "auto":
        assert convention.name == labels
    assert convention.label_set.name == label_set

    _run("preprocess", "--params", str(params))
    _run("split", "--params", str(params))
    _run("train", "--params", str(params))
    checkpoint = tmp_path / "models" / "checkpoints" / "best.ckpt"
    stored = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert stored["tumorseg_config"]["model"]["label_set"] == label_set
    head = [v for k, v in stored["state_dict"].items() if k.endswith("weight")][-1]
    assert len(regions_out) in head.shape[:2]  # the output layer has one channel per train region

    out = tmp_path / "pred"
    given = ["--labels", labels] if labels != "auto" else []  # BraTS-PED names alone are ambiguous
    _run("predict", str(raw), "--out", str(out), "--model", str(checkpoint), "--params", str(params), *given)
    codes = set(convention.allowed_values)
    written = sorted(out.glob("*.nii.gz"))
    assert len(written) == len(manifest)
    for path in written:
        assert set(np.unique(np.asarray(nib.load(path).dataobj)).tolist()) <= codes

    refs = tmp_path / "refs"
    refs.mkdir()
    for row in manifest.itertuples():
        (refs / f"{row.case_id}.nii.gz").symlink_to(row.path_seg)
    _run(
        "evaluate", "--params", str(params), "--pred", str(out), "--ref", str(refs),
        "--out", str(tmp_path / "eval.csv"), "--labels", convention.name,
    )  # fmt: skip
    scored = pd.read_csv(tmp_path / "eval.csv")
    assert tuple(dict.fromkeys(scored["region"])) == convention.region_names
    summary = json.loads((tmp_path / "eval.summary.json").read_text())
    assert list(summary["regions"]) == list(convention.region_names)
    assert summary["label_convention"] == convention.name
