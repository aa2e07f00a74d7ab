"""Request limits that hold before any endpoint code runs, and the bounded inference pool.

:class:`RequestLimits` is plain ASGI (Starlette's ``BaseHTTPMiddleware`` buffers and cannot abort an
upload half-way): a body over ``serve.max_upload_mb`` is 413 as soon as ``Content-Length`` or the
streamed bytes cross it, a request over ``serve.request_timeout_s`` 504 (a running job finishes in its
thread). :class:`InferencePool` runs ``serve.workers`` threads, at most ``serve.queue_size`` waiting.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLarge(Exception):
    """Raised inside ``receive`` when the streamed body crosses the cap."""


class PoolBusy(Exception):
    """Every worker is busy and the queue is full."""


async def send_json(
    send: Send, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    """Answer with a JSON body directly on the ASGI channel."""
    body = json.dumps(payload).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """ASGI middleware: body size cap and wall-time cap per HTTP request (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s

    def _too_large(self) -> dict[str, str]:
        return {
            "error": f"request body: larger than {self.max_body_bytes / 2**20:.0f} MB (serve.max_upload_mb); "
            "upload one case, or raise the limit"
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await send_json(send, 413, self._too_large())
            return

        state = {"received": 0, "exceeded": False, "started": False}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    state["exceeded"] = True
                    raise _BodyTooLarge
            return message

        async def tracked_send(message: Message) -> None:
            if state["exceeded"]:
                return  # the app's own error for the aborted body is replaced by the 413 below
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, limited_receive, tracked_send), self.timeout_s)
        except _BodyTooLarge:
            pass
        except TimeoutError:
            if not state["started"]:
                message = (
                    f"request: not finished within {self.timeout_s:g} s (serve.request_timeout_s); "
                    "retry later, or raise the limit for large cases on CPU"
                )
                await send_json(send, 504, {"error": message})
            return
        if state["exceeded"] and not state["started"]:
            await send_json(send, 413, self._too_large())


class InferencePool:
    """``workers`` threads for predictions, at most ``queue_size`` jobs waiting (see the module docstring)."""

    def __init__(self, workers: int, queue_size: int) -> None:
        self.workers = workers
        self.capacity = workers + queue_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tumorseg-serve")
        self._lock = threading.Lock()
        self._pending = 0

    @property
    def pending(self) -> int:
        """Jobs running or waiting."""
        with self._lock:
            return self._pending

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue ``fn(*args)``; :class:`PoolBusy` when ``workers + queue_size`` jobs are already in."""
        with self._lock:
            if self._pending >= self.capacity:
                raise PoolBusy
            self._pending += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
