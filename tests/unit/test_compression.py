"""Compression building blocks on a tiny U-Net: pruning, ONNX parity, INT8 quantization, the gate, bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from tumorseg.compression import pruning
from tumorseg.compression.config import CompressConfig, QuantizationConfig
from tumorseg.compression.fine_tune import FineTuneResult, best_weights_callback, distillation_loss
from tumorseg.compression.measure import measure_latencies
from tumorseg.compression.onnx_export import export_onnx, max_abs_difference
from tumorseg.compression.quantize import calibration_windows, check_op_types, quantize_int8
from tumorseg.compression.report import (
    VariantResult,
    apply_gate,
    choose_edge,
    meets_targets,
    ratios,
    report_markdown,
)
from tumorseg.compression.variants import _split_steps
from tumorseg.config import read_params, section
from tumorseg.errors import ConfigError, DataError
from tumorseg.models.onnx_network import OnnxRuntimeNetwork

REPO_ROOT = Path(__file__).resolve().parents[2]
PATCH = (16, 16, 16)


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UNet(3, 4, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="instance").eval()


def example(batch: int = 2, shape: tuple[int, ...] = PATCH) -> torch.Tensor:
    return torch.randn((batch, 4, *shape), generator=torch.Generator().manual_seed(1))


def _tiny_npz(root: Path, case_ids: list[str], shape: tuple[int, int, int] = (20, 18, 22)) -> Path:
    rng = np.random.default_rng(0)
    (root / "cases").mkdir(parents=True)
    for case_id in case_ids:
        brain = np.zeros(shape, dtype=bool)
        brain[3:-3, 3:-3, 3:-3] = True
        image = (rng.normal(size=(4, *shape)) * brain).astype(np.float16)
        np.savez(root / "cases" / f"{case_id}.npz", image=image, label=np.zeros(shape, np.uint8), brain=brain)
    return root


# ---------------------------------------------------------------------------- config
def test_params_yaml_compress_section_validates_with_the_documented_defaults() -> None:
    cfg = section("compress", read_params(REPO_ROOT / "params.yaml"))
    assert cfg.dice_tolerance == 0.01 and cfg.alias == "edge" and cfg.variants[0] == "fp32"
    assert (cfg.target_speedup, cfg.target_size_ratio) == (2.0, 3.0)
    assert cfg.pruning.val_every > 0  # the fine-tuned weights are chosen on the validation split


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"variants": ["fp32", "int4"]}, "compress.variants"),
        ({"alias": "champion"}, "compress"),
        ({"pruning": {"structured_ratio": 1.0}}, "compress.pruning.structured_ratio"),
        ({"pruning": {"distill_loss": "l1"}}, "compress.pruning.distill_loss"),
        ({"pruning": {"structured_rounds": 0}}, "compress.pruning.structured_rounds"),
        ({"quantization": {"calibration_split": "test"}}, "compress.quantization.calibration_split"),
    ],
)
def test_bad_compress_params_name_the_key(raw: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"params.yaml: {key}"):
        section("compress", {"compress": raw})


# ---------------------------------------------------------------------------- pruning
def test_global_unstructured_pruning_reaches_the_sparsity_and_is_made_permanent() -> None:
    network = tiny_unet()
    before = pruning.count_parameters(network)
    pruning.prune_unstructured(network, 0.6)
    pruning.make_permanent(network)
    assert not any(name.endswith(("_orig", "_mask")) for name, _ in network.named_parameters())
    assert not any(name.endswith("_mask") for name, _ in network.named_buffers())
    assert pruning.conv_sparsity(network) == pytest.approx(0.6, abs=0.01)
    assert pruning.count_parameters(network) == before
    assert pruning.count_nonzero(network) < 0.5 * before
    assert network(example()).shape == (2, 3, *PATCH)


def test_shared_prelu_expansion_keeps_the_function() -> None:
    network = tiny_unet()
    x = example()
    with torch.no_grad():
        expected = network(x)
        replaced = pruning.expand_shared_prelu(network, x[:1])
        got = network(x)
    assert replaced > 0
    assert all(m.num_parameters > 1 for m in network.modules() if isinstance(m, nn.PReLU))
    torch.testing.assert_close(got, expected)


def test_structured_channel_pruning_removes_parameters_and_keeps_the_interface() -> None:
    network = tiny_unet()
    before = pruning.count_parameters(network)
    macs_before = pruning.gmacs(network, example(1))
    pruning.prune_channels(network, 0.5, example(1), out_channels=3)
    after = pruning.count_parameters(network)
    assert after < 0.5 * before
    assert pruning.gmacs(network, example(1)) < 0.6 * macs_before
    first = next(m for m in network.modules() if isinstance(m, nn.Conv3d))
    assert first.in_channels == 4  # the input channels are kept
    with torch.no_grad():
        assert network(example(1, (24, 16, 32))).shape == (1, 3, 24, 16, 32)


def test_channel_pruning_can_keep_channel_counts_in_multiples_for_reduced_precision_kernels() -> None:
    torch.manual_seed(0)
    network = UNet(3, 4, 3, channels=(32, 64), strides=(2,), num_res_units=1, norm="instance").eval()
    plain = copy.deepcopy(network)
    pruning.prune_channels(plain, 0.3, example(1), out_channels=3)
    pruning.prune_channels(network, 0.3, example(1), out_channels=3, channel_multiple=8)

    def widths(net: nn.Module) -> set[int]:
        return {m.out_channels for m in net.modules() if isinstance(m, nn.Conv3d)} - {3}

    assert widths(plain) == {22, 44}  # 30 % off 32 and 64 (rounded by the pruner), not multiples of 8
    assert widths(network) == {16, 40}  # rounded down to multiples of 8
    with torch.no_grad():
        assert network(example(1)).shape == (1, 3, *PATCH)


def test_channel_pruning_in_rounds_removes_the_ratio_step_by_step() -> None:
    one_shot = tiny_unet()
    pruning.prune_channels(one_shot, 0.5, example(1), out_channels=3)
    network = tiny_unet()
    before = pruning.count_parameters(network)
    sizes = []
    for number in pruning.prune_channels_in_rounds(network, 0.5, example(1), out_channels=3, rounds=2):
        sizes.append((number, pruning.count_parameters(network)))
    assert [n for n, _ in sizes] == [1, 2]
    assert before > sizes[0][1] > sizes[1][1]  # half the cut after round 1, the rest after round 2
    assert sizes[1][1] == pruning.count_parameters(one_shot)  # the same architecture as one shot
    with torch.no_grad():
        assert network(example(1)).shape == (1, 3, *PATCH)


@pytest.mark.parametrize(("total", "rounds", "shares"), [(300, 1, [300]), (10, 3, [4, 3, 3]), (0, 2, [0, 0])])
def test_fine_tune_steps_are_shared_over_the_rounds(total: int, rounds: int, shares: list[int]) -> None:
    assert _split_steps(total, rounds) == shares


# ---------------------------------------------------------------------------- distillation and fine-tune
@pytest.mark.parametrize(("kind", "output"), [("mse", "regions"), ("kl", "regions"), ("kl", "labels")])
def test_distillation_loss_is_zero_at_agreement_and_training_on_it_reduces_it(kind: str, output: str) -> None:
    channels = 3 if output == "regions" else 4
    torch.manual_seed(0)
    teacher = nn.Conv3d(4, channels, 3, padding=1)
    student = nn.Conv3d(4, channels, 1)  # a smaller student: cannot copy the teacher exactly
    x = example(2, (8, 8, 8))
    with torch.no_grad():
        soft = teacher(x)
    zero = distillation_loss(soft, soft, kind=kind, output=output, temperature=2.0)
    assert float(zero) == pytest.approx(0.0, abs=1e-6)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = distillation_loss(student(x), soft, kind=kind, output=output, temperature=2.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[0] > 0
    assert losses[-1] < 0.5 * losses[0]


def test_unknown_distillation_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown distillation loss 'l1'"):
        distillation_loss(torch.zeros(1, 3, 2, 2, 2), torch.zeros(1, 3, 2, 2, 2), kind="l1", output="regions")


def test_fine_tune_keeps_the_weights_of_the_best_validation_step() -> None:
    from types import SimpleNamespace

    network = nn.Conv3d(4, 3, 1)
    result = FineTuneResult(steps=4, best_step=4, best_val_dice=None)
    callback = best_weights_callback(network, result)
    snapshots = {}
    for step, dice in [(0, 0.50), (2, 0.80), (4, 0.60)]:  # the fine-tune peaks at step 2, then overfits
        with torch.no_grad():
            network.weight.add_(1.0)
        snapshots[step] = network.weight.detach().clone()
        trainer = SimpleNamespace(
            sanity_checking=False, global_step=step, callback_metrics={"val_dice_mean": torch.tensor(dice)}
        )
        callback.on_validation_end(trainer, None)
    assert result.curve == [[0, 0.5], [2, 0.8], [4, 0.6]]
    assert (result.best_step, result.best_val_dice) == (2, pytest.approx(0.8))
    network.load_state_dict(callback.best)
    torch.testing.assert_close(network.weight.detach(), snapshots[2])


# ---------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("exporter", [pytest.param("dynamo", marks=pytest.mark.slow), "torchscript"])
def test_onnx_export_matches_pytorch_with_dynamic_batch_and_spatial_axes(
    tmp_path: Path, exporter: str
) -> None:
    network = tiny_unet()
    path = export_onnx(network, tmp_path / "m.onnx", example(), opset=18, exporter=exporter)
    assert max_abs_difference(network, path, example()) < 1e-4
    other = example(3, (24, 16, 32))  # batch and window size never seen by the exporter
    session = OnnxRuntimeNetwork(path)
    with torch.no_grad():
        expected = network(other)
    got = session(other)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-4
    assert not list(tmp_path.glob(".*"))  # no temporary file left


class _NumpyRoundTrip(nn.Module):
    """A forward pass leaving the tensor world: ``torch.export`` cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.numpy().mean()) > 1e9:
            return x[:, :3]
        return self.conv(x)


