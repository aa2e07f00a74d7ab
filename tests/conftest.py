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
