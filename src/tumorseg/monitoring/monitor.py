"""``tumorseg monitor FOLDER``: the drift of a folder of predictions against the model's training data.

``tumorseg predict`` leaves ``drift.json`` beside its predictions: the serving model's reference
profile and every case's features and predicted volumes. This module reads every ``drift.json``
under the folder, checks each case again with the current ``monitor:`` thresholds, and compares each
feature's distribution over the folder with the training cases' with a two-sample
Kolmogorov-Smirnov test (:func:`scipy.stats.ks_2samp`: distribution-free, exact for small samples,
and scipy is already installed; Evidently would add a large dependency tree for the same test).
Predicted tumour volumes are compared with the model's predictions on its held-out test cases.
The p-values are Bonferroni-corrected over the features. The folder *has drifted* when more than
``monitor.max_flagged_fraction`` of its cases are outside the reference or any test fires.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tumorseg.errors import DataError
from tumorseg.monitoring.drift import DRIFT_FILE, CaseFeatures, DriftMonitor, Profile
from tumorseg.params import Params, as_params

log = logging.getLogger(__name__)

REPORT_FILE = "monitor.json"


@dataclass
class FeatureDrift:
    """One feature over the folder: cases outside its band, medians, KS statistic and p-value."""

    name: str
    outside: int
    median: float | None
    train_median: float | None
    ks_statistic: float | None = None
    ks_pvalue: float | None = None
    drifted: bool = False


@dataclass
class MonitorReport:
    """What ``tumorseg monitor`` found (``drifted`` and the one-sentence ``reasons`` first)."""

    folder: str
    model: str
    cases: int
    flagged: int
    drifted: bool
    reasons: list[str]
    features: list[FeatureDrift] = field(default_factory=list)
    flagged_cases: dict[str, list[str]] = field(default_factory=dict)
    profile_sha256: str = ""
    mlflow_run_id: str | None = None

    @property
    def flagged_fraction(self) -> float:
        return self.flagged / self.cases if self.cases else 0.0

    def one_line(self) -> str:
        state = "DRIFTED" if self.drifted else "no drift"
        return (
            f"{state}: {self.flagged} of {self.cases} cases in {self.folder} outside the training profile of "
            f"{self.model}" + (f"; {'; '.join(self.reasons)}" if self.reasons else "")
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["flagged_fraction"] = self.flagged_fraction
        return data

    def markdown(self) -> str:
        """The report as a Markdown table (Prefect artifact, MLflow artifact)."""
        lines = [
            f"**{'drifted' if self.drifted else 'no drift'}**: {self.flagged} of {self.cases} cases outside the "
            f"training profile of {self.model}.",
            "",
            *(f"- {reason}" for reason in self.reasons),
            "",
            "| feature | cases outside | median | training median | KS statistic | KS p |",
            "|---|---|---|---|---|---|",
        ]
        for f in self.features:
            lines.append(
                f"| {f.name}{' **drift**' if f.drifted else ''} | {f.outside} | {_fmt(f.median)} | "
                f"{_fmt(f.train_median)} | {_fmt(f.ks_statistic)} | {_fmt(f.ks_pvalue)} |"
            )
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def read_drift_files(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every ``drift.json`` under ``folder``; DataError for none, or one that cannot be read."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder; pass the --out folder of `tumorseg predict`")
    found = sorted(folder.rglob(DRIFT_FILE))
    if not found:
        raise DataError(
            f"{folder}: no {DRIFT_FILE} in it or below; `tumorseg predict --out {folder}` writes one when its "
            "model carries a drift profile (registered with monitor.enabled)"
        )
    out = []
    for path in found:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("reference"), dict):
                raise ValueError("no reference profile")
            if not isinstance(data.get("cases"), list):
                raise ValueError("no list of cases")
            for case in data["cases"]:
                features = case["features"]
                if not isinstance(features["values"], dict) or not isinstance(features["category"], str):
                    raise ValueError(f"case {case.get('case_id')!r}: malformed features")
                str(case["case_id"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}: not a drift record ({exc}); rerun `tumorseg predict` into its folder"
            ) from None
        out.append((path, data))
    return out


def monitor_folder(
    folder: str | Path,
    params: Params | dict[str, Any],
    *,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    log_to_mlflow: bool = True,
    out: str | Path | None = None,
) -> MonitorReport:
    """Report the drift of ``folder`` (module docstring), log it to MLflow and write ``out``
    (default ``folder/monitor.json``). Records of several models: the newest profile's cases are
    analysed and the others named in the reasons."""
    params = as_params(params, source)
    cfg = params.monitor
    folder = Path(folder)
    records = read_drift_files(folder)
    by_profile: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path, data in records:
        by_profile.setdefault(str(data.get("profile_sha256")), []).append((path, data))
    # the newest profile: after a retrain, folders of the former model's predictions do not decide
    key = max(by_profile, key=lambda k: str(by_profile[k][0][1]["reference"].get("created", "")))
    chosen = by_profile[key]
    profile = Profile.from_dict(chosen[0][1]["reference"], str(chosen[0][0]))
    cases: dict[str, dict[str, Any]] = {}
    for _, data in chosen:
        cases.update({c["case_id"]: c for c in data["cases"]})
    report = analyse(
        profile, list(cases.values()), cfg, folder=str(folder), model=str(chosen[0][1].get("model"))
    )
    report.profile_sha256 = key
    others = [str(p) for k, group in by_profile.items() if k != key for p, _ in group]
    if others:
        report.reasons.append(f"left out {len(others)} record(s) of another model: {', '.join(others[:3])}")
    if log_to_mlflow and params.mlflow.enabled:
        from tumorseg.tracking import params_tracking_uri

        report.mlflow_run_id = log_report(
            report, params_tracking_uri(params, tracking_uri, source=source), cfg.experiment
        )
    from tumorseg.data.manifest import atomic_write_text

    target = Path(out) if out else folder / REPORT_FILE
    atomic_write_text(target, json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n")
    return report


def analyse(
    profile: Profile, cases: list[dict[str, Any]], cfg: Any, *, folder: str, model: str
) -> MonitorReport:
    """Check ``cases`` (``drift.json`` records) against ``profile`` with ``cfg`` (``monitor:``)."""
    from scipy.stats import ks_2samp

    monitor = DriftMonitor.from_params(profile, cfg)
    flagged: dict[str, list[str]] = {}
    names = profile.features
    values: dict[str, list[float]] = {name: [] for name in names}
    outside = dict.fromkeys(names, 0)
    for record in cases:
        f = record["features"]
        feats = CaseFeatures(record["case_id"], {k: _num(v) for k, v in f["values"].items()}, f["category"])
        check = monitor.check(feats)
        if check.flagged:
            flagged[check.case_id] = check.outside
        for name in names:
            values[name].append(feats.values.get(name, float("nan")))
            outside[name] += name in check.reasons
    volumes: dict[str, list[float]] = {}
    for record in cases:
        for region, value in (record.get("volumes_ml") or {}).items():
            volumes.setdefault(region, []).append(float(value))
    tests = len(names) + len([r for r in volumes if profile.predicted_volumes_ml.get(r)])
    alpha = cfg.ks_alpha / max(tests, 1)
    run_ks = len(cases) >= cfg.min_cases_for_ks
    features: list[FeatureDrift] = []

    def add(name: str, observed: list[float], reference: np.ndarray, n_outside: int) -> None:
        finite = np.asarray([v for v in observed if np.isfinite(v)], dtype=np.float64)
        item = FeatureDrift(
            name,
            n_outside,
            float(np.median(finite)) if finite.size else None,
            float(np.median(reference)) if reference.size else None,
        )
        if run_ks and finite.size >= 2 and reference.size >= 2:
            result = ks_2samp(finite, reference)
            item.ks_statistic, item.ks_pvalue = float(result.statistic), float(result.pvalue)
            item.drifted = item.ks_pvalue < alpha
        features.append(item)

    # 2-D: each storage (mat, 8-bit image) has its own scale; compare with the training images of the
    # storages the folder holds
    present = {record["features"]["category"] for record in cases} & set(profile.categories)
    kept = [record["features"]["category"] in present for record in cases]
    for name in names:
        if profile.kind == "2d" and present:  # both sides: only the storages training had
            reference = np.concatenate([profile.values(name, category) for category in sorted(present)])
            observed = [v for v, keep in zip(values[name], kept, strict=True) if keep]
        else:
            reference, observed = profile.values(name), values[name]
        add(name, observed, reference, outside[name])
    for region, observed in sorted(volumes.items()):
        reference = np.asarray(profile.predicted_volumes_ml.get(region, []), dtype=np.float64)
        if reference.size:
            unit = "px" if profile.kind == "2d" else "ml"
            add(f"predicted_{region}_{unit}", observed, reference, 0)
    reasons = []
    fraction = len(flagged) / len(cases) if cases else 0.0
    if fraction > cfg.max_flagged_fraction:
        reasons.append(
            f"{fraction:.0%} of cases outside the reference (monitor.max_flagged_fraction {cfg.max_flagged_fraction:.0%})"
        )
    fired = [f.name for f in features if f.drifted]
    if fired:
        reasons.append(
            f"KS test p < {alpha:.2g} (monitor.ks_alpha {cfg.ks_alpha:g} / {tests} tests) for {', '.join(fired)}"
        )
    if not run_ks:
        reasons.append(
            f"KS tests need {cfg.min_cases_for_ks} cases (monitor.min_cases_for_ks), the folder has {len(cases)}"
        )
    drifted = fraction > cfg.max_flagged_fraction or bool(fired)
    return MonitorReport(folder, model, len(cases), len(flagged), drifted, reasons, features, flagged)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def log_report(report: MonitorReport, tracking_uri: str, experiment: str) -> str:
    """One finished MLflow run in ``experiment``: counts, per-feature KS statistics, the report files."""
    import tempfile

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from tumorseg import tracking

    tracking.disable_telemetry()
    experiment_id = tracking.ensure_experiment(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    run_id = tracking.create_run(
        client,
        experiment_id,
        run_name=f"monitor {Path(report.folder).name}",
        tags={"tumorseg.monitor.folder": report.folder, "tumorseg.monitor.model": report.model},
    )
    import time

    now = int(time.time() * 1000)
    metrics = {
        "cases": report.cases,
        "flagged": report.flagged,
        "flagged_fraction": report.flagged_fraction,
        "drifted": float(report.drifted),
    }
    for f in report.features:
        metrics[f"outside_{f.name}"] = f.outside
        if f.ks_statistic is not None:
            metrics[f"ks_{f.name}"] = f.ks_statistic
    pvalues = [f.ks_pvalue for f in report.features if f.ks_pvalue is not None]
    if pvalues:
        metrics["ks_min_pvalue"] = min(pvalues)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory(prefix="tumorseg-monitor-") as tmp:
        (Path(tmp) / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        (Path(tmp) / "monitor.md").write_text(report.markdown())
        client.log_artifacts(run_id, tmp)
    client.set_terminated(run_id)
    return run_id
