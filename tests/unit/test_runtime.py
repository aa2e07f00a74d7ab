"""keep_freed_memory: freed arrays stay with the process for reuse (glibc), applied once per process."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Resident memory kept after a 200 MiB array is filled and freed, in MiB (/proc/self/statm).
_SCRIPT = """
import json, os, sys
import numpy as np
if sys.argv[1] == "keep":
    from tumorseg.runtime import keep_freed_memory
    assert keep_freed_memory()
def resident_mib():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = resident_mib()
a = np.ones(50 * 2**20, dtype=np.float32)
del a
print(json.dumps(resident_mib() - before))
"""


def _resident_after_free_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout))


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_freed_memory_stays_with_the_process_for_reuse_only_when_kept() -> None:
    assert _resident_after_free_mib("default") < 50  # glibc hands the 200 MiB back: touched anew next time
    assert _resident_after_free_mib("keep") > 150  # kept: the next case's arrays reuse these pages


def test_keep_freed_memory_is_applied_once(monkeypatch: pytest.MonkeyPatch) -> None:
    from tumorseg import runtime

    monkeypatch.setattr(runtime, "_applied", None)
    first = runtime.keep_freed_memory()
    assert first is GLIBC

    def no_second_call(*args: object) -> None:
        raise AssertionError("mallopt called twice")

    monkeypatch.setattr(runtime.ctypes, "CDLL", no_second_call)
    assert runtime.keep_freed_memory() is first


def test_predictors_apply_it_unless_the_params_say_no(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from tumorseg import runtime
    from tumorseg.config import PreprocessConfig
    from tumorseg.data.transforms import DataLoaderConfig
    from tumorseg.models.checkpoint import TrainedNetwork
    from tumorseg.models.config import PredictConfig, SlidingWindowConfig
    from tumorseg.models.networks import ModelConfig
    from tumorseg.models.predictor import SegmentationPredictor

    trained = TrainedNetwork(
        network=nn.Conv3d(4, 3, 1),
        model=ModelConfig(),
        data_loader=DataLoaderConfig(patch_size=(16, 16, 16)),
        sliding_window=SlidingWindowConfig(),
        config={"preprocess": PreprocessConfig().model_dump(mode="json")},
    )
    calls: list[int] = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: bool(calls.append(1)) or True)
    SegmentationPredictor(trained, PredictConfig(device="cpu"))
    assert calls == [1]  # the default
    SegmentationPredictor(trained, PredictConfig(device="cpu", keep_freed_memory=False))
    assert calls == [1]


def test_precision_auto_is_bfloat16_only_with_native_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tumorseg.runtime import native_bf16_cpu, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for value in ("32-true", "bf16-mixed", "16-mixed"):
        assert resolve_precision(value) == value  # explicit settings are kept
    native = native_bf16_cpu()
    assert resolve_precision("auto") == ("bf16-mixed" if native else "32-true")
    # a CPU capped below AVX512-BF16 (how an AVX2-only machine is imitated) counts as without it
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert native_bf16_cpu() is False
    assert resolve_precision("auto") == "32-true"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert resolve_precision("auto") == "bf16-mixed"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr("tumorseg.runtime._arm_bf16", lambda: False)
    assert resolve_precision("auto") == "32-true"
