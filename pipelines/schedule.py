"""``tumorseg schedule``: serve the training flow on the ``flow.schedule`` cron.

Scheduled runs retrain only when the raw data changed since the champion was trained
(``flow.schedule.only_if_new_data``). ``serve`` is Prefect's single-process mode: this process polls the
Prefect API (a local server, or ``PREFECT_API_URL``) and runs the flow in a subprocess when the schedule
fires. For a team, run a Prefect server and a work pool (README "Scheduled retraining").
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from tumorseg.errors import ConfigError


def schedule_settings(
    params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None
) -> Any:
    """The ``flow.schedule`` section (validated: the cron and time zone Prefect accepts)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from pipelines.data_flows import load_params

    cfg = load_params(params_path, overrides).flow.schedule
    try:  # Prefect's own model: the cron dialect and time zones its server accepts
        CronSchedule(cron=cfg.cron, timezone=cfg.timezone)
    except ValidationError as exc:
        raise ConfigError(
            f"{params_path}: flow.schedule: cron {cfg.cron!r} / timezone {cfg.timezone!r}: "
            f"{exc.errors()[0]['msg']}"
        ) from None
    return cfg


def build_deployment(params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Any:
    """The training flow as a Prefect deployment on the ``flow.schedule`` cron.

    The params file is passed as an absolute path, so the served process finds it from any
    working directory; its overrides travel as the flow's ``overrides`` parameter.
    """
    from prefect.schedules import Cron

    from pipelines.training_flow import training_flow

    cfg = schedule_settings(params_path, overrides)
    return training_flow.to_deployment(
        name=cfg.deployment,
        schedule=Cron(cfg.cron, timezone=cfg.timezone),
        parameters={
            "params_path": str(Path(params_path).resolve()),
            "overrides": overrides or {},
            "only_if_new_data": cfg.only_if_new_data,
            "tune": cfg.tune,
        },
        description="tumorseg: retrain, evaluate and promote when the raw data changed",
        tags=["tumorseg", "retraining"],
    )


def next_runs(
    cron: str, timezone: str, count: int = 3, after: dt.datetime | None = None
) -> list[dt.datetime]:
    """The next ``count`` times the schedule fires (for ``--dry-run`` and the log)."""
    from zoneinfo import ZoneInfo

    from prefect._vendor.croniter import croniter

    start = (after or dt.datetime.now(dt.UTC)).astimezone(ZoneInfo(timezone))
    iterator = croniter(cron, start)
    return [iterator.get_next(dt.datetime) for _ in range(count)]


def serve_training(
    params_path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None, *, dry_run: bool = False
) -> None:
    """Serve the scheduled training flow until interrupted (``dry_run``: print what would be served)."""
    cfg = schedule_settings(params_path, overrides)
    deployment = build_deployment(params_path, overrides)
    when = ", ".join(t.strftime("%Y-%m-%d %H:%M %Z") for t in next_runs(cfg.cron, cfg.timezone))
    print(
        f"deployment training-pipeline/{deployment.name}: cron {cfg.cron!r} ({cfg.timezone}), "
        f"only_if_new_data={cfg.only_if_new_data}; next runs: {when}"
    )
    if dry_run:
        return
    from prefect import serve

    serve(deployment)
