from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from tumorseg.compression.config import CompressConfig
from tumorseg.compression.onnx_export import export_onnx
from tumorseg.compression.quantize import quantize_weights_int8
from tumorseg.compression.variants import _kind
from tumorseg.errors import DataError
from tumorseg.models.onnx_network import OnnxRuntimeNetwork

PATCH = (16, 16, 16)


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return UNet(3, 4, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="instance").eval()


def example(batch: int = 2) -> torch.Tensor:
    return torch.randn((batch, 4, *PATCH), generator=torch.Generator().manual_seed(1))


def _optimized_ops(path: Path, tmp_path: Path) -> Counter[str]:
    """Operator counts of the graph ONNX Runtime actually runs (after its load-time optimisation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # constant folding
    options.optimized_model_filepath = str(tmp_path / f"optimized_{path.name}")
    ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def test_weight_only_int8_stores_int8_weights_runs_the_float_graph_and_stays_close(tmp_path: Path) -> None:
    network = tiny_unet()
    fp32 = export_onnx(network, tmp_path / "fp32.onnx", example(), exporter="torchscript")
    stats = quantize_weights_int8(fp32, tmp_path / "w8.onnx")
    convs = Counter(
        n.op_type for n in onnx.load(str(fp32)).graph.node if n.op_type in ("Conv", "ConvTranspose")
    )
    assert stats.quantized_nodes == dict(convs) and stats.calibration_windows == 0
    model = onnx.load(str(tmp_path / "w8.onnx"))
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == sum(convs.values())
    weights = sum(int(np.prod(t.dims)) for t in int8)
    saved = (tmp_path / "fp32.onnx").stat().st_size - (tmp_path / "w8.onnx").stat().st_size
    assert saved > 2.5 * weights  # 4 bytes -> 1 byte per conv weight (plus one scale per channel)
    # ONNX Runtime folds the Cast/Mul dequantization at load: it runs the same graph as the float model.
    assert _optimized_ops(tmp_path / "w8.onnx", tmp_path) == _optimized_ops(fp32, tmp_path)
    x = example()
    float_probs = torch.sigmoid(OnnxRuntimeNetwork(fp32)(x))
    int8_probs = torch.sigmoid(OnnxRuntimeNetwork(tmp_path / "w8.onnx")(x))
    assert float((float_probs - int8_probs).abs().mean()) < 0.01
    assert float((float_probs - int8_probs).abs().max()) > 0  # really rounded, not a copy
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_weight_only_int8_of_a_model_without_conv_weights_is_a_data_error(tmp_path: Path) -> None:
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :3] * 2.0

    path = export_onnx(Scale(), tmp_path / "s.onnx", example(), exporter="torchscript")
    with pytest.raises(DataError, match=r"weight-only INT8 of the s network: no Conv/ConvTranspose"):
        quantize_weights_int8(path, tmp_path / "q.onnx", what="s network")
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("name", ["onnx_fp32_wint8", "pruned_structured_wint8"])
def test_weight_only_variants_are_configurable_and_built_by_the_weight_only_builder(name: str) -> None:
    assert name in CompressConfig(variants=("fp32", name)).variants
    assert _kind(name) == "wint8"