def test_onnx_export_failure_is_one_line_naming_the_variant(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        export_onnx(
            _NumpyRoundTrip().eval(), tmp_path / "m.onnx", example(), exporter="dynamo", what="int8 network"
        )
    message = str(info.value)
    assert message.startswith("ONNX export of the int8 network failed with the dynamo exporter")
    assert "\n" not in message
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------- INT8
def test_int8_quantization_calibrates_on_validation_windows_and_stays_close(tmp_path: Path) -> None:
    network = tiny_unet()
    fp32 = export_onnx(network, tmp_path / "fp32.onnx", example(), exporter="torchscript")
    pre = _tiny_npz(tmp_path / "pre", ["V1", "V2"])
    cfg = QuantizationConfig(calibration_cases=2, patches_per_case=3)
    windows, cases = calibration_windows(pre, ["V1", "V2"], PATCH, cfg)
    assert cases == ["V1", "V2"] and len(windows) == 6
    assert all(w.shape == (1, 4, *PATCH) and w.dtype == np.float32 for w in windows)
    stats = quantize_int8(fp32, tmp_path / "int8.onnx", windows, cfg, calibration_cases=cases)
    assert stats.quantized_nodes.get("Conv", 0) > 0
    assert (tmp_path / "int8.onnx").stat().st_size < (tmp_path / "fp32.onnx").stat().st_size
    x = torch.from_numpy(np.concatenate(windows[:2]))
    float_probs = torch.sigmoid(OnnxRuntimeNetwork(fp32)(x))
    int8_probs = torch.sigmoid(OnnxRuntimeNetwork(tmp_path / "int8.onnx")(x))
    assert float((float_probs - int8_probs).abs().mean()) < 0.02
    assert float((float_probs - int8_probs).abs().max()) > 0  # really quantized, not a copy


def test_no_calibration_cases_is_a_data_error_naming_the_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"split.json: no 'val' cases to calibrate INT8"):
        calibration_windows(tmp_path, [], PATCH, QuantizationConfig(), split_file=tmp_path / "split.json")


