"""``tune:`` the Optuna search (params.yaml), validated like every other section.

The search space is declared in params.yaml, one entry per dotted params key::

    tune:
      space:
        train.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
        loss.name: {type: categorical, choices: [dice, dice_ce]}
        model.unet.channels: {type: categorical, choices: [[16, 32, 64], [32, 64, 128]]}
        augment_strength:                 # one knob scaling several probabilities
          {type: float, low: 0.0, high: 1.5, scales: [augment.affine_prob, augment.noise_prob]}

A ``scales`` entry is not a params key itself: its sampled value multiplies the params.yaml
value of every key listed (clipped to 1 for probabilities), so "augmentation strength" is one
dimension of the search instead of five correlated ones.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tumorseg.config import Section


class SearchDimension(Section):
    """One dimension of the search space.

    Attributes:
        type: ``float``, ``int`` or ``categorical``.
        low, high: range of ``float``/``int`` dimensions (inclusive).
        log: sample on a log scale (learning rates, weight decay).
        step: grid step of ``float``/``int`` dimensions (None: continuous / 1).
        choices: values of a ``categorical`` dimension (lists allowed: channel widths, patch sizes).
        scales: for a strength knob, the params keys whose values the sampled factor multiplies.
    """

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


class TuneConfig(Section):
    """``tune:`` the Optuna study (``tumorseg tune``, the tuning flow).

    Attributes:
        study_name: the study; workers and resumed runs join it by name.
        storage: Optuna storage URL. None: ``sqlite:///<paths.mlruns>/optuna.db``. Use an RDB
            server (``postgresql://user:pass@host/db``) for workers on several machines.
        n_trials: trials to finish (complete or pruned) in this study, counting earlier runs.
        n_jobs: worker processes on this machine, sharing the study through the storage.
        timeout_s: stop starting trials after this long (None: no limit).
        metric: what a trial maximises (the best per-epoch validation mean Dice).
        trial_overrides: params applied to every trial (shorter runs than a final training).
        best_params_file: the best trial's params (nested YAML) that ``train`` merges.
        apply_best: ``tumorseg train`` and the training flow merge ``best_params_file`` if present.
        mlflow_experiment: experiment of the parent and trial runs (None: ``<mlflow.experiment>-tune``).
        heartbeat_s, grace_s: a running trial whose worker was killed is failed after ``grace_s``
            without heartbeat and retried once (RDB storages only).
        space: the search space (module docstring).
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

    @model_validator(mode="after")
    def _heartbeat_before_grace(self) -> TuneConfig:
        if self.grace_s <= self.heartbeat_s:
            raise ValueError("grace_s must exceed heartbeat_s")
        return self
