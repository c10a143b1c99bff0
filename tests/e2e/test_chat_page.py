"""The chat page in a real headless Chromium (Debian's ``chromium``, driven by Playwright)
against a real kiln server on loopback.

It sends a message and watches the answer stream in, stops one, regenerates and edits and
walks the branches; it plants XSS payloads in an answer and checks that they render as text
and run nothing; it exports and imports; every page must break none of its strict
Content-Security-Policy. The model switch, restart, owner isolation and screenshot tests are
in ``test_chat_page_more.py``.

These tests fail (never skip) when Chromium is missing: ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from test_chat_api import Pace

from browser_harness import (
    TIMEOUT_MS,
    assistant_messages,
    launched_chromium,
    new_context,
    open_page,
    owner_cookie,
    plant_conversation,
    send,
    set_max_new_tokens,
    wait_answered,
    wait_idle,
    watched_page,
)
from kiln import LLM
from kiln.config.server import ServerConfig
from server_harness import running_server

TIMEOUT_S = TIMEOUT_MS / 1000

XSS_ANSWER = """Here you go:

<script>window.__pwned = "script"</script>
<img src=x onerror="window.__pwned = 'img'">
<svg onload="window.__pwned = 'svg'"><circle r="9"/></svg>
[click me](javascript:window.__pwned='link') and [data](data:text/html,<script>alert(1)</script>)
[relative](/api/chat/conversations) ![pixel](javascript:window.__pwned='image')
<a href="javascript:window.__pwned='a'">raw anchor</a> <iframe src="javascript:1"></iframe>
A [safe link](https://example.com/docs) and `<b>code</b>`.

| payload | cell |
|---|:-:|
| <img src=x onerror=window.__pwned='cell'> | **bold** |

```html
</code></pre><script>window.__pwned = "fence"</script>
```
"""


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(stories_dir: Path) -> LLM:
    return LLM(str(stories_dir), chat_template="chatml", kv_cache_memory=16 << 20)


@pytest.fixture(scope="module")
def pace(llm: LLM) -> Pace:
    return Pace(llm)


@pytest.fixture(scope="module")
def chat_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chat-page") / "chat.sqlite3"


@pytest.fixture(scope="module")
def url(llm: LLM, pace: Pace, chat_db: Path) -> Iterator[str]:
    with running_server(llm, ServerConfig(chat_db=str(chat_db), model_id="stories")) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_chromium() as launched:
        yield launched


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    with new_context(browser) as fresh:
        yield fresh


@pytest.fixture
def page(context: BrowserContext) -> Iterator[Page]:
    with watched_page(context) as fresh:
        yield fresh


def _pwned(page: Page) -> object:
    return page.evaluate("() => window.__pwned")


def _aborted_requests(url: str) -> float:
    """``tgi_request_failure{err="aborted"}`` from /metrics (0 before the first)."""
    text = httpx.get(url + "/metrics", timeout=TIMEOUT_S).text
    found = re.search(r'^tgi_request_failure\{err="aborted"\} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# --- tests ------------------------------------------------------------------------------------


def test_the_page_has_a_strict_csp(url: str) -> None:
    page = httpx.get(url + "/", timeout=TIMEOUT_S)
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'none'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    # No inline script for the policy to have to allow: every script is a file of ours.
    assert "<script>" not in page.text and 'src="/ui/app.js"' in page.text
    for asset in ("app.js", "markdown.js", "style.css"):
        response = httpx.get(f"{url}/ui/{asset}", timeout=TIMEOUT_S)
        assert response.status_code == 200 and "content-security-policy" in response.headers
    # The built stylesheet (KaTeX's) is a file of ours too.
    assert 'href="/ui/app.css"' in page.text
    assert httpx.get(f"{url}/ui/app.css", timeout=TIMEOUT_S).status_code == 200
    assert httpx.get(url + "/ui/..%2Fllm.py", timeout=TIMEOUT_S).status_code == 404
    assert httpx.get(url + "/ui/nothing.js", timeout=TIMEOUT_S).status_code == 404


# The first streamed text of the last answer, read while it is still streaming (one look, so
# the answer cannot end between checking its status and reading its text).
_STREAMING_TEXT = """() => {
    const answers = document.querySelectorAll('#messages article.message.assistant');
    const last = answers[answers.length - 1];
    const text = last?.querySelector('.message-body')?.innerText.trim();
    return last?.dataset.status === 'streaming' && text ? text : null;
}"""


def test_send_stream_stop(page: Page, url: str, llm: LLM, pace: Pace) -> None:
    open_page(page, url)
    expect(page.locator("#model-status")).to_contain_text("stories: available")
    set_max_new_tokens(page, 40)
    pace.delay = 0.05  # 40 tokens take two seconds: long enough to watch them arrive
    try:
        send(page, "Once upon a time")
        # Streaming: some text is shown while the answer is still being written.
        partial = page.wait_for_function(_STREAMING_TEXT).json_value()
        expect(page.locator("#stop")).to_be_visible()
        final = wait_answered(page).locator(".message-body").inner_text()
        assert len(final) > len(partial) and final.startswith(partial[:5])
        expect(page.locator("#conversations .day")).to_have_text(["Today"])
        expect(page.locator("#conversations .conversation-title")).to_have_text(
            ["Once upon a time"]
        )

        # Stop, mid-answer: the engine request is aborted (the server counts it) and its KV
        # blocks freed.
        aborted_before = _aborted_requests(url)
        set_max_new_tokens(page, 300)
        send(page, "Tell me more")
        page.wait_for_function(_STREAMING_TEXT)
        page.locator("#stop").click()
        expect(assistant_messages(page).last).to_have_attribute("data-status", "stopped")
    finally:
        pace.delay = 0.0
    expect(assistant_messages(page).last).to_contain_text("Stopped.")
    wait_idle(page)
    assert _aborted_requests(url) == aborted_before + 1
    _wait_kv_blocks_free(llm)


def _wait_kv_blocks_free(llm: LLM) -> None:
    """The abort reaches the engine thread at its next step; its blocks are free then."""
    deadline = time.monotonic() + TIMEOUT_S
    while llm.engine.stats().num_kv_blocks_used:
        assert time.monotonic() < deadline, "KV blocks still held after Stop"
        time.sleep(0.02)


def test_regenerate_edit_and_switch_branches(page: Page, url: str) -> None:
    open_page(page, url)
    set_max_new_tokens(page, 10)
    send(page, "The cat sat")
    wait_answered(page)

    page.locator("#messages article.assistant .regenerate").click()
    position = page.locator("#messages article.assistant .siblings .position")
    expect(position).to_have_text("2/2")
    wait_idle(page)
    page.locator("#messages article.assistant .previous").click()
    expect(position).to_have_text("1/2")

    # Edit the question: a second branch from the start.
    page.locator("#messages article.user .edit").click()
    page.locator(".editor textarea").fill("The dog ran")
    page.locator(".editor .save-edit").click()
    user_position = page.locator("#messages article.user .siblings .position")
    expect(user_position).to_have_text("2/2")
    wait_idle(page)
    expect(page.locator("#messages article.user .message-body")).to_have_text("The dog ran")
    # The first branch is still there, with both of its answers (shown with the newest).
    page.locator("#messages article.user .previous").click()
    expect(page.locator("#messages article.user")).to_contain_text("The cat sat")
    expect(position).to_have_text("2/2")
    # Reloaded, the page shows the branch last chosen.
    open_page(page, url)
    page.locator("#conversations .conversation-title").click()
    expect(page.locator("#messages")).to_contain_text("The cat sat")
    # Search finds the other branch's question, and opens the conversation on that branch.
    page.locator("#search").fill("dog ran")
    page.locator("#conversations .search-results .conversation-title").click()
    expect(page.locator("#messages")).to_contain_text("The dog ran")


def test_xss_payloads_render_as_text(
    page: Page, context: BrowserContext, url: str, chat_db: Path
) -> None:
    open_page(page, url)
    title = "<img src=x onerror=window.__pwned=1>"
    user_payload = '<script>window.__pwned="user"</script>'
    plant_conversation(chat_db, owner_cookie(context), title, user_payload, XSS_ANSWER)

    open_page(page, url)
    item = page.locator("#conversations .conversation-title")
    expect(item).to_have_text(title)
    item.click()
    expect(page.locator("#chat-title")).to_have_text(title)
    answer = assistant_messages(page).first
    expect(answer).to_contain_text("Here you go")
    messages = page.locator("#messages")

    # Every payload is shown as the characters it is, and none ran.
    text = messages.inner_text()
    for visible in (
        user_payload,
        '<script>window.__pwned = "script"</script>',
        "<img src=x onerror=\"window.__pwned = 'img'\">",
        "<svg onload=",
        "[click me](javascript:window.__pwned='link')",
        "[data](data:text/html,<script>alert(1)</script>)",
        "[relative](/api/chat/conversations)",
        "<iframe",
        '</code></pre><script>window.__pwned = "fence"</script>',
    ):
        assert visible in text, visible
    for tag in ("script", "img", "svg", "iframe", "object", "embed", "style"):
        assert messages.locator(tag).count() == 0, tag
    anchors = messages.locator("a")
    assert anchors.evaluate_all("(as) => as.map((a) => a.href)") == ["https://example.com/docs"]
    # Links open elsewhere and tell the target nothing.
    assert anchors.evaluate_all("(as) => as.map((a) => a.rel)") == ["noopener noreferrer nofollow"]
    # Markdown still renders: a table, inline code, a code block with its Copy button.
    expect(answer.locator("table td strong")).to_have_text("bold")
    expect(answer.locator("p code")).to_have_text("<b>code</b>")
    expect(answer.locator(".code-block .copy")).to_have_text("Copy")
    assert _pwned(page) is None

    # A payload typed by the user is text too.
    page.locator("#new-chat").click()
    set_max_new_tokens(page, 5)
    typed = "<img src=x onerror=\"window.__pwned='typed'\"> [x](javascript:alert(1))"
    send(page, typed)
    expect(page.locator("#messages .user .message-body")).to_have_text(typed)
    wait_idle(page)
    assert page.locator("#messages img").count() == 0
    assert _pwned(page) is None


MARKDOWN_CASES = {
    "# Title\n\nSome **bold**, *em*, ~~gone~~ and `a < b`.": (
        "<h1>Title</h1><p>Some <strong>bold</strong>, <em>em</em>, <del>gone</del> and "
        "<code>a &lt; b</code>.</p>"
    ),
    "- one\n- two\n  - nested\n\n3. three\n4. four": (
        "<ul><li><p>one</p></li><li><p>two</p><ul><li><p>nested</p></li></ul></li></ul>"
        '<ol start="3"><li><p>three</p></li><li><p>four</p></li></ol>'
    ),
    "| a | b |\n|:--|--:|\n| 1 | 2 |": (
        '<div class="table-wrap"><table><thead><tr><th class="align-left">a</th>'
        '<th class="align-right">b</th></tr></thead><tbody><tr><td class="align-left">1</td>'
        '<td class="align-right">2</td></tr></tbody></table></div>'
    ),
    "snake_case_name and 2 * 3 * 4": "<p>snake_case_name and 2 * 3 * 4</p>",
    "> quoted\n\nline one\nline two": (
        "<blockquote><p>quoted</p></blockquote><p>line one<br>line two</p>"
    ),
    "see https://example.com/a?b=1.": (
        '<p>see <a href="https://example.com/a?b=1" rel="noopener noreferrer nofollow" '
        'target="_blank">https://example.com/a?b=1</a>.</p>'
    ),
}
UNSAFE_TARGETS = [
    "javascript:alert(1)",
    "JaVaScRiPt:alert(1)",
    " javascript:alert(1)",
    "java\tscript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD4=",
    "vbscript:msgbox(1)",
    "file:///etc/passwd",
    "/relative/path",
    "//evil.example/x",
]
MATH_CASES = {
    "Euler: $e^{i\\pi} + 1 = 0$ and \\(x_1\\).": False,
    "Sum:\n\n$$\n\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}\n$$\n\nthen text": True,
    "Inline display $$\\int_0^1 x\\,dx$$ and \\[a^2 + b^2 = c^2\\]": True,
    "| a | b |\n|---|---|\n| $\\alpha$ | $$\\beta$$ |": True,
}
UNSAFE_TEX = [
    "$\\href{javascript:alert(1)}{click}$",
    "$$\\url{https://example.com}$$",
    "$\\includegraphics{https://example.com/x.png}$",
    "$\\htmlClass{x}{y} \\htmlStyle{color:red}{z} \\htmlData{a=b}{c}$",
    "$<img src=x onerror=alert(1)>$",
]
_TYPESET = """async (text) => {
    const md = await import('/ui/markdown.js');
    const box = document.createElement('div');
    box.className = 'message-body';
    box.append(md.renderMarkdown(text));
    document.body.append(box);
    await document.fonts.ready;
    const mathml = box.querySelector('.katex-mathml');
    const result = {
        mathml_hidden: mathml !== null && getComputedStyle(mathml).position === 'absolute',
        katex_fonts: [...document.fonts]
            .filter((f) => f.family.startsWith('KaTeX') && f.status === 'loaded')
            .map((f) => f.family),
    };
    box.remove();
    return result;
}"""
# The tags and attribute names of everything the renderer made of a text.
_ELEMENTS = """async (text) => {
    const md = await import('/ui/markdown.js');
    const box = document.createElement('div');
    box.append(md.renderMarkdown(text));
    const elements = [...box.querySelectorAll('*')];
    return {
        tags: [...new Set(elements.map((e) => e.localName))],
        attributes: [...new Set(elements.flatMap((e) => e.getAttributeNames()))],
    };
}"""
_RENDER = """async (text) => {
    const md = await import('/ui/markdown.js');
    const box = document.createElement('div');
    box.append(md.renderMarkdown(text));
    return box.innerHTML;
}"""


def test_markdown_renderer(page: Page, url: str) -> None:
    """kiln's Markdown renderer, run in the browser on known inputs."""
    open_page(page, url)
    for source, expected in MARKDOWN_CASES.items():
        assert page.evaluate(_RENDER, source) == expected, source
    for target in UNSAFE_TARGETS:
        html = page.evaluate(_RENDER, f"[x]({target}) ![y]({target})")
        assert "<a" not in html and "<img" not in html, (target, html)
    fence = page.evaluate(_RENDER, "```python\nx = 1  # unclosed, still streaming")
    # (highlight.js's class for a comment; kiln's earlier highlighter called it tok-comment)
    assert 'class="code-block"' in fence and '<span class="hljs-comment">' in fence
    # Code is highlighted by highlight.js.
    code = page.evaluate(_RENDER, "```python\nimport os\ndef home():\n    return os.sep\n```")
    assert '<span class="hljs-keyword">import</span>' in code, code
    assert '<span class="hljs-keyword">def</span>' in code and "hljs-title" in code, code
    # LaTeX math is typeset by KaTeX, inline and displayed; a price is not a formula.
    for source, display in MATH_CASES.items():
        html = page.evaluate(_RENDER, source)
        assert 'class="katex"' in html and "<annotation" in html, (source, html)
        assert ('class="katex-display"' in html) == display, (source, html)
        assert "$" not in html.replace("$5 and $10", ""), (source, html)
    prices = page.evaluate(_RENDER, "It costs $5 and $10, or `$x$` in code.")
    assert "katex" not in prices and "$5 and $10" in prices and "<code>$x$</code>" in prices
    # TeX cannot make links or markup: KaTeX runs without trust.
    for source in UNSAFE_TEX:
        made = page.evaluate(_ELEMENTS, source)
        assert "math" in made["tags"], (source, made)
        assert not {"a", "img", "image", "use", "iframe", "script"} & set(made["tags"]), made
        risky = [a for a in made["attributes"] if a in ("href", "src", "xlink:href")]
        assert not risky and not [a for a in made["attributes"] if a.startswith("on")], made
    # In the page, KaTeX's stylesheet applies and its fonts load from kiln (font-src 'self'):
    # the page's watch fails the test on any Content-Security-Policy violation.
    fonts = page.evaluate(_TYPESET, r"$$\sqrt{x^2+1} \cdot \overrightarrow{AB}$$")
    assert fonts["mathml_hidden"] and fonts["katex_fonts"], fonts
    assert _pwned(page) is None


def test_export_then_import(page: Page, context: BrowserContext, url: str, tmp_path: Path) -> None:
    open_page(page, url)
    set_max_new_tokens(page, 8)
    send(page, "The fox jumped")
    answer = wait_answered(page).locator(".message-body").inner_text()

    # Export: JSON (the whole conversation) and Markdown (the branch shown), as downloads.
    page.locator("#export-menu summary").click()
    with page.expect_download() as json_download:
        page.locator("#export-json").click()
    exported_path = tmp_path / json_download.value.suggested_filename
    json_download.value.save_as(exported_path)
    assert exported_path.suffix == ".json"
    exported = json.loads(exported_path.read_text())
    [conversation] = exported["conversations"]
    assert conversation["title"] == "The fox jumped"
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][0]["content"] == "The fox jumped"
    assert conversation["messages"][1]["model"] == "stories"
    page.locator("#export-menu summary").click()
    with page.expect_download() as markdown_download:
        page.locator("#export-markdown").click()
    assert markdown_download.value.suggested_filename.endswith(".md")
    markdown = Path(markdown_download.value.path()).read_text()
    assert markdown.startswith("# The fox jumped\n") and "## User\n\nThe fox jumped" in markdown

    # The conversation is deleted (through the API, with the page's cookie), then imported
    # back from the file: the same messages.
    deleted = context.request.delete(f"{url}/api/chat/conversations/{conversation['id']}")
    assert deleted.status == 204
    open_page(page, url)
    titles = page.locator("#conversations .conversation-title")
    expect(page.locator("#conversations")).to_contain_text("No conversations yet.")
    page.locator("#import-file").set_input_files(exported_path)
    expect(page.locator("#notice")).to_contain_text("Imported 1 conversation")
    expect(page.locator("#chat-title")).to_have_text("The fox jumped")
    expect(page.locator("#messages")).to_contain_text("The fox jumped")
    expect(page.locator("#messages")).to_contain_text(answer)
    expect(titles).to_have_text(["The fox jumped"])

    # A file that is no export: refused with the server's reason, nothing imported.
    bad = tmp_path / "notes.json"
    bad.write_text('{"hello": "world"}')
    page.locator("#import-file").set_input_files(bad)
    expect(page.locator("#notice")).to_contain_text("not a kiln chat export")
    expect(titles).to_have_text(["The fox jumped"])
