"""``monitor:`` section of params.yaml: drift of the scans a model sees against its training data."""

from __future__ import annotations

from pydantic import Field

from tumorseg.config import Section


class MonitorConfig(Section):
    """``monitor:`` the reference profile stored with each registered model and the drift rules.

    Attributes:
        enabled: the evaluate stage stores a profile with the model it registers; ``predict`` and the
            API check every case against the profile of the model that serves it.
        profile_cases: most training cases profiled (evenly spaced by case id).
        tolerance: a case is outside the reference when a feature lies beyond the training cases'
            range by more than this share of the range.
        min_relative_span: the range counts as at least this share of the feature's median (a feature
            that never varied in training, such as the voxel size, still gets a band).
        ks_alpha: ``tumorseg monitor``: a feature's distribution over a folder differs from training
            when the two-sample Kolmogorov-Smirnov p-value is below this (Bonferroni over the tests: the
            features and the predicted volumes).
        max_flagged_fraction: ``tumorseg monitor``: a folder has drifted when more than this share of
            its cases is outside the reference (or any feature's KS test fires).
        min_cases_for_ks: KS tests only on folders with at least this many cases.
        experiment: MLflow experiment of ``tumorseg monitor`` runs.
        folder: predictions folder the scheduled retraining flow monitors (null: none).
        retrain_on_drift: the scheduled flow retrains when that folder has drifted, even without new data.
    """

    enabled: bool = True
    profile_cases: int = Field(64, ge=3)
    tolerance: float = Field(0.5, ge=0.0)
    min_relative_span: float = Field(0.1, ge=0.0)
    ks_alpha: float = Field(0.01, gt=0.0, lt=1.0)
    max_flagged_fraction: float = Field(0.2, ge=0.0, le=1.0)
    min_cases_for_ks: int = Field(8, ge=2)
    experiment: str = Field("tumorseg-monitoring", min_length=1)
    folder: str | None = None
    retrain_on_drift: bool = False
