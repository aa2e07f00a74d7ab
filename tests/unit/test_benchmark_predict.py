"""The predict benchmark times the model ``predict`` runs by default, or says it fell back to random weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from benchmarks.predict import bench_network, trained_network

from tumorseg.config import read_params
from tumorseg.models.checkpoint import CONFIG_CHECKPOINT_KEY, NETWORK_PREFIX


def _params(tmp_path: Path) -> dict[str, Any]:
    params = copy.deepcopy(read_params(Path(__file__).parents[2] / "params.yaml"))
    params["paths"]["mlruns"] = str(tmp_path / "mlruns")  # an empty store: no champion
    params["mlflow"]["tracking_uri"] = None
    return params


def test_without_a_champion_the_random_weights_run_and_the_result_says_why(tmp_path: Path) -> None:
    trained, weights = bench_network(_params(tmp_path), None, seed=0)
    assert weights.startswith("random weights (models:/tumorseg@champion did not load")
    assert trained.model.name == "unet"
    reference = trained_network(_params(tmp_path), 0).network.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in trained.network.state_dict().items())


def test_a_given_checkpoint_is_the_network_timed(tmp_path: Path) -> None:
    params = _params(tmp_path)
    random_net = trained_network(params, 3)
    checkpoint = tmp_path / "best.ckpt"
    state = {f"{NETWORK_PREFIX}{k}": v for k, v in random_net.network.state_dict().items()}
    torch.save({"state_dict": state, CONFIG_CHECKPOINT_KEY: random_net.config}, checkpoint)
    trained, weights = bench_network(params, str(checkpoint), seed=0)
    assert weights == f"checkpoint {checkpoint}"
    loaded = trained.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in random_net.network.state_dict().items())
    assert bench_network(params, "random", seed=0)[1] == "random weights (--model random)"


def test_the_case_is_stored_as_brats_stores_it_and_every_step_is_timed(tmp_path: Path) -> None:
    """The benchmark reads a 240x240x155 case in LPS voxel order (BraTS's own) and writes it back so."""
    import nibabel as nib
    from benchmarks.predict import benchmark_predict

    result = benchmark_predict(
        _params(tmp_path), repeats=1, folder_cases=0, model="random", workdir=tmp_path / "work"
    )
    t1 = next((tmp_path / "work" / "raw").glob("*/*_t1.nii.gz"))
    prediction = next((tmp_path / "work" / "pred").glob("*.nii.gz"))
    assert nib.aff2axcodes(nib.load(t1).affine) == ("L", "P", "S") and result["case_orientation"] == "LPS"
    assert nib.load(prediction).shape == nib.load(t1).shape == (240, 240, 155)
    assert (nib.load(prediction).affine == nib.load(t1).affine).all()
    assert set(result["breakdown_s"]) == {"read", "preprocess", "inference", "restore", "write"}
    outside = sum(seconds for step, seconds in result["breakdown_s"].items() if step != "inference")
    assert result["outside_inference_s"] == pytest.approx(outside, abs=0.003)  # rounded separately
