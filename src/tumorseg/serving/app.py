"""The HTTP service: ``POST /predict`` for one case, a browser viewer, health and OpenAPI docs.

``create_app(settings)`` builds the FastAPI application; nothing happens at import time. The model
is loaded once, when the application starts (FastAPI lifespan), with
:func:`tumorseg.registry.loading.load_model` (checkpoint, MLflow model folder, ``models:/`` or
``runs:/`` URI, ONNX edge variants alike), and wrapped in the same
:class:`~tumorseg.models.predictor.SegmentationPredictor` ``tumorseg predict`` uses, so a served
segmentation is byte-for-byte the CLI's: same preprocessing, sliding window, post-processing, the
input's geometry and label convention.

A 2-D model (``serve.model_2d``, ``--model-2d``; :mod:`tumorseg.serving.planar`) is loaded too
when it can be; without it the service runs for 3-D cases and 2-D uploads get 503.

Endpoints:

- ``GET /health``: the models (name, version, alias, origin, and the 3-D model's ``label_set``: its
  train regions with internal codes, caption and overlay colour, which the viewer draws; ``model_2d``
  says why it is missing) and the queue.
- ``POST /predict``: multipart field ``files``: the modality files of one 3-D case or one ``.zip``;
  ``?format=nifti`` (default) returns ``<case_id>.nii.gz``; ``json`` the tumour volumes per train
  region of the model's label set (WT, TC, ET for glioma; RC or CC too for the 2024 label sets);
  ``viewer`` also keeps the case for the viewer and returns its id. Or one 2-D image (``.mat``,
  ``.png``, ``.jpg``/``.jpeg``, ``.tif``, ``.bmp``): ``?format=png`` (default) returns
  ``<case_id>_mask.png`` (0/255, the input's size); ``json`` the tumour probability, yes/no, type
  and area (``?pixel_size_mm=`` adds mm²); ``viewer`` keeps it for the viewer.
- ``GET /demo``, ``POST /demo/{case_id}``: synthetic demo cases generated at start-up.
- ``GET /cases/{id}``, ``GET /cases/{id}/slice``, ``GET /cases/{id}/segmentation``,
  ``POST /cases/{id}/ground-truth``: what the viewer page (``GET /``) draws.
- ``/docs``: OpenAPI.

Every error is JSON ``{"error": "<one line naming the file or field and what to do>"}``: upload
problems are 400 or 413, unreadable cases 422, a full queue 503, a request over the time limit
504, a 2-D upload without a 2-D model 503. Uploads go into a private per-request folder (mode 0700)
that is removed when the request ends, and only NIfTI, ``dataset.json``, zip archives, MATLAB
slices and images are read (nothing is unpickled).

This module assembles the application; the pieces live beside it, one concern each:
:mod:`~tumorseg.serving.service` (settings, the :class:`Service` state and its pool-thread jobs),
:mod:`~tumorseg.serving.error_handlers` (exceptions to one-line JSON),
:mod:`~tumorseg.serving.predict_routes` (``/predict``, ``/demo``) and
:mod:`~tumorseg.serving.viewer_routes` (``/cases``). Their public names are importable from here too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

# FastAPI resolves endpoint annotations from this module's globals, so its names are imported here;
# this module is only imported by ``tumorseg serve`` and the tests, never at CLI parse time.
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from tumorseg.serving.error_handlers import add_error_handlers
from tumorseg.serving.limits import RequestLimits
from tumorseg.serving.planar import PlanarSlot, load_planar_slot
from tumorseg.serving.predict_routes import (
    FILES_HELP,
    FORMAT_HELP,
    PIXEL_SIZE_HELP,
    OutputFormat,
    add_demo_routes,
    add_predict_route,
)
from tumorseg.serving.service import DEMO_SEED, DemoCases, ServeSettings, Service, describe_model, service_of
from tumorseg.serving.viewer_routes import (
    CaseNotFound,
    Modality,
    PlaneName,
    add_case_routes,
    add_ground_truth_route,
)

# The names this module has always offered, wherever they are defined now.
__all__ = [
    "DEMO_SEED",
    "FILES_HELP",
    "FORMAT_HELP",
    "PIXEL_SIZE_HELP",
    "CaseNotFound",
    "DemoCases",
    "Modality",
    "OutputFormat",
    "PlaneName",
    "ServeSettings",
    "Service",
    "create_app",
    "describe_model",
    "serve",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- application
def create_app(settings: ServeSettings, *, loaded_model: Any = None, planar: PlanarSlot | None = None) -> Any:
    """Build the FastAPI application (the models load when it starts, not here).

    The routes are registered group by group (errors, prediction, demo, viewer, health and page),
    in the order ``/docs`` lists them.

    Args:
        settings: from :meth:`ServeSettings.from_params`.
        loaded_model: an already loaded :class:`~tumorseg.registry.loading.LoadedModel` to serve
            instead of loading ``settings.model_uri`` (tests serve small in-memory networks).
        planar: the 2-D model slot to serve instead of loading ``settings.model_2d`` (``serve()``
            loads it before binding; tests pass small networks or an empty slot).

    Returns:
        The ASGI application, wrapped in :class:`~tumorseg.serving.limits.RequestLimits`.
    """
    static_dir = Path(str(resources.files("tumorseg.serving") / "static"))
    app = FastAPI(
        title="tumorseg",
        summary="Brain-tumour segmentation of BraTS-style MRI (T1, T1ce, T2, FLAIR)",
        version=_package_version(),
        lifespan=_lifespan(settings, loaded_model, planar),
    )
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    add_error_handlers(app)
    add_predict_route(app)
    add_demo_routes(app)
    add_case_routes(app)
    add_ground_truth_route(app)
    _add_health_routes(app, static_dir)
    return RequestLimits(
        app, max_body_bytes=settings.serve.max_upload_bytes, timeout_s=settings.serve.request_timeout_s
    )


def _lifespan(
    settings: ServeSettings, loaded_model: Any, planar: PlanarSlot | None
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: load the models and build the :class:`Service` at start, close it at stop.

    The 3-D model is ``loaded_model`` when given, else loaded from ``settings.model_uri``; the 2-D
    slot likewise (loaded on a threadpool thread, as it may download from the registry).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from tumorseg.registry.loading import load_model

        loaded = loaded_model or load_model(settings.model_uri, tracking_uri=settings.tracking_uri)
        slot = planar
        if slot is None:
            slot = await run_in_threadpool(load_planar_slot, settings.model_2d, settings.tracking_uri)
        service = Service(settings, loaded, slot)
        app.state.service = service
        log.info("serving %s", service.model_info["description"])
        try:
            yield
        finally:
            service.close()

    return lifespan


def _add_health_routes(app: FastAPI, static_dir: Path) -> None:
    """``GET /health`` (the models and the queue) and ``GET /``, the viewer page."""

    @app.get("/health", summary="Liveness and the served model")
    async def health(request: Request) -> dict[str, Any]:
        service = service_of(request)
        return {
            "status": "ok",
            "model": service.model_info,
            "model_2d": service.planar.info(),
            "pending": service.pool.pending,
            "workers": service.pool.workers,
            "uptime_s": round(time.time() - service.started, 1),
        }

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html", media_type="text/html")


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tumorseg")
    except PackageNotFoundError:
        return "0+unknown"


def serve(settings: ServeSettings, *, host: str | None = None, port: int | None = None) -> None:
    """Run the service with uvicorn until interrupted (``tumorseg serve``).

    The model is loaded here, before the server binds its port, so a wrong ``--model`` is the CLI's
    one-line error (exit 2) rather than a failed ASGI start-up; the app's lifespan then builds the
    predictor around it once. The 2-D model (``serve.model_2d``) is optional: when it cannot be
    loaded one warning is logged and the service starts for 3-D cases.

    Raises:
        DataError: the model cannot be loaded (no such file, alias or store).
    """
    import uvicorn

    from tumorseg.registry.loading import load_model, prepare_mlflow

    prepare_mlflow()
    os.environ.setdefault("MPLBACKEND", "Agg")
    loaded = load_model(settings.model_uri, tracking_uri=settings.tracking_uri)
    planar = load_planar_slot(settings.model_2d, settings.tracking_uri)
    uvicorn.run(
        create_app(settings, loaded_model=loaded, planar=planar),
        host=host or settings.serve.host,
        port=port or settings.serve.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
