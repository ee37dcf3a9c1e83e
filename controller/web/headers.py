"""Security headers on every dashboard answer.

The pages load scripts and styles only from the dashboard itself (no
inline script: dashboard.js is a file), cannot be framed by another site,
and are never cached, since each shows one user's view at one moment.
Cookies set over TLS (the request's scheme is https, as uvicorn reports it
when it serves TLS itself or trusts a proxy's headers) are marked
``Secure``, so the browser never sends them over plain HTTP; a setting can
ask for that on every answer.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _secure(cookie: bytes) -> bytes:
    attributes = {a.strip().split(b"=")[0].lower() for a in cookie.split(b";")[1:]}
    return cookie if b"secure" in attributes else cookie + b"; Secure"


class SecurityHeaders:
    """ASGI middleware adding HEADERS, ``Cache-Control: no-store`` outside ``static_prefix``,
    and ``Secure`` to every cookie set over https (or always, with ``secure_cookies``)."""

    def __init__(self, app: ASGIApp, static_prefix: str = "/static/", secure_cookies: bool = False) -> None:
        self.app = app
        self.static_prefix = static_prefix
        self.secure_cookies = secure_cookies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root = str(scope.get("root_path", ""))
        path = str(scope.get("path", ""))
        static = path[len(root):].startswith(self.static_prefix) if path.startswith(root) else False
        secure = self.secure_cookies or scope.get("scheme") == "https"

        async def add_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers.setdefault(name, value)
                if not static:
                    headers["Cache-Control"] = "no-store"
                if secure:
                    message["headers"] = [(k, _secure(v) if k.lower() == b"set-cookie" else v)
                                          for k, v in message["headers"]]
            await send(message)

        await self.app(scope, receive, add_headers)
