"""The 2-D networks: every model_2d.name builds, shapes on the preprocessed grid, prior-initialised output."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tumorseg.errors import ConfigError
from tumorseg.models.config import PlanarModelConfig
from tumorseg.models.planar_network import CLASSIFIER_OUTPUTS, build_planar_network

SMALL = {
    "input_size": 32,
    "unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "attention_unet": {"channels": [4, 8, 16], "strides": [2, 2]},
    "segresnet": {"init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1]},
    "dynunet": {"base_filters": 4, "max_filters": 16, "max_levels": 2},
    "classifier": {"channels": [4, 8], "strides": [2, 2]},
}


@pytest.mark.parametrize("name", ["unet", "attention_unet", "segresnet", "dynunet"])
def test_network_maps_preprocessed_grid_to_logits(name: str) -> None:
    cfg = PlanarModelConfig.model_validate({**SMALL, "name": name})
    network = build_planar_network(cfg).eval()
    with torch.no_grad():
        seg, classes = network(torch.randn(2, 1, 48, 48))  # preprocessed size 48, network size 32
    assert seg.shape == (2, 1, 48, 48)
    assert classes.shape == (2, CLASSIFIER_OUTPUTS)


def test_output_starts_at_the_foreground_prior() -> None:
    cfg = PlanarModelConfig.model_validate({**SMALL, "foreground_prior": 0.05})
    network = build_planar_network(cfg).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        seg, _ = network(torch.randn(4, 1, 32, 32))
    assert float(seg.mean()) == pytest.approx(math.log(0.05 / 0.95), abs=1.0)
    assert float(torch.sigmoid(seg).mean()) < 0.15


def test_output_mode_is_fixed_to_binary() -> None:
    assert PlanarModelConfig().out_channels == 1
    with pytest.raises(ValueError):
        PlanarModelConfig.model_validate({"output": "regions"})


def test_input_size_the_network_cannot_halve_is_a_config_error() -> None:
    from tumorseg.config import apply_overrides, read_params
    from tumorseg.training.config import load_planar_training_config

    root = Path(__file__).resolve().parents[2]
    params = apply_overrides(read_params(root / "params.yaml"), {"model_2d.input_size": 100})
    with pytest.raises(ConfigError, match="model_2d.input_size"):
        load_planar_training_config(params)
