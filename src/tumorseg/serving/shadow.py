"""Shadow deployment: a second model (``serve.shadow``, typically ``models:/tumorseg@challenger``)
segments a share of the 3-D requests after their answer has been sent, and its agreement with the
served model goes to MLflow. The client's answer never depends on it.

The shadow model runs on one thread of its own at idle CPU priority (``serve.shadow_priority``: Linux
``SCHED_IDLE``, else nice 19; the threads torch starts from it inherit that), so it takes only the CPU the served requests
leave. Requests wait for it in a bounded queue (``serve.shadow_queue``); beyond, they are skipped
and counted. The served model's prediction of the case is kept in memory for the comparison; the
case's files stay in the service's private folder until the shadow model has read them.

Each serve process logs one MLflow run in ``serve.shadow_experiment``, tagged with both models, with
per-case metrics (``case_dice_<region>``, ``seconds_served``, ``seconds_shadow``, step = case number)
and running totals (``cases``, ``mean_dice_<region>``, ``mean_dice``, ``errors``, ``skipped``).
``tumorseg promote`` reads them (:func:`shadow_evidence`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("tumorseg.serving.app")

SHADOW_MODEL_TAG = "tumorseg.shadow.model"
SHADOW_VERSION_TAG = "tumorseg.shadow.version"
SERVED_TAG = "tumorseg.shadow.served"


def lower_priority(level: str = "idle") -> str:
    """Lower the calling thread's CPU priority (``idle``: SCHED_IDLE where the OS has it, else nice 19;
    ``low``: nice 19; ``normal``: unchanged); returns what was applied (for the log and /health)."""
    if level == "normal":
        return "normal priority"
    tid = threading.get_native_id()
    if level == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)  # per thread on Linux
        return "nice 19"
    except (OSError, AttributeError):
        return "normal priority (this OS cannot lower one thread)"


@dataclass
class ShadowJob:
    """One request for the shadow model: the case folder, the served labels (canonical grid) and time."""

    folder: Path
    owned: bool
    case_id: str
    served_labels: np.ndarray
    served_seconds: float


@dataclass
class ShadowTotals:
    """Running agreement of the shadow model with the served one."""

    cases: int = 0
    errors: int = 0
    skipped: int = 0
    dice_sums: dict[str, float] = field(default_factory=dict)
    served_seconds: float = 0.0
    shadow_seconds: float = 0.0

    def add(self, dice: dict[str, float], served_s: float, shadow_s: float) -> None:
        self.cases += 1
        for region, value in dice.items():
            self.dice_sums[region] = self.dice_sums.get(region, 0.0) + value
        self.served_seconds += served_s
        self.shadow_seconds += shadow_s

    def means(self) -> dict[str, float]:
        return {region: total / self.cases for region, total in self.dice_sums.items()} if self.cases else {}

    def to_dict(self) -> dict[str, Any]:
        means = self.means()
        return {
            "cases": self.cases,
            "errors": self.errors,
            "skipped": self.skipped,
            "mean_dice": {k: round(v, 4) for k, v in means.items()},
            "time_ratio": round(self.shadow_seconds / self.served_seconds, 3)
            if self.served_seconds
            else None,
        }


class ShadowRunner:
    """Loads the shadow model on its own idle-priority thread and works through submitted jobs."""

    def __init__(self, settings: Any, served: dict[str, Any], label_set: Any, root: Path) -> None:
        serve = settings.serve
        self.uri: str = serve.shadow
        self.fraction = serve.shadow_fraction
        self.settings = settings
        self.served = served
        self.label_set = label_set
        self.folder = root / "shadow"
        self.folder.mkdir(mode=0o700, exist_ok=True)
        self.queue: queue.Queue[ShadowJob | None] = queue.Queue(maxsize=serve.shadow_queue)
        self.totals = ShadowTotals()
        self.lock = threading.Lock()
        self.random = random.Random(0)
        self.error: str | None = None
        self.priority = ""
        self.model: dict[str, Any] = {}
        self.ready = threading.Event()
        self.run_id: str | None = None
        self.client: Any = None
        self.thread = threading.Thread(target=self._run, name="tumorseg-shadow", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ request side
    def wanted(self) -> bool:
        """Whether this request goes to the shadow model too (its share, and it still works)."""
        with self.lock:
            return self.error is None and self.random.random() < self.fraction

    def hand_over(
        self, folder: Path, workdir: Path, case_id: str, labels: np.ndarray, seconds: float
    ) -> ShadowJob:
        """A job for the case in ``folder``: moved out of ``workdir`` (removed after the answer) into the
        shadow folder, or read where it is when it lies elsewhere (a demo case)."""
        owned = folder.resolve().is_relative_to(workdir.resolve())
        if owned:
            target = Path(self._new_folder())
            folder.rename(target / "case")
            folder = target / "case"
        return ShadowJob(folder, owned, case_id, labels, seconds)

    def _new_folder(self) -> str:
        import tempfile

        return tempfile.mkdtemp(prefix="job-", dir=self.folder)

    def submit(self, job: ShadowJob) -> None:
        """Queue ``job`` (called after the answer was sent); a full queue skips it."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            with self.lock:
                self.totals.skipped += 1
            self._discard(job)

    def info(self) -> dict[str, Any]:
        """What ``/health`` reports about the shadow model."""
        with self.lock:
            return {
                "uri": self.uri,
                "model": self.model,
                "fraction": self.fraction,
                "priority": self.priority,
                "error": self.error,
                "pending": self.queue.qsize(),
                **self.totals.to_dict(),
            }

    def close(self, timeout: float = 60.0) -> None:
        """Finish the queued jobs (within ``timeout``), end the MLflow run."""
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=timeout)
        self.thread.join(timeout=timeout)
        if self.client is not None and self.run_id is not None:
            try:
                self.client.set_terminated(self.run_id)
            except Exception:  # the store may be gone at shutdown; the next reaper ends the run
                log.warning("shadow: could not end MLflow run %s", self.run_id)

    # ------------------------------------------------------------------ shadow thread
    def _run(self) -> None:
        self.priority = lower_priority(self.settings.serve.shadow_priority)
        try:
            predictor = self._load()
        except Exception as exc:
            from tumorseg.errors import first_line

            with self.lock:
                self.error = f"{self.uri}: {first_line(exc, 500)}"
            log.warning("shadow model off: %s", self.error)
            predictor = None
        self.ready.set()
        while True:
            job = self.queue.get()
            if job is None:
                return
            try:
                if predictor is not None:
                    self._compare(predictor, job)
            except Exception as exc:
                with self.lock:
                    self.totals.errors += 1
                log.warning("shadow: %s: %s: %s", job.case_id, type(exc).__name__, str(exc)[:300])
                self._log({"errors": self.totals.errors}, step=self.totals.cases)
            finally:
                self._discard(job)

    def _load(self) -> Any:
        from tumorseg.models.predictor import SegmentationPredictor
        from tumorseg.registry.loading import MODELS_URI, load_model

        loaded = load_model(self.uri, tracking_uri=self.settings.tracking_uri)
        predictor = SegmentationPredictor(loaded.trained, self.settings.predict)
        match = MODELS_URI.match(self.uri)
        name = match["name"] if match else Path(self.uri.rstrip("/")).name
        self.model = {
            "name": name,
            "version": loaded.version,
            "uri": self.uri,
            "description": loaded.description,
        }
        if (
            self.served.get("version")
            and loaded.version == self.served.get("version")
            and name == self.served["name"]
        ):
            raise ValueError(f"is the served model itself (version {loaded.version}); nothing to compare")
        served_regions = [r.name for r in self.label_set.train_regions]
        shadow_regions = [r.name for r in predictor.label_set.train_regions]
        if served_regions != shadow_regions:
            raise ValueError(f"predicts regions {shadow_regions}, the served model {served_regions}")
        log.info("shadow model %s at %s", loaded.description, self.priority)
        return predictor

    def _compare(self, predictor: Any, job: ShadowJob) -> None:
        from tumorseg.serving.service import _one_case
        from tumorseg.serving.viewer import dice_per_region

        case = _one_case(job.folder)
        start = time.perf_counter()
        prediction = predictor.predict_case(case)
        seconds = time.perf_counter() - start
        dice = dice_per_region(prediction.canonical, job.served_labels, self.label_set)
        with self.lock:
            self.totals.add(dice, job.served_seconds, seconds)
            totals = self.totals
            n = totals.cases
            means = totals.means()
            metrics = {
                **{f"case_dice_{r}": v for r, v in dice.items()},
                "seconds_served": job.served_seconds,
                "seconds_shadow": seconds,
                "cases": float(n),
                **{f"mean_dice_{r}": v for r, v in means.items()},
                "mean_dice": float(np.mean(list(means.values()))),
                "errors": float(totals.errors),
                "skipped": float(totals.skipped),
                "time_ratio": totals.shadow_seconds / max(totals.served_seconds, 1e-9),
            }
        log.info(
            "shadow %s: agreement %s in %.1f s (served %.1f s)",
            job.case_id, " ".join(f"{r} {v:.3f}" for r, v in dice.items()), seconds, job.served_seconds,
        )  # fmt: skip
        self._log(metrics, step=n)

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """Log to this process's shadow run (created at the first result); a store error only warns."""
        try:
            from mlflow.entities import Metric

            if self.run_id is None:
                self._start_run()
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=batch)
        except Exception as exc:
            log.warning("shadow: MLflow logging failed: %s: %s", type(exc).__name__, str(exc)[:300])

    def _start_run(self) -> None:
        from mlflow import MlflowClient

        from tumorseg import tracking

        uri = self.settings.tracking_uri
        experiment = self.settings.serve.shadow_experiment
        experiment_id = tracking.ensure_experiment(uri, experiment)
        self.client = MlflowClient(uri)
        tracking.reap_orphaned_runs(uri, experiment)
        served = f"{self.served.get('name')}/{self.served.get('version')}"
        tags = {
            SHADOW_MODEL_TAG: str(self.model.get("name")),
            SHADOW_VERSION_TAG: str(self.model.get("version")),
            SERVED_TAG: served,
            "tumorseg.shadow.uri": self.uri,
        }
        name = f"shadow {self.model.get('name')} v{self.model.get('version')} vs {served}"
        self.run_id = tracking.create_run(self.client, experiment_id, run_name=name, tags=tags)

    def _discard(self, job: ShadowJob) -> None:
        if job.owned:
            from tumorseg.serving.uploads import remove_tree

            remove_tree(job.folder.parent)


