"""Shadow deployment: a second model (``serve.shadow``, typically ``models:/tumorseg@challenger``)
segments a share of the 3-D requests after their answer has been sent, and its agreement with the
served model goes to MLflow. The client's answer never depends on it.

The shadow model runs in a worker process of its own at idle CPU priority (``serve.shadow_priority``:
Linux ``SCHED_IDLE``, else nice 19; the threads torch starts there inherit it), so it takes only the
CPU the served requests leave, and never the interpreter lock of the serving process. At most
``serve.shadow_queue`` requests wait for it; beyond, they are skipped and counted. The served model's
prediction of the case goes to the worker with the job; the case's files stay in the service's
private folder until the worker has answered.

Each serve process logs one MLflow run in ``serve.shadow_experiment``, tagged with both models, with
per-case metrics (``case_dice_<region>``, ``seconds_served``, ``seconds_shadow``, step = case number)
and running totals (``cases``, ``mean_dice_<region>``, ``mean_dice``, ``errors``, ``skipped``).
``tumorseg promote`` reads them (:func:`shadow_evidence`).
"""

from __future__ import annotations

import contextlib
import logging
import os
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


def lower_priority(level: str = "idle", *, whole_process: bool = False) -> str:
    """Lower the calling thread's (or, ``whole_process``, this process's) CPU priority (``idle``:
    SCHED_IDLE where the OS has it, else nice 19; ``low``: nice 19; ``normal``: unchanged); threads
    started afterwards inherit it. Returns what was applied (for the log and /health)."""
    if level == "normal":
        return "normal priority"
    tid = 0 if whole_process else threading.get_native_id()
    if level == "idle" and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "SCHED_IDLE"
        except OSError:
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 19)  # per thread on Linux (0: the calling thread)
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
    min_confidence: float | None = None
    """The served answer's component-confidence threshold (0 for a case outside the training profile,
    None: the model's); the candidate post-processes the case the same way."""


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
    """Runs the shadow model in a worker process of its own at low CPU priority; a collector thread
    here takes its results, keeps the totals and logs them to MLflow.

    A process rather than a thread: a thread in this process would hold the interpreter lock for its
    Python steps and slow the served requests whatever its CPU priority (measured: 1.26x at 1 client).
    """

    def __init__(self, settings: Any, served: dict[str, Any], label_set: Any, root: Path) -> None:
        import multiprocessing

        serve = settings.serve
        self.uri: str = serve.shadow
        self.fraction = serve.shadow_fraction
        self.capacity = serve.shadow_queue
        self.settings = settings
        self.served = served
        self.label_set = label_set
        self.folder = root / "shadow"
        self.folder.mkdir(mode=0o700, exist_ok=True)
        self.totals = ShadowTotals()
        self.lock = threading.Lock()
        self.random = random.Random(0)
        self.error: str | None = None
        self.priority = ""
        self.model: dict[str, Any] = {}
        self.ready = threading.Event()
        self.run_id: str | None = None
        self.client: Any = None
        self.jobs: dict[int, ShadowJob] = {}  # sent to the worker, not answered yet
        self.active = 0  # requests being served (the worker is stopped while any is)
        self.closing = False
        self.stop = threading.Event()
        self.pauses: list[tuple[float, float]] = []  # when the worker was stopped (monotonic clock)
        self.paused_since: float | None = None
        self.next_id = 0
        context = multiprocessing.get_context("spawn")  # no copy of this process's threads and locks
        self.requests: Any = context.Queue()
        self.results: Any = context.Queue()
        regions = [r.name for r in label_set.train_regions]
        self.process = context.Process(
            target=shadow_worker,
            args=(self.uri, settings.tracking_uri, settings.predict.model_dump(mode="json"),
                  serve.shadow_priority, served, regions, self.requests, self.results),
            name="tumorseg-shadow",
            daemon=True,
        )  # fmt: skip
        self.process.start()
        self.collector = threading.Thread(target=self._collect, name="tumorseg-shadow-results", daemon=True)
        self.collector.start()

    # ------------------------------------------------------------------ request side
    def serving(self, started: bool) -> None:
        """A request to a predicting route started (True) or ended: the worker is stopped (SIGSTOP)
        while any runs and continued when none does, so it uses only the time between requests, also
        where the two CPUs it would share are hyper-threads of one core."""
        import signal

        with self.lock:
            self.active += 1 if started else -1
            pause = started and self.active == 1
            resume = not started and self.active == 0
            now = time.monotonic()
            if pause:
                self.paused_since = now
            elif resume and self.paused_since is not None:
                self.pauses.append((self.paused_since, now))
                self.paused_since = None
                del self.pauses[:-1000]
        if pause and self.closing:
            return  # never stopped again once closing
        # only a live worker: a reaped one's pid may belong to another process by now
        if (pause or resume) and self.process.exitcode is None and hasattr(signal, "SIGSTOP"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGSTOP if pause else signal.SIGCONT)

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
        """Send ``job`` to the worker (called after the answer was sent); with ``serve.shadow_queue``
        jobs outstanding, or the shadow model off, it is skipped."""
        with self.lock:
            if self.error is not None or len(self.jobs) >= self.capacity:
                self.totals.skipped += int(self.error is None)
                skip = True
            else:
                skip = False
                self.next_id += 1
                job_id = self.next_id
                self.jobs[job_id] = job
        if skip:
            self._discard(job)
            return
        self.requests.put((job_id, str(job.folder), job.served_labels, job.min_confidence))

    def info(self) -> dict[str, Any]:
        """What ``/health`` reports about the shadow model."""
        with self.lock:
            return {
                "uri": self.uri,
                "model": self.model,
                "fraction": self.fraction,
                "priority": self.priority,
                "error": self.error,
                "pending": len(self.jobs),
                **self.totals.to_dict(),
            }

    def close(self, timeout: float = 60.0) -> None:
        """Let the worker finish the jobs it has (within ``timeout``), stop it, end the MLflow run."""
        import signal

        with self.lock:
            self.closing = True
            self.active = 0
        if self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)  # whatever was in flight
        self.requests.put(None)
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
        self.stop.set()
        self.collector.join(timeout=timeout)
        for channel in (self.requests, self.results):  # a killed worker may hold their pipes
            channel.cancel_join_thread()
            channel.close()
        self._drop_pending()
        if self.client is not None and self.run_id is not None:
            try:
                self.client.set_terminated(self.run_id)
            except Exception:  # the store may be gone at shutdown; the next reaper ends the run
                log.warning("shadow: could not end MLflow run %s", self.run_id)

    def _drop_pending(self) -> None:
        """Remove the folders of jobs the worker will never answer."""
        with self.lock:
            left = list(self.jobs.values())
            self.jobs.clear()
        for job in left:
            self._discard(job)

    # ------------------------------------------------------------------ results (collector thread)
    def _collect(self) -> None:
        import queue

        while not self.stop.is_set():
            try:
                message = self.results.get(timeout=0.5)
            except queue.Empty:
                if self.process.exitcode is not None and not self.stop.is_set():
                    with self.lock:  # the worker died (killed, out of memory): shadowing stops, said once
                        if self.error is None:
                            self.error = (
                                f"{self.uri}: the shadow worker exited (code {self.process.exitcode})"
                            )
                            log.warning("shadow model off: %s", self.error)
                    self._drop_pending()
                    self.ready.set()
                    return
                continue
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "ready":
                _, model, priority = message
                with self.lock:
                    self.model, self.priority = model, priority
                log.info("shadow model %s at %s", model.get("description"), priority)
                self.ready.set()
            elif kind == "off":
                with self.lock:
                    self.error = f"{self.uri}: {message[1]}"
                log.warning("shadow model off: %s", self.error)
                self._drop_pending()
                self.ready.set()
            else:
                _, job_id, outcome = message
                with self.lock:
                    job = self.jobs.pop(job_id, None)
                if job is None:
                    continue
                self._record(job, outcome)
                self._discard(job)

    def _record(self, job: ShadowJob, outcome: dict[str, Any]) -> None:
        if "error" in outcome:
            with self.lock:
                self.totals.errors += 1
                errors, n = self.totals.errors, self.totals.cases
            log.warning("shadow: %s: %s", job.case_id, outcome["error"])
            self._log({"errors": float(errors)}, step=n)
            return
        dice = outcome["dice"]
        with self.lock:
            seconds = self._running_seconds(outcome["start"], outcome["end"])
            totals = self.totals
            totals.add(dice, job.served_seconds, seconds)
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

    def _running_seconds(self, start: float, end: float) -> float:
        """``end - start`` (the worker's job, on the machine's monotonic clock) less the time the worker
        was stopped in between: what the shadow model took. Called with the lock held."""
        stopped = [*self.pauses, *([(self.paused_since, end)] if self.paused_since is not None else [])]
        overlap = sum(max(0.0, min(b, end) - max(a, start)) for a, b in stopped)
        return max(end - start - overlap, 0.0)

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


