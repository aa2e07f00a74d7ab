"""``tumorseg compare``: train every ``compare.systems`` entry on the training split with one budget and
score each on the held-out test split, side by side, in one run.

Each system is params.yaml plus its overrides; its checkpoints go to ``compare.out_dir/<system>``, its
test reports (the evaluate stage's files) to ``compare.reports/<system>``, its MLflow run (training
plus ``test_*`` metrics) to ``compare.experiment``. Nothing is registered: the comparison informs a
choice of recipe, the ``evaluate``/``promote`` stages decide champions. ``compare.json`` and
``compare.md`` are written once, after the last system, so a table is never partial.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tumorseg.errors import ConfigError
from tumorseg.params import Params, as_params

log = logging.getLogger(__name__)

REGIONS_SHOWN = ("WT", "TC", "ET")
"""The columns of the table (the glioma regions; another label set shows ``dice_mean`` only)."""


@dataclass
class SystemResult:
    """One row of the comparison: the system's budget, size, time and held-out test figures."""

    name: str
    overrides: dict[str, Any]
    network: str
    parameters: int
    max_epochs: int
    steps_per_epoch: int
    step_ratio: float
    train_time_s: float
    probe_step_s: float | None = None
    """The measured seconds per training step ``budget: time`` scaled by (None with ``budget: steps``)."""
    test: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None


@dataclass
class ComparisonResult:
    systems: list[SystemResult]
    budget: str
    reports: Path

    def one_line(self) -> str:
        best = max(self.systems, key=lambda s: s.test.get("dice_mean") or 0.0)
        return (
            f"compared {len(self.systems)} systems ({self.budget} budget) on the test split; best mean Dice "
            f"{best.name} {best.test.get('dice_mean', float('nan')):.3f}; table {self.reports / 'compare.md'}"
        )


def system_params(params: Params, name: str) -> Params:
    """params.yaml plus ``compare.systems[name]``, with its own checkpoint, report and MLflow places."""
    cfg = params.compare
    overrides = {
        **cfg.systems[name],
        "train.out_dir": f"{cfg.out_dir}/{name}",
        "paths.reports": f"{cfg.reports}/{name}",
        "mlflow.experiment": cfg.experiment,
        "train.init_from": None,
    }
    try:
        return params.with_overrides(overrides)
    except ConfigError as exc:
        raise ConfigError(f"compare.systems.{name}: {exc}") from None


def step_seconds(systems: dict[str, Params], probe_steps: int) -> dict[str, float]:
    """Seconds of one training step of each system's network on a random batch (forward, loss,
    backward, AdamW step): the median of ``probe_steps`` after a warm-up, the systems taking turns
    step by step so that a load change on the machine hits them alike. The budget's exchange rate."""
    import statistics

    import torch

    from tumorseg.models.networks import build_network

    runs = {}
    for name, params in systems.items():
        loader = params.data_loader
        network = build_network(params.model, spatial_dims=3, patch_size=loader.patch_size)
        batch = torch.randn(
            loader.batch_size, 4, *loader.patch_size, generator=torch.Generator().manual_seed(0)
        )
        runs[name] = (network, torch.optim.AdamW(network.parameters()), batch)
    times: dict[str, list[float]] = {name: [] for name in systems}
    for index in range(probe_steps + 1):
        for name, (network, optimiser, batch) in runs.items():
            start = time.perf_counter()
            logits = network(batch)
            (logits if torch.is_tensor(logits) else logits[0]).square().mean().backward()
            optimiser.step()
            optimiser.zero_grad()
            if index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


@dataclass(frozen=True)
class Budget:
    """A system's share: its epochs, its step time over the reference's, the probe's seconds per step."""

    max_epochs: int
    step_ratio: float
    probe_step_s: float | None = None


def budgets(params: Params, systems: dict[str, Params]) -> dict[str, Budget]:
    """Each system's :class:`Budget` (``systems``: name -> its checked params, the reference first)."""
    names = list(systems)
    reference = systems[names[0]].train.max_epochs
    if params.compare.budget == "steps":
        return {name: Budget(system.train.max_epochs, 1.0) for name, system in systems.items()}
    seconds = step_seconds(systems, params.compare.probe_steps)
    for name, value in seconds.items():
        log.info("compare: %s: %.2f s per training step (probe)", name, value)
    base = seconds[names[0]]
    return {
        name: Budget(max(1, round(reference * base / s)), s / base, round(s, 4))
        for name, s in seconds.items()
    }


def run_comparison(params: Params | dict[str, Any], *, source: str = "params.yaml") -> ComparisonResult:
    """Train and score every system (module docstring); ConfigError for a bad system before any training."""
    params = as_params(params, source)
    cfg = params.compare
    names = list(cfg.systems)
    # every system's keys checked before the first one trains
    systems = {name: system_params(params, name) for name in names}
    plan = budgets(params, systems)
    rows = []
    for index, name in enumerate(names, start=1):
        budget = plan[name]
        own = systems[name].with_overrides({"train.max_epochs": budget.max_epochs})
        log.info(
            "compare: system %d/%d %s: %d epochs x %d steps (step time %.2fx the reference's)",
            index, len(names), name, budget.max_epochs, own.train.steps_per_epoch, budget.step_ratio,
        )  # fmt: skip
        rows.append(_train_and_score(own, name, cfg.systems[name], budget, source))
    result = ComparisonResult(rows, cfg.budget, Path(cfg.reports))
    _write_tables(result, params)
    return result


