"""The chat page's files as ``kiln.server.chat.page`` serves them: the hand-written ones of
``ui/`` and the built ones of ``ui/dist/`` (fonts in a subfolder), a clear 503 when the page
was never built, and no path that leaves the folder.

Most tests serve a made-up ``ui`` folder (so they hold without Node.js); the last one checks
the real build that ``make install`` made.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from kiln.server.chat import page
from kiln.server.errors import install_error_handlers

FONT = b"wOF2 not really a font"


def _client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(page.router)
    return TestClient(app)


def _fake_ui(root: Path, built: bool) -> Path:
    """``root/ui`` as the package holds it, with a file beside it that must never be served."""
    ui = root / "ui"
    ui.mkdir()
    (ui / "index.html").write_text('<script type="module" src="/ui/app.js"></script>')
    (ui / "style.css").write_text("body { margin: 0; }")
    (ui / "favicon.svg").write_text("<svg></svg>")
    (root / "secret.js").write_text("the package's other files")
    (root / "pyproject.toml").write_text("[project]")
    if built:
        (ui / "dist" / "fonts").mkdir(parents=True)
        (ui / "dist" / "chunks").mkdir()
        (ui / "dist" / "app.js").write_text('import "./chunks/chunk-A.js";')
        (ui / "dist" / "chunks" / "chunk-A.js").write_text("export const a = 1;")
        (ui / "dist" / "app.css").write_text("@font-face { src: url(./fonts/F-1.woff2) }")
        (ui / "dist" / "fonts" / "F-1.woff2").write_bytes(FONT)
        (ui / "dist" / "fonts" / "F-1.woff").write_bytes(FONT)
        (ui / "dist" / "fonts" / "F-1.ttf").write_bytes(FONT)
    return ui


@pytest.fixture(params=[True, False], ids=["built", "not-built"])
def fake_ui(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    ui = _fake_ui(tmp_path, built=request.param)
    monkeypatch.setattr(page, "_ui", lambda: ui)
    yield ui


@pytest.fixture
def built_ui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    ui = _fake_ui(tmp_path, built=True)
    monkeypatch.setattr(page, "_ui", lambda: ui)
    return ui


def test_missing_dist_answers_503_with_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ui = _fake_ui(tmp_path, built=False)
    monkeypatch.setattr(page, "_ui", lambda: ui)
    client = _client()
    for path in ("/", "/ui/index.html"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert response.headers["content-type"].startswith("text/html")
        assert "the chat page is not built: run make install (needs Node.js)" in response.text
        assert response.headers["content-security-policy"] == page.CONTENT_SECURITY_POLICY
    for path in ("/ui/app.js", "/ui/fonts/F-1.woff2"):
        response = client.get(path)
        assert response.status_code == 503, path
        assert response.text == page.NOT_BUILT + "\n"
    # The hand-written files do not need the build.
    assert client.get("/ui/style.css").status_code == 200


def test_an_empty_dist_counts_as_not_built(built_ui: Path) -> None:
    (built_ui / "dist" / "app.js").unlink()
    response = _client().get("/")
    assert response.status_code == 503 and page.NOT_BUILT in response.text


@pytest.mark.parametrize(
    "path",
    [
        "/ui/..%2F..%2Fpyproject.toml",
        "/ui/..%2Fsecret.js",
        "/ui/dist%2F..%2F..%2Fsecret.js",
        "/ui/fonts/..%2F..%2F..%2Fsecret.js",
        "/ui/%2E%2E/%2E%2E/secret.js",
        "/ui/fonts/%2E%2E%2F%2E%2E%2Fapp.js",
        "/ui/..%5C..%5Csecret.js",
        "/ui/%2Fetc%2Fpasswd.js",
        "/ui/fonts//F-1.woff2",
        "/ui/.hidden.js",
        "/ui/a..b.js",
        "/ui/fonts/F-1.woff2%00.js",
        "/ui/app.py",
        "/ui/a/b/c/d/e.js",
    ],
)
def test_paths_that_could_leave_the_folder_are_refused(fake_ui: Path, path: str) -> None:
    """Refused (404) before anything is looked up: built or not."""
    response = _client().get(path)
    assert response.status_code == 404, (path, response.text)
    assert "the package's other files" not in response.text and "[project]" not in response.text


@pytest.mark.parametrize(
    "path",
    [
        "/ui/nothing.js",
        "/ui/fonts/nothing.woff2",
        "/ui/dist/app.js",  # dist/ is the root of the built files, not a name in it
        "/ui/chunks",
    ],
)
def test_names_of_no_file_are_not_found(built_ui: Path, path: str) -> None:
    assert _client().get(path).status_code == 404, path


def test_built_files_and_fonts_have_their_content_types(built_ui: Path) -> None:
    client = _client()
    expected = {
        "/": "text/html; charset=utf-8",
        "/ui/style.css": "text/css; charset=utf-8",
        "/ui/favicon.svg": "image/svg+xml",
        "/ui/app.js": "text/javascript; charset=utf-8",
        "/ui/chunks/chunk-A.js": "text/javascript; charset=utf-8",
        "/ui/app.css": "text/css; charset=utf-8",
        "/ui/fonts/F-1.woff2": "font/woff2",
        "/ui/fonts/F-1.woff": "font/woff",
        "/ui/fonts/F-1.ttf": "font/ttf",
    }
    for path, content_type in expected.items():
        response = client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == content_type, path
        assert response.headers["content-security-policy"] == page.CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    assert client.get("/ui/fonts/F-1.woff2").content == FONT
    # Content-hashed names (chunks, fonts) may be cached for good; the rest is revalidated.
    assert "immutable" in client.get("/ui/fonts/F-1.woff2").headers["cache-control"]
    assert "immutable" in client.get("/ui/chunks/chunk-A.js").headers["cache-control"]
    assert client.get("/ui/app.js").headers["cache-control"] == "no-cache"
    assert client.get("/").headers["cache-control"] == "no-cache"


def test_the_policy_allows_only_this_servers_own_files() -> None:
    directives = dict(d.split(" ", 1) for d in page.CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'none'"
    for kind in ("script-src", "style-src", "font-src", "img-src", "connect-src"):
        assert directives[kind] == "'self'", kind
    assert "unsafe" not in page.CONTENT_SECURITY_POLICY


def test_the_real_build_is_served_whole() -> None:
    """What ``make install`` built: the page's scripts and stylesheets, every chunk they
    import and every font KaTeX's stylesheet names, each with its content type."""
    client = _client()
    index = client.get("/")
    assert index.status_code == 200, f"{index.text} (web/ builds into src/kiln/ui/dist)"
    assert 'src="/ui/app.js"' in index.text and 'href="/ui/app.css"' in index.text
    for entry in ("app.js", "markdown.js"):
        script = client.get(f"/ui/{entry}")
        assert script.status_code == 200 and script.headers["content-type"].startswith(
            "text/javascript"
        )
        for chunk in re.findall(r'from"\./(chunks/[^"]+\.js)"', script.text):
            assert client.get(f"/ui/{chunk}").status_code == 200, chunk
    css = client.get("/ui/app.css")
    assert css.status_code == 200 and ".katex" in css.text
    fonts = re.findall(r'url\("?\./(fonts/[^")]+)"?\)', css.text)
    assert fonts and all(font.endswith(".woff2") for font in fonts), fonts
    for font in fonts:
        response = client.get(f"/ui/{font}")
        assert response.status_code == 200, font
        assert response.headers["content-type"] == "font/woff2"
        assert response.content[:4] == b"wOF2", font