def test_unsupported_quantization_layer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"compress.quantization.op_types: LSTM has no INT8"):
        check_op_types(QuantizationConfig(op_types=("Conv", "LSTM")))


def test_model_without_quantizable_layers_is_a_data_error(tmp_path: Path) -> None:
    class Scale(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :3] * 2.0

    path = export_onnx(Scale(), tmp_path / "s.onnx", example(), exporter="torchscript")
    windows = [example(1).numpy()]
    with pytest.raises(DataError, match=r"none of its layers .* is one of compress.quantization.op_types"):
        quantize_int8(path, tmp_path / "q.onnx", windows, QuantizationConfig())
    assert not (tmp_path / "q.onnx").exists()


# ---------------------------------------------------------------------------- the gate
def _result(
    name: str, runtime: str, latency: float, size: float, case_means: dict[str, float]
) -> VariantResult:
    mean = sum(case_means.values()) / len(case_means)
    return VariantResult(
        name=name,
        runtime=runtime,
        file_mb=size,
        latency_s=latency,
        dice={"WT": mean, "TC": mean, "ET": mean, "mean": mean},
        case_dice_mean=case_means,
    )


def test_gate_rejects_a_variant_over_the_tolerance_and_edge_is_the_fastest_accepted() -> None:
    results = [
        _result("fp32", "pytorch", 10.0, 18.0, {"a": 0.80, "b": 0.70}),
        _result("int8", "onnxruntime", 2.0, 4.5, {"a": 0.78, "b": 0.69}),  # drop 0.015: rejected
        _result("pruned_structured", "onnxruntime", 3.0, 4.7, {"a": 0.80, "b": 0.69}),  # drop 0.005
        _result("onnx_fp32", "onnxruntime", 3.0, 18.2, {"a": 0.80, "b": 0.70}),  # same speed, bigger
        _result("pruned_unstructured", "onnxruntime", 1.0, 18.2, {"a": 0.79, "b": 0.69}),  # drop exactly 0.01
        VariantResult(name="fp16", runtime="onnxruntime", file_mb=9.0, reason="no GPU"),
    ]
    apply_gate(results, tolerance=0.01)
    by_name = {r.name: r for r in results}
    assert by_name["int8"].accepted is False and by_name["int8"].dice_drop == pytest.approx(0.015)
    assert by_name["pruned_structured"].accepted is True
    assert by_name["pruned_unstructured"].accepted is True  # a drop equal to the tolerance passes
    assert by_name["fp16"].accepted is False and by_name["fp16"].reason == "no GPU"
    assert by_name["fp32"].accepted is None
    assert choose_edge(results).name == "pruned_unstructured"
    by_name["pruned_unstructured"].accepted = False
    assert choose_edge(results).name == "pruned_structured"  # ties on latency go to the smaller file
    table = report_markdown(results, choose_edge(results), context={})
    assert "| int8 | onnxruntime |" in table and "rejected" in table and "**(edge)**" in table
    assert "- int8 rejected: largest per-case drop on a (mean Dice 0.8000 fp32 -> 0.7800)." in table


