"""Crash consistency of every stage that writes: each `dvc repro -s <stage>` of the real dvc.yaml,
3-D and 2-D, is SIGKILLed (process group: DVC, the stage and its workers) at several points, then
run to the end.

Kill points, per stage:
- ``last``: paused just before its last write becomes visible (``tumorseg.faults``: every atomic
  rename, folder swap, model registration and alias move is a numbered write point);
- ``first``: then again, from what the first kill left, before its first write;
- ``time``: then half-way between the command's start and its last write in the uninterrupted run
  (timed from the launch of ``dvc repro``), wherever it is.

After each kill: every visible output file is whole and is either the version before that attempt or
the version an uninterrupted run writes (temporary files start with a dot and are never visible as
outputs); ``dvc.lock`` records the old outputs, or (killed after the stage, while DVC wrote it) the
outputs now there; no registry alias names anything but what it
named before or a version the killed process finished registering. After the final run: the outputs are
the uninterrupted run's, byte for byte (files whose bytes carry a time are only checked whole: see
``VOLATILE``), no MLflow run is left RUNNING, and the aliases are those an uninterrupted run sets.

The uninterrupted run is the same project copied before the first stage and run stage by stage
beside it.

``make test`` runs the 3-D chain and compress with the ``last`` and ``time`` kills (about 4 minutes
on 2 cores). ``make reliability`` (``pytest --reliability-out=FILE``, which sets
``TUMORSEG_CRASH_FULL=1``) runs every stage, 2-D included: first it kills the stage at each of its
write points in turn, each time from the state before the stage, then ``last``, ``first`` and
``time`` as above; each kill's outcome goes to the README's reliability table.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from tumorseg.config import apply_overrides
from tumorseg.faults import LOG_ENV, PAUSE_ENV, PAUSED, START, WRITE

_SPEC = importlib.util.spec_from_file_location("dvc_support", Path(__file__).parents[1] / "dvc_support.py")
dvc_support = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(dvc_support)
ROOT, BIN = dvc_support.ROOT, dvc_support.BIN
_FIX = importlib.util.spec_from_file_location(
    "planar_fixtures", Path(__file__).parents[1] / "planar_fixtures.py"
)
planar_fixtures = importlib.util.module_from_spec(_FIX)
_FIX.loader.exec_module(planar_fixtures)

TINY: dict[str, Any] = {
    "synth.cases": 6,
    "synth.spacing_mm": 4.0,
    **dvc_support.TINY_3D,
    "compress.variants": ["fp32", "onnx_fp32"],
    "compress.exporter": "torchscript",
    "compress.dice_tolerance": 1.0,  # the gate itself is tested in test_compress_stage.py
    "compress.latency.warmup": 0,
    "compress.latency.repeats": 1,
    "compress.latency.synth_spacing_mm": 4.0,
    **planar_fixtures.TINY_2D_DATA_OVERRIDES,
    **planar_fixtures.TINY_2D_OVERRIDES,
}

ALL_STAGES: tuple[str, ...] = (
    *(
        f"{s}@3d"
        for s in ("source", "ingest", "validate", "preprocess", "split", "train", "evaluate", "promote")
    ),
    "compress",
    *(
        f"{s}@2d"
        for s in ("source", "ingest", "validate", "preprocess", "split", "train", "evaluate", "promote")
    ),
)
"""Every stage of dvc.yaml that writes, in pipeline order (the independent set and generalise stages run
the same writers as source and evaluate)."""

FULL = os.environ.get("TUMORSEG_CRASH_FULL") == "1"
STAGES = ALL_STAGES if FULL else tuple(s for s in ALL_STAGES if not s.endswith("@2d"))
KILLS = ("last", "first", "time") if FULL else ("last", "time")
COVERED_ELSEWHERE = {"train@3d"}
"""Run, not killed, by ``make test``: tests/model/test_train_sigkill.py kills training as it checkpoints."""

VOLATILE = (
    "/validation/",  # Great Expectations' stores and Data Docs: run times and random ids in every file
    "test_summary.json",  # timings of the evaluation
    "metrics.json",
    "train_metrics.json",
    "model_version.json",  # the registered version: its number and run id differ between stores
    "promotion.json",
    "compression.json",
    "compression.md",
    "compressed/",  # measured latencies; the model files are compared through `whole` below
    "logs/metrics.csv",
    "learning_curves.png",
    "best.ckpt",
    "synth_meta.json",
)
"""Outputs whose bytes carry a time, a measured duration or an id: compared only as whole files."""


@dataclass
class Stage:
    name: str
    wdir: str  # the stage's working directory, relative to the repository
    outs: list[str]
    points: int = 0
    seconds: float = 0.0
    kill_after_s: float = 0.0  # the ``time`` kill: half-way between the command's start and last write
    expected: dict[str, str] = field(default_factory=dict)  # the uninterrupted run's outputs
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)  # ... and registry aliases after it
    outcomes: list[dict[str, Any]] = field(default_factory=list)


def _env(log: Path | None, pause: int | None = None) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop(LOG_ENV, None)
    env.pop(PAUSE_ENV, None)
    if log is not None:
        env[LOG_ENV] = str(log)
    if pause is not None:
        env[PAUSE_ENV] = str(pause)
    return env


def _repro(repo: Path, stage: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "dvc"), "repro", "-s", stage],
        cwd=repo,
        env=env,
        stdout=open(repo.parent / f"{repo.name}-{stage}.out", "ab"),  # noqa: SIM115 (closed with the process)
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: DVC, the stage and the stage's workers
    )


def _finish(repo: Path, stage: str, log: Path | None = None) -> tuple[float, float]:
    """Run to the end; the seconds it took, and the Unix time it was launched at."""
    launched, begin = time.time(), time.perf_counter()
    process = _repro(repo, stage, _env(log))
    code = process.wait(timeout=900)
    seconds = time.perf_counter() - begin
    output = (repo.parent / f"{repo.name}-{stage}.out").read_text(errors="replace")
    assert code == 0, f"dvc repro -s {stage} in {repo.name} failed:\n{output[-4000:]}"
    return seconds, launched


def _lines(log: Path, kind: str) -> list[list[str]]:
    """The log's ``kind`` lines as ``[kind, time, pid, name]``."""
    text = log.read_text() if log.is_file() else ""
    return [line.split(maxsplit=3) for line in text.splitlines() if line.startswith(kind)]


