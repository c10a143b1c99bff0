"""The chat page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``,
driven by selenium) against a real kiln server on loopback.

It sends a message and watches the answer stream in, stops one, regenerates and edits and
walks the branches; it plants XSS payloads in an answer and checks that they render as text
and run nothing; the page carries a strict Content-Security-Policy and breaks none of it.

These tests fail (never skip) when Chromium is missing: ``.ci/run`` installs it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from test_chat_api import Pace

from kiln import LLM
from kiln.config.server import ServerConfig
from kiln.server.chat.owner import COOKIE
from kiln.store import ChatStore, MessageStatus, Role
from server_harness import running_server

TIMEOUT_S = 30.0
T = TypeVar("T")

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


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.fail(
            "the page tests need Debian's chromium and chromium-driver: "
            "apt-get install -y chromium chromium-driver (.ci/run does it)"
        )
    return browser, driver


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
def browser() -> Iterator[WebDriver]:
    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(condition: Callable[[], T], what: str, timeout: float = TIMEOUT_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # an element replaced under us by a re-render: look again
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.03)


def _click(browser: WebDriver, selector: str, what: str) -> None:
    """Click the element ``selector`` finds, looking again if a re-render replaced it."""

    def click() -> bool:
        browser.find_element(By.CSS_SELECTOR, selector).click()
        return True

    _wait(click, what)


def _open_page(browser: WebDriver, url: str) -> None:
    browser.get(url + "/")
    _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), "page")


def _assistant_messages(browser: WebDriver) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, "#messages article.message.assistant")


def _last_answer_status(browser: WebDriver) -> str | None:
    answers = _assistant_messages(browser)
    return answers[-1].get_attribute("data-status") if answers else None


def _idle(browser: WebDriver) -> bool:
    """No answer streams: Send is back, Stop hidden."""
    return browser.find_element(By.ID, "send").is_displayed()


def _send(browser: WebDriver, text: str) -> None:
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def _set_max_new_tokens(browser: WebDriver, tokens: int) -> None:
    browser.find_element(By.ID, "open-settings").click()
    field = _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "#settings [name=max_new_tokens]"), "dialog"
    )
    field.clear()
    field.send_keys(str(tokens))
    browser.find_element(By.ID, "save-settings").click()
    _wait(lambda: not browser.find_element(By.ID, "settings").is_displayed(), "dialog closed")


def _pwned(browser: WebDriver) -> Any:
    return browser.execute_script("return window.__pwned")


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
    assert httpx.get(url + "/ui/..%2Fllm.py", timeout=TIMEOUT_S).status_code == 404
    assert httpx.get(url + "/ui/nothing.js", timeout=TIMEOUT_S).status_code == 404


def test_send_stream_stop(browser: WebDriver, url: str, llm: LLM, pace: Pace) -> None:
    _open_page(browser, url)
    _wait(lambda: "stories" in browser.find_element(By.ID, "model-status").text, "model status")
    assert "available" in browser.find_element(By.ID, "model-status").text
    _set_max_new_tokens(browser, 40)
    pace.delay = 0.05  # 40 tokens take two seconds: long enough to watch them arrive
    try:
        _send(browser, "Once upon a time")
        # Streaming: some text is shown while the answer is still being written.
        partial = _wait(
            lambda: (
                _last_answer_status(browser) == "streaming"
                and _assistant_messages(browser)[-1]
                .find_element(By.CLASS_NAME, "message-body")
                .text
            ),
            "the first streamed text",
        )
        assert browser.find_element(By.ID, "stop").is_displayed()
        _wait(lambda: _last_answer_status(browser) == "complete", "the complete answer")
        final = _assistant_messages(browser)[-1].find_element(By.CLASS_NAME, "message-body").text
        assert len(final) > len(partial) and final.startswith(partial.strip()[:5])
        _wait(lambda: _idle(browser), "Send back")
        days = [d.text for d in browser.find_elements(By.CSS_SELECTOR, "#conversations .day")]
        assert days == ["Today"]
        titles = browser.find_elements(By.CSS_SELECTOR, "#conversations .conversation-title")
        assert [t.text for t in titles] == ["Once upon a time"]

        # Stop, mid-answer: the engine request is aborted and its blocks freed.
        _set_max_new_tokens(browser, 300)
        _send(browser, "Tell me more")
        _wait(
            lambda: (
                _last_answer_status(browser) == "streaming"
                and _assistant_messages(browser)[-1].text
            ),
            "the second answer streaming",
        )
        _click(browser, "#stop", "Stop")
        _wait(lambda: _last_answer_status(browser) == "stopped", "the answer stopped")
    finally:
        pace.delay = 0.0
    assert "Stopped." in _assistant_messages(browser)[-1].text
    _wait(lambda: llm.engine.stats().num_kv_blocks_used == 0, "KV blocks freed")


def test_regenerate_edit_and_switch_branches(browser: WebDriver, url: str) -> None:
    _open_page(browser, url)
    _click(browser, "#new-chat", "New chat")
    _set_max_new_tokens(browser, 10)
    _send(browser, "The cat sat")
    _wait(lambda: _last_answer_status(browser) == "complete" and _idle(browser), "an answer")

    _click(browser, "#messages article.assistant .regenerate", "Regenerate")
    position = "#messages article.assistant .siblings .position"
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, position).text == "2/2", "2/2")
    _wait(lambda: _idle(browser), "the regenerated answer")
    _click(browser, "#messages article.assistant .previous", "<")
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, position).text == "1/2", "1/2")

    # Edit the question: a second branch from the start.
    _click(browser, "#messages article.user .edit", "Edit")
    editor = _wait(lambda: browser.find_element(By.CSS_SELECTOR, ".editor textarea"), "editor")
    editor.clear()
    editor.send_keys("The dog ran")
    _click(browser, ".editor .save-edit", "Send the edit")
    user_position = "#messages article.user .siblings .position"
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, user_position).text == "2/2", "edit")
    _wait(lambda: _idle(browser), "the answer to the edit")
    assert browser.find_element(By.CSS_SELECTOR, "#messages article.user").text.startswith(
        "You\nThe dog ran"
    )
    # The first branch is still there, with both of its answers.
    _click(browser, "#messages article.user .previous", "< on the question")
    _wait(
        lambda: "The cat sat" in browser.find_element(By.CSS_SELECTOR, "#messages .user").text,
        "the first branch",
    )
    # (shown with its newest answer)
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, position).text == "2/2", "its answers")
    # Reloaded, the page shows the branch last chosen.
    _open_page(browser, url)
    _click(browser, "#conversations .conversation-title", "the conversation")
    _wait(lambda: "The cat sat" in browser.find_element(By.ID, "messages").text, "reloaded")
    # Search finds the other branch's question, and opens the conversation on that branch.
    browser.find_element(By.ID, "search").send_keys("dog ran")
    _click(browser, "#conversations .search-results .conversation-title", "a search result")
    _wait(lambda: "The dog ran" in browser.find_element(By.ID, "messages").text, "the found one")


def test_xss_payloads_render_as_text(browser: WebDriver, url: str, chat_db: Path) -> None:
    _open_page(browser, url)
    owner = browser.get_cookie(COOKIE)["value"]
    # The answer is written to the store directly: no model would write these on cue.
    store = ChatStore(chat_db)
    conversation = store.create_conversation(owner, "<img src=x onerror=window.__pwned=1>")
    question = store.add_message(
        owner, conversation.id, None, Role.USER, '<script>window.__pwned="user"</script>'
    )
    store.add_message(
        owner, conversation.id, question.id, Role.ASSISTANT, XSS_ANSWER, MessageStatus.COMPLETE
    )
    store.close()

    _open_page(browser, url)
    item = _wait(
        lambda: browser.find_element(By.CSS_SELECTOR, "#conversations .conversation-title"),
        "the planted conversation",
    )
    assert item.text == "<img src=x onerror=window.__pwned=1>"
    _click(browser, "#conversations .conversation-title", "the planted conversation")
    answer = _wait(lambda: _assistant_messages(browser)[0], "the planted answer")
    messages = browser.find_element(By.ID, "messages")

    # Every payload is shown as the characters it is, and none ran.
    text = messages.text
    for visible in (
        '<script>window.__pwned="user"</script>',
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
        assert messages.find_elements(By.TAG_NAME, tag) == [], tag
    hrefs = [a.get_attribute("href") for a in messages.find_elements(By.TAG_NAME, "a")]
    assert hrefs == ["https://example.com/docs"]
    # Markdown still renders: a table, inline code, a code block with its Copy button.
    assert answer.find_element(By.CSS_SELECTOR, "table td strong").text == "bold"
    assert answer.find_element(By.CSS_SELECTOR, "p code").text == "<b>code</b>"
    assert answer.find_element(By.CSS_SELECTOR, ".code-block .copy").text == "Copy"
    # Clicking what would have been links runs nothing either.
    for anchor in messages.find_elements(By.TAG_NAME, "a"):
        assert anchor.get_attribute("rel") == "noopener noreferrer nofollow"
    assert _pwned(browser) is None

    # A payload typed by the user is text too.
    _click(browser, "#new-chat", "New chat")
    typed = "<img src=x onerror=\"window.__pwned='typed'\"> [x](javascript:alert(1))"
    _send(browser, typed)
    body = "#messages .user .message-body"
    _wait(lambda: browser.find_element(By.CSS_SELECTOR, body).text == typed, "the typed text")
    _wait(lambda: _idle(browser), "its answer")
    messages = browser.find_element(By.ID, "messages")
    assert messages.find_elements(By.TAG_NAME, "img") == []
    assert _pwned(browser) is None
    # And the page itself never tripped its own Content-Security-Policy.
    logs = browser.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e["message"]], logs


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


def test_markdown_renderer(browser: WebDriver, url: str) -> None:
    """kiln's Markdown renderer, run in the browser on known inputs."""
    _open_page(browser, url)
    render = """
        const [text, done] = arguments;
        import('/ui/markdown.js').then((md) => {
            const box = document.createElement('div');
            box.append(md.renderMarkdown(text));
            done(box.innerHTML);
        });
    """
    for source, expected in MARKDOWN_CASES.items():
        assert browser.execute_async_script(render, source) == expected, source
    for target in UNSAFE_TARGETS:
        html = browser.execute_async_script(render, f"[x]({target}) ![y]({target})")
        assert "<a" not in html and "<img" not in html, (target, html)
    fence = browser.execute_async_script(render, "```python\nx = 1  # unclosed, still streaming")
    assert 'class="code-block"' in fence and '<span class="tok-comment">' in fence
    assert _pwned(browser) is None
