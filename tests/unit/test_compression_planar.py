"""The dims-generic compression pieces on a tiny 2-D model: two-output export and parity, dynamic INT8,
the 2-D model kind (pruning the segmenter only, calibration images), and the 2-D tuning keys."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from tumorseg.compression import pruning
from tumorseg.compression.config import CompressConfig, QuantizationConfig, VariantName
from tumorseg.compression.dims import MODEL_KINDS, ImageModels, VolumeModels
from tumorseg.compression.onnx_export import (
    OnnxRuntimeOutputs,
    ReducedPrecision,
    export_onnx,
    max_abs_difference,
    max_output_difference,
)
from tumorseg.compression.quantize import planar_calibration_images, quantize_dynamic_int8
from tumorseg.compression.variants import VariantBuilder, _kind
from tumorseg.config import read_params, section
from tumorseg.errors import ConfigError, DataError
from tumorseg.models.config import PlanarModelConfig
from tumorseg.models.planar_network import build_planar_network

REPO_ROOT = Path(__file__).resolve().parents[2]
SIDE = 64


def tiny_planar(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = PlanarModelConfig.model_validate(
        {
            "input_size": 32,
            "unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
            "classifier": {"channels": [4, 8], "strides": [2, 2]},
        }
    )
    return build_planar_network(cfg).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn((batch, 1, SIDE, SIDE), generator=torch.Generator().manual_seed(1))


def _export(network: nn.Module, path: Path, exporter: str = "torchscript") -> Path:
    return export_onnx(network, path, images(), exporter=exporter, **ImageModels.export_options)


def test_a_two_output_network_exports_with_a_dynamic_batch_and_matches_pytorch(tmp_path: Path) -> None:
    network = tiny_planar()
    path = _export(network, tmp_path / "planar.onnx")
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["logits", "class_logits"]
    assert max_abs_difference(network, path, images()) < 1e-4
    other = images(3)  # a batch size the exporter never saw
    got, expected = OnnxRuntimeOutputs(path)(other), network(other)
    assert isinstance(got, tuple) and [g.shape for g in got] == [e.shape for e in expected]
    assert max_output_difference(got, expected) < 1e-4
    with pytest.raises(DataError, match=r"output shapes .* differ"):
        max_output_difference(got[:1], expected)


def test_reduced_precision_casts_every_output_back_to_float32() -> None:
    network = tiny_planar()
    with torch.no_grad():
        outputs = ReducedPrecision(copy.deepcopy(network), torch.bfloat16)(images())
        expected = network(images())
    assert all(o.dtype == torch.float32 for o in outputs)
    assert 0 < max_output_difference(outputs, expected) < 1.0


# the dynamo exporter's graph records shapes ONNX Runtime's dynamic quantizer trips over
@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_dynamic_int8_turns_convolutions_into_integer_ones_and_stays_close(
    tmp_path: Path, exporter: str
) -> None:
    network = tiny_planar()
    fp32 = _export(network, tmp_path / "fp32.onnx", exporter)
    stats = quantize_dynamic_int8(fp32, tmp_path / "dyn.onnx", QuantizationConfig())
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "dyn.onnx")).graph.node)
    convs = Counter(n.op_type for n in onnx.load(str(fp32)).graph.node)["Conv"]
    assert stats.quantized_nodes == {"Conv": convs} == {"Conv": ops["ConvInteger"]} and "Conv" not in ops
    assert stats.calibration_windows == 0  # no calibration: ranges come from each input
    seg, _ = OnnxRuntimeOutputs(tmp_path / "dyn.onnx")(images())
    reference, _ = network(images())
    difference = float((torch.sigmoid(seg) - torch.sigmoid(reference.detach())).abs().max())
    assert 0 < difference < 0.1  # really quantized, and close


def test_dynamic_int8_of_a_network_without_convolutions_is_a_data_error(tmp_path: Path) -> None:
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2.0

    path = export_onnx(Scale(), tmp_path / "s.onnx", images(), exporter="torchscript")
    with pytest.raises(DataError, match=r"dynamic INT8 of the network: no Conv layer"):
        quantize_dynamic_int8(path, tmp_path / "q.onnx", QuantizationConfig())
    assert not (tmp_path / "q.onnx").exists()


def test_every_variant_name_has_a_builder() -> None:
    for name in get_args(VariantName):
        assert callable(getattr(VariantBuilder, f"_build_{_kind(name)}")), name
    assert {_kind("int8_dynamic"), _kind("pruned_structured_int8_dynamic")} == {"int8_dynamic"}


def test_the_2d_kind_prunes_the_segmenter_and_leaves_the_classifier_as_it_was() -> None:
    network = tiny_planar()
    pruned = copy.deepcopy(network)
    target, window, out_channels = MODEL_KINDS[2].prunable(pruned, None, images()[:1])
    assert target is pruned.segmenter and window.shape == (1, 1, 32, 32) and out_channels == 1
    for _ in pruning.prune_channels_in_rounds(target, 0.5, window, out_channels):
        pass
    assert pruning.count_parameters(pruned.segmenter) < pruning.count_parameters(network.segmenter)
    for kept, original in zip(
        pruned.classifier.state_dict().values(), network.classifier.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(kept, original)
    with torch.no_grad():
        (seg, classes), (_, reference) = pruned(images()), network(images())
    assert seg.shape == (2, 1, SIDE, SIDE)
    torch.testing.assert_close(classes, reference)  # the detector's scores are the fp32 model's


def test_the_volume_kind_prunes_the_whole_network_keeping_its_output_channels() -> None:
    class Trained:
        model = type("Model", (), {"out_channels": 3})()

    network, window = nn.Conv3d(4, 3, 1), torch.zeros(1, 4, 8, 8, 8)
    assert VolumeModels().prunable(network, Trained(), window) == (network, window, 3)


def test_2d_calibration_uses_whole_validation_images(tmp_path: Path) -> None:
    import pandas as pd

    rows = []
    for case_id in ("a", "b", "c"):
        np.savez(tmp_path / f"{case_id}.npz", image=np.ones((SIDE, SIDE), np.float32))
        rows.append({"case_id": case_id, "has_tumour": False, "has_mask": False, "path": f"{case_id}.npz"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    cfg = QuantizationConfig(calibration_cases=2)
    windows, ids = planar_calibration_images(tmp_path, ["c", "a", "b"], cfg)
    assert ids == ["c", "a"] and all(w.shape == (1, 1, SIDE, SIDE) and w.dtype == np.float32 for w in windows)
    with pytest.raises(DataError, match=r"split_2d.json: no 'val' cases to calibrate INT8"):
        planar_calibration_images(tmp_path, [], cfg, split_file="split_2d.json")


def test_compress_dims_2_reads_the_2d_twins_of_the_compress_keys() -> None:
    cfg = section("compress", read_params(REPO_ROOT / "params.yaml"))
    planar = cfg.for_dims(2)
    assert cfg.for_dims(3) is cfg
    assert (planar.out_dir, planar.variants) == (cfg.out_dir_2d, cfg.variants_2d) and planar.model is None
    assert planar.out_dir != cfg.out_dir and {"int8_dynamic", "int8", "pruned_structured"} <= set(
        planar.variants
    )
    assert planar.latency.case_dir == cfg.latency.case_dir_2d and planar.dice_tolerance == cfg.dice_tolerance
    default = CompressConfig(variants=("fp32", "int8_dynamic"), model_2d="m2", latency={"case_dir_2d": "x"})
    assert default.for_dims(2).variants == ("fp32", "int8_dynamic")  # variants_2d null: variants
    assert (default.for_dims(2).model, default.for_dims(2).latency.case_dir) == ("m2", "x")
    with pytest.raises(ConfigError, match=r"compress: .*variants must not repeat"):
        section("compress", {"compress": {"variants_2d": ["fp32", "fp32"]}})


def test_the_2d_study_reads_the_2d_twins_of_the_study_keys() -> None:
    cfg = section("tune", read_params(REPO_ROOT / "params.yaml"))
    planar = cfg.for_dims(2)
    assert cfg.for_dims(3) is cfg
    assert (planar.study_name, planar.best_params_file) == (cfg.study_name_2d, cfg.best_params_file_2d)
    assert planar.space == cfg.space_2d and planar.trial_overrides == cfg.trial_overrides_2d
    assert all(key.split(".")[0] in ("train_2d", "model_2d") for key in planar.space)
    assert (planar.storage, planar.sampler, planar.n_jobs) == (cfg.storage, cfg.sampler, cfg.n_jobs)
    with pytest.raises(ConfigError, match=r"tune: .*study_name_2d must differ from study_name"):
        section("tune", {"tune": {"study_name": "same", "study_name_2d": "same"}})
