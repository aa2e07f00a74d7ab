"""``tumorseg promote``: the champion/challenger gate, and ``--rollback``.

Paired per case on the same test cases (each version's ``evaluation.json``; a champion scored on other
references is re-evaluated on the challenger's), the challenger replaces the champion only when the
mean Dice improves by ``registry.promotion_margin``, no region drops by more than
``registry.region_tolerance`` and, with ``registry.require_significance``, the bootstrap CI of the
improvement is above 0. ``--rollback`` walks back the ``champion_history`` tag (a JSON list).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tumorseg.data.conventions import REGION_NAMES
from tumorseg.data.manifest import atomic_write_text
from tumorseg.errors import DataError
from tumorseg.evaluation.summary import clean_json, percentile_ci
from tumorseg.faults import write_point
from tumorseg.params import Params, as_params
from tumorseg.registry.config import CHALLENGER, CHAMPION, RegistryConfig

log = logging.getLogger(__name__)

PROMOTION_FILE = "promotion.json"
HISTORY_TAG = "champion_history"
EPSILON = 1e-12  # slack for floating-point ties at the margin and tolerance boundaries


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Comparison:
    """Paired comparison on the same test cases (challenger - champion); ``ci_low``/``ci_high`` bound a
    bootstrap CI of ``mean_improvement``, ``wilcoxon_p`` is two-sided (None: < 2 cases or all zero)."""

    promote: bool
    reasons: list[str]
    n_cases: int
    mean_dice: dict[str, float]
    mean_improvement: float
    region_means: dict[str, dict[str, float]]
    region_change: dict[str, float]
    ci_low: float
    ci_high: float
    ci_level: float
    wilcoxon_p: float | None
    paired_differences: dict[str, dict[str, float]] = field(default_factory=dict)


def _wilcoxon(differences: np.ndarray) -> float | None:
    if differences.size < 2 or not np.any(np.abs(differences) > EPSILON):
        return None
    from scipy.stats import wilcoxon

    return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def compare_versions(challenger: pd.DataFrame, champion: pd.DataFrame, cfg: RegistryConfig) -> Comparison:
    """Apply the promotion rules to per-case Dice frames (index ``case_id``, a column per region: WT, TC,
    ET or a 2-D model's ``tumour``) on the challenger's cases; ValueError when the champion lacks some."""
    regions = [str(c) for c in challenger.columns]
    cases = sorted(challenger.index)
    if not cases:
        raise ValueError("no test cases to compare")
    missing = sorted(set(cases) - set(champion.index))
    if missing:
        raise ValueError(f"champion has no score for cases {missing[:3]}")
    ours = challenger.loc[cases, regions].astype(np.float64)
    theirs = champion.loc[cases, regions].astype(np.float64)
    diff = ours - theirs
    per_case = diff.mean(axis=1).to_numpy()
    improvement = float(per_case.mean())
    n = len(cases)
    indices = np.random.default_rng(cfg.seed).integers(0, n, size=(cfg.bootstrap_resamples, n))
    ci_low, ci_high = percentile_ci(per_case[indices].mean(axis=1), cfg.ci_level)
    region_change = {r: float(diff[r].mean()) for r in regions}

    promote = improvement + EPSILON >= cfg.promotion_margin
    reasons = [
        f"mean Dice improves by {improvement:+.4f} (>= margin {cfg.promotion_margin:g})"
        if promote
        else f"mean Dice changes by {improvement:+.4f}, less than the margin {cfg.promotion_margin:g}"
    ]
    dropped = {r: c for r, c in region_change.items() if c + EPSILON < -cfg.region_tolerance}
    if dropped:
        promote = False
        text = ", ".join(f"{r} {c:+.4f}" for r, c in dropped.items())
        reasons.append(f"regions drop by more than the tolerance {cfg.region_tolerance:g}: {text}")
    else:
        reasons.append(f"no region drops by more than {cfg.region_tolerance:g}")
    if cfg.require_significance:
        ci = f"the {cfg.ci_level:.0%} CI of the improvement [{ci_low:+.4f}, {ci_high:+.4f}]"
        reasons.append(f"{ci} is above 0" if ci_low > 0 else f"{ci} includes 0 or less")
        promote = promote and ci_low > 0
    paired = {
        case_id: {**{r: float(diff.loc[case_id, r]) for r in regions}, "mean": float(per_case[i])}
        for i, case_id in enumerate(cases)
    }
    return Comparison(
        promote=promote,
        reasons=reasons,
        n_cases=n,
        mean_dice={"challenger": float(ours.to_numpy().mean()), "champion": float(theirs.to_numpy().mean())},
        mean_improvement=improvement,
        region_means={
            "challenger": {r: float(ours[r].mean()) for r in regions},
            "champion": {r: float(theirs[r].mean()) for r in regions},
        },
        region_change=region_change,
        ci_low=ci_low,
        ci_high=ci_high,
        ci_level=cfg.ci_level,
        wilcoxon_p=_wilcoxon(per_case),
        paired_differences=paired,
    )


@dataclass
class VersionEvidence:
    """A version's test evaluation: Dice by case (index) and region (columns), None when unusable
    (``problem`` says why), and the sha256 of each case's reference."""

    version: str
    run_id: str | None
    case_dice: pd.DataFrame | None
    reference_sha256: dict[str, str]
    problem: str | None = None


def read_evidence(client: Any, name: str, version: str, tracking_uri: str) -> VersionEvidence:
    """Download and check ``evaluation.json`` of a version (a missing or broken one is a ``problem``)."""
    import mlflow

    from tumorseg.registry.register import EVALUATION_ARTIFACT

    found = client.get_model_version(name, version)
    evidence = VersionEvidence(str(version), found.run_id, None, {})
    base = client.get_model_version_download_uri(name, version).rstrip("/")
    try:
        with tempfile.TemporaryDirectory(prefix="tumorseg-evidence-") as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{base}/artifacts/{EVALUATION_ARTIFACT}",
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
            record = json.loads(Path(local).read_text())
    except Exception as exc:  # any download/parse failure means "no usable evidence"; say what failed
        evidence.problem = f"version {version} has no readable {EVALUATION_ARTIFACT} ({type(exc).__name__})"
        return evidence
    case_dice = record.get("case_dice") or {}
    frame = pd.DataFrame.from_dict(case_dice, orient="index")
    regions = [str(r) for r in record.get("regions") or REGION_NAMES]  # 2-D models name their own scores
    if not case_dice:
        evidence.problem = f"version {version}: {EVALUATION_ARTIFACT} lists no test cases"
    elif not set(regions) <= set(frame.columns):
        evidence.problem = f"version {version}: {EVALUATION_ARTIFACT} lacks Dice for {regions}"
    elif not _dice_in_range(frame[regions].to_numpy(dtype=np.float64)):
        evidence.problem = f"version {version}: its test Dice values are not finite numbers in [0, 1]"
    else:
        evidence.case_dice = frame[regions].astype(np.float64)
        evidence.reference_sha256 = dict(record.get("reference_sha256") or {})
    return evidence


def _dice_in_range(values: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(values))) and values.min() >= 0 and values.max() <= 1


