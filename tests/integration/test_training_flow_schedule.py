"""``tumorseg schedule``: the deployment it serves, built without serving (serve() blocks forever)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from tumorseg.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path, **schedule: object) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["flow"]["schedule"].update(schedule)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_deployment_runs_the_training_flow_on_the_params_cron(tmp_path: Path) -> None:
    from pipelines.schedule import build_deployment

    path = _params(tmp_path, cron="30 2 * * 0", timezone="Europe/Paris", deployment="weekly")
    deployment = build_deployment(path, overrides={"train.max_epochs": 5})
    assert deployment.name == "weekly" and deployment.flow_name == "training-pipeline"
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "30 2 * * 0" and schedule.schedule.timezone == "Europe/Paris"
    assert deployment.parameters == {
        "params_path": str(path.resolve()),
        "overrides": {"train.max_epochs": 5},
        "only_if_new_data": True,
        "tune": False,
    }


def test_dry_run_prints_the_next_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pipelines.schedule import next_runs

    path = _params(tmp_path, cron="0 3 * * 1", timezone="UTC")
    assert main(["schedule", "--dry-run", "--params", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cron '0 3 * * 1' (UTC)" in out and "only_if_new_data=True" in out
    monday = dt.datetime(2026, 1, 5, 3, 0, tzinfo=dt.UTC)  # a Monday, 03:00
    runs = next_runs("0 3 * * 1", "UTC", count=2, after=monday - dt.timedelta(minutes=1))
    assert runs == [monday, monday + dt.timedelta(days=7)]


def test_bad_cron_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _params(tmp_path, cron="every monday")
    assert main(["schedule", "--dry-run", "--params", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flow.schedule" in err and "every monday" in err