def test_the_fastest_variant_is_the_one_with_the_largest_speed_up_over_fp32_timed_alongside() -> None:
    """Each variant is timed in its own block alternating with fp32; the machine got faster between
    the blocks, so the variant with the lowest latency is not the one that beat fp32 by most."""
    results = [
        _result("fp32", "pytorch", 0.039, 1.05, {"a": 0.80, "b": 0.70}),
        _result("onnx_fp32_wint8", "onnxruntime", 0.0327, 0.52, {"a": 0.80, "b": 0.70}),
        _result("pruned_structured_wint8", "onnxruntime", 0.0351, 0.39, {"a": 0.80, "b": 0.70}),
    ]
    results[1].baseline_latency_s = 0.0380  # 1.16x fp32 alongside
    results[2].baseline_latency_s = 0.0506  # 1.44x fp32 alongside
    apply_gate(results, tolerance=0.01)
    assert min(results[1:], key=lambda r: r.latency_s).name == "onnx_fp32_wint8"
    assert choose_edge(results).name == "pruned_structured_wint8"
    assert ratios(choose_edge(results), results)["speedup"] == pytest.approx(0.0506 / 0.0351, abs=1e-4)


def test_edge_prefers_an_accepted_variant_meeting_the_speed_and_size_targets() -> None:
    results = [
        _result("fp32", "pytorch", 1.2, 18.0, {"a": 0.97, "b": 0.96}),
        _result("onnx_fp32", "onnxruntime", 0.5, 18.2, {"a": 0.97, "b": 0.96}),  # fastest, not smaller
        _result("pruned_structured", "onnxruntime", 0.55, 4.7, {"a": 0.965, "b": 0.96}),  # 2.2x, 3.8x
        _result("pruned_structured_int8", "onnxruntime", 1.4, 1.3, {"a": 0.965, "b": 0.96}),  # small, slow
        _result("pruned_wide", "onnxruntime", 0.4, 4.0, {"a": 0.90, "b": 0.90}),  # meets both, over tolerance
    ]
    curve = {"curve": [[0, 0.83], [50, 0.96]], "best_step": 50, "seconds": 80.0}
    results[2].details = {"pruning": {"rounds": 1, "fine_tune": [curve]}}
    apply_gate(results, tolerance=0.01)
    assert {r.name for r in results if r.accepted} == {
        "onnx_fp32",
        "pruned_structured",
        "pruned_structured_int8",
    }
    assert choose_edge(results, speedup=2.0, size_ratio=3.0).name == "pruned_structured"
    assert choose_edge(results).name == "onnx_fp32"  # without targets: the fastest accepted variant
    # nothing meets the targets: the fastest accepted variant, as before
    assert choose_edge(results, speedup=5.0, size_ratio=3.0).name == "onnx_fp32"
    table = report_markdown(
        results,
        choose_edge(results, speedup=2.0, size_ratio=3.0),
        context={"targets": {"speedup": 2.0, "size_ratio": 3.0}},
    )
    assert "**pruned_structured**" in table and "Targets met: yes." in table
    assert (
        "pruned_structured fine-tune, validation Dice mean by step: 0: 0.8300, 50: 0.9600; kept step 50"
        in table
    )


