"""``tune:`` the Optuna search (params.yaml), validated like every other section.

One ``space`` entry per dotted params key, e.g.
``train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}``. An entry with ``scales`` is a
strength knob, not a params key: its value multiplies every listed key (probabilities clipped
to 1), one dimension instead of several correlated ones. ``tumorseg tune --dims 2`` searches the 2-D
models' keys (``train_2d``, ``model_2d``) with the ``*_2d`` twins of the study's keys.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tumorseg.config import Section


class SearchDimension(Section):
    """One dimension of the search space: inclusive ``low``/``high`` and ``step`` (None: continuous / 1)
    for numbers, ``choices`` (lists allowed) for categoricals, ``scales`` for a strength knob."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0.0)
    choices: list[Any] | None = None
    scales: list[str] | None = None

    @model_validator(mode="after")
    def _complete(self) -> SearchDimension:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs a non-empty choices list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} dimension needs low and high")
            if self.low > self.high:
                raise ValueError("low must not exceed high")
            if self.log and self.low <= 0:
                raise ValueError("log: true needs low > 0")
            if self.log and self.step is not None:
                raise ValueError("log and step cannot be combined (Optuna)")
        if self.scales is not None and self.type == "categorical":
            raise ValueError("scales needs a float or int factor, not a categorical dimension")
        return self


class SamplerConfig(Section):
    """TPE sampler: random start-up trials, then a model of good vs. bad regions."""

    seed: int | None = 42
    n_startup_trials: int = Field(5, ge=0)
    multivariate: bool = True  # joint density over dimensions (lr and weight decay interact)
    constant_liar: bool = True  # parallel workers avoid sampling next to a running trial


class PrunerConfig(Section):
    """Median pruner on the per-epoch validation Dice."""

    enabled: bool = True
    n_startup_trials: int = Field(3, ge=0)  # trials that always run to the end first
    n_warmup_steps: int = Field(1, ge=0)  # epochs before a trial can be pruned
    interval_steps: int = Field(1, ge=1)


PER_DIMS_KEYS: tuple[str, ...] = ("study_name", "trial_overrides", "best_params_file", "space")
"""``tune:`` keys with a ``_2d`` twin for the 2-D study."""


class TuneConfig(Section):
    """``tune:`` the Optuna study (``tumorseg tune``, the tuning flow).

    Attributes:
        storage: Optuna storage URL (None: ``sqlite:///<paths.mlruns>/optuna.db``); an RDB server
            (``postgresql://...``) for workers on several machines.
        n_trials: trials to finish (complete or pruned) in this study, counting earlier runs.
        trial_overrides: params applied to every trial (shorter runs than a final training).
        apply_best: ``tumorseg train`` and the training flow merge ``best_params_file`` if present.
        mlflow_experiment: of the parent and trial runs (None: ``<mlflow.experiment>-tune``).
        heartbeat_s, grace_s: a trial of a killed worker is failed after ``grace_s`` without
            heartbeat and retried once.
        study_name_2d, trial_overrides_2d, best_params_file_2d, space_2d: the 2-D study's
            (:meth:`for_dims`); storage, workers, sampler and pruner are shared.
    """

    study_name: str = Field("tumorseg", min_length=1)
    storage: str | None = None
    n_trials: int = Field(20, ge=1)
    n_jobs: int = Field(1, ge=1)
    timeout_s: float | None = Field(None, gt=0.0)
    metric: Literal["val_dice_mean"] = "val_dice_mean"
    trial_overrides: dict[str, Any] = Field(default_factory=dict)
    best_params_file: str = "reports/best_params.yaml"
    apply_best: bool = True
    mlflow_experiment: str | None = None
    heartbeat_s: int = Field(30, ge=1)
    grace_s: int = Field(120, ge=1)
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    space: dict[str, SearchDimension] = Field(default_factory=dict)
    study_name_2d: str = Field("tumorseg-2d", min_length=1)
    trial_overrides_2d: dict[str, Any] = Field(default_factory=dict)
    best_params_file_2d: str = "reports/2d/best_params.yaml"
    space_2d: dict[str, SearchDimension] = Field(default_factory=dict)

    def for_dims(self, dims: int) -> TuneConfig:
        """This section as the ``dims``-D study sees it: for 2, the ``*_2d`` keys in place of theirs."""
        if dims == 3:
            return self
        return self.model_copy(update={name: getattr(self, f"{name}_2d") for name in PER_DIMS_KEYS})

    @model_validator(mode="after")
    def _consistent(self) -> TuneConfig:
        if self.grace_s <= self.heartbeat_s:
            raise ValueError("grace_s must exceed heartbeat_s")
        for name in ("study_name", "best_params_file"):  # the 2-D study searches other keys
            if getattr(self, name) == getattr(self, f"{name}_2d"):
                raise ValueError(f"{name}_2d must differ from {name}")
        return self
