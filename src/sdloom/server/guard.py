"""The server's outer edge, before any route: the Host check, HTTP basic auth, the request body
limit, and the last word on failures (a JSON 500 with no traceback or path).

One ASGI middleware, so it covers every route, the OpenAPI pages and unknown paths alike.
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
from collections.abc import Iterable

from starlette.exceptions import HTTPException

from ..errors import SdloomError

log = logging.getLogger("sdloom.server")


def error_body(error: str, message: str) -> dict[str, str]:
    """A1111's error body (modules/api/api.py api_middleware). The text is made encodable, so
    a message quoting bad input can never break the response itself."""
    text = str(message).encode("utf-8", "replace").decode("utf-8")
    return {"error": error, "detail": text, "body": text, "errors": text}


def parse_users(spec: str) -> list[tuple[bytes, bytes]]:
    """`--api-auth u1:p1,u2:p2` (A1111's format) → (user, password) pairs as UTF-8 bytes."""
    users = []
    for item in spec.split(","):
        user, sep, pw = item.strip().partition(":")
        if not sep or not user:
            raise SdloomError("--api-auth takes USER:PASS, or several as U1:P1,U2:P2")
        users.append((user.encode("utf-8"), pw.encode("utf-8")))
    return users


def host_name(value: str) -> str:
    """The host of a Host header, without the port: `[::1]:7860` → `[::1]`."""
    v = value.strip().lower()
    if v.startswith("["):
        return v[:v.find("]") + 1] if "]" in v else v
    return v.rsplit(":", 1)[0] if ":" in v else v


class BodyTooLarge(HTTPException):
    """Raised from `receive` once a streamed body passes the limit. An HTTPException, so the
    request-parsing code passes it on untouched (FastAPI turns other errors there into 400)."""


class Guard:
    """ASGI middleware: Host allow-list, basic auth on every path, body size limit, JSON 500."""

    def __init__(self, app, *, max_body: int, users: list[tuple[bytes, bytes]] | None = None,
                 allowed_hosts: Iterable[str] | None = None):
        self.app, self.max_body, self.users = app, max_body, users
        self.hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        if self.hosts is not None and "*" not in self.hosts \
                and host_name(headers.get("host", "")) not in self.hosts:
            # DNS rebinding: a page on evil.example resolving to 127.0.0.1 sends Host: evil…
            await _send(send, 400, error_body("HTTPException", "Invalid host header"))
            return
        if self.users is not None and not self._authorized(headers.get("authorization", "")):
            await _send(send, 401, error_body("HTTPException", "Incorrect username or password"),
                        [(b"www-authenticate", b'Basic realm="sdloom"')])
            return
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                await _send(send, 400, error_body("HTTPException", "Invalid Content-Length"))
                return
            if too_big:
                await _send(send, 413, error_body("LimitError", self._over()))
                return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(413, self._over())
            return message

        started = False

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as e:
            if not started:
                await _send(send, 413, error_body("LimitError", e.detail))
        except Exception:  # a bug, not bad input: logged here, never shown to the client
            log.exception("unexpected error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send(send, 500, error_body(
                    "InternalError", "internal server error; the server log has the details"))

    def _over(self) -> str:
        return f"request body is over the limit max_body_bytes={self.max_body}"

    def _authorized(self, header: str) -> bool:
        """Constant-time: every configured user is compared, whether the name given exists or
        not, and on bytes, so non-ASCII names and passwords work."""
        scheme, _, token = header.partition(" ")
        given_user, given_pw = b"", b""
        if scheme.lower() == "basic":
            try:
                raw = base64.b64decode(token.strip().encode("latin-1"), validate=True)
            except (binascii.Error, ValueError, UnicodeEncodeError):
                raw = b""
            given_user, _, given_pw = raw.partition(b":")
        ok = False
        for user, pw in self.users or []:
            ok |= secrets.compare_digest(given_user, user) & secrets.compare_digest(given_pw, pw)
        return ok and bool(given_user)


async def _send(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode())] + (headers or [])})
    await send({"type": "http.response.body", "body": data})
