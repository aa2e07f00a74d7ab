"""Data-triggered retraining: retrain only when the raw data changed since the champion was trained.

The raw data's hash is an md5 over the ingested manifest's per-file sha256 (every case id and
the sha256 of its four modalities and segmentation). ``ingest`` is incremental (unchanged files
are not re-read), so after it the hash costs nothing, and it changes exactly when a case is added,
removed or has a file whose bytes changed; renaming the folder or touching mtimes does not count.

Each model version registered by the training flow carries that hash as the tag
``raw_data_md5`` (:func:`record_raw_data_hash`). A run in "new data only" mode compares the
current hash with the champion's and stops early, recording "no new data", when they are equal.

A failed run never moves ``champion``: the flow's last step, ``promote``, only runs after every
earlier step succeeded, and only ``promote`` touches the alias.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tumorseg.config import section
from tumorseg.data.manifest import FILE_KEYS, read_manifest

log = logging.getLogger(__name__)

RAW_DATA_TAG = "raw_data_md5"


def raw_data_hash(ingested_dir: str | Path) -> str:
    """md5 over ``case_id`` and ``sha256_<file>`` of every manifest row, in case-id order.

    Raises:
        DataError: no manifest in ``ingested_dir`` (run ``tumorseg ingest``).
    """
    manifest = read_manifest(ingested_dir)
    columns = ["case_id", *[f"sha256_{key}" for key in FILE_KEYS if f"sha256_{key}" in manifest.columns]]
    digest = hashlib.md5()
    for row in manifest.sort_values("case_id")[columns].itertuples(index=False):
        digest.update(("\t".join(str(value) for value in row) + "\n").encode())
    return digest.hexdigest()


@dataclass
class RetrainDecision:
    """Whether a run retrains, and why.

    Attributes:
        retrain: train a new model.
        reason: one sentence for the log, the Prefect artifact and the flow result.
        raw_data_md5: hash of the current raw data.
        champion_version: the champion's version (None without one).
        champion_raw_data_md5: the hash recorded on it (None when not recorded).
    """

    retrain: bool
    reason: str
    raw_data_md5: str
    champion_version: str | None = None
    champion_raw_data_md5: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def champion_raw_data_hash(params: dict[str, Any], *, tracking_uri: str) -> tuple[str | None, str | None]:
    """``(champion version, its raw_data_md5 tag)``; ``(None, None)`` without a registered champion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tumorseg.registry.config import CHAMPION, RegistryConfig
    from tumorseg.tracking import sqlite_path

    cfg: RegistryConfig = section("registry", params)
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
    params: dict[str, Any], *, tracking_uri: str, source: str = "params.yaml"
) -> RetrainDecision:
    """Compare the ingested raw data with the data the champion was trained on."""

    current = raw_data_hash(section("paths", params, source=source).ingested)
    version, recorded = champion_raw_data_hash(params, tracking_uri=tracking_uri)
    if version is None:
        return RetrainDecision(True, "no champion yet: training the first model", current)
    if recorded is None:
        return RetrainDecision(
            True,
            f"champion version {version} has no {RAW_DATA_TAG} tag (not trained by the flow): retraining",
            current,
            version,
        )
    if recorded == current:
        return RetrainDecision(
            False,
            f"no new data: the raw data ({current[:12]}) is what champion version {version} was trained on",
            current,
            version,
            recorded,
        )
    return RetrainDecision(
        True,
        f"new data: raw data {current[:12]} differs from champion version {version}'s {recorded[:12]}",
        current,
        version,
        recorded,
    )


def record_raw_data_hash(
    params: dict[str, Any], version: str, raw_md5: str, *, tracking_uri: str, source: str = "params.yaml"
) -> None:
    """Tag a registered model version (and its training run) with the raw data it was trained on."""
    from mlflow import MlflowClient

    name = section("registry", params, source=source).model_name
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    client.set_model_version_tag(name, version, RAW_DATA_TAG, raw_md5)
    run_id = client.get_model_version(name, version).run_id
    if run_id:
        client.set_tag(run_id, f"data.{RAW_DATA_TAG}", raw_md5)
    log.info("model %s version %s: %s=%s", name, version, RAW_DATA_TAG, raw_md5)
