"""A real headless browser for the page tests: the system's Chromium (Debian's ``chromium``, which
``make install`` installs when missing) driven by Playwright's Python API. Playwright's own browser
download is never used (it cannot work offline)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


def chromium_path() -> str:
    path = os.environ.get("VITATTN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium: the page tests need Debian's chromium (make install installs it)")
    return path


@dataclass
class Opened:
    """A page opened from a file, with everything it logged and requested."""

    page: Any
    url: str
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def check_clean(self, files_under: Path | None = None) -> None:
        """No console errors, no uncaught exceptions, and no request but the page's own file (or, with
        ``files_under``, files in that folder: the gallery's thumbnails)."""
        assert self.errors == [], self.errors
        if files_under is None:
            assert self.requests == [self.url], self.requests
            return
        root = files_under.resolve().as_uri() + "/"
        assert self.requests[0] == self.url and all(u.startswith(root) for u in self.requests), self.requests


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def open_file(browser: Any, path: Path, *, ready: str | None = "body[data-ready='1']") -> Opened:
    """Open ``path`` from file:// in a fresh page; every request is recorded and any network one aborted."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    url = path.resolve().as_uri()
    opened = Opened(page, url)

    def on_console(msg: Any) -> None:
        if msg.type in ("error", "warning"):
            opened.errors.append(f"console {msg.type}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: opened.errors.append(f"page error: {exc}"))
    page.on("request", lambda req: opened.requests.append(req.url))

    def route(r: Any) -> None:  # every request is seen here; only files are let through (and recorded anyway)
        if r.request.url.startswith("file:"):
            r.continue_()
        else:
            r.abort()

    page.route("**/*", route)
    page.goto(url)
    if ready:
        page.wait_for_selector(ready, timeout=20_000)
    return opened
