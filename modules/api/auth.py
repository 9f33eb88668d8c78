"""The one auth layer of the server: who the caller is (HTTP Basic or the UI's login cookie) and which paths need a login.

Every HTTP and websocket request passes through `AuthMiddleware`, which sits on the whole FastAPI app,
so a router added later (`app.include_router(...)` in create_app) is covered without doing anything:
with credentials configured, every path needs a login except the few the UI's login page itself needs
(`PUBLIC_PATHS`, `PUBLIC_PREFIXES`). A route that needs to know *who* calls (jobs belong to their caller)
declares `user: str | None = Depends(current_user)`.

Both credential sets (`--api-auth` and `--gradio-auth`) are accepted everywhere: as HTTP Basic on any
path, and through the UI's login form (Gradio's cookie). A Basic-authenticated request to a Gradio route
carries a Gradio session cookie for that user, so Gradio's own per-route checks see the same login.
"""
from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Callable

from starlette.requests import Request

USER_SCOPE_KEY = "webui.user"

# What the UI's login page loads before anyone has logged in. "/" and "/config" answer Gradio's login
# form (not the app) to a caller without a login; the rest are the page's static files and the login form.
PUBLIC_PATHS = frozenset({
    "/", "/login", "/login/", "/logout", "/config", "/config/", "/favicon.ico", "/theme.css", "/robots.txt",
    "/manifest.json", "/gradio_api/theme.css", "/gradio_api/login_check", "/gradio_api/login_check/",
})
PUBLIC_PREFIXES = ("/assets/", "/static/", "/svelte/", "/pwa_icon")
# Paths answered with an HTTP Basic challenge (scripts and the Swagger page), not the UI's login form.
API_PREFIXES = ("/sdapi/", "/internal/", "/docs", "/openapi.json")


def current_user(request: Request) -> str | None:
    """FastAPI dependency: the logged-in user name, or None when the server has no credentials."""
    return request.scope.get(USER_SCOPE_KEY)


class Authenticator:
    """Checks credentials from both flags; knows the UI's session cookies once the UI is mounted."""

    def __init__(self, api_credentials: dict[str, str], gradio_credentials: dict[str, str]):
        # The same user name in both sets with two passwords: either password logs that user in.
        self._passwords: dict[str, set[str]] = {}
        for creds in (api_credentials, gradio_credentials):
            for user, password in creds.items():
                self._passwords.setdefault(user, set()).add(password)
        self._gradio_app = None  # set by attach_gradio once the UI is mounted
        self._basic_tokens: dict[str, str] = {}  # user -> the Gradio session token minted for Basic callers

    @property
    def enabled(self) -> bool:
        return bool(self._passwords)

    def check_password(self, username: str, password: str) -> bool:
        """Constant-time check against every password the user has (also Gradio's login callback)."""
        ok = False
        for expected in self._passwords.get(username, ()):
            ok |= secrets.compare_digest(password.encode(), expected.encode())
        # compare against a dummy for unknown users, so timing does not reveal which names exist
        if username not in self._passwords:
            secrets.compare_digest(password.encode(), b"\0" * 16)
        return ok

    def attach_gradio(self, gradio_app) -> None:
        """Let the middleware read the UI's session cookies (Gradio's token table)."""
        self._gradio_app = gradio_app

    def user_from_basic(self, header: str | None) -> str | None:
        if not header or not header[:6].lower() == "basic ":
            return None
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return None
        username, sep, password = decoded.partition(":")
        if not sep:
            return None
        return username if self.check_password(username, password) else None

    def user_from_cookie(self, cookies: dict[str, str]) -> str | None:
        app = self._gradio_app
        if app is None:
            return None
        for name in (f"access-token-{app.cookie_id}", f"access-token-unsecure-{app.cookie_id}"):
            token = cookies.get(name)
            if token:
                user = app.tokens.get(token)
                if user is not None and user in self._passwords:
                    return user
        return None

    def gradio_cookie_for(self, user: str) -> str | None:
        """`name=token` of a Gradio session for `user` (reused per user), so Gradio's routes accept Basic."""
        app = self._gradio_app
        if app is None:
            return None
        token = self._basic_tokens.get(user)
        if token is None or app.tokens.get(token) != user:
            token = secrets.token_urlsafe(16)
            app.tokens[token] = user
            self._basic_tokens[user] = token
        return f"access-token-unsecure-{app.cookie_id}={token}"


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return None


def _cookies(scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in scope.get("headers") or ():
        if key == b"cookie":
            for part in value.decode("latin-1").split(";"):
                name, sep, val = part.strip().partition("=")
                if sep:
                    out[name] = val
    return out


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def error_json(status: int, detail: str) -> bytes:
    return json.dumps({"error": "HTTPException", "detail": detail, "body": None, "errors": None}).encode()


class AuthMiddleware:
    """ASGI middleware: identifies the caller on every request and refuses protected paths without a login."""

    def __init__(self, app, authenticator: Authenticator):
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        # A client could send this key in no way (it is not a header), but clear it to be sure nothing upstream set it.
        scope[USER_SCOPE_KEY] = None
        if not self.auth.enabled:
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        user = self.auth.user_from_basic(_header(scope, b"authorization"))
        via_basic = user is not None
        if user is None:
            user = self.auth.user_from_cookie(_cookies(scope))
        if user is not None:
            scope[USER_SCOPE_KEY] = user
            if via_basic and not path.startswith(API_PREFIXES):
                cookie = self.auth.gradio_cookie_for(user)
                if cookie:
                    scope["headers"] = [*scope["headers"], (b"cookie", cookie.encode("latin-1"))]
            return await self.app(scope, receive, send)
        if is_public(path):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = [(b"content-type", b"application/json")]
        if path.startswith(API_PREFIXES):
            headers.append((b"www-authenticate", b'Basic realm="Stable Diffusion studio"'))
        body = error_json(401, "Not authenticated: log in (HTTP Basic with a --api-auth or --gradio-auth user, "
                               "or the UI's login form)")
        await send({"type": "http.response.start", "status": 401,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def gradio_auth_callback(authenticator: Authenticator) -> Callable[[str, str], bool] | None:
    """Gradio's `auth=`: the UI login form accepts both credential sets."""
    return authenticator.check_password if authenticator.enabled else None


def mounted_gradio_app(app):
    """The Gradio app that gr.mount_gradio_app mounted on `app` (it holds the UI's session tokens)."""
    for route in app.routes:
        sub = getattr(route, "app", None)
        if sub is not None and hasattr(sub, "tokens") and hasattr(sub, "cookie_id"):
            return sub
    raise RuntimeError("no Gradio app is mounted")
