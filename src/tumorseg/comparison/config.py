"""``compare:`` in params.yaml (light: no torch)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tumorseg.config import Section


class CompareConfig(Section):
    """``tumorseg compare``: every system trains on the training split and is scored on the held-out
    test split of the current dataset, one after the other, in one run.

    Attributes:
        systems: name -> dotted params.yaml overrides (``{}`` is params.yaml as is). The first one is
            the reference whose budget the others get.
        budget: ``steps``: every system runs the reference's ``max_epochs x steps_per_epoch``;
            ``time``: every system gets the reference's training wall time, its ``max_epochs`` scaled by
            the ratio of training-step times measured before training (the learning-rate schedule still
            runs to its end).
        probe_steps: timed forward/backward steps per system for ``budget: time`` (after one warm-up).
        out_dir: checkpoints, one folder per system. reports: ``compare.json``, ``compare.md`` and one
            folder of test reports per system. experiment: the MLflow experiment of the runs.
    """

    systems: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"unet": {}})
    budget: Literal["steps", "time"] = "time"
    probe_steps: int = Field(6, ge=1)
    out_dir: str = "models/compare"
    reports: str = "reports/compare"
    experiment: str = "tumorseg-compare"

    @field_validator("systems")
    @classmethod
    def _named(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError("name at least one system")
        bad = [name for name in value if not name.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"system names are folder names: letters, digits, - and _ only ({bad[0]!r})")
        return value