def _kill(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)


def _visible(path: Path, root: Path) -> bool:
    return not any(part.startswith(".") for part in path.relative_to(root).parts)


def _files(repo: Path, stage: Stage) -> dict[str, Path]:
    """Every visible file of the stage's outputs, by path relative to the repository."""
    found: dict[str, Path] = {}
    for out in stage.outs:
        target = (repo / stage.wdir / out).resolve()
        candidates = [target] if target.is_file() else sorted(target.rglob("*")) if target.is_dir() else []
        for path in candidates:
            if path.is_file() and _visible(path, target.parent):
                found[str(path.relative_to(repo.resolve()))] = path
    return found


def _volatile(key: str) -> bool:
    return any(mark in key for mark in VOLATILE)


def whole(path: Path) -> bool:
    """The file reads as a whole file of its kind (a torn write would not)."""
    data = path.read_bytes()
    name = path.name
    try:
        if name.endswith((".json",)):
            json.loads(data)
        elif name.endswith((".yaml", ".yml")):
            yaml.safe_load(data)
        elif name.endswith((".npz", ".ckpt", ".pt2")) or zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return archive.testzip() is None
        elif name.endswith(".png"):
            return data.startswith(b"\x89PNG") and data.rstrip().endswith(b"IEND\xaeB`\x82")
        elif name.endswith(".gz"):
            import gzip

            gzip.decompress(data)
        elif name.endswith(".onnx"):
            import onnx

            onnx.load_from_string(data)
        elif name.endswith((".html",)):
            return data.rstrip().lower().endswith(b"</html>")
        elif name.endswith(".csv"):
            import pandas as pd

            pd.read_csv(io.BytesIO(data))
            return data.endswith(b"\n")
    except Exception:  # noqa: BLE001  (any parse error means a torn file)
        return False
    return True


MTIME = re.compile(rb"@\d{12,}")
"""A file's modification time in ns, as the manifests' stat fingerprints (``size@mtime_ns``) hold it."""


def _digest(path: Path, repo: Path) -> str:
    """sha256 of the file; text files with the repository's path and the source files' times masked
    (the manifests name absolute paths, and the two projects' generated files differ in time only)."""
    data = path.read_bytes()
    if path.suffix in (".csv", ".json", ".yaml", ".md"):
        data = MTIME.sub(b"@<mtime>", data.replace(str(repo.resolve()).encode(), b"<repo>"))
    return hashlib.sha256(data).hexdigest()


RUN_TIME = re.compile(r"\d{8}T\d{6}\.\d+Z")
"""The run time Great Expectations names its result files by."""


def _snapshot(repo: Path, stage: Stage) -> dict[str, str]:
    return {
        RUN_TIME.sub("<time>", key): ("volatile" if _volatile(key) else _digest(path, repo))
        for key, path in _files(repo, stage).items()
    }


def _lock_entry(repo: Path, stage: str) -> Any:
    lock = repo / "dvc.lock"
    return yaml.safe_load(lock.read_text())["stages"].get(stage) if lock.is_file() else None


