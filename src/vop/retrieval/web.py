"""The web app of ``vop serve`` (optional extra ``vop[serve]``: FastAPI + uvicorn).

Routes:

- ``GET /``: the search page (plain HTML + JS, no framework).
- ``GET /api/indexes``: loaded indexes (prompt sets): name, method, videos, shared backbone or not.
- ``GET /api/search?q=TEXT&k=10&index=NAME[&exact=1]``: ranked videos with cosine scores.
- ``GET /thumb/{index}/{row}``, ``GET /video/{index}/{row}``: the thumbnail strip / the video file of one
  indexed video (range requests supported). Nothing else on disk is reachable: files are looked up
  by row in a loaded index, never by a path taken from the request.

Errors are JSON ``{"error": message}`` with a 4xx status for anything the client sent wrong (empty,
over-long or non-UTF-8 query, bad k, unknown index or row); 500 with the message for a damaged index
or model found while answering (a NaN score: see ``VideoIndex.search``), and 500 ``internal error`` for
bugs. Responses are always valid JSON (Starlette writes them with ``allow_nan=False``). A query string over
``MAX_QUERY_BYTES`` gets 413 (``serve`` lets uvicorn read requests up to ``MAX_REQUEST_HEAD`` so that
it can answer; beyond that uvicorn closes the connection).

DNS rebinding: a page on another site can make a browser send requests to a local server under the
site's own host name. Only requests whose ``Host`` header names this server are answered: an IP
address (which no rebinding page can use), ``localhost``, the host name bound to, and the names given
with ``--allowed-host`` (``*``: any); others get 400.
"""

import ipaddress
import json
import logging
import socket
from typing import Iterable
from urllib.parse import unquote_to_bytes

from vop.errors import ConfigError, VopError
from vop.retrieval.service import RequestError, SearchService

__all__ = ["create_app", "serve", "require_web", "server_config", "is_loopback", "default_allowed_hosts", "MAX_QUERY_BYTES"]

MAX_QUERY_BYTES = 16 * 1024  # a query of MAX_QUERY_CHARS characters, percent-encoded UTF-8, fits with room
MAX_REQUEST_HEAD = 4 * 1024 * 1024  # what uvicorn (h11) reads of a request line + headers before it gives up

log = logging.getLogger("vop.retrieval.web")

VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".ogv": "video/ogg",
               ".mov": "video/quicktime", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}


