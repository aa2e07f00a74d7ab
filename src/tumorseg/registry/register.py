"""Log the test evaluation to the training run and register the model as the new ``challenger``.

Each version carries its own evidence (``evaluation.json``: per-case Dice per region that ``tumorseg
promote`` pairs, reference sha256s, metrics; ``model_card.md``) and provenance and score tags.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tumorseg.config import section
from tumorseg.data.source import source_folder
from tumorseg.registry.config import CHALLENGER, RegistryConfig
from tumorseg.registry.model_card import (
    ModelCardFacts,
    registry_description,
    render_model_card,
    scored_regions,
)
from tumorseg.tracking import data_version, ensure_experiment, fluent_store, git_commit

log = logging.getLogger(__name__)

LOGGED_MODEL_NAME = "segmentation_model"
EVALUATION_ARTIFACT = "evaluation.json"
MODEL_CARD_ARTIFACT = "model_card.md"
METRIC_PREFIX = "test_eval/"
"""MLflow prefix of the source-geometry test metrics (training logs ``test_dice_*`` on its own grid)."""
MODEL_DESCRIPTION = (
    "Brain-tumour segmentation (BraTS regions WT/TC/ET) from T1, T1ce, T2 and FLAIR. Aliases: "
    "`champion` (serving), `challenger` (latest evaluated candidate). Not for clinical use."
)


@dataclass
class RegisteredVersion:
    """A registered model version (``model_uri``: ``models:/<name>/<version>``) and its training run."""

    name: str
    version: str
    run_id: str
    model_uri: str
    alias: str = CHALLENGER

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def checkpoint_run_id(checkpoint: str | Path) -> str | None:
    """The MLflow run id ``tumorseg train`` stores in its checkpoints (None when tracking was off)."""
    import torch

    from tumorseg.models.lightning_module import RUN_ID_CHECKPOINT_KEY

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    run_id = state.get(RUN_ID_CHECKPOINT_KEY)
    return str(run_id) if run_id else None


def params_md5(config: dict[str, Any]) -> str:
    """md5 of the resolved training sections (key order independent)."""
    return hashlib.md5(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def cases_fingerprint(reference_sha256: dict[str, str]) -> str:
    """md5 over the sorted test case ids and their reference digests: equal means "same test set"."""
    text = "\n".join(f"{case_id} {digest}" for case_id, digest in sorted(reference_sha256.items()))
    return hashlib.md5(text.encode()).hexdigest()


def checkpoint_or_new_run(
    client: Any,
    checkpoint: str | Path,
    *,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: dict[str, str] | None = None,
) -> str:
    """The training run a checkpoint came from (test results belong there), else a new, finished run.

    A new run ``run_name`` in ``experiment`` is created when training ran without MLflow or the store
    does not know the run, so evaluation results are never lost.
    """
    from mlflow.exceptions import MlflowException

    run_id = checkpoint_run_id(checkpoint)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("run %s of %s is not in %s; logging to a new run", run_id, checkpoint, tracking_uri)
            run_id = None
    if run_id is None:
        experiment_id = ensure_experiment(tracking_uri, experiment)
        run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        client.set_terminated(run_id)
    return run_id


def log_test_evaluation(
    evaluation: Any, *, checkpoint: str | Path, tracking_uri: str, experiment: str
) -> str:
    """Log test metrics (``test_eval/*``) and reports to the checkpoint's run (or a new ``evaluate`` run)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    tags = {"tumorseg.checkpoint": str(checkpoint)}
    run_id = checkpoint_or_new_run(
        client, checkpoint, tracking_uri=tracking_uri, experiment=experiment, run_name="evaluate", tags=tags
    )
    now = int(time.time() * 1000)
    items = evaluation.metrics.items()
    metrics = [Metric(f"{METRIC_PREFIX}{k}", float(v), now, 0) for k, v in items if v is not None]
    client.log_batch(run_id, metrics=metrics)
    for name, path in evaluation.files.items():
        folder = "evaluation/plots" if name.startswith("plot_") else "evaluation"
        client.log_artifact(run_id, str(path), artifact_path=folder)
    return run_id


def _data_hash(client: Any, run_id: str, params: dict[str, Any], source: str) -> tuple[str, str]:
    """The training data hash the run recorded, else computed from ``paths.preprocessed``."""
    tags = client.get_run(run_id).data.tags
    if tags.get("data.data_md5"):
        return tags["data.data_md5"], tags.get("data.data_md5_source", "run tag")
    found = data_version(section("paths", params, source=source).preprocessed)
    return found["data_md5"], found["data_md5_source"]


@contextmanager
def evidence_files(record: dict[str, Any], card: str, prefix: str) -> Iterator[dict[str, Path]]:
    """``evaluation.json`` and ``model_card.md`` by artifact key: logged with the model, a version still
    explains itself when its run is gone."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        files = {"evaluation": Path(tmp) / EVALUATION_ARTIFACT, "model_card": Path(tmp) / MODEL_CARD_ARTIFACT}
        files["evaluation"].write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
        files["model_card"].write_text(card)
        yield files


def register_version(client: Any, uri: str, name: str, description: str, tags: dict[str, str]) -> str:
    """Register model ``uri`` as a new version of ``name`` (created with ``description`` if new)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description)
    return str(mlflow.register_model(uri, name, tags=tags).version)


def register_model(
    trained: Any,
    evaluation: Any,
    *,
    run_id: str,
    tracking_uri: str,
    cfg: RegistryConfig,
    predict_settings: dict[str, Any],
    params: dict[str, Any],
    source: str = "params.yaml",
) -> RegisteredVersion:
    """Log the pyfunc to ``run_id``, register it as a new version of ``cfg.model_name``, alias ``challenger``.

    ``evaluation`` is the :class:`~tumorseg.evaluation.pipeline_stage.TestEvaluation` of ``trained``
    with ``predict_settings``, which are stored with the model.
    """
    import mlflow

    with fluent_store(tracking_uri):
        client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        facts = _model_card_facts(client, trained, evaluation, run_id, cfg, predict_settings, params, source)
        cases_md5 = cases_fingerprint(evaluation.reference_sha256)
        record = {
            **evaluation.to_record(),
            "test_cases_md5": cases_md5,
            "data_md5": facts.data_md5,
            "params_md5": facts.params_md5,
            "git_commit": facts.git_commit,
        }
        uri = _log_version_model(trained, predict_settings, record, render_model_card(facts), run_id)
        tags = _version_tags(trained, evaluation, facts, cases_md5)
        version = register_version(client, uri, cfg.model_name, MODEL_DESCRIPTION, tags)
        card = render_model_card(facts, version=version)
        client.update_model_version(cfg.model_name, version, description=registry_description(card))
        client.set_registered_model_alias(cfg.model_name, CHALLENGER, version)
        client.set_tag(run_id, "tumorseg.registered_version", f"{cfg.model_name}/{version}")
        log.info("registered %s version %s (run %s) as %s", cfg.model_name, version, run_id, CHALLENGER)
        return RegisteredVersion(cfg.model_name, version, run_id, f"models:/{cfg.model_name}/{version}")


def _model_card_facts(
    client: Any,
    trained: Any,
    evaluation: Any,
    run_id: str,
    cfg: RegistryConfig,
    predict_settings: dict[str, Any],
    params: dict[str, Any],
    source: str,
) -> ModelCardFacts:
    """What the model card states, and the provenance the version's tags and evidence record."""
    data_md5, data_source = _data_hash(client, run_id, params, source)
    commit = git_commit(Path(__file__).resolve().parent)  # the code's repository, wherever the stage runs
    return ModelCardFacts(
        model_name=cfg.model_name,
        run_id=run_id,
        config=trained.config,
        predict_settings=predict_settings,
        metrics=evaluation.metrics,
        n_parameters=sum(p.numel() for p in trained.network.parameters()),
        git_commit=commit,
        data_md5=data_md5,
        data_md5_source=data_source,
        params_md5=params_md5(trained.config),
        synthetic_data=(source_folder(params, source) / "synth_meta.json").is_file(),
        test_cases=int(evaluation.metrics["n_cases"]),
        label_convention=evaluation.label_convention,
    )


def _log_version_model(
    trained: Any, predict_settings: dict[str, Any], record: dict[str, Any], card: str, run_id: str
) -> str:
    """Log the pyfunc with its evidence to ``run_id``; return the model URI (the card goes to the run too)."""
    import mlflow

    from tumorseg.registry.pyfunc import log_segmentation_model

    with evidence_files(record, card, "tumorseg-register-") as files, mlflow.start_run(run_id=run_id):
        info = log_segmentation_model(
            trained, predict_settings, name=LOGGED_MODEL_NAME, extra_artifacts=files
        )
        mlflow.log_artifact(str(files["model_card"]))
    return info.model_uri


def _version_tags(trained: Any, evaluation: Any, facts: ModelCardFacts, cases_md5: str) -> dict[str, str]:
    """The version's provenance and test scores as tags (what ``tumorseg promote`` and searches read)."""
    m = evaluation.metrics
    return {
        "git_commit": facts.git_commit or "unknown",
        "data_md5": facts.data_md5,
        "data_md5_source": facts.data_md5_source,
        "params_md5": facts.params_md5,
        "network": str(trained.config.get("model", {}).get("name")),
        "test_n_cases": str(m["n_cases"]),
        "test_cases_md5": cases_md5,
        "test_dice_mean": f"{m['dice_mean']:.6f}",
        **{f"test_dice_{r}": f"{m[f'dice_{r}']:.6f}" for r in scored_regions(m)},
    }
