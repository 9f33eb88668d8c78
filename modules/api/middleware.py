"""ASGI middleware of the server's edge: the request-size limit (413) and the `--api-log` request log."""
from __future__ import annotations

import logging
import time
from typing import Callable

from modules.api.auth import error_json

log = logging.getLogger("webui.api")


class BodySizeLimitMiddleware:
    """Refuses a request body over `limit()` bytes with 413, before the route reads it all into memory.

    The limit is read per request (it is a setting). A declared Content-Length over the limit is refused at
    once; a chunked body is counted as it streams and refused as soon as it passes the limit.
    """

    def __init__(self, app, limit: Callable[[], int]):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        declared = None
        for key, value in scope.get("headers") or ():
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
        if declared is not None and declared > limit:
            return await self._refuse(send, limit)
        received = 0
        started = refused = False

        async def counting_receive():
            # Past the limit the 413 goes out at once and the app is told the client left, so it stops
            # reading; whatever it answers after that is dropped (frameworks turn an exception raised
            # here into their own 400, hence no exception).
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await self._refuse(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:
                raise

    @staticmethod
    async def _refuse(send, limit: int):
        body = error_json(413, f"request body too large: the limit is {limit // 2**20} MB (setting api_max_request_mb)")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


class ApiLogMiddleware:
    """`--api-log`: one line per API request: method, path, status, client address, duration."""

    def __init__(self, app, prefixes: tuple[str, ...] = ("/sdapi/", "/internal/")):
        self.app = app
        self.prefixes = prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope.get("path", "").startswith(self.prefixes):
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client sees when the app fails before answering

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            client = scope.get("client")
            where = f"{client[0]}:{client[1]}" if client else "-"
            log.info("API %s %s %d client=%s %.3fs", scope.get("method"), scope.get("path"), status, where,
                     time.perf_counter() - started)


def install_edge_middleware(app, *, authenticator, api_log: bool, cors_origins: str | None,
                            max_request_bytes: Callable[[], int]) -> None:
    """Wraps the app, outermost first: CORS (only with --cors-allow-origins), the --api-log line, the 413
    size limit, then auth. Starlette runs the middleware added last first, hence the order below."""
    from modules.api.auth import AuthMiddleware
    app.add_middleware(AuthMiddleware, authenticator=authenticator)
    app.add_middleware(BodySizeLimitMiddleware, limit=max_request_bytes)
    if api_log:
        app.add_middleware(ApiLogMiddleware)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        # CORS answers browsers' preflight requests before auth sees them (a preflight carries no credentials)
        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in cors_origins.split(",") if o.strip()],
                           allow_methods=["*"], allow_headers=["*"], allow_credentials=True)
