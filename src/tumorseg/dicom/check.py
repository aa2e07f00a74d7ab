"""``tumorseg dicom-check``: the DICOM path measured on generated studies no model was trained on.

Per study (made by ``tumorseg synth --generator dicom``, truth in ``<studies>/truth/<study>/``):

- classification: the series picked per modality are the true T1, T1ce, T2 and FLAIR series, and no
  distractor (localiser, diffusion, ADC, low-resolution duplicates) is picked;
- registration: target registration error of T1, T2 and FLAIR onto T1ce, the mean distance over the
  true brain's voxels (T1ce frame) between where the estimated and the true transforms send them;
- brain extraction: Dice of the extracted brain against the true brain on the imported grid, and
  with ``dicom.compare_brain`` of the alternative (nilearn's MNI152 mask registered to the T1ce,
  :mod:`tumorseg.dicom.atlas`, when the import used the network; the network when it used the atlas);
- end to end: WT/TC/ET Dice of the DICOM-in prediction in the T1ce series' geometry, and of the same
  model on the BraTS-ready NIfTI of the same case brought into that geometry with the true transform,
  both against the true labels there;
- seconds per step: read and classify, read pixels, register, resample, N4, brain extraction,
  write the case, predict, write the DICOM-SEG; ``total`` is the whole DICOM-in -> DICOM-SEG-out call
  (model loading included; scoring and the other brain extractor not).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.dicom.prepare import Geometry

REPORT_JSON = "dicom_check.json"
REPORT_MD = "dicom_check.md"
_TRE_POINTS = 20000


def _region_dice(pred: np.ndarray, truth: np.ndarray, label_set: Any) -> dict[str, float]:
    """Dice per region with the evaluation's rules (1 when both masks are empty)."""
    from tumorseg.evaluation.metrics import confusion_counts, overlap_metrics

    rows = overlap_metrics(confusion_counts(label_set.regions(pred), label_set.regions(truth)))
    return {name: round(row["dice"], 4) for name, row in zip(label_set.region_names, rows, strict=True)}


def _lps_points(mask_img: Any, n: int, seed: int = 0) -> np.ndarray:
    """Up to ``n`` voxel centres of a SimpleITK mask, LPS mm ``(N, 3)``."""
    import SimpleITK as sitk

    idx = np.argwhere(sitk.GetArrayFromImage(mask_img) > 0)[:, ::-1]  # (i, j, k)
    if len(idx) > n:
        idx = idx[np.random.default_rng(seed).choice(len(idx), n, replace=False)]
    geo = Geometry.of(mask_img)
    return (geo.index_to_lps() @ np.c_[idx, np.ones(len(idx))].T)[:3].T


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return (matrix @ np.c_[points, np.ones(len(points))].T)[:3].T


def other_brain_mask(case: Any, params: Any, extractor: Any) -> tuple[np.ndarray, float]:
    """``(mask, seconds)``: ``extractor``'s brain mask of an imported study on its full grid (the
    series it reads, ``extractor.modalities``, read again, moved by the import's own registration and
    N4-corrected as the import did) and the seconds the extraction alone took."""
    from tumorseg.dicom.prepare import grid_array, matrix_transform
    from tumorseg.dicom.series import read_series

    arrays = {}
    for m in extractor.modalities:
        image, _ = read_series(case.picked[m])
        transform = matrix_transform(case.fixed_to_moving[m])
        arrays[m] = grid_array(image, case.full_grid, transform, params.dicom.bias)
    start = time.perf_counter()
    mask = extractor.extract(arrays, case.full_grid.ras_affine())
    return mask, time.perf_counter() - start


