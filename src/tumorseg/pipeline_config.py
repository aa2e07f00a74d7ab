"""``flow:`` the Prefect training pipeline (params.yaml): steps, caching, schedule and smoke run."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, model_validator

from tumorseg.config import Section

SMOKE_OVERRIDES: dict[str, Any] = {
    "synth.cases": 8,
    "synth.spacing_mm": 4.0,
    "synth.tumour_free_fraction": 0.125,
    "preprocess.target_spacing_mm": [4.0, 4.0, 4.0],
    "data_loader.patch_size": [32, 32, 32],
    "data_loader.batch_size": 2,
    "model.name": "unet",
    "model.unet.channels": [8, 16, 32],
    "model.unet.strides": [2, 2],
    "model.unet.num_res_units": 1,
    "train.max_epochs": 1,
    "train.steps_per_epoch": 4,
    "train.warmup_epochs": 0.0,
    "mlflow.overlays": 0,
    "evaluate.bootstrap_resamples": 200,
    "evaluate.plots": False,
    "registry.bootstrap_resamples": 200,
    "compress.pruning.fine_tune_steps": 2,
    "compress.pruning.unstructured_fine_tune_steps": 2,
    "compress.quantization.calibration_cases": 1,
    "compress.latency.synth_spacing_mm": 4.0,
    "compress.latency.warmup": 0,
    "compress.latency.repeats": 1,
}
"""Default smoke run: 8 cases at 4 mm, a 3-level U-Net of 8-32 channels, one 4-step epoch."""


class ScheduleConfig(Section):
    """``flow.schedule:`` what ``tumorseg schedule`` serves.

    Attributes:
        cron: when retraining runs (``0 3 * * 1``: Mondays 03:00), in ``timezone`` (IANA name).
        only_if_new_data: stop early, recording "no new data", when the raw data is the champion's.
        tune: search hyper-parameters before training.
    """

    cron: str = "0 3 * * 1"
    timezone: str = "UTC"
    deployment: str = Field("tumorseg-retrain", min_length=1)
    only_if_new_data: bool = True
    tune: bool = False

    @model_validator(mode="after")
    def _valid_schedule(self) -> ScheduleConfig:
        # Light checks here (no Prefect import when params.yaml loads); `tumorseg schedule` also runs
        # Prefect's own cron validation (pipelines/schedule.py) before serving.
        problem = cron_problem(self.cron, self.timezone)
        if problem:
            raise ValueError(
                f"cron {self.cron!r} / timezone {self.timezone!r}: {problem} "
                "(cron: minute hour day month weekday; timezone: an IANA name such as Europe/Paris)"
            )
        return self


def cron_problem(cron: str, timezone: str) -> str | None:
    """Why ``cron`` / ``timezone`` cannot be a schedule (five cron fields, a known IANA zone), or None."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    fields = cron.split()
    if len(fields) != 5 or not all(re.fullmatch(r"[0-9A-Za-z*/,?#-]+", f) for f in fields):
        return "Invalid cron string"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return "Invalid timezone"
    return None


class SmokeConfig(Section):
    """``flow.smoke:`` dotted params overrides of the tiny run (``tumorseg flow training --smoke``)."""

    overrides: dict[str, Any] = Field(default_factory=lambda: dict(SMOKE_OVERRIDES))


class FlowConfig(Section):
    """``flow:`` the training pipeline flow (``tumorseg flow training``).

    Attributes:
        tune: run the Optuna search (``tune:``) before training; training merges its best params.
        cache_dir: Prefect's stage cache (relative to the working directory): a rerun with
            unchanged inputs skips finished stages; records expire after ``cache_days`` (None: never).
    """

    tune: bool = False
    compress: bool = True
    cache_dir: str = ".prefect-cache"
    cache_days: float | None = Field(None, gt=0.0)
    schedule: ScheduleConfig = ScheduleConfig()
    smoke: SmokeConfig = SmokeConfig()
