"""Prefect flow for the DICOM path: train and register the brain-extraction network on generated
heads, then (when a tumour champion exists) measure import and DICOM-SEG output on generated
studies. The same functions as the DVC stages ``brain``, ``dicom_studies`` and ``dicom_check``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipelines.data_flows import IO_RETRIES, load_params, tracking_uri


@task(name="train-brain-extractor", cache_policy=NO_CACHE, **IO_RETRIES)
def train_brain_task(params: Any) -> dict[str, Any]:
    """``tumorseg train-brain``: the network, its checkpoint and its registered version."""
    from tumorseg.dicom.brain import train_brain_extractor

    report = train_brain_extractor(params, tracking_uri=tracking_uri(params))
    return {"line": report.one_line(), "val_dice": report.val_dice}


@task(name="dicom-check", cache_policy=NO_CACHE)
def dicom_check_task(params: Any, root: str) -> dict[str, Any]:
    """``tumorseg dicom-check`` on the generated studies (made when missing)."""
    from tumorseg.dicom.check import REPORT_MD, run_dicom_check

    base = Path(root)
    report = run_dicom_check(params, base / params.dicom.studies.out, base / params.dicom.report)
    markdown = (base / params.dicom.report / REPORT_MD).read_text()
    create_markdown_artifact(
        key="dicom-check", markdown=markdown, description="DICOM path on generated studies"
    )
    return report["summary"]


@flow(name="dicom-pipeline", log_prints=True)
def dicom_flow(
    params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, check: bool = True
) -> dict:
    """Brain extraction model, then the DICOM check (``check``: needs the tumour champion)."""
    params = load_params(params_path, overrides)
    summary: dict[str, Any] = {"brain": train_brain_task(params)}
    if check:
        summary["check"] = dicom_check_task(params, str(Path(params_path).resolve().parent))
    return summary
