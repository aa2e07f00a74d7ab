"""Bearer tokens for ``tumorseg serve`` and the audit trail of its requests.

Tokens (``tumorseg token create NAME`` / ``revoke NAME`` / ``list``) are kept in ``serve.tokens_file``
(mode 0600) as a salted SHA-256 of their secret only: a token is ``tsg_<id>_<secret>``, 256 random
bits, so one hash suffices (a slow password hash protects guessable secrets; these are not). The
``id`` finds the entry; the hash is compared in constant time.

:class:`Gatekeeper` is plain ASGI around the application: every route but the open ones
(:data:`OPEN_PATHS`: liveness, the viewer's page and assets, the API docs) needs
``Authorization: Bearer <token>`` when tokens exist; a missing, malformed, wrong or revoked token is
401 with a JSON error, and a client address with too many failures in a minute is 429. Every request
to a closed route is one JSON line of the audit log (:class:`AuditLog`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tumorseg.errors import DataError
from tumorseg.serving.limits import ASGIApp, Message, Receive, Scope, Send, send_json

TOKEN = re.compile(r"^tsg_(?P<id>[0-9a-f]{12})_(?P<secret>[A-Za-z0-9_-]{43})$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
OPEN_PATHS = ("/health", "/", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")
OPEN_PREFIXES = ("/static/",)
AUDIT_KEY = "tumorseg.audit"
"""The scope key under which routes add what they know to the request's audit line."""


# ---------------------------------------------------------------------------- token store
@dataclass(frozen=True)
class TokenEntry:
    name: str
    token_id: str
    salt: str
    sha256: str
    created: str

    def matches(self, secret: str) -> bool:
        digest = hashlib.sha256(bytes.fromhex(self.salt) + secret.encode()).hexdigest()
        return hmac.compare_digest(digest, self.sha256)