def test_each_variant_is_timed_alternating_with_fp32_so_load_drift_hits_both_alike() -> None:
    from types import SimpleNamespace

    calls: list[str] = []

    class Recorder:
        def __init__(self, name: str, inference: float) -> None:
            self.name, self.inference = name, inference

        def predict_case(self, case: str) -> SimpleNamespace:
            calls.append(f"{self.name}:{case}")
            return SimpleNamespace(seconds={"inference": self.inference})

    predictors = {
        "fp32": Recorder("fp32", 0.3),
        "pruned_structured": Recorder("pruned_structured", 0.1),
        "int8": Recorder("int8", 0.2),
    }
    timings = measure_latencies(predictors, ["c1", "c2"], warmup=1, repeats=2)
    timed = calls[6:]  # after one warm-up per variant and case
    pruned_block = ["fp32:c1", "pruned_structured:c1", "fp32:c2", "pruned_structured:c2"] * 2
    int8_block = ["fp32:c1", "int8:c1", "fp32:c2", "int8:c2"] * 2
    assert timed == pruned_block + int8_block
    assert set(timings) == set(predictors)
    latency, inference, runs, alongside = timings["pruned_structured"]
    assert inference == pytest.approx(0.1) and len(runs) == 4 and latency >= 0 and alongside is not None
    fp32_latency, fp32_inference, fp32_runs, fp32_alongside = timings["fp32"]
    assert fp32_inference == pytest.approx(0.3) and len(fp32_runs) == 8 and fp32_alongside is None


