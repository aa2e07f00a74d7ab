"""A generated site for the integration tests: synth -> ingest -> validate -> preprocess -> split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tumorseg.cli import main
from tumorseg.config import apply_overrides, read_params

ROOT = Path(__file__).resolve().parents[2]

NETWORK = {
    "preprocess.target_spacing_mm": [4.0, 4.0, 4.0],
    "data_loader.patch_size": [16, 16, 16],
    "model.name": "unet",
    "model.unet.channels": [8, 16, 32],
    "model.unet.strides": [2, 2],
    "model.unet.num_res_units": 1,
    "sliding_window.sw_batch_size": 4,
    "sliding_window.overlap": 0.25,
    "train.warmup_epochs": 0,
    "train.score_test": True,
    "trainer.accelerator": "cpu",
    "trainer.precision": "32-true",
    "mlflow.overlays": 0,
    "evaluate.bootstrap_resamples": 100,
    "evaluate.plots": False,
    "registry.bootstrap_resamples": 100,
    "monitor.enabled": False,
}


def generate_site(root: Path, uri: str, layout: str, seed: int) -> Path:
    """Generate, ingest, validate, preprocess and split one site's data under ``root``; its params file."""
    overrides: dict[str, Any] = {
        **{f"paths.{k}": str(root / k) for k in ("ingested", "validated", "preprocessed", "reports")},
        "data.source": str(root / "raw"),
        "paths.split": str(root / "split.json"),
        "train.out_dir": str(root / "models"),
        "mlflow.tracking_uri": uri,
        "synth.cases": 12,
        "synth.spacing_mm": 4.0,
        "synth.seed": seed,
        "synth.layout": layout,
        **NETWORK,
    }
    params_file = root / "params.yaml"
    params_file.parent.mkdir(parents=True, exist_ok=True)
    params_file.write_text(yaml.safe_dump(apply_overrides(read_params(ROOT / "params.yaml"), overrides)))
    p = ["--params", str(params_file)]
    assert main(["synth", "--out", str(root / "raw"), *p]) == 0
    assert main(["ingest", *p]) == 0
    assert main(["validate", str(root / "ingested"), "--out", str(root / "validated"), *p]) == 0
    assert main(["preprocess", *p]) == 0
    assert main(["split", *p]) == 0
    return params_file
