"""The status page: `/` and the files under `/static/`, served by the admin server.

Owns: registering the page and its static files (plain HTML, CSS and JavaScript shipped in
proxy/static, read once at start) as public routes. The page itself polls the /api endpoints,
sending the admin token as a bearer token when one is set.
Must not: expose any observer data itself (the page is public; the data stays behind /api and its
token), or need a build step.
"""

from __future__ import annotations

from importlib import resources

from pgscout.exposition.admin import AdminServer, Request, Response

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}


def register(admin: AdminServer) -> None:
    for entry in resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        content_type = _CONTENT_TYPES.get(suffix)
        if content_type is None:
            continue
        admin.route(f"/static/{entry.name}", _serve_bytes(entry.read_bytes(), content_type),
                    protected=False)
        if entry.name == "index.html":
            admin.route("/", _serve_bytes(entry.read_bytes(), content_type), protected=False)


def _serve_bytes(body: bytes, content_type: str):
    async def serve(request: Request) -> Response:
        return Response(200, body, content_type)

    return serve