def _lock_cut(repo: Path, stage: str, before: str | None) -> bool:
    """Whether ``dvc.lock`` was cut short while DVC rewrote it: it does not parse, or any stage but
    ``stage`` lost or changed its entry against ``before`` (the text before the attempt). DVC rewrites
    the whole file in place (``open(path, "w+")``, then the YAML dump: dvc/utils/serialize/_common.py),
    so a SIGKILL inside that write can cut it anywhere, a line boundary included; a user gets it back
    with ``git checkout dvc.lock`` (docs/decisions/0018-crash-consistency.md)."""
    lock = repo / "dvc.lock"
    if not lock.is_file() or before is None:
        return False
    try:
        data = yaml.safe_load(lock.read_text())
    except yaml.YAMLError:
        return True
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        return True
    old = (yaml.safe_load(before) or {}).get("stages", {})
    now = data["stages"]
    return any(now.get(name) != entry for name, entry in old.items() if name != stage)


def _registry(repo: Path) -> tuple[dict[str, dict[str, str]], set[str], list[str]]:
    """Aliases by model, the versions' ``name/number``, and the RUNNING runs of the project's store.

    Read with sqlite3, not an MLflow client: MLflow keeps one SQLAlchemy engine per store URI in this
    process, and after ``_restore`` replaces the database file its pooled connection reads the old one.
    """
    import sqlite3

    db = repo / "mlruns" / "mlflow.db"
    if not db.is_file():
        return {}, set(), []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        aliases: dict[str, dict[str, str]] = {}
        for name, alias, version in connection.execute(
            "SELECT name, alias, version FROM registered_model_aliases"
        ):
            aliases.setdefault(name, {})[alias] = str(version)
        for (name,) in connection.execute("SELECT name FROM registered_models"):
            aliases.setdefault(name, {})
        versions = {f"{n}/{v}" for n, v in connection.execute("SELECT name, version FROM model_versions")}
        running = [
            r
            for (r,) in connection.execute(
                "SELECT run_uuid FROM runs WHERE status = 'RUNNING' AND lifecycle_stage = 'active'"
            )
        ]
    return aliases, versions, running


def _reference(ref: Path, name: str, log: Path) -> Stage:
    """Run ``name`` uninterrupted in the reference project; what the killed project is compared with."""
    seconds, launched = _finish(ref, name, log)
    stage = _stage(ref, name)
    writes, starts = _lines(log, WRITE), _lines(log, START)
    stage.points, stage.seconds = len(writes), seconds
    begin = float(starts[0][1]) - launched
    end = float(writes[-1][1]) - launched if writes else seconds
    stage.kill_after_s = begin + 0.5 * (end - begin)
    stage.expected = _snapshot(ref, stage)
    stage.aliases, _, running = _registry(ref)
    assert running == [], f"{name}: the uninterrupted run left MLflow runs RUNNING: {running}"
    return stage


