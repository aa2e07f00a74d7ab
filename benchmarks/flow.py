"""Orchestration benchmarks (``make bench``): what Prefect costs, and what parallel Optuna workers gain.

- :func:`bench_flow_overhead`: the smoke pipeline through the Prefect flow vs. the same functions
  called directly, on the same tiny generated data, each in a fresh workspace (no cache hits).
  Both times exclude data generation, which runs once beforehand; the flow's time includes its
  server round trips, task state tracking, cache-key hashing and artifacts, but not the start of
  the Prefect server (measured separately: ``server_start_s``).
- :func:`bench_tuning_workers`: wall time of N identical tiny trials with 1 worker vs. 2 worker
  processes on one SQLite study.

Both return plain dicts for the benchmark report.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from tumorseg.config import read_params


def _prepare(workspace: Path, params_path: str | Path) -> Path:
    """Smoke params in ``workspace`` and its generated raw data (``synth``)."""
    from pipelines.training_flow import smoke_params

    from tumorseg.config import section
    from tumorseg.data.synth import synthesize_dataset

    path = smoke_params(workspace, params_path)
    params = read_params(path)
    folder = Path(workspace) / "dataset"
    synthesize_dataset(folder, section("synth", params))
    params["data"] = {"source": str(folder.resolve())}  # both sides read the same folder, neither generates
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_direct(params_path: str | Path) -> str:
    """The flow's steps as plain calls (what ``dvc repro`` runs, minus the process starts)."""
    import tumorseg.training.config  # noqa: F401
    from tumorseg.compression.stage import run_compress_stage
    from tumorseg.config import section
    from tumorseg.data.ingest import ingest
    from tumorseg.data.preprocess import preprocess_dataset
    from tumorseg.data.source import source_folder
    from tumorseg.data.split import make_split
    from tumorseg.registry.evaluate_stage import run_evaluate_stage
    from tumorseg.registry.promote import promote
    from tumorseg.training.train import train
    from tumorseg.tuning.best import with_best_params
    from tumorseg.validation.suite import validate_dataset

    params = read_params(params_path)
    paths = section("paths", params)
    ingest(source_folder(params, params_path), Path(paths.ingested), section("ingest", params))
    validate_dataset(Path(paths.ingested), Path(paths.validated), section("validate", params))
    preprocess_dataset(Path(paths.validated), Path(paths.preprocessed), section("preprocess", params))
    make_split(Path(paths.preprocessed), Path(paths.split), section("split", params))
    params = with_best_params(params)
    result = train(params)
    if section("flow", params).compress:
        run_compress_stage(params, model_uri=str(result.best_checkpoint))
    run_evaluate_stage(params)
    return promote(params).action


def bench_flow_overhead(params_path: str | Path = "params.yaml", *, compress: bool = False) -> dict[str, Any]:
    """Smoke pipeline: Prefect flow vs. direct calls (seconds and their ratio).

    Args:
        params_path: the project's params.yaml (``flow.smoke`` settings are applied).
        compress: include the compression step (slow, and the same work on both sides).
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from pipelines.training_flow import training_flow
    from prefect.testing.utilities import prefect_test_harness

    root = Path(tempfile.mkdtemp(prefix="tumorseg-bench-flow-"))
    try:
        spaces = {}
        for name in ("direct", "flow"):
            path = _prepare(root / name, params_path)
            params = yaml.safe_load(path.read_text())
            params["flow"].update({"compress": compress})
            path.write_text(yaml.safe_dump(params))
            spaces[name] = path
        # Import the heavy libraries once before either clock starts: first imports (torch, MONAI,
        # Lightning, GX, MLflow) would otherwise be billed to whichever side runs first.
        import tumorseg.evaluation.pipeline_stage  # noqa: F401
        import tumorseg.registry.promote  # noqa: F401
        import tumorseg.training.train  # noqa: F401
        import tumorseg.validation.suite  # noqa: F401

        started = time.perf_counter()
        direct_action = run_direct(spaces["direct"])
        direct_s = time.perf_counter() - started

        started = time.perf_counter()
        with prefect_test_harness(server_startup_timeout=120):
            server_s = time.perf_counter() - started
            started = time.perf_counter()
            summary = training_flow(params_path=str(spaces["flow"]))
            flow_s = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "direct_s": round(direct_s, 2),
        "flow_s": round(flow_s, 2),
        "overhead_s": round(flow_s - direct_s, 2),
        "ratio": round(flow_s / direct_s, 3),
        "server_start_s": round(server_s, 2),
        "decisions": [direct_action, summary["promote"]["action"]],
        "compress": compress,
    }


def bench_tuning_workers(params_path: str | Path = "params.yaml", *, n_trials: int = 6) -> dict[str, Any]:
    """Wall time of ``n_trials`` small trials: 1 worker vs. 2 worker processes on one SQLite study.

    Pruning is off and the search space is a single learning-rate dimension, so both sides train
    the same number of equally sized networks. One worker runs in the calling process (what
    ``tumorseg tune --n-jobs 1`` does); two workers are new processes, so their start-up (imports)
    is part of their time: trials must be long enough (tens of optimiser steps) for the figure to
    say something about parallel trials rather than about Python start-up.
    """
    from tumorseg.cli import main
    from tumorseg.tuning.study import run_study

    root = Path(tempfile.mkdtemp(prefix="tumorseg-bench-tune-"))
    try:
        path = _prepare(root, params_path)
        params = yaml.safe_load(path.read_text())
        p = ["--params", str(path)]
        for command in ("ingest", "validate", "preprocess", "split"):
            extra = ["--out", params["paths"]["validated"]] if command == "validate" else []
            main([command, *extra, *p])
        params["tune"].update(
            {
                "trial_overrides": {"train.max_epochs": 2, "train.steps_per_epoch": 16},
                "pruner": {"enabled": False},
                "space": {"train.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
            }
        )
        times: dict[int, float] = {}
        for workers in (1, 2):
            run_params = dict(params, tune={**params["tune"], "study_name": f"bench-{workers}"})
            result = run_study(run_params, source=str(path), n_trials=n_trials, n_jobs=workers)
            times[workers] = result.wall_time_s
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "n_trials": n_trials,
        "one_worker_s": round(times[1], 2),
        "two_workers_s": round(times[2], 2),
        "speedup": round(times[1] / times[2], 3),
        "cpu_count": os.cpu_count(),
    }
