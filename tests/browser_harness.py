"""Headless Chromium for the page tests: Debian's ``chromium`` driven by Playwright.

NOTE: Playwright's own browser download is not used (CI and the development machine reach no
CDN): Playwright launches the system Chromium through ``executable_path``. It talks to it over
the DevTools protocol, so no chromedriver is needed either.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Dialog,
    Error,
    Locator,
    Page,
    expect,
    sync_playwright,
)

from kiln.server.chat.owner import COOKIE
from kiln.store import ChatStore, MessageStatus, Role

TIMEOUT_MS = 30_000
ARTIFACTS_ENV = "KILN_TEST_ARTIFACTS"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 360, "height": 740}

expect.set_options(timeout=TIMEOUT_MS)


def chromium_executable() -> str:
    """The system Chromium; the page tests fail (never skip) without it: ``.ci/run`` installs
    it."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.fail("the page tests need Debian's chromium: apt-get install -y chromium (.ci/run)")


@contextlib.contextmanager
def launched_chromium() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_executable(),
            # /dev/shm is small in containers; Chromium then crashes tabs under load.
            args=["--disable-dev-shm-usage", "--disable-gpu"],
        )
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageWatch:
    """What a page reported that a test should never see: Content-Security-Policy violations
    (Chromium logs them to the console), uncaught script errors, and dialogs nobody expected
    (an ``alert(1)`` payload that ran would open one)."""

    csp_violations: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("console", self._on_console)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.on("dialog", self._on_dialog)

    def _on_console(self, message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            self.csp_violations.append(message.text)

    def _on_dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        with contextlib.suppress(Error):  # the page may be closing
            dialog.dismiss()

    def assert_clean(self) -> None:
        assert not self.csp_violations, self.csp_violations
        assert not self.page_errors, self.page_errors
        assert not self.dialogs, self.dialogs


@contextlib.contextmanager
def new_context(browser: Browser, **options: object) -> Iterator[BrowserContext]:
    """A fresh browser profile (desktop-sized unless told): its own owner cookie, so its own
    conversations."""
    context = browser.new_context(**{"viewport": DESKTOP, "accept_downloads": True, **options})
    context.set_default_timeout(TIMEOUT_MS)
    try:
        yield context
    finally:
        context.close()


@contextlib.contextmanager
def watched_page(context: BrowserContext) -> Iterator[Page]:
    """A page of ``context``; whatever the test did with it, the page never tripped its own
    Content-Security-Policy, threw, or opened a dialog."""
    watch = PageWatch()
    page = context.new_page()
    watch.attach(page)
    yield page
    watch.assert_clean()


def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: ``$KILN_TEST_ARTIFACTS`` (CI keeps it), else pytest's temporary
    directory; never inside the repository."""
    configured = os.environ.get(ARTIFACTS_ENV)
    if configured:
        path = Path(configured).expanduser().resolve() / "chat-page"
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("artifacts")


# --- the chat page ----------------------------------------


def open_page(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")


def assistant_messages(page: Page) -> Locator:
    return page.locator("#messages article.message.assistant")


def wait_idle(page: Page) -> None:
    """No answer streams: Send is back, Stop hidden."""
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()


def wait_answered(page: Page) -> Locator:
    """The last answer, once complete and the page idle."""
    answer = assistant_messages(page).last
    expect(answer).to_have_attribute("data-status", "complete")
    wait_idle(page)
    return answer


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def set_max_new_tokens(page: Page, tokens: int) -> None:
    page.locator("#open-settings").click()
    page.locator("#settings [name=max_new_tokens]").fill(str(tokens))
    page.locator("#save-settings").click()
    expect(page.locator("#settings")).to_be_hidden()


def owner_cookie(context: BrowserContext) -> str:
    [value] = [c["value"] for c in context.cookies() if c["name"] == COOKIE]
    return value


def plant_conversation(chat_db: Path, owner: str, title: str, question: str, answer: str) -> None:
    """A conversation written to the store directly: no model writes these answers on cue."""
    store = ChatStore(chat_db)
    try:
        conversation = store.create_conversation(owner, title)
        asked = store.add_message(owner, conversation.id, None, Role.USER, question)
        store.add_message(
            owner, conversation.id, asked.id, Role.ASSISTANT, answer, MessageStatus.COMPLETE
        )
    finally:
        store.close()
