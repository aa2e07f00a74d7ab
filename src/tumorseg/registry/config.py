"""``registry:`` the MLflow model registry and the champion/challenger gate (params.yaml)."""

from __future__ import annotations

from pydantic import Field

from tumorseg.config import Section

CHAMPION = "champion"
CHALLENGER = "challenger"


class RegistryConfig(Section):
    """``registry:`` where models are registered and when a challenger replaces the champion.

    Attributes:
        enabled: the evaluate stage registers the evaluated model as a new version (``challenger``).
        promotion_margin: least gain of the challenger's mean Dice (cases x regions) over the
            champion's on the same test cases; region_tolerance: most any region's mean may drop.
        require_significance: also require the paired bootstrap CI to lie above 0 (off by default:
            small test sets give wide intervals).
        history_length: champion versions remembered for ``tumorseg promote --rollback``.
        shadow_min_cases: production cases the challenger must have segmented in shadow
            (``serve.shadow``) before it may be promoted (0: shadow evidence reported, not required).
        shadow_min_agreement: least mean Dice (over regions) between the challenger's shadow output
            and the served model's on those cases (0: not gated). Low agreement on production scans
            while the test split says "better" means the two disagree where it matters: look first.
    """

    enabled: bool = True
    model_name: str = Field("tumorseg", min_length=1, max_length=256)
    promotion_margin: float = Field(0.005, ge=0.0, le=1.0)
    region_tolerance: float = Field(0.01, ge=0.0, le=1.0)
    require_significance: bool = False
    bootstrap_resamples: int = Field(2000, ge=100)
    ci_level: float = Field(0.95, gt=0.0, lt=1.0)
    seed: int = 42
    history_length: int = Field(20, ge=1, le=500)
    shadow_min_cases: int = Field(0, ge=0)
    shadow_min_agreement: float = Field(0.0, ge=0.0, le=1.0)
