"""``tumorseg tune [--dims 2]``: an Optuna study (TPE, median pruning on the per-epoch validation Dice)
over ``tune.space`` in an RDB storage resumed by name. ``n_jobs`` worker processes (a trial is a Lightning
run with process-wide state) split the budget; each trial is a nested MLflow run that never sees the test
split. The best overrides go to ``tune.best_params_file``. ``--dims 2`` trains the 2-D models in each
trial and reads the ``*_2d`` twins of those keys (:meth:`~tumorseg.tuning.config.TuneConfig.for_dims`)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from tumorseg.config import apply_overrides
from tumorseg.errors import ConfigError, TumorsegError, first_line
from tumorseg.params import Params, as_params
from tumorseg.tuning.config import TuneConfig

log = logging.getLogger(__name__)

DB_NAME = "optuna.db"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
ROLE_TAG = "tumorseg.role"
FINISHED_STATES = ("COMPLETE", "PRUNED")


@dataclass(frozen=True)
class _Branch:
    """The params keys a trial of the ``dims``-D models writes: its model folder, reports folder and
    MLflow experiment (``experiment`` also names the study's default ``<experiment>-tune``)."""

    out_dir: str
    reports: str
    experiment: str


BRANCHES = {
    3: _Branch("train.out_dir", "paths.reports", "mlflow.experiment"),
    2: _Branch("train_2d.out_dir", "paths.reports_2d", "train_2d.experiment"),
}


@dataclass
class TuneResult:
    """A study run's outcome: ``storage`` without password, ``best_*`` None without a completed trial,
    ``counts`` by state over the whole study, ``trials_run`` by this call."""

    study_name: str
    storage: str
    best_value: float | None = None
    best_trial: int | None = None
    best_overrides: dict[str, Any] = field(default_factory=dict)
    best_params_file: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)
    trials_run: int = 0
    parent_run_id: str | None = None
    wall_time_s: float = 0.0
    plots: list[Path] = field(default_factory=list)

    def one_line(self) -> str:
        counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(self.counts.items()))
        if self.best_value is None:
            return f"study {self.study_name}: no completed trial ({counts}); best params not written"
        return (
            f"study {self.study_name}: best val Dice {self.best_value:.4f} (trial {self.best_trial}; "
            f"{counts}; {self.trials_run} run now in {self.wall_time_s:.0f} s) -> {self.best_params_file}"
        )


def storage_url(params: Params | dict[str, Any], cfg: TuneConfig, *, source: str = "params.yaml") -> str:
    """``tune.storage``, else SQLite next to the MLflow store (``<paths.mlruns>/optuna.db``)."""
    params = as_params(params, source)
    return cfg.storage or f"sqlite:///{(Path(params.paths.mlruns) / DB_NAME).resolve()}"


def hide_password(url: str) -> str:
    """A storage URL safe to print and log (``postgresql://user:***@host/db``)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: nothing we can parse, show only its scheme
        return url.split(":", 1)[0] + "://..."


def open_storage(url: str, cfg: TuneConfig) -> Any:
    """An Optuna RDB storage with heartbeats (a killed worker's trials are failed and retried); SQLite
    writers wait up to 60 s for the lock."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5, and what we need
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=cfg.heartbeat_s,
                grace_period=cfg.grace_s,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
            )
    except (optuna.exceptions.StorageInternalError, ImportError, ValueError) as exc:
        raise ConfigError(
            f"tune.storage: cannot open {hide_password(url)} ({type(exc).__name__}: {first_line(exc, 10_000)}); "
            "check the URL, the server and its driver (psycopg2 for postgresql://)"
        ) from None


def open_study(storage: Any, cfg: TuneConfig, *, worker_index: int = 0) -> Any:
    """Create or load the study (TPE, median pruner); the sampler seed is ``seed + worker_index``
    so parallel workers do not draw the same start-up trials."""
    import optuna

    # tune.sampler and tune.pruner hold TPESampler's and MedianPruner's keyword arguments
    sampler = cfg.sampler.model_dump()
    if sampler["seed"] is not None:
        sampler["seed"] += worker_index
    pruner: Any = optuna.pruners.NopPruner()
    if cfg.pruner.enabled:
        pruner = optuna.pruners.MedianPruner(**cfg.pruner.model_dump(exclude={"enabled"}))
    return optuna.create_study(
        study_name=cfg.study_name,
        storage=storage,
        sampler=optuna.samplers.TPESampler(**sampler),
        pruner=pruner,
        direction="maximize",
        load_if_exists=True,
    )


def state_counts(study: Any) -> dict[str, int]:
    return dict(Counter(trial.state.name for trial in study.get_trials(deepcopy=False)))


def finished_trials(study: Any) -> int:
    counts = state_counts(study)
    return sum(counts.get(s, 0) for s in FINISHED_STATES)


