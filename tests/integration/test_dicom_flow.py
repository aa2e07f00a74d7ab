"""The DICOM Prefect flow on Prefect's test server: the brain-extraction network is trained on a few
tiny generated heads, registered as ``champion`` in the flow's MLflow store, and loads back by alias."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # nothing leaves the machine

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_dicom_flow_trains_and_registers_the_brain_extractor(tmp_path: Path) -> None:
    from pipelines.dicom_flow import dicom_flow
    from prefect.testing.utilities import prefect_test_harness

    from tumorseg.config import apply_overrides, read_params
    from tumorseg.dicom.brain import load_brain_extractor

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    params = apply_overrides(
        read_params(ROOT / "params.yaml"),
        {
            "paths.mlruns": str(tmp_path / "mlruns"),
            "mlflow.tracking_uri": uri,
            "dicom.brain.out_dir": str(tmp_path / "brain"),
            "dicom.brain.train_cases": 2,
            "dicom.brain.val_cases": 1,
            "dicom.brain.spacing_mm": 4.0,
            "dicom.brain.channels": [4, 8],
            "dicom.brain.steps": 4,
        },
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    with prefect_test_harness(server_startup_timeout=120):
        summary = dicom_flow(params_path=str(params_file), check=False)
    assert "brain extraction" in summary["brain"]["line"]
    assert 0.0 <= summary["brain"]["val_dice"] <= 1.0
    assert (tmp_path / "brain" / "brain.pt").is_file() and (tmp_path / "brain" / "metrics.json").is_file()
    extractor = load_brain_extractor("models:/tumorseg-brain@champion", tracking_uri=uri)
    assert extractor.spacing_mm == 4.0 and extractor.channels == [4, 8]
