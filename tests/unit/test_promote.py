"""The champion/challenger rules on paired per-case Dice (no MLflow needed)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tumorseg.registry.config import RegistryConfig
from tumorseg.registry.promote import (
    PromotionResult,
    VersionEvidence,
    compare_versions,
    pairable,
)

CASES = [f"case_{i:02d}" for i in range(12)]


def scores(seed: int, shift: dict[str, float] | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        rng.uniform(0.55, 0.9, size=(len(CASES), 3)), index=CASES, columns=["WT", "TC", "ET"]
    )
    for region, delta in (shift or {}).items():
        frame[region] = (frame[region] + delta).clip(0.0, 1.0)
    return frame


def test_a_clear_improvement_is_promoted_with_its_evidence() -> None:
    champion = scores(0)
    challenger = champion + 0.03
    result = compare_versions(
        challenger, champion, RegistryConfig(promotion_margin=0.01, region_tolerance=0.01)
    )
    assert result.promote
    assert result.mean_improvement == pytest.approx(0.03)
    assert result.region_change == pytest.approx({"WT": 0.03, "TC": 0.03, "ET": 0.03})
    assert result.ci_low == pytest.approx(0.03) and result.ci_high == pytest.approx(0.03)
    assert result.n_cases == 12 and set(result.paired_differences) == set(CASES)
    assert result.paired_differences["case_03"]["mean"] == pytest.approx(0.03)
    assert result.wilcoxon_p is not None and result.wilcoxon_p < 0.01


def test_an_improvement_below_the_margin_is_rejected() -> None:
    champion = scores(1)
    result = compare_versions(champion + 0.004, champion, RegistryConfig(promotion_margin=0.005))
    assert not result.promote
    assert "less than the margin" in result.reasons[0]


def test_exactly_the_margin_is_enough() -> None:
    champion = scores(2, {"WT": -0.2})
    result = compare_versions(champion + 0.005, champion, RegistryConfig(promotion_margin=0.005))
    assert result.promote


def test_a_region_that_drops_beyond_the_tolerance_blocks_promotion() -> None:
    champion = scores(3)
    challenger = champion.copy()
    challenger["WT"] += 0.08
    challenger["TC"] += 0.08
    challenger["ET"] -= 0.03  # mean still improves by ~0.043
    result = compare_versions(
        challenger, champion, RegistryConfig(promotion_margin=0.01, region_tolerance=0.02)
    )
    assert result.mean_improvement > 0.04
    assert not result.promote
    assert any("ET -0.0300" in reason for reason in result.reasons)
    # within a looser tolerance the same challenger passes
    assert compare_versions(
        challenger, champion, RegistryConfig(promotion_margin=0.01, region_tolerance=0.05)
    ).promote


def test_a_worse_challenger_is_rejected() -> None:
    champion = scores(4)
    result = compare_versions(champion - 0.05, champion, RegistryConfig())
    assert not result.promote and result.mean_improvement == pytest.approx(-0.05)
    assert result.ci_high < 0


def test_significance_requirement_rejects_a_noisy_gain() -> None:
    champion = scores(5)
    noise = np.random.default_rng(9).normal(0.0, 0.1, size=(len(CASES), 1))
    challenger = champion + 0.01 + noise  # +0.01 on average with a lot of case-to-case noise
    loose = compare_versions(challenger, champion, RegistryConfig(promotion_margin=0.0, region_tolerance=1.0))
    strict = compare_versions(
        challenger,
        champion,
        RegistryConfig(promotion_margin=0.0, region_tolerance=1.0, require_significance=True),
    )
    assert loose.ci_low < 0 < loose.ci_high
    assert loose.promote == (loose.mean_improvement >= 0)
    assert not strict.promote and "includes 0" in strict.reasons[-1]


def test_pairing_uses_only_the_challengers_cases_and_needs_all_of_them() -> None:
    champion = scores(6)
    challenger = champion.iloc[:5] + 0.02
    assert compare_versions(challenger, champion, RegistryConfig()).n_cases == 5
    with pytest.raises(ValueError, match="no score"):
        compare_versions(champion + 0.02, champion.iloc[:5], RegistryConfig())


def test_identical_models_have_no_wilcoxon_p_and_are_not_promoted() -> None:
    champion = scores(7)
    result = compare_versions(champion.copy(), champion, RegistryConfig())
    assert result.wilcoxon_p is None and not result.promote


def test_cases_pair_only_on_identical_reference_files() -> None:
    frame = scores(8)
    digests = {case: f"sha-{case}" for case in CASES}
    ours = VersionEvidence("2", "r2", frame, digests)
    same = VersionEvidence("1", "r1", frame, dict(digests))
    changed = VersionEvidence("1", "r1", frame, {**digests, "case_04": "other"})
    fewer = VersionEvidence("1", "r1", frame.iloc[:6], digests)
    broken = VersionEvidence("1", "r1", None, {}, problem="no evaluation.json")
    assert pairable(ours, same)
    assert not pairable(ours, changed)
    assert not pairable(ours, fewer)
    assert not pairable(ours, broken)


def test_the_decision_report_is_json_and_readable() -> None:
    champion = scores(10)
    comparison = compare_versions(champion + 0.02, champion, RegistryConfig())
    result = PromotionResult(
        "promoted", "tumorseg", "2", "1", "2", comparison.reasons, comparison, "stored evaluations"
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["comparison"]["paired_differences"]["case_00"]["mean"] == pytest.approx(0.02)
    lines = result.lines()
    assert lines[0].startswith("promoted tumorseg version 2 to champion")
    assert "12 paired cases" in lines[1] and "Wilcoxon p" in lines[1]
    assert lines[2].startswith("  per region")


def test_promote_without_a_registry_writes_its_decision_and_touches_nothing(tmp_path) -> None:
    from tumorseg.registry.promote import promote

    params = {"paths": {"reports": str(tmp_path / "reports"), "mlruns": str(tmp_path / "mlruns")}}
    result = promote({**params, "registry": {"enabled": False}})
    assert result.action == "kept" and "registry.enabled is false" in result.reasons[0]
    decision = json.loads((tmp_path / "reports" / "promotion.json").read_text())
    assert decision["action"] == "kept" and decision["champion"] is None
    assert not (tmp_path / "mlruns").exists()


def test_promote_without_a_store_says_what_to_run(tmp_path) -> None:
    from tumorseg.errors import DataError
    from tumorseg.registry.promote import promote

    params = {"paths": {"reports": str(tmp_path / "reports"), "mlruns": str(tmp_path / "mlruns")}}
    with pytest.raises(DataError, match=r"no MLflow store at .*mlflow\.db; run `dvc repro`"):
        promote(params, tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    assert not (tmp_path / "mlruns").exists()