def test_speedup_is_against_fp32_timed_alongside_the_variant() -> None:
    fp32 = _result("fp32", "pytorch", 10.0, 18.0, {"a": 0.8})
    edge = _result("pruned_structured_bf16", "torch.export", 4.0, 4.0, {"a": 0.8})
    assert ratios(edge, [fp32, edge])["speedup"] == pytest.approx(2.5)  # no alongside time: fp32's own
    edge.baseline_latency_s = 7.0
    assert ratios(edge, [fp32, edge])["speedup"] == pytest.approx(1.75)
    assert not meets_targets(edge, fp32, 2.0, 3.0)
    edge.baseline_latency_s = 9.0
    assert meets_targets(edge, fp32, 2.0, 3.0)


def test_gate_with_nothing_accepted_chooses_no_edge() -> None:
    results = [
        _result("fp32", "pytorch", 10.0, 18.0, {"a": 0.8}),
        _result("int8", "onnxruntime", 2.0, 4.5, {"a": 0.5}),
    ]
    apply_gate(results, tolerance=0.01)
    assert choose_edge(results) is None
    assert "No variant passed the gate" in report_markdown(results, None, context={})


def test_config_defaults_build_every_default_variant() -> None:
    cfg = CompressConfig()
    assert set(cfg.variants) >= {
        "fp32",
        "pruned_unstructured",
        "pruned_structured",
        "int8",
        "pruned_structured_int8",
    }


def test_fine_tune_can_draw_tumour_free_cases_more_often(tmp_path: Path) -> None:
    from tumorseg.compression.fine_tune import _with_repeated_tumour_free

    (tmp_path / "index.csv").write_text("case_id,has_tumour\na,True\nb,False\nc,True\n")
    records = [{"case_id": c, "path": f"{c}.npz"} for c in ("a", "b", "c")]
    repeated = _with_repeated_tumour_free(records, str(tmp_path), 3)
    assert [r["case_id"] for r in repeated] == ["a", "b", "c", "b", "b"]
    with pytest.raises(DataError, match=r"index.csv: missing; rerun `tumorseg preprocess`"):
        _with_repeated_tumour_free(records, str(tmp_path / "nowhere"), 3)


def test_gate_on_2d_also_requires_the_detection_accuracy_of_fp32() -> None:
    results = [
        _result("fp32", "pytorch", 10.0, 18.0, {"a": 0.80, "b": 0.70}),
        _result("onnx_fp32", "onnxruntime", 3.0, 18.2, {"a": 0.80, "b": 0.70}),  # same calls
        _result("int8", "onnxruntime", 2.0, 4.5, {"a": 0.80, "b": 0.70}),  # same Dice, one call lost
        _result("pruned_structured", "onnxruntime", 3.0, 4.7, {"a": 0.80, "b": 0.70}),  # one call won
        _result("pruned_unstructured", "onnxruntime", 1.0, 4.0, {"a": 0.70, "b": 0.70}),  # both lost
    ]
    lost = 0.90 - 1 / 36
    for r, accuracy in zip(results, (0.90, 0.90, lost, 0.90 + 1 / 36, lost), strict=True):
        r.detection_accuracy = accuracy
    apply_gate(results, tolerance=0.01, detection_tolerance=0.0)
    by_name = {r.name: r for r in results}
    assert by_name["onnx_fp32"].accepted is True and by_name["pruned_structured"].accepted is True
    assert by_name["int8"].accepted is False and by_name["int8"].rejected_for == ["detection"]
    assert "detection accuracy drop +0.0278 > tolerance 0" in by_name["int8"].reason
    assert by_name["pruned_unstructured"].rejected_for == ["dice", "detection"]
    assert choose_edge(results).name == "pruned_structured"  # int8 is faster but calls one image wrong
    table = report_markdown(results, choose_edge(results), context={})
    # a variant rejected on detection alone is reported for detection, not for a Dice drop it passed
    assert "- int8 rejected: detection accuracy 0.9000 fp32 -> 0.8722.\n" in table
    assert (
        "- pruned_unstructured rejected: largest per-case drop on a (mean Dice 0.8000 fp32 -> 0.7000);"
        " detection accuracy 0.9000 fp32 -> 0.8722.\n" in table
    )
    # 3-D variants have no detection figure: the Dice gate alone, as before
    apply_gate(results, tolerance=0.01, detection_tolerance=None)
    assert by_name["int8"].accepted is True
    for r in results:
        r.detection_accuracy = None
    apply_gate(results, tolerance=0.01, detection_tolerance=0.0)
    assert by_name["int8"].accepted is True


