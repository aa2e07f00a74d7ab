"""bfloat16 variants: a torch.export program of the network in bfloat16, loaded and run like a deployment."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from tumorseg.compression.config import CompressConfig
from tumorseg.compression.onnx_export import ReducedPrecision, export_program
from tumorseg.compression.report import VariantResult, choose_edge, report_markdown
from tumorseg.compression.variants import BFLOAT16_SOURCES, _kind
from tumorseg.errors import DataError
from tumorseg.models.package import load_artifacts
from tumorseg.models.program_network import ExportedProgramNetwork

PATCH = (16, 16, 16)


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return UNet(3, 4, 3, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="instance").eval()


def windows(batch: int, size: tuple[int, ...] = PATCH) -> torch.Tensor:
    return torch.randn((batch, 4, *size), generator=torch.Generator().manual_seed(batch))


def test_bfloat16_program_is_half_the_weights_and_runs_any_batch_and_window_size(tmp_path: Path) -> None:
    network = tiny_unet()
    path = export_program(
        ReducedPrecision(tiny_unet(), torch.bfloat16), tmp_path / "bf16.pt2", windows(2), what="bf16 network"
    )
    weights = sum(p.numel() for p in network.parameters())
    with zipfile.ZipFile(path) as archive:  # a .pt2 is a zip: graph (JSON), weights, constants
        names = {info.filename: info.file_size for info in archive.infolist()}
    assert sum(size for name, size in names.items() if "/data/weights/weight_" in name) == 2 * weights  # bf16
    assert all(size == 0 for name, size in names.items() if "sample_inputs" in name)  # no example input kept
    program = ExportedProgramNetwork(path)
    assert program.eval() is program and program.train() is program  # exported modules cannot switch modes
    with torch.no_grad():
        for x in (windows(1), windows(3), windows(2, (24, 16, 32))):  # last batch of 1, other window sizes
            got, expected = program(x), network(x)
            assert got.dtype == torch.float32 and got.shape == expected.shape
            probs = torch.sigmoid(got) - torch.sigmoid(expected)
            assert 0 < float(probs.abs().max()) < 0.05  # rounded to bfloat16, not a float32 copy
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_export_failure_and_unreadable_program_are_one_line_data_errors(tmp_path: Path) -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :3] if x.sum() > 0 else -x[:, :3]  # control flow on values: not exportable

    with pytest.raises(DataError, match=r"^torch.export of the odd network failed") as failure:
        export_program(DataDependent(), tmp_path / "odd.pt2", windows(2), what="odd network")
    assert "\n" not in str(failure.value)
    assert not list(tmp_path.iterdir())  # nothing half-written
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a program")
    with pytest.raises(DataError, match=r"junk.pt2: not a torch.export program PyTorch can load"):
        ExportedProgramNetwork(junk)
    with pytest.raises(DataError, match=r"missing.pt2: no exported program file"):
        ExportedProgramNetwork(tmp_path / "missing.pt2")


def test_registered_artifacts_load_in_the_runtime_their_file_needs(tmp_path: Path) -> None:
    path = export_program(ReducedPrecision(tiny_unet(), torch.bfloat16), tmp_path / "m.pt2", windows(2))
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "model": {"name": "unet", "output": "regions"},
                "data_loader": {"patch_size": list(PATCH)},
                "preprocess": {"target_spacing_mm": [2.0, 2.0, 2.0]},
            }
        )
    )
    trained = load_artifacts({"program": path, "config": config, "predict": tmp_path / "p.json"})
    assert isinstance(trained.network, ExportedProgramNetwork)
    assert trained.spacing_mm == (2.0, 2.0, 2.0) and trained.roi_size == PATCH
    with pytest.raises(DataError, match=r"expected config with weights, onnx or program"):
        load_artifacts({"config": config})
    config.write_text("{}")
    with pytest.raises(DataError, match=r"lacks the sections \['model', 'data_loader', 'preprocess'\]"):
        load_artifacts({"program": path, "config": config})


@pytest.mark.parametrize("name", sorted(BFLOAT16_SOURCES))
def test_bfloat16_variants_are_configurable_and_built_by_the_bfloat16_builder(name: str) -> None:
    assert name in CompressConfig(variants=("fp32", name)).variants
    assert _kind(name) == "bf16"


def _row(name: str, runtime: str, latency: float, mb: float, **details: object) -> VariantResult:
    return VariantResult(
        name, runtime, file_mb=mb, latency_s=latency, dice={"mean": 0.9}, accepted=True, details=dict(details)
    )


def test_a_bfloat16_program_can_be_the_edge_and_emulated_bfloat16_is_flagged() -> None:
    fp32 = _row("fp32", "pytorch", 1.0, 18.0)
    fp32.accepted = None
    onnx = _row("pruned_structured_wint8", "onnxruntime", 0.6, 2.4)
    bf16 = _row("pruned_structured_bf16", "torch.export", 0.45, 4.4, native_bfloat16=False)
    edge = choose_edge([fp32, onnx, bf16], speedup=2.0, size_ratio=3.0)
    assert edge is bf16  # the only one meeting both targets
    assert choose_edge([fp32, onnx, bf16], speedup=2.0, size_ratio=5.0) is bf16  # none meets both: fastest
    text = report_markdown([fp32, onnx, bf16], edge, context={})
    assert "| pruned_structured_bf16 **(edge)** | torch.export |" in text
    assert "pruned_structured_bf16: this CPU has no native bfloat16" in text
    bf16.details["native_bfloat16"] = True
    assert "no native bfloat16" not in report_markdown([fp32, onnx, bf16], edge, context={})
