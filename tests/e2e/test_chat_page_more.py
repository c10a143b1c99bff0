"""More of the chat page in headless Chromium (Playwright) against real kiln servers on
loopback: switching the model from the page, a server restart, two browsers that must not see
each other's conversations, and phone and desktop screenshots.

Screenshots are written under ``$KILN_TEST_ARTIFACTS/chat-page`` when that is set (CI keeps
them), else under pytest's temporary directory; never into the repository.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Error, Page, expect

from browser_harness import (
    PHONE,
    TIMEOUT_MS,
    artifacts_dir,
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
from kiln.serving.models import ModelManager, ModelSpec
from server_harness import free_port, running_server

TIMEOUT_S = TIMEOUT_MS / 1000
KV_CACHE_BYTES = 16 << 20
# Each model as the page's server loads it: stories260K has no chat template of its own.
MODEL_OPTIONS = {"kv_cache_memory": KV_CACHE_BYTES, "chat_template": "chatml"}

SHOWCASE = """Here is a table, some code and a very long line.

| model | params | note |
|---|--:|---|
| stories260K | 0.26M | tiny |
| SmolLM2-135M | 135M | the default |

```python
def greet(name: str) -> str:
    return f"Hello, {name}! " + "a deliberately long line that must scroll inside its block"
```

Averyveryverylongwordwithoutanyspacesthatmustwrapratherthanwidenthepageonaphone
"""


def _stories(stories_dir: Path) -> LLM:
    return LLM(str(stories_dir), **MODEL_OPTIONS)


@pytest.fixture(scope="module")
def chat_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chat-page-more") / "chat.sqlite3"


@pytest.fixture(scope="module")
def url(stories_dir: Path, chat_db: Path) -> Iterator[str]:
    config = ServerConfig(chat_db=str(chat_db), model_id="stories")
    with running_server(_stories(stories_dir), config) as base:
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


def _author(answer_index: int, page: Page) -> str:
    return assistant_messages(page).nth(answer_index).locator(".author").inner_text()


# --- model switching --------------------------------------------------------------------------


class HeldLoader:
    """Loads specs as the server would, but a test may hold one model's load until it lets
    go: "loading" then stays on the page long enough to be seen."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}

    def hold(self, name: str) -> None:
        self.gates[name] = threading.Event()

    def let_go(self) -> None:
        for gate in self.gates.values():
            gate.set()

    def __call__(self, spec: ModelSpec) -> LLM:
        gate = self.gates.get(spec.name)
        if gate is not None:
            assert gate.wait(TIMEOUT_S), f"the test never let {spec.name} load"
        return LLM(spec.model, **spec.options)


@pytest.fixture
def two_models_url(
    stories_dir: Path, eos_dir: Path, tmp_path: Path
) -> Iterator[tuple[str, HeldLoader]]:
    """A server with stories260K active, its copy with one more EOS id (``eos``), and a model
    that fails to load (``broken``)."""
    loader = HeldLoader()
    specs = [
        ModelSpec("stories", str(stories_dir), MODEL_OPTIONS),
        ModelSpec("eos", str(eos_dir), MODEL_OPTIONS),
        ModelSpec("broken", str(stories_dir / "no-such-model"), MODEL_OPTIONS),
    ]
    manager = ModelManager(specs, loader=loader, switch_wait_seconds=TIMEOUT_S)
    manager.load("stories")
    try:
        with running_server(manager, ServerConfig(chat_db=str(tmp_path / "chat.sqlite3"))) as base:
            yield base, loader
    finally:
        loader.let_go()  # nothing waits for a test that failed midway


def test_switch_model_from_the_page(page: Page, two_models_url: tuple[str, HeldLoader]) -> None:
    url, loader = two_models_url
    status = page.locator("#model-status")
    open_page(page, url)
    expect(status).to_have_text("stories: available, answering")
    expect(page.locator("#model-select option")).to_have_count(3)
    expect(page.locator("#activate")).to_be_disabled()  # it is the model answering
    set_max_new_tokens(page, 5)
    send(page, "Once upon a time")
    wait_answered(page)
    assert _author(0, page) == "stories"

    # Activate: the page shows the load under way, then the model available and answering.
    loader.hold("eos")
    page.locator("#model-select").select_option("eos")
    expect(status).to_have_text("eos: unloaded")
    page.locator("#activate").click()
    expect(status).to_have_text("eos: loading")
    expect(status).to_have_attribute("data-status", "loading")
    loader.let_go()
    expect(status).to_have_text("eos: available, answering")
    expect(page.locator("#model-select option", has_text="stories")).to_have_text(
        "stories (unloaded)"
    )
    # The next answer in the same conversation is eos's; the first one still says stories.
    send(page, "And then?")
    expect(assistant_messages(page)).to_have_count(2)
    wait_answered(page)
    assert [_author(0, page), _author(1, page)] == ["stories", "eos"]

    # A model that cannot load: the page says why, and eos keeps answering.
    page.locator("#model-select").select_option("broken")
    page.locator("#activate").click()
    expect(status).to_contain_text("broken: failed (")
    expect(page.locator("#model-select option", has_text="eos")).to_have_text("eos (available)")


# --- restart ----------------------------------------------------------------------------------


