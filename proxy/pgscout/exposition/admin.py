"""The admin HTTP server and the routing of its requests.

Owns: a deliberately small HTTP/1.1 server (GET only, one request per connection, bounded request
size) that runs in the data-plane process, answers its own routes there (/healthz, /readyz, the
status page's files) and hands every other request to a `relay` (the analysis process answers
/metrics and /api); the optional bearer token on /metrics and /api/*, checked before anything is
relayed; and `Router`, the route table the analysis process answers relayed requests with.
Must not: compute observer state itself (handlers do) or run anything in threads.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import structlog

log = structlog.get_logger("pgscout.admin")

_MAX_REQUEST_HEAD = 16384
_READ_TIMEOUT = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}


class Response:
    __slots__ = ("status", "content_type", "body")

    def __init__(self, status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8"):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type


def json_response(data: object, status: int = 200) -> Response:
    return Response(status, json.dumps(data, default=str), "application/json")


Handler = Callable[[dict[str, list[str]]], Awaitable[Response]]
# (method, path, raw query string, headers with lower-cased names) -> Response
Relay = Callable[[str, str, str, dict[str, str]], Awaitable[Response]]


class Router:
    """Routes by path to registered GET handlers."""

    def __init__(self) -> None:
        self._routes: dict[str, tuple[Handler, bool]] = {}

    def route(self, path: str, handler: Handler, *, protected: bool) -> None:
        """Register a GET handler; protected routes need the bearer token when one is set."""
        self._routes[path] = (handler, protected)

    def get(self, path: str) -> tuple[Handler, bool] | None:
        return self._routes.get(path)

    async def respond(self, method: str, path: str, query: dict[str, list[str]],
                      headers: dict[str, str]) -> Response:
        route = self._routes.get(path)
        if route is None:
            return Response(404, f"no such endpoint: {path}\n")
        try:
            return await route[0](query)
        except Exception:
            log.exception("admin_handler_failed", path=path)
            return Response(500, "internal error\n")


class AdminServer(Router):
    def __init__(self, token: str = "", relay: Relay | None = None):
        super().__init__()
        self._token = token.encode()
        self._relay = relay
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            response = await self._respond(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (response.status, _REASONS[response.status].encode(),
                                                    response.content_type.encode(), len(response.body)))
        writer.write(response.body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def _respond(self, head: bytes) -> Response:
        if len(head) > _MAX_REQUEST_HEAD:
            return Response(400, "request head too large\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            return Response(400, "malformed request line\n")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return Response(405, "only GET is served\n")
        url = urlsplit(target)
        headers = _headers(lines[1:])
        route = self.get(url.path)
        if route is None and self._relay is None:
            return Response(404, f"no such endpoint: {url.path}\n")
        # Everything relayed is protected: it is the observation data.
        protected = route is None or route[1]
        if protected and self._token and not self._authorized(headers):
            return Response(401, "missing or wrong bearer token\n")
        if route is None:
            assert self._relay is not None
            return await self._relay(method, url.path, url.query, headers)
        return await self.respond(method, url.path, parse_qs(url.query), headers)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, credential = headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(),
                                                                  self._token)


def _headers(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers
