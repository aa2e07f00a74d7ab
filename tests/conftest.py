"""Suite-wide isolation.

``mlflow.set_tracking_uri`` sets a process-global URI *and* ``$MLFLOW_TRACKING_URI`` (for
subprocesses; ``set_registry_uri`` likewise with ``$MLFLOW_REGISTRY_URI``), so one test pointing MLflow at its temporary store would leak that store into every
later test that resolves its store from the environment (and, once the folder is gone, into
MLflow's default ``./mlruns``). Each test gets the URI and the variable it started with back.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest


def _tracking_uri_restored() -> Iterator[None]:
    from tumorseg.tracking import MLFLOW_URI_VARIABLES, environ_restored

    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    registry = sys.modules.get("mlflow.tracking._model_registry.utils")
    global_before = getattr(utils, "_tracking_uri", None)
    registry_before = getattr(registry, "_registry_uri", None)
    with environ_restored(MLFLOW_URI_VARIABLES):
        yield
        utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
        if utils is not None and utils._tracking_uri != global_before:
            utils.set_tracking_uri(global_before)  # None unsets the variable too
        registry = sys.modules.get("mlflow.tracking._model_registry.utils")
        if registry is not None:
            registry._registry_uri = registry_before


# Autouse fixtures run first within their scope, so the module-scoped one also undoes what
# module-scoped fixtures (a model trained once per module) set.
@pytest.fixture(autouse=True, scope="module")
def _module_keeps_mlflow_tracking_uri() -> Iterator[None]:
    yield from _tracking_uri_restored()


@pytest.fixture(autouse=True)
def _test_keeps_mlflow_tracking_uri() -> Iterator[None]:
    yield from _tracking_uri_restored()


@pytest.fixture(autouse=True, scope="session")
def _model_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Registered models resolved by the suite are cached under its temporary folder, not ``~/.cache``
    (subprocesses inherit the variable)."""
    import os

    from tumorseg.registry.loading import MODEL_CACHE_ENV

    before = os.environ.get(MODEL_CACHE_ENV)
    os.environ[MODEL_CACHE_ENV] = str(tmp_path_factory.mktemp("model-cache"))
    yield
    if before is None:
        os.environ.pop(MODEL_CACHE_ENV, None)
    else:
        os.environ[MODEL_CACHE_ENV] = before


# ---------------------------------------------------------------------------- the reliability table
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-out",
        metavar="FILE",
        help="write the README's reliability figures to FILE (JSON): the crash-consistency harness's kill "
        "points and reruns, and the distinct one-line errors (bad inputs) each command gave in this run",
    )


def pytest_configure(config: pytest.Config) -> None:
    import os
    import tempfile

    if config.getoption("--reliability-out", None):
        folder = tempfile.mkdtemp(prefix="tumorseg-reliability-")
        os.environ["TUMORSEG_ERROR_LOG"] = os.path.join(folder, "errors.jsonl")
        os.environ["TUMORSEG_RELIABILITY_OUT"] = os.path.join(folder, "crash.json")
        os.environ["TUMORSEG_CRASH_FULL"] = "1"  # every stage, 2-D included, with every kill point


def pytest_sessionfinish(session: pytest.Session) -> None:
    import json
    import os
    import platform
    from pathlib import Path

    out = session.config.getoption("--reliability-out", None)
    if not out or session.config.option.collectonly:
        return
    errors = Path(os.environ["TUMORSEG_ERROR_LOG"])
    crash = Path(os.environ["TUMORSEG_RELIABILITY_OUT"])
    distinct: dict[str, set[str]] = {}
    for line in errors.read_text().splitlines() if errors.is_file() else []:
        record = json.loads(line)
        distinct.setdefault(record["command"], set()).add(record["error"])
    report = {
        "command": "pytest --reliability-out=" + str(out),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "crash_consistency": json.loads(crash.read_text()) if crash.is_file() else None,
        "bad_inputs": {command: len(messages) for command, messages in sorted(distinct.items())},
    }
    Path(out).write_text(json.dumps(report, indent=1) + "\n")
    Path(out).with_suffix(".md").write_text(_reliability_markdown(report))


def _reliability_markdown(report: dict) -> str:
    """The README's two reliability tables from the JSON report."""
    lines = []
    crash = report["crash_consistency"]
    if crash:
        lines += [
            "| Stage | Write points | Kills (SIGKILL to the process group) | Rerun identical | Lost |",
            "|---|---:|---|---|---|",
        ]
        for stage in crash:
            each = [k for k in stage["kills"] if k["kill"].startswith("write ")]
            named = [k for k in stage["kills"] if not k["kill"].startswith("write ")]
            parts = (
                [f"each of its {len(each)} writes ({sum(k['files_checked'] for k in each)} files checked)"]
                if each
                else []
            )
            parts += [
                f"{k['kill']}: {k['at'].rsplit('/', 1)[-1]}"
                + (f" ({k['files_checked']} files checked)" if k["files_checked"] else "")
                for k in named
            ]
            identical = "yes" if stage["rerun_identical"] else "no"
            kills = "; ".join(parts) or "none (tested elsewhere)"
            lines.append(
                f"| `{stage['stage']}` | {stage['write_points']} | {kills} | {identical} | nothing |"
            )
        lines.append("")
    lines += ["| Command | Distinct bad inputs refused with a one-line error |", "|---|---:|"]
    lines += [f"| `tumorseg {command}` | {count} |" for command, count in report["bad_inputs"].items()]
    lines.append(f"| all commands | {sum(report['bad_inputs'].values())} |")
    return "\n".join(lines) + "\n"