def pairable(challenger: VersionEvidence, champion: VersionEvidence) -> bool:
    """The champion scored every challenger case against the same reference file."""
    if champion.case_dice is None or challenger.case_dice is None:
        return False
    return all(
        case_id in champion.case_dice.index
        and challenger.reference_sha256.get(case_id) is not None
        and challenger.reference_sha256.get(case_id) == champion.reference_sha256.get(case_id)
        for case_id in challenger.case_dice.index
    )


def _require_same_cases(version: str, challenger: VersionEvidence, current: dict[str, str]) -> None:
    """DataError unless ``current`` (case id -> reference digest, from the current split) holds exactly the
    challenger's test cases with the same references, so the champion can be scored on them."""
    same = set(current) == set(challenger.case_dice.index) and all(
        challenger.reference_sha256.get(case_id) == digest for case_id, digest in current.items()
    )
    if not same:
        raise DataError(
            f"cannot pair the champion (version {version}) with challenger version {challenger.version}: the "
            "challenger's test cases are no longer those of the current split and manifest; rerun `dvc repro` "
            "to evaluate a challenger on the current data"
        )


def rescore_champion(
    name: str,
    version: str,
    challenger: VersionEvidence,
    params: Params | dict[str, Any],
    *,
    tracking_uri: str,
    source: str,
) -> pd.DataFrame:
    """Evaluate the champion, as it is served, on the challenger's test cases; DataError when the current
    split and manifest no longer hold them."""
    params = as_params(params, source)
    from tumorseg.evaluation.pipeline_stage import evaluate_cases, reference_digest, split_cases
    from tumorseg.models.config import PredictConfig
    from tumorseg.models.predictor import SegmentationPredictor
    from tumorseg.registry.loading import load_model

    regions = [str(r) for r in challenger.case_dice.columns]
    wanted = set(challenger.case_dice.index)
    cases = [case for case in split_cases(params, source=source) if case.case_id in wanted]
    _require_same_cases(version, challenger, {c.case_id: reference_digest(c) for c in cases})
    loaded = load_model(f"models:/{name}/{version}", tracking_uri=tracking_uri)
    settings = PredictConfig.model_validate(loaded.predict_settings or {})
    predictor = SegmentationPredictor(
        loaded.trained, settings.model_copy(update={"probabilities": False, "uncertainty": False})
    )
    cfg = params.evaluate
    with tempfile.TemporaryDirectory(prefix="tumorseg-rescore-") as tmp:
        out = Path(tmp)
        result = evaluate_cases(
            predictor, cases, out / "champion.csv", cfg=cfg, summary_path=out / "s.json", make_plots=False
        )
    wide = result.per_case.pivot(index="case_id", columns="region", values="dice")
    if set(wide.columns) != set(regions):
        raise DataError(
            f"cannot pair the champion (version {version}) of {name!r} with challenger version {challenger.version}: "
            f"the champion is scored on {', '.join(map(str, wide.columns))}, the challenger on {', '.join(regions)} "
            "(different label sets); register a model of another label set under its own registry.model_name"
        )
    return wide[regions]


@dataclass
class PromotionResult:
    """The decision (``promoted``, ``rejected``, ``kept``: nothing to decide, ``rolled_back``);
    ``champion``/``previous_champion``: versions after and before it."""

    action: str
    model_name: str
    champion: str | None
    previous_champion: str | None
    challenger: str | None
    reasons: list[str]
    comparison: Comparison | None = None
    evidence_source: str | None = None
    shadow: dict[str, Any] | None = None
    """The challenger's shadow evidence (:class:`~tumorseg.serving.shadow.ShadowEvidence`), if any."""
    mlflow_run_id: str | None = None
    decided_at: str = field(default_factory=_now)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["comparison"] is not None:
            data["comparison"] = clean_json(data["comparison"])
        return data

    def lines(self) -> list[str]:
        """Printable report: the decision, then the evidence."""
        head = {
            "promoted": f"promoted {self.model_name} version {self.challenger} to champion",
            "rejected": f"kept champion version {self.champion}; challenger version {self.challenger} rejected",
            "kept": f"champion unchanged (version {self.champion or 'none'})",
            "rolled_back": f"rolled back champion from version {self.previous_champion} to version {self.champion}",
        }[self.action]
        out = [f"{head}: " + "; ".join(self.reasons)]
        c = self.comparison
        if c is not None:
            means = "  ".join(
                f"{r} {c.region_means['challenger'][r]:.4f} vs {c.region_means['champion'][r]:.4f} "
                f"({c.region_change[r]:+.4f})"
                for r in c.region_means["challenger"]
            )
            p = "n/a" if c.wilcoxon_p is None else f"{c.wilcoxon_p:.3g}"
            out.append(
                f"  {c.n_cases} paired cases ({self.evidence_source}): mean Dice {c.mean_dice['challenger']:.4f} vs "
                f"{c.mean_dice['champion']:.4f}, difference {c.mean_improvement:+.4f} "
                f"[{c.ci_level:.0%} CI {c.ci_low:+.4f}, {c.ci_high:+.4f}], Wilcoxon p {p}"
            )
            out.append(f"  per region (challenger vs champion): {means}")
        return out


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _history(client: Any, name: str) -> list[str]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    try:
        return [str(v) for v in json.loads(raw)]
    except (json.JSONDecodeError, TypeError):
        log.warning(
            "registered model %s: unreadable %s tag %r; starting a new history", name, HISTORY_TAG, raw
        )
        return []