class TokenStore:
    """The tokens file: ``{"tokens": [{name, token_id, salt, sha256, created}]}``, written atomically
    with mode 0600."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[TokenEntry]:
        try:
            raw = json.loads(self.path.read_text())
            entries = [TokenEntry(**entry) for entry in raw["tokens"]]
            for entry in entries:
                bytes.fromhex(entry.salt)
            return entries
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise DataError(
                f"{self.path}: cannot read the tokens file ({exc.strerror}); it must be readable by the user "
                "that serves (in Docker: the image's user `tumorseg`)"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"{self.path}: not a tumorseg tokens file ({type(exc).__name__}); remove it and create tokens again"
            ) from None

    def create(self, name: str) -> str:
        """A new token for ``name`` (the only time its secret is shown); DataError if the name is taken."""
        if not NAME.match(name):
            raise DataError(f"token name {name!r}: use 1-64 letters, digits, . _ @ - (it names the client)")
        entries = self.entries()
        if any(e.name == name for e in entries):
            raise DataError(f"token {name!r} exists in {self.path}; revoke it first or choose another name")
        token_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
        entry = TokenEntry(
            name=name,
            token_id=token_id,
            salt=salt.hex(),
            sha256=hashlib.sha256(salt + secret.encode()).hexdigest(),
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._write([*entries, entry])
        return f"tsg_{token_id}_{secret}"

    def revoke(self, name: str) -> None:
        entries = self.entries()
        kept = [e for e in entries if e.name != name]
        if len(kept) == len(entries):
            known = ", ".join(e.name for e in entries) or "none"
            raise DataError(f"no token named {name!r} in {self.path} (tokens: {known})")
        self._write(kept)

    def _write(self, entries: list[TokenEntry]) -> None:
        from tumorseg.data.manifest import atomic_output

        text = json.dumps({"tokens": [e.__dict__ for e in entries]}, indent=1) + "\n"
        with atomic_output(self.path) as tmp:  # mkstemp: created 0600, and kept so
            os.chmod(tmp, 0o600)
            tmp.write_text(text)

    def check(self, header: bytes | None) -> tuple[str | None, str | None]:
        """``(token name, None)`` for a valid ``Authorization`` header, else ``(None, why)``."""
        if not header:
            return (
                None,
                "missing bearer token: send 'Authorization: Bearer <token>' (tumorseg token create NAME)",
            )
        scheme, _, value = header.decode("latin-1").strip().partition(" ")
        match = TOKEN.match(value.strip())
        if scheme.lower() != "bearer" or match is None:
            return None, "malformed Authorization header: expected 'Bearer tsg_<id>_<secret>'"
        for entry in self.entries():  # read per request: a revoked token stops working at once
            if hmac.compare_digest(entry.token_id, match["id"]) and entry.matches(match["secret"]):
                return entry.name, None
        return None, "invalid or revoked token"


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- audit log
class AuditLog:
    """One JSON line per request, appended to ``path`` (opened, written and closed under a lock, so no
    file handle outlives a write) and rotated at ``max_bytes``: ``path.1`` .. ``path.<backups>`` kept."""

    def __init__(self, path: str | Path, max_bytes: int, backups: int) -> None:
        import threading

        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_file() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)

    def _rotate(self) -> None:
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.is_file():
                os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def hash_uploads(uploads: list[tuple[str, Any]]) -> list[dict[str, str]]:
    """sha256 of each uploaded file (read in 1 MiB blocks, then rewound for staging)."""
    hashes = []
    for name, fh in uploads:
        digest = hashlib.sha256()
        for block in iter(lambda f=fh: f.read(2**20), b""):
            digest.update(block)
        fh.seek(0)
        hashes.append({"name": Path(str(name)).name, "sha256": digest.hexdigest()})
    return hashes


# ---------------------------------------------------------------------------- the gate
class Gatekeeper:
    """ASGI middleware: bearer tokens on every closed route, failures rate-limited per client address,
    and an audit line per request (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: TokenStore | None,
        audit: AuditLog | None,
        max_failures: int = 10,
        window_s: float = 60.0,
    ) -> None:
        self.app, self.store, self.audit = app, store, audit
        self.max_failures, self.window_s = max_failures, window_s
        self.failures: dict[str, deque[float]] = {}
        self.required = False

    def _closed(self, path: str) -> bool:
        return path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)

    def _limited(self, client: str, now: float) -> bool:
        recent = self.failures.get(client)
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        if recent is not None and not recent:
            del self.failures[client]
        return recent is not None and len(recent) >= self.max_failures

    def _fail(self, client: str, now: float) -> None:
        if len(self.failures) > 100_000:  # addresses seen once, long ago: dropped first
            self.failures = {c: d for c, d in self.failures.items() if d and now - d[-1] <= self.window_s}
        self.failures.setdefault(client, deque()).append(now)

    def _authenticate(self, scope: Scope) -> tuple[str | None, str | None]:
        """The token's name, or why not. Once a token has existed, authentication stays required: a
        revoked last token or a missing file closes the routes, never opens them."""
        assert self.store is not None
        entries = self.store.entries()
        self.required = self.required or bool(entries)
        if not self.required:
            return "", None
        if not entries:
            return None, f"no valid token: {self.store.path} holds none; `tumorseg token create NAME`"
        return self.store.check(dict(scope.get("headers") or []).get(b"authorization"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._closed(scope["path"]):
            await self.app(scope, receive, send)
            return
        began = time.monotonic()
        client = (scope.get("client") or ("unknown", 0))[0]
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "client": client,
            "method": scope["method"],
            "route": scope["path"],
            "token": None,
        }
        scope[AUDIT_KEY] = record
        status = {"code": 500}

        async def noted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.store is not None:
                try:
                    name, why = self._authenticate(scope)
                except DataError as exc:  # an unreadable tokens file: nobody gets in, one line says why
                    logging.getLogger(__name__).error("%s", exc)
                    await send_json(noted_send, 503, {"error": str(exc)})
                    return
                if name is None:
                    if self._limited(client, began):
                        retry = f"{self.window_s:.0f}"
                        message = f"too many failed authentications from {client}; retry in {retry} s"
                        await send_json(noted_send, 429, {"error": message}, {"Retry-After": retry})
                        return
                    self._fail(client, began)
                    await send_json(noted_send, 401, {"error": why}, {"WWW-Authenticate": "Bearer"})
                    return
                record["token"] = name or None
            await self.app(scope, receive, noted_send)
        finally:
            if self.audit is not None:
                record["status"] = status["code"]
                record["duration_s"] = round(time.monotonic() - began, 3)
                service = getattr(getattr(scope.get("app"), "state", None), "service", None)
                if service is not None and "model" not in record:
                    info = service.model_info
                    record["model"] = {k: info.get(k) for k in ("name", "version", "alias")}
                self.audit.write(record)
