"""The predict benchmark times the model ``predict`` runs by default, or says it fell back to random weights."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from tumorseg.bench_predict import _bench_network, _trained_network
from tumorseg.config import read_params
from tumorseg.models.checkpoint import NETWORK_PREFIX
from tumorseg.models.lightning_module import CONFIG_CHECKPOINT_KEY


def _params(tmp_path: Path) -> dict[str, Any]:
    params = copy.deepcopy(read_params(Path(__file__).parents[2] / "params.yaml"))
    params["paths"]["mlruns"] = str(tmp_path / "mlruns")  # an empty store: no champion
    params["mlflow"]["tracking_uri"] = None
    return params


def test_without_a_champion_the_random_weights_run_and_the_result_says_why(tmp_path: Path) -> None:
    trained, weights = _bench_network(_params(tmp_path), None, seed=0)
    assert weights.startswith("random weights (models:/tumorseg@champion did not load")
    assert trained.model.name == "unet"
    reference = _trained_network(_params(tmp_path), 0).network.state_dict()
    assert all(torch.equal(reference[k], v) for k, v in trained.network.state_dict().items())


def test_a_given_checkpoint_is_the_network_timed(tmp_path: Path) -> None:
    params = _params(tmp_path)
    random_net = _trained_network(params, 3)
    checkpoint = tmp_path / "best.ckpt"
    state = {f"{NETWORK_PREFIX}{k}": v for k, v in random_net.network.state_dict().items()}
    torch.save({"state_dict": state, CONFIG_CHECKPOINT_KEY: random_net.config}, checkpoint)
    trained, weights = _bench_network(params, str(checkpoint), seed=0)
    assert weights == f"checkpoint {checkpoint}"
    loaded = trained.network.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in random_net.network.state_dict().items())
    assert _bench_network(params, "random", seed=0)[1] == "random weights (--model random)"
