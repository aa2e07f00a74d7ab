"""Log a test evaluation to the training run and register the model as the new ``challenger``.

Each version carries its own evidence (``evaluation.json``: the per-case scores ``tumorseg promote``
pairs, reference sha256s, metrics; ``model_card.md``) and provenance and score tags. A volume model is
one name (``registry.model_name``); the 2-D package is registered twice, as ``tumorseg-2d`` (per-image
score: ``tumour`` Dice) and ``tumorseg-detect`` (``correct``, 0/1, so the gate's mean is the accuracy).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tumorseg.data.source import source_folder
from tumorseg.faults import write_point
from tumorseg.params import Params, as_params
from tumorseg.registry.config import CHALLENGER, RegistryConfig
from tumorseg.registry.model_card import (
    PLANAR_DESCRIPTIONS,
    ModelCardFacts,
    registry_description,
    render_model_card,
    render_planar_card,
    scored_regions,
)
from tumorseg.tracking import (
    PARENT_TAG,
    data_version,
    ensure_experiment,
    fluent_store,
    git_commit,
    reap_orphaned_runs,
    registry_lock,
    tag_process,
)

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
    """md5 of the resolved training sections (key order independent; not what was chosen after training,
    ``postprocess``)."""
    from tumorseg.models.postprocess import POSTPROCESS_KEY

    trained = {key: value for key, value in config.items() if key != POSTPROCESS_KEY}
    return hashlib.md5(json.dumps(trained, sort_keys=True, default=str).encode()).hexdigest()


def cases_fingerprint(reference_sha256: dict[str, str]) -> str:
    """md5 over the sorted test case ids and their reference digests: equal means "same test set"."""
    text = "\n".join(f"{case_id} {digest}" for case_id, digest in sorted(reference_sha256.items()))
    return hashlib.md5(text.encode()).hexdigest()


def log_test_evaluation(
    metrics: dict[str, Any],
    files: dict[str, Path],
    *,
    checkpoint: str | Path,
    tracking_uri: str,
    experiment: str,
    prefix: str = METRIC_PREFIX,
    folder: Callable[[str], str] = lambda key: (
        "evaluation/plots" if key.startswith("plot_") else "evaluation"
    ),
    run_name: str = "evaluate",
    tags: dict[str, str] | None = None,
) -> str:
    """Log test ``metrics`` (``<prefix><name>``, None skipped) and report ``files`` (to ``folder(key)``)
    to the checkpoint's training run; returns the run id.

    A new, finished run ``run_name`` in ``experiment`` (with ``tags``) takes them when training ran
    without MLflow or the store does not know its run, so evaluation results are never lost.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    reap_orphaned_runs(tracking_uri, experiment)  # a run a killed evaluation reopened: FAILED
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
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(f"{prefix}{k}", float(v), now, 0) for k, v in metrics.items() if v is not None],
    )
    for key, path in files.items():
        client.log_artifact(run_id, str(path), artifact_path=folder(key))
    return run_id


def _data_hash(client: Any, run_id: str, params: Params, source: str) -> tuple[str, str]:
    """The training data hash the run recorded, else computed from ``paths.preprocessed``."""
    tags = client.get_run(run_id).data.tags
    if tags.get("data.data_md5"):
        return tags["data.data_md5"], tags.get("data.data_md5_source", "run tag")
    found = data_version(params.paths.preprocessed)
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


MLFLOW_REGISTRATION_NOTES = ("Successfully registered model ", "Registered model ", "Created version ")
"""The lines ``mlflow.register_model`` prints on stderr for every registration ("Registered model 'x'
already exists. Creating a new version of this model...", "Created version '3' of model 'x'."): the
caller logs the version it registered instead."""


