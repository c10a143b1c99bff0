"""The chat page at ``/`` and its assets at ``/ui/...``, served from the package (no CDN).

Two folders make the page: the hand-written ``ui/index.html``, ``ui/style.css`` and
``ui/favicon.svg``, and ``ui/dist/``, which ``make install`` builds from the TypeScript project
in ``web/`` (the scripts, KaTeX's stylesheet and fonts). ``dist/`` is not in the repository: a
checkout where it was never built answers 503 with what to run, rather than a broken page.

Every answer carries a strict Content-Security-Policy: scripts, styles and fonts only from this
server's own files (no inline script or style, no ``eval``), no plugins, no frames, images only
from here. It is the second line of defence: the page's renderer never lets model text become
markup in the first place.
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

from fastapi import APIRouter
from fastapi.responses import Response

from kiln.errors import NotFoundError
from kiln.server.errors import TGIRoute

# NOTE: style-src needs no 'unsafe-inline' although KaTeX positions math with inline styles:
# the page typesets with katex.render, which sets them through the CSSOM (element.style),
# and a policy only refuses style attributes written in markup, never styles set by a script
# it allowed.
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
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
}
# esbuild names the shared chunks and the fonts by a hash of their content: a new build is new
# names, so a browser may keep these for good (the entry files and the page stay no-cache).
HASHED_FOLDERS = frozenset({"chunks", "fonts"})
IMMUTABLE = {**SECURITY_HEADERS, "Cache-Control": "public, max-age=31536000, immutable"}
HAND_WRITTEN = frozenset({"index.html", "style.css", "favicon.svg"})
"""The files of ``ui/`` itself; every other asset is a built one, under ``ui/dist/``."""
DIST = "dist"
BUILT_ENTRY = "app.js"
"""The built file the page cannot work without: its absence means ``dist/`` was not built."""
NOT_BUILT = "the chat page is not built: run make install (needs Node.js)"
# One path segment of a built file: a plain name (esbuild's are letters, digits, - _ .), never
# "." or "..", nor hidden, nor anything a filesystem could read as a separator.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_MAX_DEPTH = 4

router = APIRouter(route_class=TGIRoute, include_in_schema=False)


def _ui() -> Traversable:
    return resources.files("kiln").joinpath("ui")


def _not_built(html: bool) -> Response:
    if html:
        body = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>kiln chat</title></head><body><p>{NOT_BUILT}.</p></body></html>"
        )
        return Response(body, 503, media_type=_TYPES[".html"], headers=SECURITY_HEADERS)
    text = NOT_BUILT + "\n"
    return Response(text, 503, media_type="text/plain; charset=utf-8", headers=SECURITY_HEADERS)


def _built() -> bool:
    return _ui().joinpath(DIST).joinpath(BUILT_ENTRY).is_file()


def _segments(path: str) -> list[str]:
    """The segments of the asset path ``path``; NotFoundError for any that could leave the
    ui folder or name something other than a file of a known type."""
    segments = path.split("/")
    suffix = path[path.rfind(".") :] if "." in path else ""
    if (
        len(segments) > _MAX_DEPTH
        or suffix not in _TYPES
        or not all(_SEGMENT.fullmatch(segment) for segment in segments)
        or any(".." in segment for segment in segments)
    ):
        raise NotFoundError(f"no asset {path!r}")
    return segments


def _file(
    folder: Traversable, segments: list[str], path: str, headers: dict[str, str] = SECURITY_HEADERS
) -> Response:
    asset = folder
    for segment in segments:
        asset = asset.joinpath(segment)
    if not asset.is_file():
        raise NotFoundError(f"no asset {path!r}")
    suffix = segments[-1][segments[-1].rfind(".") :]
    return Response(asset.read_bytes(), media_type=_TYPES[suffix], headers=headers)


@router.get("/")
async def page() -> Response:
    if not _built():
        return _not_built(html=True)
    return _file(_ui(), ["index.html"], "index.html")


@router.get("/ui/{path:path}")
async def asset(path: str) -> Response:
    segments = _segments(path)
    if segments == ["index.html"]:
        return await page()  # the page under its other name: the same check that it is built
    if len(segments) == 1 and segments[0] in HAND_WRITTEN:
        return _file(_ui(), segments, path)
    dist = _ui().joinpath(DIST)
    if not dist.is_dir():
        return _not_built(html=False)
    hashed = len(segments) > 1 and segments[0] in HASHED_FOLDERS
    return _file(dist, segments, path, IMMUTABLE if hashed else SECURITY_HEADERS)