class PauseShadowWhileServing:
    """ASGI wrapper: each POST (every route that predicts is one: uploads, demo cases, ground-truth
    scoring) counts as a request being served from its first byte to the end of its answer
    (:meth:`ShadowRunner.serving`)."""

    def __init__(self, app: Any, service_app: Any) -> None:
        self.app = app
        self.service_app = service_app  # the FastAPI app whose state holds the Service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        service = getattr(self.service_app.state, "service", None)
        runner = getattr(service, "shadow", None)
        if runner is None or scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        runner.serving(True)
        try:
            await self.app(scope, receive, send)
        finally:
            runner.serving(False)


def shadow_worker(
    uri: str,
    tracking_uri: str,
    predict: dict[str, Any],
    priority: str,
    served: dict[str, Any],
    regions: list[str],
    requests: Any,
    results: Any,
) -> None:
    """The shadow process: lower its priority, load the model (answer ``("ready", model, priority)`` or
    ``("off", why)``), then segment each ``(job id, case folder, served labels)`` and answer
    ``("done", job id, {"dice", "start", "end"} | {"error"})`` (start and end on the monotonic clock)."""
    import warnings

    applied = lower_priority(priority, whole_process=True)
    warnings.filterwarnings("ignore")  # the served process reports; this one only answers
    try:
        from tumorseg.data.conventions import get_label_set
        from tumorseg.models.config import PredictConfig
        from tumorseg.models.predictor import SegmentationPredictor
        from tumorseg.registry.loading import MODELS_URI, load_model
        from tumorseg.serving.viewer import dice_per_region

        loaded = load_model(uri, tracking_uri=tracking_uri)
        predictor = SegmentationPredictor(loaded.trained, PredictConfig.model_validate(predict))
        match = MODELS_URI.match(uri)
        name = match["name"] if match else Path(uri.rstrip("/")).name
        if served.get("version") and loaded.version == served["version"] and name == served.get("name"):
            raise ValueError(f"is the served model itself (version {loaded.version}); nothing to compare")
        label_set = get_label_set(loaded.trained.model.label_set)
        own = [r.name for r in label_set.train_regions]
        if own != regions:
            raise ValueError(f"predicts regions {own}, the served model {regions}")
    except Exception as exc:
        from tumorseg.errors import first_line

        results.put(("off", first_line(exc, 500)))
        return
    model = {"name": name, "version": loaded.version, "uri": uri, "description": loaded.description}
    results.put(("ready", model, applied))
    while True:
        job = requests.get()
        if job is None:
            return
        job_id, folder, served_labels, min_confidence = job
        try:
            from tumorseg.serving.service import _one_case

            start = time.monotonic()  # one clock for both processes: the server subtracts its pauses
            prediction = predictor.predict_case(_one_case(Path(folder)), min_confidence=min_confidence)
            end = time.monotonic()
            dice = dice_per_region(prediction.canonical, served_labels, label_set)
            results.put(("done", job_id, {"dice": dice, "start": start, "end": end}))
        except Exception as exc:
            results.put(("done", job_id, {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}))


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
