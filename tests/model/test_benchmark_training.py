"""The training-throughput benchmark runs both loops on the same data and reports their ratio."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.training import BenchTrainingSettings, benchmark_training
from tiny_data import tiny_overrides


def test_benchmark_reports_both_loops_and_their_ratio(tiny_dataset: Path, real_params: dict) -> None:
    settings = BenchTrainingSettings(steps=3, warmup_steps=1, repeats=1)
    result = benchmark_training(real_params, settings=settings, overrides=tiny_overrides(tiny_dataset))
    assert result["plain_patches_per_s"] > 0 and result["lightning_patches_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["lightning_patches_per_s"] / result["plain_patches_per_s"], rel=1e-2
    )
    assert result["cpu_ratio"] == pytest.approx(
        result["lightning_patches_per_cpu_s"] / result["plain_patches_per_cpu_s"], rel=1e-2
    )
    assert result["batch_size"] == 2 and result["patch_size"] == [16, 16, 16]
    assert len(result["plain_runs"]) == len(result["lightning_runs"]) == 1