def _tag(client: Any, name: str, version: str, **tags: str) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def _set_champion(
    client: Any, name: str, version: str, previous: str | None, history: list[str], keep: int
) -> None:
    """Make ``version`` champion, in an order that a process killed at any point leaves right: its tags
    and the history first (a rerun finds them and does not append twice), then the alias (the one
    write that changes what is served), then the challenger alias dropped (a rerun finishes that)."""
    write_point(f"promotion of {name} version {version}")
    _tag(client, name, version, previous_champion=previous or "none", promoted_at=_now())
    if previous is not None and previous in history:  # entries after the champion: a killed promotion's
        history = history[: len(history) - history[::-1].index(previous)]
    if history[-1:] != [version]:
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, version][-keep:]))
    write_point(f"alias {name}@{CHAMPION}")
    client.set_registered_model_alias(name, CHAMPION, version)
    _drop_challenger(client, name)


def _drop_challenger(client: Any, name: str) -> None:
    write_point(f"alias {name}@{CHALLENGER} removed")
    client.delete_registered_model_alias(name, CHALLENGER)


def _open_client(params: Params, source: str, tracking_uri: str | None) -> tuple[Any, str, RegistryConfig]:
    import mlflow
    from mlflow.exceptions import MlflowException

    from tumorseg.registry.loading import FIRST_STEPS, prepare_mlflow
    from tumorseg.tracking import params_tracking_uri, sqlite_path

    prepare_mlflow()
    cfg: RegistryConfig = params.registry
    uri = params_tracking_uri(params, tracking_uri, source=source)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise DataError(f"no MLflow store at {db}; {FIRST_STEPS}")
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    try:
        client.get_registered_model(cfg.model_name)
    except MlflowException:
        raise DataError(
            f"no registered model {cfg.model_name!r} in {db or uri}; run `dvc repro` (the evaluate stage registers "
            "a challenger) first"
        ) from None
    return client, uri, cfg


def promote(
    params: Params | dict[str, Any],
    *,
    rollback: bool = False,
    source: str = "params.yaml",
    tracking_uri: str | None = None,
    report_file: str | Path | None = None,
    write: bool = True,
) -> PromotionResult:
    """Run the gate (or the rollback), apply it, log it as an MLflow run and write ``promotion.json``
    (or ``report_file``; nothing with ``write`` False). DataError: no store or model, nothing to roll
    back to, or evidence that cannot be paired."""
    params = as_params(params, source)
    from tumorseg.training.config import MlflowConfig

    cfg: RegistryConfig = params.registry
    mlflow_cfg: MlflowConfig = params.mlflow
    reports = Path(params.paths.reports)
    if not (cfg.enabled and mlflow_cfg.enabled):
        off = "registry.enabled" if not cfg.enabled else "mlflow.enabled"
        result = PromotionResult(
            "kept", cfg.model_name, None, None, None, [f"{off} is false: no registry to act on"]
        )
    else:
        from tumorseg.tracking import registry_lock

        client, uri, cfg = _open_client(params, source, tracking_uri)
        name = cfg.model_name
        with registry_lock(uri):  # aliases and history read, decided on and moved by one process at a time
            if rollback:
                result = _rollback(client, name)
            else:
                result = _decide_and_apply(client, uri, cfg, params, source)
        result.mlflow_run_id = _log_decision(client, uri, result, params, source)
    if write:
        atomic_write_text(
            Path(report_file) if report_file else reports / PROMOTION_FILE,
            json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n",
        )
    return result


PLANAR_SCORES = (["tumour"], ["correct"])
"""The per-image scores 2-D versions store: the segmenter's Dice, the detector's 0/1 correctness."""


def rescore_planar_champion(
    name: str,
    version: str,
    challenger: VersionEvidence,
    params: Params | dict[str, Any],
    *,
    tracking_uri: str,
    source: str,
) -> pd.DataFrame:
    """The 2-D champion (its segmenter and the detector stored with it) scored on the challenger's test
    images as the 2-D evaluation scores them; DataError when the current split no longer holds them."""
    params = as_params(params, source)
    from tumorseg.evaluation.planar_evaluate import _per_case_table, _run_split, reference_digest
    from tumorseg.registry.loading import load_planar_model
    from tumorseg.training.config import load_planar_training_config
    from tumorseg.training.train import planar_split_records

    score = str(challenger.case_dice.columns[0])
    wanted = set(challenger.case_dice.index)
    records = planar_split_records(load_planar_training_config(params, source=source), source)
    chosen = [r for r in records["test"] if r["case_id"] in wanted]
    _require_same_cases(version, challenger, {r["case_id"]: reference_digest(r) for r in chosen})
    model = load_planar_model(f"models:/{name}/{version}", tracking_uri=tracking_uri)
    test = _run_split(model, chosen)
    probability = model.detector.probability(test["classes"][:, 0], test["areas"])
    per_case = _per_case_table(chosen, test, probability, probability >= model.detector.threshold)
    column = "dice" if score == "tumour" else "correct"
    rows = per_case.set_index("case_id").loc[sorted(wanted), column].astype(np.float64)
    return rows.to_frame(score)