def score_study(
    study_dir: Path,
    truth_dir: Path,
    out_dir: Path,
    params: Any,
    *,
    model_uri: str | None,
    source: str,
    other_brain: Any = None,
) -> dict[str, Any]:
    """One study through ``predict`` on DICOM and on its BraTS-ready NIfTI, scored (module docstring)."""
    import nibabel as nib
    import SimpleITK as sitk

    from tumorseg.data.conventions import get_convention
    from tumorseg.dicom.brain import dice
    from tumorseg.dicom.outputs import predict_dicom, resample_labels
    from tumorseg.registry.predict import predict_folder

    truth = json.loads((truth_dir / "truth.json").read_text())
    series = truth["series"]
    by_uid = {s["series_uid"]: s for s in series}
    head_to = {
        s["modality"]: np.asarray(s["head_to_scanner"], dtype=float)
        for s in series
        if s["modality"] != "other"
    }
    begin = time.perf_counter()
    result = predict_dicom(
        study_dir, out_dir / "dicom", params, model_uri=model_uri, source=source, progress=lambda _: None
    )
    path_seconds = time.perf_counter() - begin  # DICOM in -> DICOM-SEG out, as `tumorseg predict` does it
    case = result.cases[0]
    record: dict[str, Any] = {"study": study_dir.name, "case_id": case.case_id}

    picks = {m: by_uid.get(s.uid, {}).get("modality", "unknown") for m, s in case.picked.items()}
    record["picked"] = {m: f"{s.label}" for m, s in case.picked.items()}
    record["classification_right"] = all(picks[m] == m for m in picks)
    record["distractors_picked"] = sum(1 for m in picks if picks[m] == "other")

    brain_truth = sitk.ReadImage(str(truth_dir / "brain_t1ce.nii.gz"))
    points = _lps_points(brain_truth, _TRE_POINTS)
    tre = {}
    for m in ("t1", "t2", "flair"):
        true = head_to[m] @ np.linalg.inv(head_to["t1ce"])
        estimated = case.fixed_to_moving[m]
        tre[m] = round(
            float(np.linalg.norm(_apply(estimated, points) - _apply(true, points), axis=1).mean()), 3
        )
    record["tre_mm"] = tre

    grid = case.full_grid
    truth_on_grid = sitk.Resample(
        brain_truth,
        grid.image(sitk.sitkUInt8),
        sitk.Transform(3, sitk.sitkIdentity),
        sitk.sitkNearestNeighbor,
        0,
    )
    truth_mask = sitk.GetArrayFromImage(truth_on_grid).transpose(2, 1, 0) > 0
    record["brain_dice"] = round(dice(case.brain_mask, truth_mask), 4)
    if other_brain is not None:  # the extractor the import did not use, on the same study
        other_mask, other_seconds = other_brain_mask(case, params, other_brain)
        record["other_brain_dice"] = round(dice(other_mask, truth_mask), 4)
        record["other_brain_seconds"] = round(other_seconds, 2)

    truth_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_dir / "seg_t1ce.nii.gz"))).astype(np.uint8)
    convention = get_convention("brats2021")
    label_set = convention.label_set
    dicom_pred = sitk.GetArrayFromImage(
        sitk.ReadImage(str(out_dir / "dicom" / f"{case.case_id}_t1ce.nii.gz"))
    )
    record["dicom_dice"] = _region_dice(convention.encode(dicom_pred.astype(np.uint8)), truth_seg, label_set)

    nifti_dir = truth_dir / "nifti"
    nifti_out = out_dir / "nifti"
    predictions: list[Any] = []
    predict_folder(
        nifti_dir,
        nifti_out,
        params,
        model_uri=model_uri,
        layout="brats2021",
        source=source,
        on_case=lambda prediction, _files: predictions.append(prediction),
    )
    pred = predictions[0]
    img = nib.load(str(nifti_out / f"{pred.case_id}.nii.gz"))
    source_grid = Geometry.from_ras_affine(img.affine, img.shape)
    t1ce_ref = Geometry.of(brain_truth)
    on_t1ce = resample_labels(pred.canonical, source_grid, t1ce_ref, np.linalg.inv(head_to["t1ce"]))
    record["nifti_dice"] = _region_dice(on_t1ce, truth_seg, label_set)
    record["dice_gap"] = round(
        float(np.mean(list(record["nifti_dice"].values())) - np.mean(list(record["dicom_dice"].values()))), 4
    )
    record["seconds"] = {k: round(v, 2) for k, v in result.seconds[case.case_id].items()}
    record["seconds"]["total"] = round(path_seconds, 2)
    return record


