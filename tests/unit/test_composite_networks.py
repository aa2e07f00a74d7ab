"""Seed 003's networks: the attention-gated EfficientNet U-Net and the slice ConvLSTM in front of it."""

from __future__ import annotations

import pytest
import torch

from tumorseg.errors import ConfigError
from tumorseg.models.composite_networks import EfficientNetAttentionUNet, SliceConvLSTM, SliceLSTMSegmenter
from tumorseg.models.networks import ModelConfig, build_network
from tumorseg.training.transfer import encoder_levels

SMALL = {"backbone": "efficientnet-b0", "decoder_channels": [16, 8, 8, 4, 4]}


def _seed003(**lstm: object) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "efficientnet_attention_unet",
            "efficientnet_attention_unet": SMALL,
            "slice_lstm": {"enabled": True, **lstm},
        }
    )


def test_every_skip_passes_an_attention_gate_that_changes_the_output() -> None:
    torch.manual_seed(0)
    net = build_network(
        _seed003().model_copy(update={"slice_lstm": ModelConfig().slice_lstm}),
        spatial_dims=3,
        patch_size=(32,) * 3,
    )
    assert isinstance(net, EfficientNetAttentionUNet)
    assert len(net.gates) == net.skip_connect == 4
    x = torch.randn(2, 4, 32, 32, 32)
    net.eval()
    with torch.no_grad():
        gated = net(x)
        for gate in net.gates:  # a gate that lets everything through: the plain FlexibleUNet path
            gate.forward = lambda g, x: x  # type: ignore[method-assign]
        open_gates = net(x)
    assert gated.shape == (2, 3, 32, 32, 32)
    assert not torch.allclose(gated, open_gates)


def test_the_slice_lstm_starts_as_the_identity_and_learns_a_correction() -> None:
    torch.manual_seed(0)
    lstm = SliceConvLSTM(4, hidden=4, axis=2)
    x = torch.randn(1, 4, 8, 8, 6)
    assert torch.equal(lstm(x), x)  # zero-initialised output layer: training starts from the segmenter alone
    optimiser = torch.optim.Adam(lstm.parameters(), lr=0.02)
    target = x.mean(dim=-1, keepdim=True).expand_as(x)  # a correction that needs every slice
    for _ in range(150):
        loss = (lstm(x) - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert (lstm(x) - target).square().mean() < (x - target).square().mean() * 0.5


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_the_slice_lstm_carries_information_along_its_axis_in_both_directions(axis: int) -> None:
    torch.manual_seed(0)
    lstm = SliceConvLSTM(4, hidden=4, axis=axis)
    torch.nn.init.normal_(lstm.project.weight)
    x = torch.zeros(1, 4, 6, 6, 6, requires_grad=True)
    middle = [slice(None)] * 5
    middle[2 + axis] = 3
    lstm(x)[tuple(middle)].sum().backward()
    along = x.grad.abs().sum(dim=[d for d in range(5) if d != 2 + axis])
    assert (along > 0).all()  # slices before and after the middle one reach it


def test_the_seed003_system_is_the_lstm_in_front_of_the_attention_unet() -> None:
    net = build_network(_seed003(hidden_channels=4), spatial_dims=3, patch_size=(32,) * 3)
    assert isinstance(net, SliceLSTMSegmenter)
    assert isinstance(net.lstm, SliceConvLSTM) and isinstance(net.segmenter, EfficientNetAttentionUNet)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 4, 32, 32, 32)).shape == (1, 3, 32, 32, 32)
    levels = encoder_levels(net, (32, 32, 32), 4)
    assert levels and not any(name.startswith("lstm.") for name in levels)  # pre-processing, not encoder


def test_the_slice_lstm_is_for_volumes_and_needs_an_odd_kernel() -> None:
    with pytest.raises(ConfigError, match="slice_lstm.*3-D"):
        build_network(_seed003(), spatial_dims=2, patch_size=(32, 32))
    with pytest.raises(ValueError, match="odd"):
        _seed003(kernel_size=4)


def test_the_seed003_system_exports_to_onnx_for_its_window(tmp_path) -> None:
    from tumorseg.models.onnx_network import export_fp32_onnx

    net = build_network(_seed003(hidden_channels=4), spatial_dims=3, patch_size=(32,) * 3)
    torch.nn.init.normal_(net.lstm.project.weight, std=0.1)
    assert export_fp32_onnx(net, tmp_path / "net.onnx", (32, 32, 32)) < 1e-3