def register_version(client: Any, uri: str, name: str, description: str | None, tags: dict[str, str]) -> str:
    """Register model ``uri`` as a new version of ``name`` (created with ``description`` if new).

    MLflow prints its registration notes straight to stderr, outside logging: they are logged at DEBUG
    here; anything else it wrote meanwhile (a warning) is passed on to stderr unchanged."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            return str(mlflow.register_model(uri, name, tags=tags).version)
    finally:
        for line in printed.getvalue().splitlines(keepends=True):
            if line.startswith(MLFLOW_REGISTRATION_NOTES):
                log.debug("mlflow: %s", line.rstrip())
            else:
                sys.stderr.write(line)


def publish_version(
    client: Any,
    *,
    name: str,
    run_id: str,
    description: str,
    record: dict[str, Any],
    card: Callable[[str | None], str],
    log_model: Callable[[dict[str, Path]], str],
    tags: dict[str, str],
    prefix: str,
) -> RegisteredVersion:
    """Log a pyfunc with its evidence to ``run_id``, register it under ``name``, alias it ``challenger``.

    ``card(version)`` renders the model card (version None before registration); ``log_model(files)``
    logs the pyfunc and the card into the active run and returns the model URI.
    """
    import mlflow

    with evidence_files(record, card(None), prefix) as files, mlflow.start_run(run_id=run_id):
        tag_process(client, run_id)  # RUNNING again while the model is logged: killed here, it is reaped
        uri = log_model(files)
    with registry_lock(client.tracking_uri):  # not while a promotion reads and moves the aliases
        write_point(f"register {name}")
        version = register_version(client, uri, name, description, tags)
        client.update_model_version(name, version, description=registry_description(card(version)))
        write_point(f"alias {name}@{CHALLENGER}")
        client.set_registered_model_alias(name, CHALLENGER, version)
    log.info("registered %s version %s (run %s) as %s", name, version, run_id, CHALLENGER)
    return RegisteredVersion(name, version, run_id, f"models:/{name}/{version}")


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
    drift_profile: Any = None,
) -> RegisteredVersion:
    """Register the volume model ``trained`` as a new ``challenger`` version of ``cfg.model_name``.

    ``evaluation`` is its :class:`~tumorseg.evaluation.pipeline_stage.TestEvaluation` with
    ``predict_settings``, which are stored with the model, as is ``drift_profile``
    (:class:`~tumorseg.monitoring.drift.Profile`, the reference ``predict`` checks cases against).
    """
    params = as_params(params, source)
    import mlflow

    from tumorseg.models.onnx_predictor import ONNX_ARTIFACT
    from tumorseg.models.package import save_onnx
    from tumorseg.registry.pyfunc import log_segmentation_model

    def log_model(files: dict[str, Path]) -> str:
        # The fp32 network as ONNX beside the weights: `tumorseg predict` then runs without torch
        # (models/onnx_predictor.py); a failed export only costs that speed.
        with tempfile.TemporaryDirectory(prefix="tumorseg-onnx-") as tmp:
            onnx_file = save_onnx(trained, tmp)
            extra = {**files, ONNX_ARTIFACT: onnx_file} if onnx_file is not None else files
            if drift_profile is not None:
                from tumorseg.monitoring.drift import PROFILE_ARTIFACT, PROFILE_FILE

                profile_file = Path(tmp) / PROFILE_FILE
                profile_file.write_text(json.dumps(drift_profile.to_dict(), indent=1) + "\n")
                extra = {**extra, PROFILE_ARTIFACT: profile_file}
            info = log_segmentation_model(
                trained, predict_settings, name=LOGGED_MODEL_NAME, extra_artifacts=extra
            )
        mlflow.log_artifact(str(files["model_card"]))
        return info.model_uri

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
        registered = publish_version(
            client,
            name=cfg.model_name,
            run_id=run_id,
            description=MODEL_DESCRIPTION,
            record=record,
            card=lambda version: render_model_card(facts, version=version),
            log_model=log_model,
            tags=_version_tags(trained, evaluation, facts, cases_md5),
            prefix="tumorseg-register-",
        )
        client.set_tag(run_id, "tumorseg.registered_version", f"{cfg.model_name}/{registered.version}")
        return registered


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
        parent_model=client.get_run(run_id).data.tags.get(PARENT_TAG),
    )


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
        **({"parent_model": facts.parent_model[:5000]} if facts.parent_model else {}),
    }


def register_planar_models(
    package: dict[str, Path],
    evaluation: dict[str, Any],
    *,
    run_id: str,
    tracking_uri: str,
    names: dict[str, str],
    config: dict[str, Any],
    data_md5: str,
    synthetic: bool,
    drift_profile: Any = None,
) -> dict[str, RegisteredVersion]:
    """Register the 2-D ``package`` once per kind of ``names`` (``{"segmentation": ..., "detection": ...}``).

    ``evaluation`` is ``{"metrics", "evidence": {kind: {"regions", "case_dice", "reference_sha256"}}}``.
    """
    import mlflow

    from tumorseg.registry.pyfunc import log_planar_model

    with fluent_store(tracking_uri):
        client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
        facts = {
            "run_id": run_id,
            "git_commit": git_commit(Path(__file__).resolve().parent),
            "data_md5": data_md5,
            "params_md5": params_md5(config),
            "synthetic": synthetic,
        }
        metrics = evaluation["metrics"]
        registered: dict[str, RegisteredVersion] = {}
        for kind, name in names.items():
            evidence = evaluation["evidence"][kind]
            cases_md5 = cases_fingerprint(evidence["reference_sha256"])

            def log_model(files: dict[str, Path], kind: str = kind) -> str:
                if drift_profile is not None:
                    from tumorseg.monitoring.drift import PROFILE_ARTIFACT, PROFILE_FILE

                    files = {**files, PROFILE_ARTIFACT: files["model_card"].with_name(PROFILE_FILE)}
                    files[PROFILE_ARTIFACT].write_text(json.dumps(drift_profile.to_dict(), indent=1) + "\n")
                info = log_planar_model(package, name=f"planar_{kind}", extra_artifacts=files)
                mlflow.log_artifact(str(files["model_card"]), artifact_path=f"model_card_{kind}")
                return info.model_uri

            tags = {
                "git_commit": facts["git_commit"] or "unknown",
                "data_md5": data_md5,
                "params_md5": facts["params_md5"],
                "network": str(config.get("model_2d", {}).get("name")),
                "branch": "2d",
                "test_n_cases": str(len(evidence["case_dice"])),
                "test_cases_md5": cases_md5,
                **{k: f"{v:.6f}" for k, v in _planar_headline(kind, metrics).items() if v is not None},
            }
            registered[kind] = publish_version(
                client,
                name=name,
                run_id=run_id,
                description=PLANAR_DESCRIPTIONS[kind],
                record={**evidence, "metrics": metrics, "test_cases_md5": cases_md5, **facts},
                card=lambda version, kind=kind, name=name: render_planar_card(
                    kind, name, metrics, config, {**facts, "version": version} if version else facts
                ),
                log_model=log_model,
                tags=tags,
                prefix="tumorseg-register-2d-",
            )
        return registered


def _planar_headline(kind: str, metrics: dict[str, Any]) -> dict[str, float | None]:
    """The test scores a 2-D version is tagged with: ``tumour`` Dice, or the detector's four figures."""
    if kind == "segmentation":
        dice = metrics.get("segmentation", {}).get("dice_tumour") or {}
        return {"test_dice_tumour": dice.get("value")}
    det = metrics.get("detection", {})
    return {
        f"test_{m}": (det.get(m) or {}).get("value")
        for m in ("accuracy", "sensitivity", "specificity", "auc")
    }
