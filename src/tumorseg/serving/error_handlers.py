"""Every error the service answers, as one line of JSON: ``{"error": "<what went wrong, what to do>"}``.

User errors keep their status (422 by default), the server's temp folders scrubbed from the message; a
full pool is 503 with ``Retry-After``; anything unexpected a logged 500 naming only the exception type.
"""

from __future__ import annotations

import logging

# FastAPI resolves handler annotations from this module's globals, so its names are imported here.
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tumorseg.errors import TumorsegError
from tumorseg.serving.limits import PoolBusy
from tumorseg.serving.service import service_of

# One logger name for the whole service, whichever module logs.
log = logging.getLogger("tumorseg.serving.app")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The service's one error shape: ``{"error": message}`` with ``status`` (and ``headers``)."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into :func:`error_response`'s JSON."""

    @app.exception_handler(TumorsegError)
    async def _user_error(request: Request, exc: TumorsegError) -> JSONResponse:
        status = getattr(exc, "status_code", 422)
        return error_response(status, service_of(request).scrub(str(exc)))

    @app.exception_handler(PoolBusy)
    async def _busy(request: Request, exc: PoolBusy) -> JSONResponse:
        pool = service_of(request).pool
        return error_response(
            503,
            f"server busy: {pool.pending} predictions running or queued (serve.workers + serve.queue_size); "
            "retry shortly",
            {"Retry-After": "5"},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        hint = (
            "; send the case's modality files or one .zip as multipart field 'files'"
            if where.startswith("files")
            else ""
        )
        return error_response(422, f"{where or 'request'}: {first.get('msg', 'invalid')}{hint}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in detail:
            detail = "request body: not a readable multipart form; send the files as multipart/form-data field 'files'"
        return error_response(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error ({type(exc).__name__}); the server log has the details")