def promote_planar(
    params: Params | dict[str, Any],
    *,
    report_file: str | Path | None = None,
    rollback: bool = False,
    source: str = "params.yaml",
) -> list[PromotionResult]:
    """``promote --dims 2``: the segmenter (``evaluate_2d.model_name``), then the detector
    (``detect.model_name``); one report (default ``<paths.reports_2d>/promotion.json``): the
    segmenter's decision, the detector's under ``also``."""
    params = as_params(params, source)
    from tumorseg.config import apply_overrides

    names = [params.section(key).model_name for key in ("evaluate_2d", "detect")]
    report_file = report_file or Path(params.paths.reports_2d) / PROMOTION_FILE
    results = [
        promote(
            apply_overrides(params, {"registry.model_name": name}),
            rollback=rollback,
            source=source,
            write=False,
        )
        for name in names
    ]
    report = {**results[0].to_dict(), "also": [r.to_dict() for r in results[1:]]}
    atomic_write_text(Path(report_file), json.dumps(report, indent=2, allow_nan=False) + "\n")
    return results


def _decide_and_apply(
    client: Any, uri: str, cfg: RegistryConfig, params: dict[str, Any], source: str
) -> PromotionResult:
    name = cfg.model_name
    champion = _alias_version(client, name, CHAMPION)
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        why = "no challenger to compare (the evaluate stage registers one)"
        return PromotionResult("kept", name, champion, champion, None, [why])
    if challenger == champion:  # a promotion killed before it removed the challenger alias
        _drop_challenger(client, name)
        return PromotionResult(
            "kept", name, champion, champion, challenger, [f"version {challenger} is already champion"]
        )

    ours = read_evidence(client, name, challenger, uri)
    if ours.problem is not None:
        _tag(client, name, challenger, promotion_decision="rejected", promotion_reason=ours.problem)
        why = f"challenger evaluation failed: {ours.problem}"
        return PromotionResult("rejected", name, champion, champion, challenger, [why])

    history = _history(client, name)
    if champion is None:
        _tag(client, name, challenger, promotion_decision="promoted", promotion_reason="first model")
        _set_champion(client, name, challenger, None, history, cfg.history_length)
        return PromotionResult(
            "promoted", name, challenger, None, challenger, ["first registered model with a valid evaluation"]
        )

    theirs = read_evidence(client, name, champion, uri)
    if pairable(ours, theirs):
        champion_dice = theirs.case_dice
        evidence_source = "stored evaluations"
    else:
        log.info(
            "champion %s was scored on other cases; re-evaluating it on the challenger's test cases", champion
        )
        rescore = (
            rescore_planar_champion if list(ours.case_dice.columns) in PLANAR_SCORES else rescore_champion
        )
        champion_dice = rescore(name, champion, ours, params, tracking_uri=uri, source=source)
        evidence_source = "champion re-evaluated on the challenger's test cases"
    comparison = compare_versions(ours.case_dice, champion_dice, cfg)
    shadow, shadow_ok = _shadow_gate(client, params, cfg, name, challenger, comparison.reasons)
    comparison.promote = comparison.promote and shadow_ok
    decision = "promoted" if comparison.promote else "rejected"
    _tag(
        client,
        name,
        challenger,
        promotion_decision=decision,
        promotion_reason="; ".join(comparison.reasons),
        promotion_mean_improvement=f"{comparison.mean_improvement:.6f}",
    )
    if comparison.promote:
        _set_champion(client, name, challenger, champion, history, cfg.history_length)
    new_champion = challenger if comparison.promote else champion
    return PromotionResult(
        decision,
        name,
        new_champion,
        champion,
        challenger,
        comparison.reasons,
        comparison,
        evidence_source,
        shadow,
    )


