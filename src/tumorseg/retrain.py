"""Data-triggered retraining: retrain only when the raw data changed since the champion was trained.

The raw data's hash is an md5 over the ingested manifest's case ids and per-file sha256: it changes
exactly when a case is added, removed or has different bytes (not on renames or touched mtimes).
Registered versions carry it as the tag ``raw_data_md5``; only the flow's last step, ``promote``,
moves ``champion``, so a failed run never does.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tumorseg.data.manifest import FILE_KEYS, read_manifest
from tumorseg.params import Params, as_params

log = logging.getLogger(__name__)

RAW_DATA_TAG = "raw_data_md5"


def raw_data_hash(ingested_dir: str | Path) -> str:
    """md5 over ``case_id`` and ``sha256_<file>`` of every manifest row, in case-id order.

    Raises DataError without a manifest in ``ingested_dir`` (run ``tumorseg ingest``).
    """
    manifest = read_manifest(ingested_dir)
    columns = ["case_id", *[f"sha256_{key}" for key in FILE_KEYS if f"sha256_{key}" in manifest.columns]]
    digest = hashlib.md5()
    for row in manifest.sort_values("case_id")[columns].itertuples(index=False):
        digest.update(("\t".join(str(value) for value in row) + "\n").encode())
    return digest.hexdigest()


@dataclass
class RetrainDecision:
    """Whether a run retrains, and why (``reason``: one sentence for the log, artifact and result)."""

    retrain: bool
    reason: str
    raw_data_md5: str
    champion_version: str | None = None
    champion_raw_data_md5: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def champion_raw_data_hash(
    params: Params | dict[str, Any], *, tracking_uri: str
) -> tuple[str | None, str | None]:
    """``(champion version, its raw_data_md5 tag)``; ``(None, None)`` without a registered champion."""
    params = as_params(params)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tumorseg.registry.config import CHAMPION, RegistryConfig
    from tumorseg.tracking import sqlite_path

    cfg: RegistryConfig = params.registry
    db = sqlite_path(tracking_uri)
    if db is not None and not db.is_file():
        return None, None
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        version = client.get_model_version_by_alias(cfg.model_name, CHAMPION)
    except MlflowException:
        return None, None
    return str(version.version), version.tags.get(RAW_DATA_TAG)


def decide_retrain(
    params: Params | dict[str, Any], *, tracking_uri: str, source: str = "params.yaml"
) -> RetrainDecision:
    """Compare the ingested raw data with the data the champion was trained on."""
    params = as_params(params, source)
    current = raw_data_hash(params.paths.ingested)
    version, recorded = champion_raw_data_hash(params, tracking_uri=tracking_uri)
    if version is None:
        return RetrainDecision(True, "no champion yet: training the first model", current)
    if recorded is None:
        reason = f"champion version {version} has no {RAW_DATA_TAG} tag (not trained by the flow): retraining"
        return RetrainDecision(True, reason, current, version)
    short = current[:12]
    if recorded == current:
        reason = f"no new data: the raw data ({short}) is what champion version {version} was trained on"
    else:
        reason = f"new data: raw data {short} differs from champion version {version}'s {recorded[:12]}"
    return RetrainDecision(recorded != current, reason, current, version, recorded)


def record_raw_data_hash(
    params: Params | dict[str, Any],
    version: str,
    raw_md5: str,
    *,
    tracking_uri: str,
    source: str = "params.yaml",
) -> None:
    """Tag a registered model version (and its training run) with the raw data it was trained on."""
    params = as_params(params, source)
    from mlflow import MlflowClient

    name = params.registry.model_name
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    client.set_model_version_tag(name, version, RAW_DATA_TAG, raw_md5)
    run_id = client.get_model_version(name, version).run_id
    if run_id:
        client.set_tag(run_id, f"data.{RAW_DATA_TAG}", raw_md5)
    log.info("model %s version %s: %s=%s", name, version, RAW_DATA_TAG, raw_md5)
