"""The chat page at ``/`` and its assets at ``/ui/...``, served from the package (no CDN).

Every answer carries a strict Content-Security-Policy: scripts and styles only from this
server's own files (no inline script, no ``eval``), no plugins, no frames, images only from
here. It is the second line of defence: the page's renderer never turns model text into
markup in the first place.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from fastapi.responses import Response

from kiln.errors import NotFoundError
from kiln.server.errors import TGIRoute

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

router = APIRouter(route_class=TGIRoute, include_in_schema=False)


def _ui() -> Traversable:
    return resources.files("kiln").joinpath("ui")


def _asset(name: str) -> Response:
    # NOTE: only plain names of known types: no path in a name can leave the ui folder.
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in _TYPES:
        raise NotFoundError(f"no asset {name!r}")
    asset = _ui().joinpath(name)
    if not asset.is_file():
        raise NotFoundError(f"no asset {name!r}")
    return Response(asset.read_bytes(), media_type=_TYPES[suffix], headers=SECURITY_HEADERS)


@router.get("/")
async def page() -> Response:
    return _asset("index.html")


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    return _asset(name)
