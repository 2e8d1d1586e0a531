"""The web app of ``vop serve`` (optional extra ``vop[serve]``: FastAPI + uvicorn).

Routes:

- ``GET /``: the search page (plain HTML + JS, no framework).
- ``GET /api/indexes``: loaded indexes (prompt sets): name, method, videos, shared backbone or not.
- ``GET /api/search?q=TEXT&k=10&index=NAME[&exact=1]``: ranked videos with cosine scores.
- ``GET /thumb/{index}/{row}``, ``GET /video/{index}/{row}``: the thumbnail strip / the video file of one
  indexed video (range requests supported). Nothing else on disk is reachable: files are looked up
  by row in a loaded index, never by a path taken from the request.

Errors are JSON ``{"error": message}`` with a 4xx status for anything the client sent wrong (empty,
over-long or non-UTF-8 query, bad k, unknown index or row); 5xx only for bugs.
"""

import ipaddress
import logging
from urllib.parse import unquote_to_bytes

from vop.errors import ConfigError
from vop.retrieval.service import RequestError, SearchService

__all__ = ["create_app", "serve", "is_loopback"]

log = logging.getLogger("vop.retrieval.web")

VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".webm": "video/webm", ".ogv": "video/ogg",
               ".mov": "video/quicktime", ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}


def _require():
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


def create_app(service: SearchService):
    """A FastAPI app around ``service``."""
    _require()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from vop.retrieval.page import PAGE

    app = FastAPI(title="vop search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError):
        return JSONResponse({"error": str(e)}, status_code=e.status)

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


def serve(service: SearchService, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    _require()
    import uvicorn

    if not is_loopback(host):
        log.warning("serving on %s: anyone who can reach this address can search the index and watch its videos", host)
    uvicorn.run(create_app(service), host=host, port=port, log_level=log_level)
