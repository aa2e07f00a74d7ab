"""The HTTP service: ``POST /predict`` for one 3-D case, DICOM study or 2-D image, a browser viewer, health
and docs.

Models load through :mod:`tumorseg.registry.loading` and predict with :mod:`tumorseg.models.predictor`,
so a served segmentation is byte-for-byte the CLI's. Every error is JSON ``{"error": "<one line>"}``;
routes live in :mod:`.predict_routes` and :mod:`.viewer_routes`, the state in :mod:`.service`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

# FastAPI resolves endpoint annotations from this module's globals, so its names are imported here.
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from tumorseg.serving.auth import AuditLog, Gatekeeper, TokenStore, is_loopback
from tumorseg.serving.error_handlers import add_error_handlers
from tumorseg.serving.limits import RequestLimits
from tumorseg.serving.predict_routes import add_demo_routes, add_predict_route
from tumorseg.serving.service import (
    PlanarSlot,
    ServeSettings,
    Service,
    describe_model,
    load_planar_slot,
    service_of,
)
from tumorseg.serving.viewer_routes import add_case_routes, add_ground_truth_route

__all__ = ["ServeSettings", "Service", "create_app", "describe_model", "fastapi_app", "serve"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- application
def create_app(settings: ServeSettings, *, loaded_model: Any = None, planar: PlanarSlot | None = None) -> Any:
    """Build the ASGI application, wrapped in :class:`~tumorseg.serving.limits.RequestLimits` and, outside
    it, :class:`~tumorseg.serving.auth.Gatekeeper` (bearer tokens, the audit log).

    ``loaded_model`` (a :class:`~tumorseg.registry.loading.LoadedModel`) and ``planar`` are served
    instead of loading ``settings.model_uri`` / ``settings.model_2d`` (``serve()`` loads them first).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """Load the models (the 2-D one on a threadpool thread: it may download) and build the
        :class:`Service` at start; close it at stop."""
        from tumorseg.registry.loading import load_model

        loaded = loaded_model or load_model(settings.model_uri, tracking_uri=settings.tracking_uri)
        slot = planar or await run_in_threadpool(load_planar_slot, settings.model_2d, settings.tracking_uri)
        service = Service(settings, loaded, slot)
        app.state.service = service
        log.info("serving %s", service.model_info["description"])
        try:
            yield
        finally:
            service.close()

    app = FastAPI(
        title="tumorseg",
        summary="Brain-tumour segmentation of BraTS-style MRI (T1, T1ce, T2, FLAIR)",
        version=_package_version(),
        lifespan=lifespan,
    )
    static_dir = Path(str(resources.files("tumorseg.serving") / "static"))
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    add_error_handlers(app)
    for add_routes in (add_predict_route, add_demo_routes, add_case_routes, add_ground_truth_route):
        add_routes(app)  # in the order the docs list them
    _add_health_routes(app, static_dir)
    from tumorseg.serving.shadow import PauseShadowWhileServing

    limited = RequestLimits(
        PauseShadowWhileServing(app, app),
        max_body_bytes=settings.serve.max_upload_bytes,
        timeout_s=settings.serve.request_timeout_s,
    )
    cfg = settings.serve
    audit = (
        AuditLog(cfg.audit_log, int(cfg.audit_max_mb * 2**20), cfg.audit_backups) if cfg.audit_log else None
    )
    # outermost: a request without a valid token is answered before its body is read
    return Gatekeeper(
        limited, store=TokenStore(cfg.tokens_file), audit=audit, max_failures=cfg.auth_max_failures
    )


def fastapi_app(asgi: Any) -> FastAPI:
    """The FastAPI application inside :func:`create_app`'s middleware."""
    while not isinstance(asgi, FastAPI):
        asgi = asgi.app
    return asgi


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
            "drift": service.drift.counts() if service.drift is not None else None,
            "drift_2d": service.planar_drift.counts() if service.planar_drift is not None else None,
            "shadow": service.shadow.info() if service.shadow is not None else None,
            "dicom": service.brain.info(),
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


def serve(
    settings: ServeSettings, *, host: str | None = None, port: int | None = None, insecure: bool = False
) -> None:
    """Run the service with uvicorn until interrupted (``tumorseg serve``).

    The models load before the server binds its port, so a wrong ``--model`` is the CLI's one-line
    :class:`~tumorseg.errors.DataError` rather than a failed ASGI start-up. Without tokens it binds
    loopback only, unless ``insecure``.
    """
    import uvicorn

    from tumorseg.errors import DataError
    from tumorseg.registry.loading import load_model, prepare_mlflow

    bind = host or settings.serve.host
    tokens = TokenStore(settings.serve.tokens_file).entries()
    if not tokens and not is_loopback(bind):
        if not insecure:
            raise DataError(
                f"--host {bind}: no tokens in {settings.serve.tokens_file}, so anyone who reaches the port could "
                "upload scans and read results; run `tumorseg token create NAME` first (or pass --insecure)"
            )
        log.warning("serving on %s without authentication (--insecure)", bind)
    elif not tokens:  # loopback: only this machine's users reach it
        log.info("no tokens in %s: serving %s without authentication", settings.serve.tokens_file, bind)

    prepare_mlflow()
    os.environ.setdefault("MPLBACKEND", "Agg")
    loaded = load_model(settings.model_uri, tracking_uri=settings.tracking_uri)
    planar = load_planar_slot(settings.model_2d, settings.tracking_uri)
    uvicorn.run(
        create_app(settings, loaded_model=loaded, planar=planar),
        host=bind,
        port=port or settings.serve.port,
        log_level="info",
        timeout_graceful_shutdown=10,
    )