def _train_and_score(
    params: Params, name: str, overrides: dict[str, Any], budget: Budget, source: str
) -> SystemResult:
    from tumorseg.evaluation.pipeline_stage import evaluate_test_split, store_component_confidence
    from tumorseg.models.checkpoint import load_trained_network
    from tumorseg.models.predictor import SegmentationPredictor
    from tumorseg.training.train import train

    trained_run = train(params, source=source)
    if trained_run.best_checkpoint is None:
        raise ConfigError(
            f"compare.systems.{name}: training saved no checkpoint (train.out_dir {params.train.out_dir})"
        )
    trained = load_trained_network(trained_run.best_checkpoint)
    store_component_confidence(trained, params.predict, params, source=source)  # as the evaluate stage does
    predictor = SegmentationPredictor(
        trained, params.predict.model_copy(update={"probabilities": False, "uncertainty": False})
    )
    evaluation = evaluate_test_split(predictor, params, source=source)
    row = SystemResult(
        name=name,
        overrides=overrides,
        network=params.model.name + (" + slice ConvLSTM" if params.model.slice_lstm.enabled else ""),
        parameters=sum(p.numel() for p in trained.network.parameters()),
        max_epochs=params.train.max_epochs,
        steps_per_epoch=params.train.steps_per_epoch,
        step_ratio=round(budget.step_ratio, 3),
        train_time_s=round(trained_run.train_time_s, 1),
        probe_step_s=budget.probe_step_s,
        test=evaluation.metrics,
    )
    if params.mlflow.enabled:
        row.mlflow_run_id = _log_test(params, evaluation, trained_run.best_checkpoint, source)
    log.info(
        "compare: %s: test mean Dice %.3f, trained in %.0f s", name, row.test["dice_mean"], row.train_time_s
    )
    return row


def _log_test(params: Params, evaluation: Any, checkpoint: Path, source: str) -> str:
    from tumorseg.registry.loading import prepare_mlflow
    from tumorseg.registry.register import log_test_evaluation
    from tumorseg.tracking import params_tracking_uri

    prepare_mlflow()
    return log_test_evaluation(
        evaluation.metrics,
        evaluation.files,
        checkpoint=checkpoint,
        tracking_uri=params_tracking_uri(params, source=source),
        experiment=params.mlflow.experiment,
    )


def _cell(metrics: dict[str, Any], key: str) -> str:
    value, low, high = (metrics.get(f"{key}{end}") for end in ("", "_ci_low", "_ci_high"))
    if value is None:
        return "–"
    return f"{value:.3f} ({low:.3f}–{high:.3f})" if low is not None and high is not None else f"{value:.3f}"


def markdown_table(result: ComparisonResult) -> str:
    """The README's comparison table: Dice per region and mean with CIs, HD95, time, parameters."""
    regions = [r for r in REGIONS_SHOWN if any(f"dice_{r}" in s.test for s in result.systems)]
    head = ["system", "network", *(f"Dice {r} (95 % CI)" for r in regions), "mean Dice (95 % CI)"]
    head += [*(f"HD95 {r} mm" for r in regions), "epochs x steps", "train time", "parameters"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in result.systems:
        cells = [
            s.name,
            s.network,
            *(_cell(s.test, f"dice_{r}") for r in regions),
            _cell(s.test, "dice_mean"),
        ]
        hd95 = [s.test.get(f"hd95_{r}") for r in regions]
        cells += [f"{v:.1f}" if v is not None else "–" for v in hd95]
        cells += [
            f"{s.max_epochs} x {s.steps_per_epoch}"
            + (f" ({s.probe_step_s:.2f} s/step probed)" if s.probe_step_s is not None else ""),
            f"{s.train_time_s / 60:.1f} min",
            f"{s.parameters / 1e6:.2f} M",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _write_tables(result: ComparisonResult, params: Params) -> None:
    from tumorseg.data.manifest import atomic_write_text
    from tumorseg.runtime import cpu_description

    folder = result.reports
    folder.mkdir(parents=True, exist_ok=True)
    n_cases = {s.test.get("n_cases") for s in result.systems}
    document = {
        "budget": result.budget,
        "test_cases": sorted(n for n in n_cases if n is not None),
        "cpu": {**cpu_description(), "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY")},
        "systems": [asdict(s) for s in result.systems],
    }
    atomic_write_text(folder / "compare.json", json.dumps(document, indent=2, default=str) + "\n")
    budget = {
        "time": "each system trained for the reference's wall time (epochs scaled by its measured step time)",
        "steps": "each system trained for the reference's epochs x steps",
    }[result.budget]
    text = (
        f"Held-out test split ({', '.join(map(str, document['test_cases']))} cases), 95 % bootstrap CIs over "
        f"cases; {budget}; {_cpu_text(document['cpu'])}.\n\n" + markdown_table(result)
    )
    atomic_write_text(folder / "compare.md", text)


def _cpu_text(cpu: dict[str, Any]) -> str:
    kernels = f", kernels limited to {cpu['ATEN_CPU_CAPABILITY']}" if cpu.get("ATEN_CPU_CAPABILITY") else ""
    return f"{len(os.sched_getaffinity(0))} CPU threads of {cpu['cpu_model']} ({' '.join(cpu['cpu_flags'])}{kernels})"