def _tune_experiment(params: Params, cfg: TuneConfig, dims: int) -> str:
    """``tune.mlflow_experiment``, else ``<the trials' training experiment>-tune``."""
    section, key = BRANCHES[dims].experiment.split(".")
    return cfg.mlflow_experiment or f"{getattr(params.section(section), key)}-tune"


def best_val_dice(result: Any) -> float:
    """A trial's objective: the best validation mean Dice of its training (NaN without a validation)."""
    from tumorseg.models.lightning_module import VAL_DICE_MEAN
    from tumorseg.training.train import PlanarTrainResult

    if isinstance(result, PlanarTrainResult):
        return result.best_val.get(VAL_DICE_MEAN, math.nan)
    return result.best_val_dice.get("mean", math.nan)


def check_trials(params: Params, cfg: TuneConfig, dims: int, source: str) -> None:
    """Fail fast (ConfigError) when the training sections with ``trial_overrides`` do not validate."""
    from tumorseg.training.config import load_planar_training_config, load_training_config

    load = load_planar_training_config if dims == 2 else load_training_config
    load(apply_overrides(params, cfg.trial_overrides), source=source)


def ensure_parent_run(study: Any, tracking_uri: str, experiment: str, storage: str) -> str:
    """The study's MLflow parent run, reused when it has one. Workers starting at once may each create
    one; all agree on the oldest (start time, then id) and the others are deleted."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tumorseg.tracking import ensure_experiment

    client = MlflowClient(tracking_uri)
    name = study.study_name
    known = study.user_attrs.get(PARENT_RUN_ATTR)
    if known:
        try:
            if client.get_run(known).info.lifecycle_stage == "active":
                return str(known)
        except MlflowException:
            log.warning("parent run %s of study %s is not in %s; starting another", known, name, tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, experiment)
    tags = {ROLE_TAG: "tune", "optuna.study_name": name, "optuna.storage": storage}
    mine = client.create_run(experiment_id, run_name=f"tune {name}", tags=tags).info.run_id
    candidates = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'tune' and tags.`optuna.study_name` = '{name}'"
    )
    winner = min(candidates, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    if winner != mine:
        client.delete_run(mine)
    study.set_user_attr(PARENT_RUN_ATTR, winner)
    return winner


@dataclass(eq=False)
class TrialObjective:
    """Train the ``dims``-D models with the trial's overrides and return the best validation mean Dice
    (``threads``: torch CPU threads per trial when ``trainer.num_threads`` is 0)."""

    params: Params
    cfg: TuneConfig
    _: KW_ONLY
    source: str
    tracking_uri: str
    parent_run_id: str
    experiment: str
    threads: int
    dims: int = 3

    def trial_params(self, trial: Any, out_dir: Path) -> tuple[Params, dict[str, Any]]:
        from tumorseg.tuning.space import sample_overrides

        base = apply_overrides(self.params, self.cfg.trial_overrides)
        sampled = sample_overrides(trial, self.cfg.space, base, self.source)
        branch = BRANCHES[self.dims]
        fixed = {
            # a trial is a scratch run: own folder, no test scoring, no model in the registry
            branch.out_dir: str(out_dir / "model"),
            branch.reports: str(out_dir / "reports"),
            "train.score_test": False,
            "mlflow.enabled": True,
            "mlflow.log_model": False,
            "mlflow.overlays": 0,
            branch.experiment: self.experiment,
            "mlflow.run_name": f"trial {trial.number}",
        }
        if not base.trainer.num_threads:
            fixed["trainer.num_threads"] = self.threads
        return apply_overrides(base, {**sampled, **fixed}), sampled

    def __call__(self, trial: Any) -> float:
        import optuna
        from mlflow import MlflowClient
        from optuna_integration import PyTorchLightningPruningCallback

        from tumorseg.models.lightning_module import VAL_DICE_MEAN
        from tumorseg.training.train import train
        from tumorseg.tuning.callbacks import TrialRunLink

        out_dir = Path(tempfile.mkdtemp(prefix=f"tumorseg-trial{trial.number}-"))
        try:
            params, sampled = self.trial_params(trial, out_dir)
            trial.set_user_attr("overrides", sampled)
            link = TrialRunLink(trial, self.parent_run_id, self.cfg.study_name)
            pruning = PyTorchLightningPruningCallback(trial, monitor=VAL_DICE_MEAN)
            try:
                result = train(
                    params,
                    dims=self.dims,
                    callbacks=[pruning, link],
                    source=self.source,
                    tracking_uri=self.tracking_uri,
                )
            except optuna.TrialPruned:
                if link.run_id is not None:
                    client = MlflowClient(self.tracking_uri)
                    client.set_tag(link.run_id, "optuna.state", "PRUNED")
                    client.set_terminated(link.run_id, status="KILLED")
                raise
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        value = best_val_dice(result)
        if link.run_id is not None:
            MlflowClient(self.tracking_uri).set_tag(link.run_id, "optuna.state", "COMPLETE")
        if math.isnan(value):
            log.warning("trial %d: no validation Dice (did validation run?); the trial fails", trial.number)
        return float(value)


def run_worker(
    params: Params | dict[str, Any],
    *,
    source: str,
    storage: str,
    tracking_uri: str,
    parent_run_id: str,
    n_trials: int,
    wanted: int,
    worker_index: int,
    threads: int,
    timeout_s: float | None,
    dims: int = 3,
) -> int:
    """Run up to ``n_trials`` trials of the ``dims``-D study until it has ``wanted`` finished; the trials
    run. Arguments are JSON-able: it runs in a worker process for ``n_jobs > 1``."""
    params = as_params(params, source)
    import optuna
    from optuna.trial import TrialState

    from tumorseg.tracking import disable_telemetry

    disable_telemetry()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg: TuneConfig = params.tune.for_dims(dims)
    study = open_study(open_storage(storage, cfg), cfg, worker_index=worker_index)
    objective = TrialObjective(
        params,
        cfg,
        source=source,
        tracking_uri=tracking_uri,
        parent_run_id=parent_run_id,
        experiment=_tune_experiment(params, cfg, dims),
        threads=threads,
        dims=dims,
    )
    before = len(study.get_trials(deepcopy=False))
    # Workers started by hand on other machines aim at the same study total.
    enough = optuna.study.MaxTrialsCallback(wanted, states=(TrialState.COMPLETE, TrialState.PRUNED))
    study.optimize(
        objective,
        n_trials=n_trials,
        timeout=timeout_s,
        # a sampled combination the config rejects (e.g. a patch larger than a volume) fails that
        # trial only; the study goes on
        catch=(ConfigError,),
        callbacks=[enough],
        gc_after_trial=True,
    )
    return len(study.get_trials(deepcopy=False)) - before


def _worker_main(job_file: str) -> int:
    """Entry point of a worker process: ``python -m tumorseg.tuning.study JOB.json``."""
    import json

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(**json.loads(Path(job_file).read_text()))
    return 0


def split_budget(total: int, workers: int) -> list[int]:
    """Trials per worker: ``total`` spread as evenly as possible (no worker gets 0 when total >= workers)."""
    base, extra = divmod(total, workers)
    return [base + (1 if i < extra else 0) for i in range(workers) if base + (1 if i < extra else 0) > 0]


def _run_processes(jobs: list[dict[str, Any]]) -> None:
    """One ``python -m tumorseg.tuning.study`` process per job, and wait: fresh interpreters (no forked
    torch state), like workers started by hand."""
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="tumorseg-tune-jobs-") as tmp:
        processes = []
        for index, job in enumerate(jobs):
            job_file = Path(tmp) / f"worker{index}.json"
            job_file.write_text(json.dumps(job))
            command = [sys.executable, "-m", "tumorseg.tuning.study", str(job_file)]
            processes.append(subprocess.Popen(command))
        codes = [process.wait() for process in processes]
    failed = [index for index, code in enumerate(codes) if code != 0]
    if failed:
        raise TumorsegError(
            f"tune: worker process(es) {failed} exited with an error (see the log above); "
            "rerun `tumorseg tune` to resume the study"
        )


def run_study(
    params: Params | dict[str, Any],
    *,
    source: str = "params.yaml",
    n_trials: int | None = None,
    n_jobs: int | None = None,
    storage: str | None = None,
    timeout_s: float | None = None,
    tracking_uri: str | None = None,
    dims: int = 3,
) -> TuneResult:
    """Run (or resume) the ``dims``-D study until it has ``n_trials`` finished trials; write the best
    params. Options default to the ``tune:`` section (its ``*_2d`` keys for ``dims=2``) and
    ``mlflow.tracking_uri``."""
    params = as_params(params, source)
    from tumorseg.tracking import disable_telemetry, params_tracking_uri

    disable_telemetry()
    cfg: TuneConfig = params.tune.for_dims(dims)
    if not cfg.space:
        key = "space_2d" if dims == 2 else "space"
        raise ConfigError(f"{source}: tune.{key}: empty; declare at least one dimension to search")
    check_trials(params, cfg, dims, source)
    wanted = n_trials or cfg.n_trials
    url = storage or storage_url(params, cfg, source=source)
    uri = params_tracking_uri(params, tracking_uri, source=source)

    study = open_study(open_storage(url, cfg), cfg)
    parent = ensure_parent_run(study, uri, _tune_experiment(params, cfg, dims), hide_password(url))
    remaining = max(wanted - finished_trials(study), 0)
    budgets = split_budget(remaining, n_jobs or cfg.n_jobs)
    threads = max(1, (os.cpu_count() or 1) // max(len(budgets), 1))
    log.info(
        "study %s on %s: %d finished, running %d more trial(s) in %d worker(s)",
        cfg.study_name,
        hide_password(url),
        finished_trials(study),
        remaining,
        len(budgets),
    )
    job = {  # run_worker's arguments, JSON for the worker processes (params validated again there)
        "params": params.raw,
        "source": source,
        "storage": url,
        "tracking_uri": uri,
        "parent_run_id": parent,
        "wanted": wanted,
        "threads": threads,
        "timeout_s": timeout_s or cfg.timeout_s,
        "dims": dims,
    }
    jobs = [{**job, "n_trials": budget, "worker_index": index} for index, budget in enumerate(budgets)]
    before = len(study.get_trials(deepcopy=False))
    started = time.perf_counter()
    if len(jobs) == 1:
        run_worker(**jobs[0])
    elif jobs:
        _run_processes(jobs)
    elapsed = time.perf_counter() - started
    study = open_study(open_storage(url, cfg), cfg)
    result = summarise(
        study, params, cfg, source=source, parent_run_id=parent, storage=hide_password(url), dims=dims
    )
    result.trials_run = len(study.get_trials(deepcopy=False)) - before
    result.wall_time_s = elapsed
    log_study(study, result, uri)
    return result


def summarise(
    study: Any,
    params: Params,
    cfg: TuneConfig,
    *,
    source: str,
    parent_run_id: str | None,
    storage: str,
    dims: int = 3,
) -> TuneResult:
    """Best trial -> overrides, written to ``cfg.best_params_file`` (nothing written without one)."""
    from tumorseg.tuning.best import write_best_params
    from tumorseg.tuning.space import decode_trial_params, to_overrides

    counts = state_counts(study)
    result = TuneResult(cfg.study_name, storage, counts=counts, parent_run_id=parent_run_id)
    if counts.get("COMPLETE", 0) == 0:
        return result
    best = study.best_trial
    base = apply_overrides(params, cfg.trial_overrides)
    overrides = to_overrides(decode_trial_params(best.params, cfg.space), cfg.space, base, source)
    result.best_value = float(best.value)
    result.best_trial = best.number
    result.best_overrides = overrides
    train = "tumorseg train --dims 2" if dims == 2 else "tumorseg train"
    header = (
        f"tumorseg tune: study {cfg.study_name}, trial {best.number}, {cfg.metric} {best.value:.4f} "
        f"({finished_trials(study)} trials finished); merged by `{train}` (tune.apply_best)"
    )
    result.best_params_file = write_best_params(cfg.best_params_file, overrides, header)
    return result


def study_plots(study: Any, folder: Path) -> list[Path]:
    """Optuna's optimisation history and parameter importances as PNGs (one it cannot draw is skipped)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as optuna_plots

    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, draw in (
        ("optimization_history", optuna_plots.plot_optimization_history),
        ("param_importances", optuna_plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():  # the matplotlib backend is "experimental" in Optuna 5
                warnings.simplefilter("ignore", ExperimentalWarning)
                axes = draw(study)
        except (ValueError, RuntimeError) as exc:
            log.info("no %s plot: %s", name, exc)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written


def log_study(study: Any, result: TuneResult, tracking_uri: str) -> None:
    """Best value/params, the trials table and the plots, on the parent run."""
    from mlflow import MlflowClient

    if result.parent_run_id is None:
        return
    client = MlflowClient(tracking_uri)
    run_id = result.parent_run_id
    for state, n in result.counts.items():
        client.log_metric(run_id, f"trials_{state.lower()}", n)
    if result.best_value is not None:
        client.log_metric(run_id, "best_val_dice_mean", result.best_value)
        client.set_tag(run_id, "optuna.best_trial", str(result.best_trial))
        # tags, not params: a resumed study updates its best values, and MLflow params are write-once
        for key, value in result.best_overrides.items():
            client.set_tag(run_id, f"best.{key}", str(value))
    with tempfile.TemporaryDirectory(prefix="tumorseg-tune-") as tmp:
        folder = Path(tmp)
        table = folder / "trials.csv"
        study.trials_dataframe().to_csv(table, index=False)
        client.log_artifact(run_id, str(table))
        for path in study_plots(study, folder / "plots"):
            client.log_artifact(run_id, str(path), artifact_path="plots")
            result.plots.append(Path("plots") / path.name)
        if result.best_params_file is not None:
            client.log_artifact(run_id, str(result.best_params_file))
    client.set_terminated(run_id)


if __name__ == "__main__":
    import sys

    sys.exit(_worker_main(sys.argv[1]))
