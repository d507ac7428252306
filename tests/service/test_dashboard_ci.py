"""The dashboard's CI panel and failed VMs, in a real browser (headless Chromium).

The service runs in this test's event loop (``github_harness.serving``) with
its GitHub integration against FakeGitHub (a stand-in for GitHub's REST API
and webhooks, on 127.0.0.1) and the fake VM backend, whose VMs of one pool
never boot (:class:`~stoker.errors.BootError` with a console, as a real boot
failure has).  The page is driven with Playwright's async API in the same
loop.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dashboard_browser import async_chromium, screenshot_path
from github_harness import (
    LABELS,
    REPO,
    FakeGitHub,
    app_key,
    github_for,
    github_table,
    serving,
    stand_in_dir,
    until,
)

from conftest import ConfigFactory
from stoker.backends.base import MachineSpec
from stoker.errors import BootError
from stoker.service.config import TokenConfig
from stoker.service.fake_backend import FakeBackend

pytest.importorskip("playwright")
from playwright.async_api import Browser, expect

pytestmark = pytest.mark.timeout(300)

VIEWER = "stk_dashboard_viewer_0123456789"
SUBMITTER = "stk_dashboard_ci_0123456789"
#: The broken pool's VMs are the only ones with this much memory.
BROKEN_MB = 320
CONSOLE = "[    0.12] Linux version 6.1\n[    0.50] VFS: Cannot open root device\nKernel panic\n"


@pytest.fixture
def github(tmp_path: Path, sock: Any) -> Iterator[FakeGitHub]:
    with github_for(sock, app_key(tmp_path)[1]) as fake:
        yield fake


def never_boots(spec: MachineSpec) -> None:
    if spec.memory_mb == BROKEN_MB:
        raise BootError("the guest agent did not come up", console=CONSOLE)


async def test_ci_panel_and_failed_vms(
    make_config: ConfigFactory, tmp_path: Path, github: FakeGitHub, sock: Any
) -> None:
    tokens = tuple(
        TokenConfig(name=name, sha256=hashlib.sha256(token.encode()).hexdigest(), scopes=scopes)
        for name, token, scopes in (
            ("viewer", VIEWER, ("read",)),
            ("ci", SUBMITTER, ("submit", "read")),
        )
    )
    config = make_config(
        pools={
            "gh": {"cpus": 1, "memory": 256, "max": 2},
            "broken": {"cpus": 1, "memory": BROKEN_MB, "max": 1},
        },
        submitters={"overrides": {"github": {"max_concurrent": 100}}},
        github=github_table(
            tmp_path, github.url, runner_user="root", pools={"gh": {"labels": LABELS}}
        ),
        retry_limit=0,
    ).model_copy(update={"tokens": tokens})
    backend = FakeBackend(
        image_files={"/opt/actions-runner": stand_in_dir(tmp_path)}, on_launch=never_boots
    )
    async with serving(config, sock, backend=backend) as running:
        workflow_job = github.queue_job(REPO, LABELS)
        await until(
            lambda: github.jobs[workflow_job].status == "completed" and not github.runners,
            60,
            "the workflow job to finish on a runner of ours",
        )
        async with httpx.AsyncClient(base_url=running.url) as client:
            created = await client.post(
                "/v1/jobs",
                headers={"Authorization": f"Bearer {SUBMITTER}"},
                files={"spec": (None, json.dumps({"command": ["true"], "pool": "broken"}))},
            )
            assert created.status_code == 201, created.text
        broken_job = created.json()["id"]
        await running.service.wait(broken_job, timeout=30)

        async with async_chromium() as launched:
            browser: Browser = launched  # type: ignore[assignment]
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{running.url}/ui/")
            await page.get_by_label("API token").fill(VIEWER)
            await page.get_by_role("button", name="Sign in").click()

            ci = page.locator("#integrations")
            await expect(ci).to_contain_text("github")
            await expect(ci).to_contain_text(f"repository:{REPO}")
            await expect(ci).to_contain_text("(leader)")
            row = ci.locator("tbody tr").first
            await expect(row.locator("td").nth(4)).to_contain_text("ago")  # last webhook
            await expect(row.locator("td").nth(5)).to_contain_text("ago")  # last pass
            finished = page.locator("#finished")
            await expect(finished.locator("tr", has_text="errored")).to_contain_text("1")
            await expect(finished.locator("tr", has_text="succeeded")).to_contain_text("1")
            await page.screenshot(path=screenshot_path("overview-ci"), full_page=True)

            await page.get_by_role("link", name="VMs").click()
            failed = page.locator("details").filter(has_text="broken")
            await expect(failed).to_have_count(1)
            await expect(failed.locator("summary")).to_contain_text("did not come up")
            console = failed.get_by_label("Console of", exact=False)
            await expect(console).to_be_hidden()
            await failed.locator("summary").click()
            await expect(console).to_contain_text("VFS: Cannot open root device")
            await expect(failed.get_by_role("link")).to_have_text(broken_job[:12])
            # The next refresh keeps it open.
            await page.wait_for_timeout(3500)
            await expect(console).to_be_visible()
            await page.screenshot(path=screenshot_path("vms"), full_page=True)
            assert not errors, errors
