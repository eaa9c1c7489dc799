"""The admin HTTP server and the routing of its requests.

Owns: a deliberately small HTTP/1.1 server (one request per connection, bounded request size)
that runs in the data-plane process, answers its own routes there (/healthz, /readyz, the status
page's files) and hands every other request to a `relay` (the analysis process answers /metrics
and /api); the optional bearer token on protected and relayed routes (RFC 6750: a 401 names the
Bearer scheme in WWW-Authenticate), checked before anything is relayed; refusing cross-origin
POSTs, so a web page open in the operator's browser cannot reset pgscout; and `Router`, the route
table by path and method (GET, with HEAD answered from it without the body; POST for the few
routes that change state) with its periodic work (`every`), which the analysis process answers
relayed requests with.
Must not: compute observer state itself (handlers are functions of the Request returning a
Response), or run anything in threads.
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
_MAX_REQUEST_BODY = 65536
_READ_TIMEOUT = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Content Too Large", 500: "Internal Server Error",
            503: "Service Unavailable"}


class Request:
    """One parsed request: method, path, query (parse_qs form) and headers (lower-case names)."""

    __slots__ = ("method", "path", "query", "headers")

    def __init__(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]):
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers

    def header(self, name: str) -> str:
        return self.headers.get(name.lower(), "")


class Response:
    __slots__ = ("status", "content_type", "body", "headers")

    def __init__(self, status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
                 headers: tuple[tuple[str, str], ...] = ()):
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = headers


def json_response(data: object, status: int = 200) -> Response:
    return Response(status, json.dumps(data, default=str), "application/json")


Handler = Callable[[Request], Awaitable[Response]]
Relay = Callable[[Request], Awaitable[Response]]


class Router:
    """Routes a Request by path and method to its handler; runs the periodic work."""

    def __init__(self) -> None:
        self._routes: dict[str, dict[str, tuple[Handler, bool]]] = {}
        self._periodic: list[tuple[float, Callable[[], None]]] = []
        self._tasks: list[asyncio.Task] = []

    def every(self, seconds: float, work: Callable[[], None]) -> None:
        """Call `work` at start and then every `seconds` until stop()."""
        self._periodic.append((seconds, work))

    def route(self, path: str, handler: Handler, *, protected: bool, method: str = "GET") -> None:
        """Register a handler for `method` on `path`; protected routes need the bearer token when
        one is set. A GET route also answers HEAD."""
        self._routes.setdefault(path, {})[method] = (handler, protected)

    def start_periodic(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(_repeat(seconds, work)) for seconds, work in self._periodic]

    def stop_periodic(self) -> None:
        for task in self._tasks:
            task.cancel()

    def route_for(self, request: Request) -> tuple[Handler, bool] | Response | None:
        """The (handler, protected) for the request, a 405 naming what the path answers, or
        None when nothing is registered at the path."""
        methods = self._routes.get(request.path)
        if methods is None:
            return None
        route = methods.get("GET" if request.method == "HEAD" else request.method)
        if route is None:
            allowed = sorted({*methods, *(("HEAD",) if "GET" in methods else ())})
            return Response(405, f"{request.path} answers {', '.join(allowed)}\n",
                            headers=(("Allow", ", ".join(allowed)),))
        return route

    async def respond(self, request: Request) -> Response:
        """Answer a request whose credentials were already checked (the analysis process's
        entry point for relayed requests)."""
        route = self.route_for(request)
        if route is None:
            return Response(404, f"no such endpoint: {request.path}\n")
        if isinstance(route, Response):
            return route
        try:
            return await route[0](request)
        except Exception:
            log.exception("admin_handler_failed", path=request.path)
            return Response(500, "internal error\n")


class AdminServer(Router):
    def __init__(self, token: str = "", relay: Relay | None = None):
        super().__init__()
        self._token = token.encode()
        self._relay = relay
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        self.start_periodic()

    async def stop(self) -> None:
        self.stop_periodic()
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                request = _parse(head)
                if isinstance(request, Response):
                    response = request
                else:
                    response = await self._read_body(reader, request) or await self._respond(request)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        head_only = not isinstance(request, Response) and request.method == "HEAD"
        lines = [b"HTTP/1.1 %d %s" % (response.status, _REASONS[response.status].encode()),
                 b"Content-Type: " + response.content_type.encode(),
                 # HEAD announces the length the GET would send (RFC 9110, 9.3.2).
                 b"Content-Length: %d" % len(response.body)]
        lines += [f"{name}: {value}".encode("latin-1") for name, value in response.headers]
        writer.write(b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n")
        if not head_only:
            writer.write(response.body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, request: Request) -> Response | None:
        """Read (and drop: no handler takes a body) what a POST sends, so the client sees the
        answer instead of a reset."""
        length = request.header("content-length") or "0"
        if not length.isdigit():
            return Response(400, "invalid Content-Length\n")
        if int(length) > _MAX_REQUEST_BODY:
            return Response(413, "request body too large\n")
        await reader.readexactly(int(length))
        return None

    async def _respond(self, request: Request) -> Response:
        route = self.route_for(request)
        if route is None and self._relay is None:
            return Response(404, f"no such endpoint: {request.path}\n")
        if isinstance(route, Response):
            return route
        # Everything relayed is protected: it is the observation data.
        if (route is None or route[1]) and self._token:
            refusal = self._refuse_credentials(request)
            if refusal is not None:
                return refusal
        if request.method == "POST" and not _same_origin(request):
            return Response(403, "cross-origin POST refused\n")
        if route is None:
            assert self._relay is not None
            return await self._relay(request)
        return await self.respond(request)

    def _refuse_credentials(self, request: Request) -> Response | None:
        authorization = request.header("authorization")
        if not authorization:
            return Response(401, "this endpoint needs the admin token: Authorization: Bearer TOKEN\n",
                            headers=(("WWW-Authenticate", 'Bearer realm="pgscout"'),))
        scheme, _, credential = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self._token):
            return None
        return Response(401, "wrong bearer token\n", headers=(
            ("WWW-Authenticate", 'Bearer realm="pgscout", error="invalid_token"'),))


async def _repeat(seconds: float, work: Callable[[], None]) -> None:
    while True:
        try:
            work()
        except Exception:  # a bug in one sample must not end the sampling
            log.exception("admin_periodic_work_failed", work=getattr(work, "__qualname__", repr(work)))
        await asyncio.sleep(seconds)


def _parse(head: bytes) -> Request | Response:
    if len(head) > _MAX_REQUEST_HEAD:
        return Response(400, "request head too large\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return Response(400, "malformed request line\n")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    url = urlsplit(target)
    return Request(method, url.path, parse_qs(url.query), headers)


def _same_origin(request: Request) -> bool:
    """A browser names the page's origin on a POST; a script or curl sends none."""
    origin = request.header("origin")
    return not origin or urlsplit(origin).netloc == request.header("host")

