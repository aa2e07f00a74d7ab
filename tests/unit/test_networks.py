"""Networks, losses and inference helpers built by name from the ``model:``/``loss:`` sections."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tumorseg.data.conventions import canonical_from_regions, regions_from_canonical
from tumorseg.errors import ConfigError
from tumorseg.models.config import LossConfig
from tumorseg.models.inference import labels_to_regions, logits_to_labels, regions_to_labels
from tumorseg.models.losses import build_loss, with_deep_supervision
from tumorseg.models.networks import (
    ModelConfig,
    build_network,
    check_patch_size,
    downsampling_factors,
    dynunet_kernels_strides,
)

TINY = {
    "unet": {"unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1}},
    "attention_unet": {"attention_unet": {"channels": [4, 8, 16], "strides": [2, 2]}},
    "segresnet": {"segresnet": {"init_filters": 4, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]}},
    "dynunet": {"dynunet": {"base_filters": 4, "max_filters": 16, "max_levels": 3}},
    "swinunetr": {"swinunetr": {"feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}},
    "flexible_unet": {"flexible_unet": {"backbone": "efficientnet-b0", "decoder_channels": [16, 8, 8, 4, 4]}},
    "efficientnet_attention_unet": {
        "efficientnet_attention_unet": {"backbone": "efficientnet-b0", "decoder_channels": [16, 8, 8, 4, 4]}
    },
}


def _model(name: str, output: str = "regions", **extra: object) -> ModelConfig:
    return ModelConfig.model_validate({"name": name, "output": output, **TINY[name], **extra})


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("dims", [3, 2])
def test_every_network_maps_a_patch_to_same_size_logits(name: str, dims: int) -> None:
    patch = (64 if name == "swinunetr" else 32,) * dims
    cfg = _model(name)
    check_patch_size(cfg, patch, key="data_loader.patch_size")
    net = build_network(cfg, spatial_dims=dims, patch_size=patch).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 4, *patch))
    assert out.shape == (1, 3, *patch)
    assert torch.isfinite(out).all()


def test_labels_output_has_four_channels() -> None:
    net = build_network(_model("unet", output="labels"), spatial_dims=3, patch_size=(16, 16, 16)).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 4, 16, 16, 16)).shape == (2, 4, 16, 16, 16)


def test_default_unet_is_the_classic_32_to_256_unet() -> None:
    cfg = ModelConfig()
    assert cfg.name == "unet"
    assert cfg.unet.channels == (32, 64, 128, 256)
    assert cfg.output == "regions"


def test_flexible_unet_needs_no_torchvision_and_no_download() -> None:
    # In a fresh interpreter: build the EfficientNet U-Net with sockets disabled, then check torchvision
    # was never imported (it is not installable here) and nothing tried to reach the network.
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k):\n"
        "    raise RuntimeError('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "from tumorseg.models.networks import ModelConfig, build_network\n"
        "cfg = ModelConfig(name='flexible_unet')\n"
        "build_network(cfg, spatial_dims=3, patch_size=(32, 32, 32))\n"
        "print('torchvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_dynunet_strides_follow_patch_and_spacing() -> None:
    kernels, strides = dynunet_kernels_strides(
        (64, 64, 64), (1.0, 1.0, 1.0), max_levels=5, min_feature_size=4
    )
    assert strides[0] == [1, 1, 1]
    assert strides[1:] == [[2, 2, 2]] * 4  # 64 -> 4 at the bottleneck
    assert len(kernels) == len(strides)
    # a thick third axis waits until the in-plane spacing catches up
    _, strides = dynunet_kernels_strides((64, 64, 32), (1.0, 1.0, 3.0), max_levels=5, min_feature_size=4)
    assert strides[1] == [2, 2, 1]
    assert downsampling_factors(_model("dynunet"), (64, 64, 32), (1.0, 1.0, 3.0))[0] == 8  # max_levels 3


@pytest.mark.parametrize(
    ("name", "patch", "factor"),
    [("unet", (30, 32, 32), 4), ("segresnet", (18, 16, 16), 4), ("swinunetr", (80, 64, 64), 32)],
)
def test_patch_not_divisible_by_the_network_factor_names_the_key(
    name: str, patch: tuple[int, ...], factor: int
) -> None:
    with pytest.raises(ConfigError, match=rf"^data_loader\.patch_size: .*not divisible by \[{factor}") as exc:
        check_patch_size(_model(name), patch, key="data_loader.patch_size")
    assert "\n" not in str(exc.value)


def test_swinunetr_refuses_patches_below_64() -> None:
    with pytest.raises(ConfigError, match=r"smaller than 64"):
        check_patch_size(_model("swinunetr"), (32, 32, 32), key="data_loader.patch_size")


def test_label_region_conversions_match_the_numpy_conventions() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(6, 5, 4)).astype(np.uint8)
    regions = labels_to_regions(torch.from_numpy(labels)[None, None])[0].numpy().astype(bool)
    assert np.array_equal(regions, regions_from_canonical(labels))
    back = regions_to_labels(torch.from_numpy(regions)[None])[0, 0].numpy()
    assert np.array_equal(back, labels)
    # un-nested regions are nested as canonical_from_regions does
    messy = rng.random((3, 6, 5, 4)) > 0.5
    assert np.array_equal(
        regions_to_labels(torch.from_numpy(messy)[None])[0, 0].numpy(), canonical_from_regions(messy)
    )


def test_logits_to_labels_thresholds_regions_and_argmaxes_labels() -> None:
    region_logits = torch.tensor([[5.0, 5.0, -5.0]]).reshape(1, 3, 1, 1, 1)
    assert logits_to_labels(region_logits, "regions").item() == 1  # WT+TC, no ET -> NCR
    label_logits = torch.tensor([[0.0, 0.0, 0.0, 9.0]]).reshape(1, 4, 1, 1, 1)
    assert logits_to_labels(label_logits, "labels").item() == 3


@pytest.mark.parametrize("name", ["dice", "dice_ce", "dice_focal", "bce"])
def test_region_losses_prefer_the_right_answer(name: str) -> None:
    target = (torch.rand(2, 3, 8, 8, 8) > 0.7).float()
    loss = build_loss(LossConfig(name=name), "regions")
    good = loss(target * 12 - 6, target)
    bad = loss(6 - target * 12, target)
    assert torch.isfinite(good) and good < bad


@pytest.mark.parametrize("name", ["dice", "dice_ce", "dice_focal", "ce"])
def test_label_losses_prefer_the_right_answer(name: str) -> None:
    labels = torch.randint(0, 4, (2, 1, 8, 8, 8))
    onehot = torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    loss = build_loss(LossConfig(name=name), "labels")
    assert loss(onehot * 12, labels) < loss(-onehot * 12, labels)


def test_region_dice_ce_uses_binary_not_softmax_cross_entropy() -> None:
    # overlapping regions: all three channels on. Softmax CE could never reach ~0 here; BCE does.
    target = torch.ones(1, 3, 4, 4, 4)
    loss = build_loss(LossConfig(name="dice_ce", lambda_dice=0.0), "regions")
    assert loss(torch.full((1, 3, 4, 4, 4), 20.0), target) < 1e-6


def test_mismatched_loss_and_output_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="^loss.name: bce needs model.output: regions"):
        build_loss(LossConfig(name="bce"), "labels")
    with pytest.raises(ConfigError, match="^loss.name: ce needs model.output: labels"):
        build_loss(LossConfig(name="ce"), "regions")


def test_deep_supervision_loss_takes_a_list_of_heads() -> None:
    target = (torch.rand(1, 3, 8, 8, 8) > 0.5).float()
    loss = with_deep_supervision(build_loss(LossConfig(), "regions"), "exp")
    heads = [target * 12 - 6, torch.zeros_like(target)]
    assert torch.isfinite(loss(heads, target))
