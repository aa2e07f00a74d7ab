"""The champions scored on a dataset they were not trained on (``tumorseg generalise``).

The default test split comes from the same generator as the training cases, so a model can score
well on it by learning that generator. This scores a registered model on another dataset folder
(by default the independent set of :mod:`tumorseg.data.independent`, made by different code on
purpose) exactly as ``predict`` + ``evaluate`` would: 3-D, every dataset in the folder (each
sub-folder in its own layout) with the BraTS metrics of its convention; 2-D, Dice of every image
with a mask and tumour detection of every image, each with a patient-level bootstrap CI.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import DataError
from tumorseg.evaluation.summary import clean_json, patient_mean_ci
from tumorseg.params import Params, as_params

log = logging.getLogger(__name__)

REPORT_NAME = "generalisation.json"
PER_CASE_NAME = "generalisation_per_case.csv"


def dataset_folders(root: Path) -> list[Path]:
    """``root`` when it is one dataset (its cases directly inside: case folders, ``imagesTr``...),
    else each sub-folder that is one (a layout per sub-folder), sorted."""
    from tumorseg.data.layouts import discover_cases

    def is_dataset(folder: Path) -> bool:
        try:
            cases = discover_cases(folder)
        except DataError:
            return False
        top = folder.resolve()
        return all(top in (Path(c.case_dir).resolve(), Path(c.case_dir).resolve().parent) for c in cases)

    if is_dataset(root):
        return [root]
    folders = [
        p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".") and is_dataset(p)
    ]
    if not folders:
        raise DataError(f"{root}: no dataset in a supported layout, nor one per sub-folder")
    return folders


def _region_summary(per_case: pd.DataFrame, stats: dict[str, Any]) -> dict[str, Any]:
    """Mean Dice and HD95 per region over cases, each with a case-level bootstrap CI."""
    out: dict[str, Any] = {}
    for region, rows in per_case.groupby("region", sort=False):
        ids = rows["case_id"].to_numpy()
        out[str(region)] = {
            "dice": patient_mean_ci(rows["dice"].to_numpy(), ids, **stats),
            "hd95": patient_mean_ci(rows["hd95"].to_numpy(), ids, **stats),
        }
    return out


def score_volumes(
    data: Path, out_dir: Path, params: Params, *, model_uri: str | None, source: str, tracking_uri: str | None
) -> dict[str, Any]:
    """Predict and evaluate every dataset under ``data``; per-case rows carry their dataset's name."""
    from tumorseg.evaluation.evaluate import evaluate_folders
    from tumorseg.models.predictor import plan_cases
    from tumorseg.registry.predict import predict_folder

    frames, description, engines = [], "", set()
    with tempfile.TemporaryDirectory(prefix="tumorseg-generalise-") as work:
        for folder in dataset_folders(data):
            cases = plan_cases(folder)
            pred_dir, ref_dir = Path(work) / "pred" / folder.name, Path(work) / "ref" / folder.name
            ref_dir.mkdir(parents=True)
            conventions = {}
            for case in cases:
                seg = case.paths.get("seg")
                if seg is None or not Path(seg).is_file():
                    raise DataError(f"{case.case_dir}: case {case.case_id} has no reference segmentation")
                os.symlink(Path(seg).resolve(), ref_dir / f"{case.case_id}.nii.gz")
                conventions[case.case_id] = case.label_convention
            run = predict_folder(
                folder, pred_dir, params, model_uri=model_uri, source=source, tracking_uri=tracking_uri
            )
            description, engine = run.model, run.engine
            engines.add(engine)
            result = evaluate_folders(
                pred_dir,
                ref_dir,
                Path(work) / f"{folder.name}.csv",
                cfg=params.evaluate,
                case_conventions=conventions,
                make_plots=False,
            )
            frame = result.per_case.copy()
            frame.insert(1, "dataset", folder.name)
            frames.append(frame)
            log.info("generalise: %s, %d cases scored", folder.name, len(cases))
    per_case = pd.concat(frames, ignore_index=True)
    cfg = params.evaluate
    stats = {"resamples": cfg.bootstrap_resamples, "ci_level": cfg.ci_level, "seed": cfg.seed}
    report = {
        "dims": 3,
        "data": str(data),
        "model": description,
        "engine": ", ".join(sorted(engines)),
        "n_cases": int(per_case["case_id"].nunique()),
        "datasets": {name: int(rows["case_id"].nunique()) for name, rows in per_case.groupby("dataset")},
        "regions": _region_summary(per_case, stats),
        "by_dataset": {
            name: _region_summary(rows, stats) for name, rows in per_case.groupby("dataset", sort=True)
        },
        "bootstrap": {**stats, "unit": "case"},
    }
    _write(out_dir, report, per_case)
    return report