def test_restart_the_server_and_reload(browser: Browser, stories_dir: Path, tmp_path: Path) -> None:
    """Conversations live in the store, not in the server or the page: a new server on the
    same database (and port) shows them all, branches included."""
    config = ServerConfig(chat_db=str(tmp_path / "chat.sqlite3"), model_id="stories")
    port = free_port()
    position = "#messages article.assistant .siblings .position"
    with new_context(browser) as context, watched_page(context) as page:
        with running_server(_stories(stories_dir), config, port=port) as url:
            open_page(page, url)
            set_max_new_tokens(page, 6)
            send(page, "Remember this")
            first = wait_answered(page).locator(".message-body").inner_text()
            page.locator("#messages article.assistant .regenerate").click()
            expect(page.locator(position)).to_have_text("2/2")
            second = wait_answered(page).locator(".message-body").inner_text()
        # The server is gone: the page cannot be loaded.
        with pytest.raises(Error, match="ERR_CONNECTION_REFUSED"):
            page.reload()
        with running_server(_stories(stories_dir), config, port=port) as url:
            open_page(page, url)
            titles = page.locator("#conversations .conversation-title")
            expect(titles).to_have_text(["Remember this"])
            titles.click()
            expect(page.locator("#messages article.user")).to_contain_text("Remember this")
            expect(page.locator(position)).to_have_text("2/2")
            expect(assistant_messages(page).locator(".message-body")).to_have_text(second)
            page.locator("#messages article.assistant .previous").click()
            expect(page.locator(position)).to_have_text("1/2")
            expect(assistant_messages(page).locator(".message-body")).to_have_text(first)
            assert _author(0, page) == "stories"


# --- owners -----------------------------------------------------------------------------------


def test_a_second_browser_sees_none_of_the_first_ones_conversations(
    browser: Browser, page: Page, context: BrowserContext, url: str
) -> None:
    open_page(page, url)
    set_max_new_tokens(page, 5)
    send(page, "Secret plans")
    wait_answered(page)
    [mine] = context.request.get(f"{url}/api/chat/conversations").json()
    api = f"{url}/api/chat/conversations/{mine['id']}"

    with new_context(browser) as other_context, watched_page(other_context) as other:
        open_page(other, url)
        assert owner_cookie(other_context) != owner_cookie(context)
        expect(other.locator("#conversations")).to_have_text("No conversations yet.")
        other.locator("#search").fill("Secret")
        expect(other.locator("#conversations")).to_have_text("Nothing found.")

        # Nor through the API with that browser's cookie: the conversation does not exist for
        # it (404, not 403), for reading, searching, exporting, writing and deleting alike.
        request = other_context.request
        assert request.get(f"{url}/api/chat/conversations").json() == []
        assert request.get(f"{url}/api/chat/search?q=Secret").json() == []
        assert request.get(f"{url}/api/chat/export").json()["conversations"] == []
        assert request.get(api).status == 404
        assert request.get(f"{api}/export?format=markdown").status == 404
        assert request.patch(api, data={"title": "mine now"}).status == 404
        assert request.post(f"{api}/messages", data={"content": "hi"}).status == 404
        assert request.delete(api).status == 404

    # The first browser still has it, untouched.
    mine_now = context.request.get(api)
    assert mine_now.status == 200 and mine_now.json()["title"] == "Secret plans"
    open_page(page, url)
    expect(page.locator("#conversations .conversation-title")).to_have_text(["Secret plans"])


# --- layouts ----------------------------------------------------------------------------------


def _no_horizontal_scroll(page: Page) -> None:
    width = page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"], f"the page is {width}px wide"


def _screenshot(page: Page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=path)
    with Image.open(path) as image:
        assert image.width == page.viewport_size["width"], (path, image.size)
    return path


def test_phone_and_desktop_screenshots(
    browser: Browser,
    page: Page,
    context: BrowserContext,
    url: str,
    chat_db: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = artifacts_dir(tmp_path_factory)
    open_page(page, url)
    owner = owner_cookie(context)
    plant_conversation(chat_db, owner, "Tables and code", "Show me a table and code", SHOWCASE)

    # Desktop: the list beside the chat, in light and dark themes.
    open_page(page, url)
    page.locator("#conversations .conversation-title").click()
    expect(page.locator("#messages table")).to_be_visible()
    expect(page.locator("#sidebar")).to_be_in_viewport()
    expect(page.locator("#open-sidebar")).to_be_hidden()
    _no_horizontal_scroll(page)
    _screenshot(page, folder, "desktop")
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    page.locator("#theme").click()
    expect(page.locator("html")).to_have_attribute(
        "data-theme", "dark" if "255" in background else "light"
    )
    assert page.evaluate("() => getComputedStyle(document.body).backgroundColor") != background
    _screenshot(page, folder, "desktop-other-theme")

    # Phone, 360 px, the same owner: the list is a drawer behind a button; nothing is wider
    # than the screen (long code scrolls inside its block, long words wrap).
    with new_context(browser, viewport=PHONE, is_mobile=True, has_touch=True) as phone_context:
        phone_context.add_cookies(
            [c for c in context.cookies() if c["name"] == "kiln_owner" or c["value"] == owner]
        )
        with watched_page(phone_context) as phone:
            open_page(phone, url)
            expect(phone.locator("#sidebar")).not_to_be_in_viewport()
            expect(phone.locator("#composer")).to_be_in_viewport(ratio=1)
            _no_horizontal_scroll(phone)
            _screenshot(phone, folder, "phone-empty")
            phone.locator("#open-sidebar").click()
            expect(phone.locator("#sidebar")).to_be_in_viewport(ratio=1)
            _screenshot(phone, folder, "phone-list")
            phone.locator("#conversations .conversation-title").click()
            expect(phone.locator("#sidebar")).not_to_be_in_viewport()
            expect(phone.locator("#messages table")).to_be_visible()
            expect(phone.locator("#composer")).to_be_in_viewport(ratio=1)
            _no_horizontal_scroll(phone)
            _screenshot(phone, folder, "phone-chat")
            wait_idle(phone)
    print(f"screenshots in {folder}")