def test_a_variant_failing_dice_on_no_case_in_common_with_fp32_is_reported_by_its_mean() -> None:
    """The gate compares the means when fp32 and a variant were scored on no common case; the report
    line then names those means, not nothing."""
    results = [
        _result("fp32", "pytorch", 10.0, 18.0, {"a": 0.80, "b": 0.70}),
        _result("int8", "onnxruntime", 2.0, 4.5, {"c": 0.60}),
    ]
    apply_gate(results, tolerance=0.01)
    assert results[1].rejected_for == ["dice"]
    table = report_markdown(results, choose_edge(results), context={})
    assert "- int8 rejected: mean Dice 0.7500 fp32 -> 0.6000.\n" in table


def test_speed_ups_within_the_tie_share_of_the_fastest_go_to_the_smallest_file() -> None:
    """A rerun moved the ONNX fp32 forms' speed-ups by about 0.1x: within ``speed_tie`` of the fastest,
    the smallest file is the edge, not a variant a few per cent faster and 3x bigger."""
    results = [
        _result("fp32", "pytorch", 0.48, 2.31, {"a": 0.80, "b": 0.70}),
        _result("onnx_fp32", "onnxruntime", 0.58, 2.43, {"a": 0.80, "b": 0.70}),
        _result("onnx_fp32_wint8", "onnxruntime", 0.59, 0.71, {"a": 0.80, "b": 0.70}),
        _result("pruned_unstructured", "onnxruntime", 0.51, 2.43, {"a": 0.80, "b": 0.70}),
        _result("int8", "onnxruntime", 1.31, 0.73, {"a": 0.80, "b": 0.70}),  # 0.37x: not a tie
    ]
    for r, alongside in zip(results[1:], (0.50, 0.50, 0.47, 0.48), strict=True):
        r.baseline_latency_s = alongside  # 0.86x, 0.85x, 0.92x, 0.37x
    apply_gate(results, tolerance=0.01)
    assert choose_edge(results).name == "pruned_unstructured"  # no tie share: the fastest
    assert choose_edge(results, speed_tie=0.1).name == "onnx_fp32_wint8"  # 0.85 >= 0.92 x 0.9
    assert choose_edge(results, speed_tie=0.05).name == "pruned_unstructured"  # 0.85 < 0.92 x 0.95
    table = report_markdown(
        results,
        choose_edge(results, speed_tie=0.1),
        context={"targets": {"speedup": 2.0, "size_ratio": 3.0, "speed_tie": 0.1}},
    )
    assert "every speed-up within 10% of it counting as fastest" in table
    assert "Edge: **onnx_fp32_wint8**: 0.85x the fp32 speed, 3.25x smaller file" in table  # not "faster"
    table = report_markdown(
        results,
        choose_edge(results, speed_tie=0.125),
        context={"targets": {"speedup": 2.0, "size_ratio": 3.0, "speed_tie": 0.125}},
    )
    assert "every speed-up within 12.5% of it" in table