def _shadow_gate(
    client: Any, params: Any, cfg: RegistryConfig, name: str, version: str, reasons: list[str]
) -> tuple[dict[str, Any] | None, bool]:
    """The challenger's shadow runs (``serve.shadow``) as evidence, appended to ``reasons``; False when
    ``registry.shadow_min_cases`` or ``shadow_min_agreement`` are not met."""
    from tumorseg.serving.shadow import shadow_evidence

    evidence = shadow_evidence(client, params.serve.shadow_experiment, name, version)
    if evidence is None:
        if cfg.shadow_min_cases:
            reasons.append(
                f"no shadow runs of version {version}; registry.shadow_min_cases is {cfg.shadow_min_cases}"
            )
            return None, False
        return None, True
    reasons.append(evidence.sentence())
    ok = True
    if evidence.cases < cfg.shadow_min_cases:
        reasons.append(f"fewer shadow cases than registry.shadow_min_cases {cfg.shadow_min_cases}")
        ok = False
    agreement = evidence.agreement
    if cfg.shadow_min_agreement and (agreement is None or agreement < cfg.shadow_min_agreement):
        reasons.append(
            f"shadow agreement {agreement if agreement is None else round(agreement, 4)} below "
            f"registry.shadow_min_agreement {cfg.shadow_min_agreement:g}"
        )
        ok = False
    return evidence.to_dict(), ok


def _rollback(client: Any, name: str) -> PromotionResult:
    current = _alias_version(client, name, CHAMPION)
    if current is None:
        raise DataError(f"registered model {name!r} has no champion to roll back")
    history = _history(client, name)
    if current in history:
        position = len(history) - 1 - history[::-1].index(current)
        earlier = history[:position]
    else:  # the alias was moved by hand: everything recorded came before it
        earlier = history
    if not earlier:
        raise DataError(f"champion version {current} of {name!r} has no previous champion to roll back to")
    previous = earlier[-1]
    client.get_model_version(name, previous)  # fails loudly if that version was deleted
    # history first: killed before the alias moved, a rerun finds `current` outside it and rolls back to
    # the same `previous`, not one further
    write_point(f"rollback of {name} version {current}")
    _tag(client, name, current, rolled_back="true", rolled_back_at=_now())
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(earlier))
    write_point(f"alias {name}@{CHAMPION}")
    client.set_registered_model_alias(name, CHAMPION, previous)
    return PromotionResult(
        "rolled_back", name, previous, current, None, [f"version {current} withdrawn by --rollback"]
    )


def _log_decision(client: Any, uri: str, result: PromotionResult, params: Params, source: str) -> str:
    """One MLflow run per decision: tags, the comparison's numbers, and the decision JSON as artifact."""
    from mlflow.entities import Metric, RunTag

    from tumorseg.tracking import create_run, ensure_experiment, reap_orphaned_runs
    from tumorseg.training.config import MlflowConfig

    mlflow_cfg: MlflowConfig = params.mlflow
    experiment_id = ensure_experiment(uri, mlflow_cfg.experiment)
    reap_orphaned_runs(uri, mlflow_cfg.experiment)  # a killed promote's run: FAILED, not RUNNING
    title = f"promote {result.model_name}" + (f" v{result.challenger}" if result.challenger else "")
    run_id = create_run(
        client, experiment_id, run_name="rollback" if result.action == "rolled_back" else title
    )
    tags = {
        "tumorseg.stage": "promote",
        "decision": result.action,
        "model_name": result.model_name,
        "champion_version": result.champion or "none",
        "previous_champion_version": result.previous_champion or "none",
        "challenger_version": result.challenger or "none",
        "reasons": "; ".join(result.reasons)[:5000],
    }
    now = int(time.time() * 1000)
    metrics: list[Any] = []
    c = result.comparison
    if c is not None:
        values = {
            "mean_improvement": c.mean_improvement,
            "mean_improvement_ci_low": c.ci_low,
            "mean_improvement_ci_high": c.ci_high,
            "n_cases": c.n_cases,
            **({"wilcoxon_p": c.wilcoxon_p} if c.wilcoxon_p is not None else {}),
            **{f"region_change_{r}": v for r, v in c.region_change.items()},
        }
        metrics = [Metric(k, float(v), now, 0) for k, v in values.items()]
    client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
    with tempfile.TemporaryDirectory(prefix="tumorseg-promote-") as tmp:
        path = Path(tmp) / PROMOTION_FILE
        path.write_text(
            json.dumps({**result.to_dict(), "mlflow_run_id": run_id}, indent=2, allow_nan=False) + "\n"
        )
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id
