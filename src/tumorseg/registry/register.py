"""Log the test evaluation to the training run and register the model as the new ``challenger``.

A registered version is the pyfunc of :mod:`tumorseg.registry.pyfunc` (weights + config + predict
settings), plus two more artifacts stored with it so every version carries its own evidence:

- ``evaluation.json``: the test cases, their per-case Dice per region (what ``tumorseg promote``
  pairs), the sha256 of each reference segmentation, the flat metrics and the summary with CIs;
- ``model_card.md`` (:mod:`tumorseg.registry.model_card`), also the version's description.

Version tags: ``git_commit``, ``data_md5`` (+ ``data_md5_source``), ``params_md5``,
``test_dice_mean`` / ``test_dice_<region>``, ``test_n_cases``, ``test_cases_md5``, ``network``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tumorseg.config import section
from tumorseg.registry.config import CHALLENGER, RegistryConfig
from tumorseg.registry.model_card import (
    ModelCardFacts,
    registry_description,
    render_model_card,
    scored_regions,
)

log = logging.getLogger(__name__)

LOGGED_MODEL_NAME = "segmentation_model"
EVALUATION_ARTIFACT = "evaluation.json"
MODEL_CARD_ARTIFACT = "model_card.md"
METRIC_PREFIX = "test_eval/"
"""MLflow metric prefix of the source-geometry test metrics (training logs ``test_dice_*`` on its own grid)."""


@dataclass
class RegisteredVersion:
    """A registered model version.

    Attributes:
        name: registered model name.
        version: version number (text, as MLflow returns it).
        run_id: training run the model was logged to.
        model_uri: ``models:/<name>/<version>``.
        alias: alias set on it.
    """

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
    """The training run a checkpoint came from, or a new, finished run when there is none.

    Test results belong on the run that trained the weights, so the 3-D (:func:`log_test_evaluation`)
    and the 2-D evaluation (:mod:`tumorseg.evaluation.planar_evaluate`) log there. When training ran without
    MLflow, or the store does not know the run (another store, deleted), a run named ``run_name``
    is created in ``experiment`` and marked finished, so evaluation results are never lost.

    Args:
        client: an ``mlflow.MlflowClient`` on ``tracking_uri``.
        checkpoint: the Lightning checkpoint (its run id is read from it).
        tracking_uri: the store, for messages and the new run's experiment.
        experiment: experiment of a new run.
        run_name: name of a new run.
        tags: tags of a new run.

    Returns:
        The run id.
    """
    from mlflow.exceptions import MlflowException

    from tumorseg.tracking import ensure_experiment

    run_id = checkpoint_run_id(checkpoint)
    if run_id is not None:
        try:
            client.get_run(run_id)
        except MlflowException:
            log.warning("run %s of %s is not in %s; logging to a new run", run_id, checkpoint, tracking_uri)
            run_id = None
    if run_id is None:
        experiment_id = ensure_experiment(tracking_uri, experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        client.set_terminated(run_id)
    return run_id


def log_test_evaluation(
    evaluation: Any, *, checkpoint: str | Path, tracking_uri: str, experiment: str
) -> str:
    """Log test metrics (``test_eval/*``) and the reports to the training run; return its id.

    The run is the one stored in the checkpoint. When there is none (training ran without MLflow)
    or the store does not know it, a new run named ``evaluate`` is created in ``experiment``.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    run_id = checkpoint_or_new_run(
        client,
        checkpoint,
        tracking_uri=tracking_uri,
        experiment=experiment,
        run_name="evaluate",
        tags={"tumorseg.checkpoint": str(checkpoint)},
    )
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{METRIC_PREFIX}{key}", float(value), now, 0)
        for key, value in evaluation.metrics.items()
        if value is not None
    ]
    client.log_batch(run_id, metrics=metrics)
    for name, path in evaluation.files.items():
        folder = "evaluation/plots" if name.startswith("plot_") else "evaluation"
        client.log_artifact(run_id, str(path), artifact_path=folder)
    return run_id


def _data_hash(client: Any, run_id: str, params: dict[str, Any], source: str) -> tuple[str, str]:
    """The training data hash the run recorded, else computed from ``paths.preprocessed``."""
    from tumorseg.tracking import data_version

    tags = client.get_run(run_id).data.tags
    if tags.get("data.data_md5"):
        return tags["data.data_md5"], tags.get("data.data_md5_source", "run tag")
    found = data_version(section("paths", params, source=source).preprocessed)
    return found["data_md5"], found["data_md5_source"]


def _ensure_registered_model(client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            description=(
                "Brain-tumour segmentation (BraTS regions WT/TC/ET) from T1, T1ce, T2 and FLAIR. Aliases: "
                "`champion` (serving), `challenger` (latest evaluated candidate). Not for clinical use."
            ),
        )


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

    Args:
        trained: the evaluated :class:`~tumorseg.models.checkpoint.TrainedNetwork`.
        evaluation: its :class:`~tumorseg.evaluation.pipeline_stage.TestEvaluation`.
        run_id: training run (from :func:`log_test_evaluation`).
        tracking_uri: MLflow store (tracking and registry).
        cfg: the ``registry`` section.
        predict_settings: ``predict`` settings used for the evaluation, stored with the model.
        params: params dict (paths for the data hash and the synthetic-data check).
        source: params file name for error messages.
    """
    import mlflow

    from tumorseg.tracking import fluent_store

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
        model_uri = _log_version_model(trained, predict_settings, record, render_model_card(facts), run_id)

        _ensure_registered_model(client, cfg.model_name)
        tags = _version_tags(trained, evaluation, facts, cases_md5)
        registered = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
        version = str(registered.version)
        client.update_model_version(
            cfg.model_name,
            version,
            description=registry_description(render_model_card(facts, version=version)),
        )
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
    from tumorseg.data.source import source_folder
    from tumorseg.tracking import git_commit

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
    """Log the pyfunc, with its evaluation record and model card, to ``run_id``; return the model URI.

    The evidence travels with the model (``evaluation.json``, ``model_card.md``), so a version
    still explains itself when the run is gone; the card is also logged to the run itself.
    """
    import mlflow

    from tumorseg.registry.pyfunc import log_segmentation_model

    with tempfile.TemporaryDirectory(prefix="tumorseg-register-") as tmp:
        evaluation_file = Path(tmp) / EVALUATION_ARTIFACT
        evaluation_file.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
        card_file = Path(tmp) / MODEL_CARD_ARTIFACT
        card_file.write_text(card)
        with mlflow.start_run(run_id=run_id):
            info = log_segmentation_model(
                trained,
                predict_settings,
                name=LOGGED_MODEL_NAME,
                extra_artifacts={"evaluation": evaluation_file, "model_card": card_file},
            )
            mlflow.log_artifact(str(card_file))
    return info.model_uri


def _version_tags(trained: Any, evaluation: Any, facts: ModelCardFacts, cases_md5: str) -> dict[str, str]:
    """The version's provenance and test scores as tags (what ``tumorseg promote`` and searches read)."""
    return {
        "git_commit": facts.git_commit or "unknown",
        "data_md5": facts.data_md5,
        "data_md5_source": facts.data_md5_source,
        "params_md5": facts.params_md5,
        "network": str(trained.config.get("model", {}).get("name")),
        "test_n_cases": str(evaluation.metrics["n_cases"]),
        "test_cases_md5": cases_md5,
        "test_dice_mean": f"{evaluation.metrics['dice_mean']:.6f}",
        **{
            f"test_dice_{r}": f"{evaluation.metrics[f'dice_{r}']:.6f}"
            for r in scored_regions(evaluation.metrics)
        },
    }
