"""Real headless Chromium (Debian's ``chromium``) driven by Playwright, for the dashboard tests.

Playwright's own browser downloads cannot be reached here, so it is pointed
at the system's executable.  ``--no-sandbox``: Chromium's sandbox refuses to
run as root (CI runs as root); the browser only ever loads our own page from
127.0.0.1.  Screenshots go to ``build/test-artifacts/dashboard`` (kept after
the run, ignored by git).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Final

import pytest

#: Where the test run keeps its screenshots.
ARTIFACTS: Final = Path(__file__).resolve().parents[2] / "build" / "test-artifacts" / "dashboard"


def chromium_path() -> str:
    """The Chromium executable (``$STOKER_CHROMIUM``, else ``chromium`` on PATH); skips if none."""
    path = os.environ.get("STOKER_CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.skip("Debian's chromium is not installed (scripts/setup.sh installs it)")
    return path


@contextmanager
def chromium() -> Iterator[object]:
    """A launched headless browser; closing it ends Chromium and Playwright's driver."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # pragma: no cover - a dev dependency
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


def screenshot_path(name: str) -> Path:
    """``build/test-artifacts/dashboard/<name>.png`` (its directory made)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


@asynccontextmanager
async def async_chromium() -> AsyncIterator[object]:
    """:func:`chromium` for tests whose service runs in their own event loop."""
    try:
        from playwright.async_api import async_playwright
    except ImportError:  # pragma: no cover - a dev dependency
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    executable = chromium_path()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=["--no-sandbox"]
        )
        try:
            yield browser
        finally:
            await browser.close()