# ---------------------------------------------------------------------------- the promotion's evidence
@dataclass
class ShadowEvidence:
    """A challenger version's shadow runs summed: cases, errors, mean Dice per region against the served
    models (weighted by cases), time relative to them, and the runs read."""

    cases: int
    errors: int
    mean_dice: dict[str, float]
    time_ratio: float | None
    runs: list[str]

    @property
    def agreement(self) -> float | None:
        return float(np.mean(list(self.mean_dice.values()))) if self.mean_dice else None

    def sentence(self) -> str:
        if not self.cases:
            return f"shadow: no production case yet ({self.errors} errors)"
        regions = " ".join(f"{r} {v:.3f}" for r, v in self.mean_dice.items())
        ratio = "" if self.time_ratio is None else f", {self.time_ratio:.2f}x the served model's time"
        return (
            f"shadow: {self.cases} production cases, agreement with the served model (mean Dice) {regions}"
            f"{ratio}, {self.errors} errors"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "errors": self.errors,
            "mean_dice": self.mean_dice,
            "agreement": self.agreement,
            "time_ratio": self.time_ratio,
            "runs": self.runs,
        }


def shadow_evidence(client: Any, experiment: str, name: str, version: str) -> ShadowEvidence | None:
    """Sum the shadow runs of ``name`` version ``version`` in ``experiment`` (None: no such run)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{SHADOW_MODEL_TAG}` = '{name}' and tags.`{SHADOW_VERSION_TAG}` = '{version}'",
        max_results=1000,
    )
    if not runs:
        return None
    cases = errors = 0
    sums: dict[str, float] = {}
    served_s = shadow_s = 0.0
    for run in runs:
        m = run.data.metrics
        n = int(m.get("cases", 0))
        errors += int(m.get("errors", 0))
        if not n:
            continue
        cases += n
        for key, value in m.items():
            if key.startswith("mean_dice_"):
                region = key.removeprefix("mean_dice_")
                sums[region] = sums.get(region, 0.0) + value * n
        ratio = m.get("time_ratio")
        if ratio is not None:
            served_s += n
            shadow_s += ratio * n
    means = {region: total / cases for region, total in sums.items()} if cases else {}
    return ShadowEvidence(
        cases, errors, means, shadow_s / served_s if served_s else None, [r.info.run_id for r in runs]
    )
