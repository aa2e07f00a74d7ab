"""Suite-wide isolation.

``mlflow.set_tracking_uri`` sets a process-global URI *and* ``$MLFLOW_TRACKING_URI`` (for
subprocesses), so one test pointing MLflow at its temporary store would leak that store into every
later test that resolves its store from the environment (and, once the folder is gone, into
MLflow's default ``./mlruns``). Each test gets the URI and the variable it started with back.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest


def _tracking_uri_restored() -> Iterator[None]:
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    global_before = getattr(utils, "_tracking_uri", None)
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and utils._tracking_uri != global_before:
        utils.set_tracking_uri(global_before)  # None unsets the variable too
    if env_before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env_before


# Autouse fixtures run first within their scope, so the module-scoped one also undoes what
# module-scoped fixtures (a model trained once per module) set.
@pytest.fixture(autouse=True, scope="module")
def _module_keeps_mlflow_tracking_uri() -> Iterator[None]:
    yield from _tracking_uri_restored()


@pytest.fixture(autouse=True)
def _test_keeps_mlflow_tracking_uri() -> Iterator[None]:
    yield from _tracking_uri_restored()
