"""The training-throughput benchmark runs both loops on the same data and reports their ratio."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_data import tiny_overrides

from tumorseg.bench_training import benchmark_training


def test_benchmark_reports_both_loops_and_their_ratio(tiny_dataset: Path, real_params: dict) -> None:
    overrides = tiny_overrides(
        tiny_dataset,
        **{"bench_training.steps": 3, "bench_training.warmup_steps": 1, "bench_training.repeats": 1},
    )
    result = benchmark_training(real_params, overrides=overrides)
    assert result["plain_patches_per_s"] > 0 and result["lightning_patches_per_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["lightning_patches_per_s"] / result["plain_patches_per_s"], rel=1e-2
    )
    assert result["cpu_ratio"] == pytest.approx(
        result["lightning_patches_per_cpu_s"] / result["plain_patches_per_cpu_s"], rel=1e-2
    )
    assert result["batch_size"] == 2 and result["patch_size"] == [16, 16, 16]
    assert len(result["plain_runs"]) == len(result["lightning_runs"]) == 1