def _check_after_kill(repo: Path, stage: Stage, before: dict[str, str], lock: Any, registry: Any) -> int:
    """The invariants a SIGKILL must leave; returns the number of visible output files checked."""
    expected = stage.expected
    files = _files(repo, stage)
    for key, path in files.items():
        assert whole(path), f"{stage.name}: {key} is visible but not a whole file"
        if _volatile(key):
            continue
        digest = _digest(path, repo)
        assert digest in (before.get(key), expected.get(key)), (
            f"{stage.name}: {key} is neither the version before the kill nor the uninterrupted run's"
        )
    if _lock_entry(repo, stage.name) != lock:  # killed after the stage, while DVC recorded it: then
        status = subprocess.run(  # the lock must describe the outputs now there, as a finished run's does
            [str(BIN / "dvc"), "status", stage.name], cwd=repo, env=_env(None), capture_output=True, text=True
        )
        assert "changed" not in status.stdout, (
            f"{stage.name}: dvc.lock does not match its outputs:\n{status.stdout}"
        )
    aliases, versions, _ = _registry(repo)
    old_aliases, old_versions, _ = registry
    for model, named in aliases.items():
        before = old_aliases.get(model, {})
        for alias, version in named.items():
            allowed = {before.get(alias)}  # where it was,
            if alias == "champion":
                allowed.add(before.get("challenger"))  # the one promotion the killed stage could make,
            assert version in allowed or f"{model}/{version}" not in old_versions, (  # or a new version
                f"{stage.name}: alias {model}@{alias} moved to version {version}, "
                f"neither {sorted(map(str, allowed))} nor a version the killed run registered"
            )
    return len(files)


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    params = apply_overrides(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    ref = dvc_support.dvc_repo(tmp_path_factory.mktemp("reference"), params)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    dvc_support.run([*git, "add", "-A"], ref)
    dvc_support.run([*git, "commit", "-qm", "project"], ref)
    work = tmp_path_factory.mktemp("killed") / "repo"
    shutil.copytree(ref, work, symlinks=True)
    return ref, work


def _stage(repo: Path, name: str) -> Stage:
    entry = _lock_entry(repo, name)
    wdir = "data" if name.split("@")[0] in ("source", "ingest") else "."
    return Stage(name, wdir, [out["path"] for out in entry.get("outs", [])])


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_every_stage_survives_sigkill_at_its_writes_and_reruns_to_the_same_outputs(
    projects: tuple[Path, Path], tmp_path: Path
) -> None:
    ref, work = projects
    table: list[dict[str, Any]] = []
    # The reference project runs ahead in a thread (one stage at a time, in order) while this one kills.
    with ThreadPoolExecutor(max_workers=1) as ahead:
        references = [ahead.submit(_reference, ref, name, tmp_path / f"ref-{name}.log") for name in STAGES]
        for future in references:
            _kill_and_rerun(future.result(), work, ref, tmp_path, table)
    out = os.environ.get("TUMORSEG_RELIABILITY_OUT")
    if out:
        Path(out).write_text(json.dumps(table, indent=1) + "\n")


def _attempt(stage: Stage, work: Path, kill: str, pause: int | None, log: Path) -> None:
    """Start ``stage`` in ``work``, SIGKILL it at write point ``pause`` (or by time), check what it left."""
    name = stage.name
    before, lock, registry = _snapshot(work, stage), _lock_entry(work, name), _registry(work)
    lock_text = (work / "dvc.lock").read_text() if (work / "dvc.lock").is_file() else None
    process = _repro(work, name, _env(log, pause))
    killed_at = None
    deadline = time.monotonic() + (600 if pause else stage.kill_after_s)
    while time.monotonic() < deadline and process.poll() is None:
        if pause and _lines(log, PAUSED):
            killed_at = _lines(log, PAUSED)[0][3]
            break
        time.sleep(0.02)
    finished = process.poll() is not None
    _kill(process)
    if pause and not finished:
        assert killed_at is not None, f"{name}: write point {pause} not reached in 600 s"
    cut = _lock_cut(work, name, lock_text)
    if cut:  # only a kill by time can land inside DVC's own write of dvc.lock, after the stage's writes
        assert not pause and not finished and lock_text is not None, f"{name}: dvc.lock cut short"
        after = _snapshot(work, stage)  # DVC records a stage once it has finished: its outputs are whole
        stale = [k for k, v in after.items() if v != "volatile" and v != stage.expected.get(k)]
        assert not stale, f"{name}: dvc.lock cut short before the stage finished its outputs: {stale}"
        (work / "dvc.lock").write_text(lock_text)  # what `git checkout dvc.lock` gives the user back
    checked = _check_after_kill(work, stage, before, lock, registry)
    at = killed_at or ("finished first" if finished else f"{stage.kill_after_s:.1f} s")
    if cut:
        at += " (inside DVC's write of dvc.lock: it was cut short and checked out again)"
    stage.outcomes.append({"kill": kill, "at": at, "files_checked": checked})


def _restore(pristine: Path, work: Path) -> None:
    shutil.rmtree(work)
    shutil.copytree(pristine, work, symlinks=True)


def _kill_and_rerun(stage: Stage, work: Path, ref: Path, tmp_path: Path, table: list[dict[str, Any]]) -> None:
    """Every kill point of ``stage`` in ``work``, the checks after each, then the run to the end.

    ``make reliability`` first kills the stage at each of its write points in turn, each time from
    the state before the stage (restored from a copy); then, as ``make test`` does, ``last``, ``first``
    and ``time`` one after the other, each from what the previous kill left."""
    name = stage.name
    if FULL and stage.points:
        pristine = tmp_path / "pristine"
        shutil.rmtree(pristine, ignore_errors=True)
        shutil.copytree(work, pristine, symlinks=True)
        for point in range(1, stage.points + 1):
            _attempt(stage, work, f"write {point}", point, tmp_path / f"{name}-write-{point}.log")
            _restore(pristine, work)
    kills = KILLS if FULL or name not in COVERED_ELSEWHERE else ()
    for kill in kills:
        if kill != "time" and stage.points == 0:
            continue
        pause = {"last": stage.points, "first": 1}.get(kill)
        _attempt(stage, work, kill, pause, tmp_path / f"{name}-{kill}.log")
    _finish(work, name)
    assert _snapshot(work, stage) == stage.expected, f"{name}: the rerun's outputs differ"
    for key, path in _files(work, stage).items():
        assert whole(path), key
    aliases, _, running = _registry(work)
    assert running == [], f"{name}: MLflow runs left RUNNING: {running}"
    assert {m: sorted(a) for m, a in aliases.items()} == {m: sorted(a) for m, a in stage.aliases.items()}
    table.append(
        {
            "stage": name,
            "write_points": stage.points,
            "seconds": round(stage.seconds, 1),
            "kills": stage.outcomes,
            "rerun_identical": True,
        }
    )