def require_web() -> None:
    """A ConfigError naming the extra to install when FastAPI or uvicorn is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ConfigError("the web app needs FastAPI and uvicorn: pip install 'vop[serve]'") from None


def _query_params(raw: bytes) -> dict[str, str]:
    """Decode a raw query string strictly: percent-escapes and '+' undone, then UTF-8 (invalid -> 400)."""
    out: dict[str, str] = {}
    for part in raw.split(b"&"):
        if not part:
            continue
        key, _, value = part.partition(b"=")
        try:
            k = unquote_to_bytes(key.replace(b"+", b" ")).decode("utf-8")
            v = unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"parameter {key[:20].decode('ascii', 'replace')!r} is not valid UTF-8") from None
        out.setdefault(k, v)
    return out


def _host_name(value: str) -> str:
    """The host of a Host header, lower case, without port or trailing dot ('[::1]:8000' -> '::1')."""
    v = value.strip().lower()
    if v.startswith("["):
        v = v[1:v.find("]")] if "]" in v else v[1:]
    elif v.count(":") == 1:
        v = v.split(":", 1)[0]
    return v.rstrip(".")


def _host_allowed(name: str, allowed: frozenset[str]) -> bool:
    if "*" in allowed or name in allowed:
        return True
    try:
        ipaddress.ip_address(name)
        return True  # an address: the browser's origin is this server itself, no rebinding possible
    except ValueError:
        return False


def default_allowed_hosts(bound: str = "127.0.0.1") -> list[str]:
    """Host names answered by default: localhost, the bound name, and this machine's names when bound
    to every interface (0.0.0.0 / ::)."""
    names = ["localhost"]
    try:
        ipaddress.ip_address(bound)
        if ipaddress.ip_address(bound).is_unspecified:
            names += [socket.gethostname(), socket.getfqdn()]
    except ValueError:
        names.append(bound)  # a host name was given to bind to
    return [n.lower().rstrip(".") for n in names if n]


class _Guard:
    """ASGI middleware: refuse foreign Host headers (400) and oversized query strings (413) before
    any routing."""

    def __init__(self, app, allowed_hosts: Iterable[str]):
        self.app = app
        self.allowed = frozenset(h.strip().lower().rstrip(".") for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
            if host is not None and not _host_allowed(_host_name(host), self.allowed):
                name = _host_name(host)[:100]
                return await _send_json(send, 400, {"error": (
                    f"host {name!r} is not served here (a page of another site may be trying to reach this local "
                    f"server); if you open it under this name, restart vop serve with --allowed-host {name}")})
            n = len(scope.get("query_string", b""))
            if n > MAX_QUERY_BYTES:
                return await _send_json(send, 413, {"error": f"query string too large ({n} bytes; at most {MAX_QUERY_BYTES})"})
        await self.app(scope, receive, send)


async def _send_json(send, status: int, obj) -> None:
    body = json.dumps(obj).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(service: SearchService, allowed_hosts: Iterable[str] | None = None):
    """A FastAPI app around ``service``; ``allowed_hosts``: Host names answered besides IP addresses
    (default :func:`default_allowed_hosts`: localhost)."""
    require_web()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from vop.retrieval.page import PAGE

    app = FastAPI(title="vop search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(_Guard, allowed_hosts=default_allowed_hosts() if allowed_hosts is None else list(allowed_hosts))

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(VopError)
    async def _server_error(_: Request, e: VopError):  # a damaged index or model: the server's side, said clearly
        log.error("%s", e)
        return JSONResponse({"error": str(e)}, status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        msg = "not found" if e.status_code == 404 else str(e.detail)
        return JSONResponse({"error": msg}, status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        return JSONResponse({"error": "bad request"}, status_code=400)

    @app.exception_handler(Exception)
    async def _bug(_: Request, e: Exception):  # pragma: no cover - a bug, logged with its traceback
        log.exception("internal error")
        return JSONResponse({"error": "internal error"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-cache"})

    @app.get("/api/indexes")
    def indexes():
        return service.describe()

    @app.get("/api/search")
    def search(request: Request):
        p = _query_params(request.scope.get("query_string", b""))
        exact = p.get("exact", "").lower() in ("1", "true", "yes")
        return service.search(p.get("q"), p.get("k", "10"), p.get("index"), exact=exact or None)

    @app.get("/thumb/{name}/{row}")
    def thumb(name: str, row: str):
        from vop.retrieval.images import image_mime

        path = service.thumb_file(name, row)
        with open(path, "rb") as f:
            head = f.read(8)
        return FileResponse(path, media_type=image_mime(head), headers={"Cache-Control": "max-age=3600"})

    @app.get("/video/{name}/{row}")
    def video(name: str, row: str):
        path = service.video_file(name, row)
        return FileResponse(path, media_type=VIDEO_TYPES.get(path.suffix.lower(), "application/octet-stream"))

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(service: SearchService, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          allowed_hosts: Iterable[str] = ()) -> None:
    """Run the app with uvicorn until interrupted; ``allowed_hosts`` are added to the default names."""
    require_web()
    import uvicorn

    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach this address can search the index and watch its videos", host)
    server = uvicorn.Server(server_config(service, host, port, log_level, allowed_hosts))
    try:
        server.run()
    except KeyboardInterrupt:  # as uvicorn.run: Ctrl-C ends the server quietly
        pass
    except SystemExit:  # uvicorn exits when it cannot bind; it has logged why
        if server.started:
            raise
    if not server.started:
        raise ConfigError(f"cannot listen on {host}:{port} (see the ERROR line above: port in use, or not an address of "
                          "this machine); choose another --port or --host")


def server_config(service: SearchService, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  allowed_hosts: Iterable[str] = ()):
    """The uvicorn configuration ``serve`` runs (tests start it on their own socket)."""
    require_web()
    import uvicorn

    app = create_app(service, default_allowed_hosts(host) + list(allowed_hosts))
    # h11 reads a request head up to this size, so that an oversized query gets our 413 (not a reset)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, h11_max_incomplete_event_size=MAX_REQUEST_HEAD)