def _markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    cpu = report["cpu"]
    other = report["other_brain_model"]
    lines = [
        "# DICOM path on generated studies",
        "",
        f"`tumorseg dicom-check`, {len(report['studies'])} studies (seed {report['seed']}), model "
        f"`{report['model']}`, brain model `{report['brain_model']}`; CPU: {cpu.get('cpu_model', '?')} "
        f"({', '.join(cpu.get('cpu_flags', []))}), {report['threads']} threads.",
        "",
        "| study | picks right | distractors picked | TRE T1 / T2 / FLAIR (mm) | brain Dice | "
        + (f"brain Dice, {other} | " if other else "")
        + "DICOM Dice WT / TC / ET | NIfTI Dice WT / TC / ET | gap | seconds |",
        "|---|---|---|---|---|" + ("---|" if other else "") + "---|---|---|---|",
    ]
    for r in report["studies"]:
        t, d, n = r["tre_mm"], r["dicom_dice"], r["nifti_dice"]
        lines.append(
            f"| {r['study']} | {'yes' if r['classification_right'] else 'no'} | {r['distractors_picked']} | "
            f"{t['t1']:.2f} / {t['t2']:.2f} / {t['flair']:.2f} | {r['brain_dice']:.3f} | "
            + (f"{r['other_brain_dice']:.3f} | " if other else "")
            + f"{d['WT']:.3f} / {d['TC']:.3f} / {d['ET']:.3f} | {n['WT']:.3f} / {n['TC']:.3f} / {n['ET']:.3f} | "
            f"{r['dice_gap']:+.3f} | {r['seconds']['total']:.0f} |"
        )
    lines += [
        "",
        f"- Series classification: {s['classification_right']} of {s['studies']} studies with all four right, "
        f"{s['distractors_picked']} distractors picked.",
        f"- Mean TRE {s['tre_mm_mean']:.3f} mm (largest {s['tre_mm_max']:.3f} mm); target at most 1 mm.",
        f"- Brain extraction Dice mean {s['brain_dice_mean']:.3f} (lowest {s['brain_dice_min']:.3f}); target at least 0.95."
        + (
            f" The alternative, {other}, on the same studies: mean {s['other_brain_dice_mean']:.3f} "
            f"(lowest {s['other_brain_dice_min']:.3f}), {s['other_brain_seconds_mean']:.1f} s per study for the "
            "extraction alone (the network's is `brain_extraction` below)."
            if other
            else " The other extractor is not scored (`dicom.compare_brain: false`)."
        ),
        f"- Mean Dice (WT, TC, ET) DICOM in: {s['dicom_dice_mean']:.3f}; the same model on the NIfTI: "
        f"{s['nifti_dice_mean']:.3f}; gap {s['dice_gap']:+.3f} (target: at most 0.03).",
        "",
        "Seconds per study and step (mean):",
        "",
        "| step | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in s["seconds_mean"].items()]
    return "\n".join(lines) + "\n"


def run_dicom_check(
    params: Any, studies: Path, report_dir: Path, *, model_uri: str | None = None, source: str = "params.yaml"
) -> dict[str, Any]:
    """Score every study under ``studies`` (generated when missing); write the report."""
    import tempfile

    import torch

    from tumorseg.data.manifest import atomic_write_text
    from tumorseg.dicom.study_synth import synth_studies
    from tumorseg.runtime import cpu_description

    truth_root = studies / "truth"
    if not truth_root.is_dir() or not any(truth_root.iterdir()):
        synth_studies(params, studies)
    names = sorted(p.name for p in truth_root.iterdir() if (p / "truth.json").is_file())
    from tumorseg.dicom.atlas import ATLAS_URI, AtlasBrainExtractor

    # With dicom.compare_brain the extractor the import does not use is scored beside it (same
    # registration, same N4).
    other_uri: str | None = None
    other: Any = None
    if params.dicom.compare_brain:
        if params.dicom.brain.model == ATLAS_URI:
            from tumorseg.dicom.brain import load_brain_extractor
            from tumorseg.tracking import params_tracking_uri

            other_uri = f"models:/{params.dicom.brain.model_name}@champion"
            other = load_brain_extractor(other_uri, tracking_uri=params_tracking_uri(params, source=source))
        else:
            other_uri, other = ATLAS_URI, AtlasBrainExtractor()
    records = []
    with tempfile.TemporaryDirectory(prefix="tumorseg-dicom-check-") as tmp:
        for n, name in enumerate(names, 1):
            record = score_study(
                studies / name,
                truth_root / name,
                Path(tmp) / name,
                params,
                model_uri=model_uri,
                source=source,
                other_brain=other,
            )
            records.append(record)
            print(
                f"[{n}/{len(names)}] {name}: picks {'right' if record['classification_right'] else 'WRONG'}, "
                f"TRE {max(record['tre_mm'].values()):.2f} mm, brain Dice {record['brain_dice']:.3f}, "
                f"Dice gap {record['dice_gap']:+.3f}, {record['seconds']['total']:.0f} s",
                flush=True,
            )
    steps = [k for k in records[0]["seconds"]]
    summary = {
        "studies": len(records),
        "classification_right": sum(r["classification_right"] for r in records),
        "distractors_picked": sum(r["distractors_picked"] for r in records),
        "tre_mm_mean": round(float(np.mean([v for r in records for v in r["tre_mm"].values()])), 4),
        "tre_mm_max": round(float(np.max([v for r in records for v in r["tre_mm"].values()])), 4),
        "brain_dice_mean": round(float(np.mean([r["brain_dice"] for r in records])), 4),
        "brain_dice_min": round(float(np.min([r["brain_dice"] for r in records])), 4),
        "dicom_dice_mean": round(
            float(np.mean([np.mean(list(r["dicom_dice"].values())) for r in records])), 4
        ),
        "nifti_dice_mean": round(
            float(np.mean([np.mean(list(r["nifti_dice"].values())) for r in records])), 4
        ),
        "seconds_mean": {
            k: round(float(np.mean([r["seconds"].get(k, 0.0) for r in records])), 2) for k in steps
        },
    }
    summary["dice_gap"] = round(summary["nifti_dice_mean"] - summary["dicom_dice_mean"], 4)
    if other is not None:
        summary["other_brain_dice_mean"] = round(float(np.mean([r["other_brain_dice"] for r in records])), 4)
        summary["other_brain_dice_min"] = round(float(np.min([r["other_brain_dice"] for r in records])), 4)
        summary["other_brain_seconds_mean"] = round(
            float(np.mean([r["other_brain_seconds"] for r in records])), 2
        )
    report = {
        "model": model_uri or params.predict.model,
        "brain_model": params.dicom.brain.model,
        "other_brain_model": other_uri,
        "seed": params.dicom.studies.seed,
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "summary": summary,
        "studies": records,
    }
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    atomic_write_text(report_dir / REPORT_MD, _markdown(report))
    report["one_line"] = (
        f"dicom-check: {summary['classification_right']}/{summary['studies']} studies classified right, "
        f"TRE {summary['tre_mm_mean']:.2f} mm, brain Dice {summary['brain_dice_mean']:.3f}, "
        f"Dice DICOM {summary['dicom_dice_mean']:.3f} vs NIfTI {summary['nifti_dice_mean']:.3f} -> {report_dir}"
    )
    return report
