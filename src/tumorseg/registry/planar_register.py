"""Register the evaluated 2-D model as ``tumorseg-2d`` and ``tumorseg-detect`` challengers.

Each name gets a version of the same package with its own evidence for :mod:`tumorseg.registry.promote`:
the per-image score column is ``tumour`` Dice for the segmentation and ``correct`` (0/1) for the
detector, so the gate's mean is the test accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tumorseg.registry.config import CHALLENGER
from tumorseg.registry.register import RegisteredVersion, cases_fingerprint, params_md5
from tumorseg.tracking import fluent_store, git_commit

log = logging.getLogger(__name__)

DESCRIPTIONS = {
    "segmentation": (
        "2-D brain-tumour segmentation of single MRI slices (tumour vs background), with tumour-type "
        "classification (meningioma/glioma/pituitary). Aliases: `champion`, `challenger`. Not for clinical use."
    ),
    "detection": (
        "2-D brain-tumour detection (tumour / no tumour) of single MRI slices. Aliases: `champion`, "
        "`challenger`. Not for clinical use."
    ),
}


def _fmt(metric: dict[str, Any] | None, digits: int = 3) -> str:
    if not metric or metric.get("value") is None:
        return "n/a"
    low, high = metric.get("ci_low"), metric.get("ci_high")
    ci = f" [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and high is not None else ""
    return f"{metric['value']:.{digits}f}{ci}"


def render_planar_card(
    kind: str, name: str, metrics: dict[str, Any], config: dict[str, Any], facts: dict[str, Any]
) -> str:
    """The model card of a 2-D version as Markdown (``kind``: ``segmentation`` or ``detection``)."""
    model = config.get("model_2d", {})
    train = config.get("train_2d", {})
    pre = config.get("preprocess_2d", {})
    seg = metrics.get("segmentation", {})
    det = metrics.get("detection", {})
    lines = [
        f"# Model card: {name}" + (f" version {facts['version']}" if facts.get("version") else ""),
        "",
        DESCRIPTIONS[kind],
        "",
        "## Model",
        f"- Segmenter: {model.get('name')} (2-D, 1 channel in, 1 sigmoid out) at {model.get('input_size')} px; "
        f"classifier: MONAI Classifier {model.get('classifier', {}).get('channels')}",
        f"- Preprocessing: grayscale, Otsu crop {pre.get('otsu_crop')}, square {pre.get('size')} px, {pre.get('normalise')}",
        f"- Detector: {det.get('method')} (chosen on the validation split), threshold {det.get('threshold')}",
        f"- Trained {train.get('max_epochs')} epochs x {train.get('steps_per_epoch')} steps, lr {train.get('lr')}",
        "",
        "## Provenance",
        f"- MLflow run `{facts.get('run_id')}`, git `{facts.get('git_commit') or 'unknown'}`",
        f"- Data hash `{facts.get('data_md5')}`; params hash `{facts.get('params_md5')}`",
        "",
        "## Held-out test metrics (patient-level split; 95% patient-level bootstrap CIs)",
        f"- Segmentation Dice (tumour images): {_fmt(seg.get('dice_tumour'))}; HD95 px: {_fmt(seg.get('hd95_px_tumour'), 1)}",
    ]
    for kind_name, stats in (seg.get("per_tumour_type") or {}).items():
        lines.append(f"  - {kind_name}: Dice {_fmt(stats.get('dice'))} ({stats.get('n_images')} images)")
    lines += [
        f"- Detection: accuracy {_fmt(det.get('accuracy'))}, sensitivity {_fmt(det.get('sensitivity'))}, "
        f"specificity {_fmt(det.get('specificity'))}, AUC {_fmt(det.get('auc'))} "
        f"({det.get('n_images')} images, {det.get('n_patients')} patients)",
        f"- Tumour type accuracy: {_fmt(metrics.get('type_classification', {}).get('accuracy'))}",
        "",
        "## Intended use and limits",
        "- Research and testing of the tumorseg pipeline; **not for clinical use**.",
        "- Input: one 2-D MRI slice (.mat as in the Figshare dataset, or PNG/JPEG/TIFF/BMP), any size.",
    ]
    if facts.get("synthetic"):
        lines.append("- Trained and tested on **generated** images: performance on real scans is unknown.")
    lines.append("- Metrics come from a small test split; the intervals show how uncertain they are.")
    return "\n".join(lines) + "\n"


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
) -> dict[str, RegisteredVersion]:
    """Log and register one version per name in ``names`` (``{"segmentation": ..., "detection": ...}``).

    ``evaluation`` is ``{"metrics", "evidence": {kind: {"regions", "case_dice", "reference_sha256"}}}``.
    """
    import mlflow

    from tumorseg.registry.model_card import registry_description
    from tumorseg.registry.planar_pyfunc import log_planar_model
    from tumorseg.registry.register import evidence_files, register_version

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
            record = {**evidence, "metrics": metrics, "test_cases_md5": cases_md5, **facts}
            card = render_planar_card(kind, name, metrics, config, facts)
            with (
                evidence_files(record, card, "tumorseg-register-2d-") as files,
                mlflow.start_run(run_id=run_id),
            ):
                info = log_planar_model(package, name=f"planar_{kind}", extra_artifacts=files)
                mlflow.log_artifact(str(files["model_card"]), artifact_path=f"model_card_{kind}")
            tags = {
                "git_commit": facts["git_commit"] or "unknown",
                "data_md5": data_md5,
                "params_md5": facts["params_md5"],
                "network": str(config.get("model_2d", {}).get("name")),
                "branch": "2d",
                "test_n_cases": str(len(evidence["case_dice"])),
                "test_cases_md5": cases_md5,
                **{k: f"{v:.6f}" for k, v in _headline(kind, metrics).items() if v is not None},
            }
            version = register_version(client, info.model_uri, name, DESCRIPTIONS[kind], tags)
            card = render_planar_card(kind, name, metrics, config, {**facts, "version": version})
            client.update_model_version(name, version, description=registry_description(card))
            client.set_registered_model_alias(name, CHALLENGER, version)
            log.info("registered %s version %s (run %s) as %s", name, version, run_id, CHALLENGER)
            registered[kind] = RegisteredVersion(name, version, run_id, f"models:/{name}/{version}")
        return registered


def _headline(kind: str, metrics: dict[str, Any]) -> dict[str, float | None]:
    if kind == "segmentation":
        dice = metrics.get("segmentation", {}).get("dice_tumour") or {}
        return {"test_dice_tumour": dice.get("value")}
    det = metrics.get("detection", {})
    return {
        f"test_{m}": (det.get(m) or {}).get("value")
        for m in ("accuracy", "sensitivity", "specificity", "auc")
    }
