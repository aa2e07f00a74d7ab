"""The training pipeline flow end to end on Prefect's local test server (``prefect_test_harness``).

One workspace goes through the life of a deployment: the smoke run trains and promotes the first
champion; a rerun skips every finished stage (cache keyed on data, params and code); a run in
"new data only" mode on unchanged data records "no new data" and stops; new raw data triggers
retraining, and when that run fails, ``champion`` does not move.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # nothing leaves the machine

from tumorseg.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CACHED_STAGES = {"source", "ingest", "validate", "preprocess", "split", "train", "compress", "evaluate"}


@pytest.fixture(scope="module")
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _task_states(
    flow_run_id: Any, expect: set[str] = frozenset(), timeout_s: float = 180.0
) -> dict[str, str]:
    """Task name -> final state name of a flow run's task runs.

    Prefect 3 records task-run states from events, asynchronously: right after a flow returns, the
    server may not have them all yet (seen on a loaded machine). Poll until every task run is in a
    final state and the ``expect``-ed tasks are there, or ``timeout_s`` passes.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> dict[str, tuple[str, bool]]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
            return {run.name.rsplit("-", 1)[0]: (run.state.name, run.state.is_final()) for run in runs}

    deadline = time.monotonic() + timeout_s
    while True:
        runs = asyncio.run(read())
        settled = all(final for _, final in runs.values()) and expect <= set(runs)
        if settled or time.monotonic() > deadline:
            return {name: state for name, (state, _) in runs.items()}
        time.sleep(0.5)


def _artifacts() -> dict[str, str]:
    from prefect.client.orchestration import get_client

    async def read() -> dict[str, str]:
        async with get_client() as client:
            return {a.key: str(a.data) for a in await client.read_artifacts() if a.key}

    return asyncio.run(read())


def _drifted_predictions(params: Any, params_path: Path, folder: Path) -> Path:
    """A predictions folder's ``drift.json`` for the champion: the workspace's cases on a 10x scale."""
    from tumorseg.data.layouts import read_case
    from tumorseg.data.source import source_folder
    from tumorseg.models.predictor import plan_cases
    from tumorseg.monitoring.drift import DriftMonitor, image_features, write_drift_file
    from tumorseg.params import as_params
    from tumorseg.registry.loading import load_model

    params = as_params(params, str(params_path))
    profile = load_model("models:/tumorseg@champion", tracking_uri=params.mlflow.tracking_uri).drift_profile
    monitor = DriftMonitor.from_params(profile, params.monitor)
    checks = []
    for case in plan_cases(source_folder(params, str(params_path))):
        volumes = read_case(case)
        checks.append(monitor.check(image_features(case.case_id, volumes.image * 10, volumes.affine)))
    write_drift_file(folder, "models:/tumorseg@champion", monitor, checks)
    return folder


def _champion(params: dict[str, Any]) -> tuple[str, int]:
    """(champion version, number of registered versions)."""
    from mlflow import MlflowClient

    uri = params["mlflow"]["tracking_uri"]
    client = MlflowClient(uri, registry_uri=uri)
    versions = client.search_model_versions("name = 'tumorseg'")
    return str(client.get_model_version_by_alias("tumorseg", "champion").version), len(versions)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pipeline_smoke_cache_no_new_data_and_failed_run(
    prefect_server: None, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines.training_flow import training_flow

    from tumorseg.config import read_params

    # 1. `tumorseg flow training --smoke`: the whole chain, the decision printed.
    assert (
        main(
            [
                "flow",
                "training",
                "--smoke",
                "--workspace",
                str(tmp_path),
                "--params",
                str(ROOT / "params.yaml"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "promoted tumorseg version" in out and "first registered model" in out
    params_path = tmp_path / "params.yaml"
    params = read_params(params_path)
    champion, versions = _champion(params)
    artifacts = _artifacts()
    assert {
        "data-validation",
        "data-split",
        "training",
        "test-metrics",
        "registered-model",
        "promotion-decision",
    } <= set(artifacts)
    assert "promoted" in artifacts["promotion-decision"]
    assert (tmp_path / "reports" / "metrics.json").is_file() and (
        tmp_path / "reports" / "promotion.json"
    ).is_file()

    # 2. A rerun with nothing changed skips every finished stage; the registry is left as it was.
    state = training_flow(params_path=str(params_path), return_state=True)
    summary = state.result()
    states = _task_states(state.state_details.flow_run_id, expect={*CACHED_STAGES, "promote"})
    assert {name for name, s in states.items() if s == "Cached"} == CACHED_STAGES, states
    assert states["promote"] == "Completed" and summary["promote"]["action"] == "kept"
    assert _champion(params) == (champion, versions)

    # 3. Scheduled mode, same raw data: "no new data", stop before validation.
    state = training_flow(params_path=str(params_path), only_if_new_data=True, return_state=True)
    summary = state.result()
    assert summary["status"] == "no_new_data" and "no new data" in summary["decision"]["reason"]
    states = _task_states(state.state_details.flow_run_id, expect={"check-new-data"})
    assert "check-new-data" in states and "validate" not in states and "train" not in states
    assert "no new data" in _artifacts()["retrain-decision"]

    # 3b. The same with production predictions that drifted: published, and with retrain_on_drift the
    # run retrains (every stage cached here: nothing else changed) and decides again.
    drifted = _drifted_predictions(params, params_path, tmp_path / "production")
    watch = {"monitor.folder": str(drifted)}
    state = training_flow(
        params_path=str(params_path), overrides=watch, only_if_new_data=True, return_state=True
    )
    summary = state.result()
    assert summary["status"] == "no_new_data" and summary["drift"]["drifted"], summary
    assert summary["drift"]["flagged"] == summary["drift"]["cases"] > 0
    assert "**drifted**" in _artifacts()["drift"]
    watch["monitor.retrain_on_drift"] = True
    state = training_flow(
        params_path=str(params_path), overrides=watch, only_if_new_data=True, return_state=True
    )
    summary = state.result()
    assert summary["status"] == "completed" and "retraining on drift" in summary["decision"]["reason"]
    assert summary["promote"]["action"] == "kept" and _champion(params) == (champion, versions)

    # 4. A bad setting anywhere in params.yaml fails the run before any task starts.
    bad = {"synth.seed": 7, "evaluate.hd95_penalty_mm": -1.0}
    state = training_flow(params_path=str(params_path), overrides=bad, return_state=True)
    assert state.is_failed() and "evaluate.hd95_penalty_mm" in str(state.message)
    assert _task_states(state.state_details.flow_run_id) == {}

    # 5. New raw data triggers retraining; the run then fails in evaluate (a data error there): the
    # champion stays.
    from tumorseg.errors import DataError

    def unreadable(*args: Any, **kwargs: Any) -> Any:
        raise DataError("data/validated/manifest.csv: unreadable (injected by the test)")

    monkeypatch.setattr("tumorseg.registry.evaluate_stage.run_evaluate_stage", unreadable)
    overrides = {"synth.seed": 7, "flow.compress": False}
    state = training_flow(
        params_path=str(params_path), overrides=overrides, only_if_new_data=True, return_state=True
    )
    assert state.is_failed()
    states = _task_states(state.state_details.flow_run_id, expect={"source", "train", "evaluate"})
    assert (
        states["source"] == "Completed" and states["train"] == "Completed" and states["evaluate"] == "Failed"
    )
    assert "promote" not in states
    assert "new data" in _artifacts()["retrain-decision"]
    assert _champion(params) == (champion, versions)