def score_images(
    data: Path, out_dir: Path, params: Params, *, model_uri: str | None, tracking_uri: str
) -> dict[str, Any]:
    """Segment and classify every 2-D image under ``data``: Dice where a mask exists, detection everywhere."""
    from tumorseg.data.planar import read_planar
    from tumorseg.data.readers import image_inputs
    from tumorseg.evaluation.metrics import PLANAR_OVERLAP, overlap_scores, segmentation_scores
    from tumorseg.models.predictor import predict_planar
    from tumorseg.registry.loading import load_planar_model

    model = load_planar_model(model_uri or params.predict_2d.model, tracking_uri=tracking_uri)
    rows = []
    for path in image_inputs(data):
        truth = read_planar(path)
        prediction = predict_planar(path, model)
        row = {
            "case_id": truth.case_id,
            "patient_id": truth.patient_id,
            "source": truth.source,
            "has_tumour": bool(truth.has_tumour),
            "probability": prediction.probability,
            "predicted": bool(prediction.label),
            "correct": float(bool(prediction.label) == bool(truth.has_tumour)),
            "dice": np.nan,
            "hd95_px": np.nan,
        }
        if truth.mask is not None and truth.mask.any():
            row["dice"], row["hd95_px"] = segmentation_scores(prediction.mask > 0, truth.mask > 0)
            row.update(overlap_scores(prediction.mask > 0, truth.mask > 0))
        rows.append(row)
    per_case = pd.DataFrame(rows)
    cfg = params.evaluate_2d
    stats = {"resamples": cfg.bootstrap_resamples, "ci_level": cfg.ci_level, "seed": cfg.seed}
    masked = per_case[per_case["dice"].notna()]
    tumour, free = per_case[per_case["has_tumour"]], per_case[~per_case["has_tumour"]]
    report = {
        "dims": 2,
        "data": str(data),
        "model": model.description,
        "n_images": int(len(per_case)),
        "n_patients": int(per_case["patient_id"].nunique()),
        "dice_tumour": patient_mean_ci(masked["dice"], masked["patient_id"], **stats),
        "hd95_px_tumour": patient_mean_ci(masked["hd95_px"], masked["patient_id"], **stats),
        **{
            f"{name}_tumour": patient_mean_ci(masked[name], masked["patient_id"], **stats)
            for name in (*PLANAR_OVERLAP, "pixel_accuracy_empty")
        },
        "detection_accuracy": patient_mean_ci(per_case["correct"], per_case["patient_id"], **stats),
        "sensitivity": patient_mean_ci(tumour["correct"], tumour["patient_id"], **stats),
        "specificity": patient_mean_ci(free["correct"], free["patient_id"], **stats),
        "bootstrap": {**stats, "unit": "patient"},
    }
    _write(out_dir, report, per_case)
    return report


def _write(out_dir: Path, report: dict[str, Any], per_case: pd.DataFrame) -> None:
    """The CSV first, the JSON last: a report file present means both are complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / PER_CASE_NAME, per_case.to_csv(index=False))
    atomic_write_text(out_dir / REPORT_NAME, json.dumps(clean_json(report), indent=2) + "\n")


def generalise(
    params: Params | dict[str, Any],
    *,
    dims: int = 3,
    data: str | Path | None = None,
    out_dir: str | Path | None = None,
    model_uri: str | None = None,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Score the ``dims``-D champion (or ``model_uri``) on ``data`` (``generalise.data`` /
    ``generalise.data_2d``); writes ``generalisation.json`` and the per-case CSV to ``out_dir``
    (``paths.reports`` / ``paths.reports_2d``). The dataset is only read."""
    params = as_params(params, source)
    from tumorseg.tracking import params_tracking_uri

    cfg = params.generalise
    data = Path(data or (cfg.data if dims == 3 else cfg.data_2d))
    if not data.is_dir():
        raise DataError(f"{data}: no such folder; generate it with `tumorseg synth --generator independent`")
    out = Path(out_dir or (params.paths.reports if dims == 3 else params.paths.reports_2d))
    uri = params_tracking_uri(params, tracking_uri, source=source)
    if dims == 3:
        return score_volumes(data, out, params, model_uri=model_uri, source=source, tracking_uri=uri)
    return score_images(data, out, params, model_uri=model_uri, tracking_uri=uri)


def one_line(report: dict[str, Any]) -> str:
    """The figures a console line shows."""

    def f(m: dict[str, Any]) -> str:
        return (
            "n/a" if m.get("value") is None else f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
        )

    if report["dims"] == 3:
        dice = ", ".join(f"{r} {f(v['dice'])}" for r, v in report["regions"].items())
        return f"independent set, {report['n_cases']} cases: Dice {dice} ({report['model']})"
    return (
        f"independent set, {report['n_images']} images: Dice {f(report['dice_tumour'])}, detection accuracy "
        f"{f(report['detection_accuracy'])} ({report['model']})"
    )
