"""The chat page of ``qwen2vl serve`` (off with ``--no-web-ui``).

    GET /                      the page (static/index.html)
    GET /static/{name}         its scripts and style sheet: only the files shipped in qwen2vl/server/static
    GET /webui/config.json     what the page needs to know of this server: whether /v1 wants an API key, and the
                               limits a request must keep (so a file over them is refused before it is sent)

The page is plain HTML, CSS and JavaScript modules written for this package: no build step, nothing fetched from
another origin (a Content-Security-Policy of 'self' says so to the browser). It talks to this server's own
``/v1/models`` and ``/v1/chat/completions`` like any other client. These routes need no API key: they serve
nothing but the page and the limits; the page asks for the key and sends it to /v1.
"""

from __future__ import annotations

import os

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from .protocol import APIError

__all__ = ["STATIC_DIR", "web_routes", "page_config"]

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}

#: The browser may load scripts, styles and connect only to this origin; pictures come from the page itself
#: (data: and blob: URLs of the attached files).
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data: blob:; media-src 'self' data: blob:; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def page_config(config) -> dict:
    """The page's view of a :class:`~qwen2vl.server.app.ServerConfig`: whether an API key is needed and the
    request limits (None: no limit of that kind)."""
    return {
        "api_key_required": bool(config.api_key),
        "limits": {
            "max_request_bytes": config.max_request_bytes,
            "max_images_per_request": config.max_images_per_request,
            "max_videos_per_request": config.max_videos_per_request,
            "max_image_pixels": config.media.max_image_pixels,
            "max_completion_tokens": config.max_completion_tokens,
        },
    }


def web_routes(config) -> list[Route]:
    """The page's routes for a server configured by ``config`` (a ServerConfig)."""
    files = {name for name in os.listdir(STATIC_DIR) if os.path.splitext(name)[1] in _TYPES}
    body = page_config(config)

    def static(name: str) -> Response:
        return FileResponse(os.path.join(STATIC_DIR, name), media_type=_TYPES[os.path.splitext(name)[1]],
                            headers=_HEADERS)

    async def index(request: Request) -> Response:
        return static("index.html")

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in files:  # only the shipped files: no path is ever joined from the request
            e = APIError(404, f"no file {name!r} in the web UI")
            return JSONResponse(e.body(), status_code=e.status)
        return static(name)

    async def page_settings(request: Request) -> Response:
        return JSONResponse(body, headers={"Cache-Control": "no-cache"})

    return [Route("/", index, methods=["GET"]), Route("/static/{name}", asset, methods=["GET"]),
            Route("/webui/config.json", page_settings, methods=["GET"])]
