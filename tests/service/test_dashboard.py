"""The dashboard in a real browser: headless Chromium against a real ``stoker serve``.

The service runs on the fake backend (its "VMs" run commands on this host:
the jobs here are harmless shell), listening on 127.0.0.1; the page is the
one users get, signed in through its form.  Jobs that must be seen running
wait for a gate file the test creates, so what the page shows while a job
runs is proven by cause, not by timing.  Screenshots of the overview, the
jobs list, a job page and the phone layout are kept in
``build/test-artifacts/dashboard``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dashboard_browser import chromium, screenshot_path
from serve_process import ServeProcess

pytest.importorskip("playwright")
from playwright.sync_api import Browser, Page, expect

pytestmark = pytest.mark.timeout(300)

#: The hostile job's long line (the issue's figure): 50 MB without a newline.
LONG_LINE = 50_000_000


#: Room for the 50 MB line (the default keeps 16 MiB of a job's log), and a pool whose VMs
#: reach the network only through the egress proxy, which allows only names no test uses.
EXTRA_CONFIG = """
[limits]
max_log_bytes = "64M"

[pools.net]
cpus = 1
memory = "256M"
max = 2
labels = ["net"]
network = { mode = "egress", allow = ["pkg.test"] }
"""

#: A job in the egress pool: an artifact, then two plain-HTTP requests for denied.test
#: through the loopback proxy only (NETWORK RULE: it exits at once without one; the
#: proxy refuses the name before any lookup), then exit status 3.
NET_CLIENT = r"""
import os, pathlib, sys, urllib.error, urllib.request
pathlib.Path("out").mkdir()
pathlib.Path("out/report.txt").write_text("all good\n")
proxy = os.environ.get("http_proxy", "")
if not proxy.startswith("http://127.0.0.1:"):
    sys.exit("no loopback proxy: %r" % proxy)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
for _ in range(2):
    try:
        opener.open("http://denied.test/", timeout=30)
    except urllib.error.HTTPError as exc:
        print(exc.code, exc.headers.get("X-Stoker-Deny-Reason"))
sys.exit(3)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("dashboard")
    with ServeProcess(
        root,
        pool_max=4,
        pool_labels=["linux", "dashboard"],
        extra=EXTRA_CONFIG,
    ) as serve:
        yield serve


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched  # type: ignore[misc]


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"the page's scripts failed: {errors}"


@pytest.fixture
def gate(tmp_path: Path) -> Path:
    """A file whose creation lets a waiting job go on."""
    return tmp_path / "gate"


def submit(server: ServeProcess, command: list[str], who: str = "ci", **spec: Any) -> str:
    response = httpx.post(
        f"{server.url}/v1/jobs",
        headers=server.headers(who),
        files={"spec": (None, json.dumps({"command": command, **spec}), "application/json")},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def job(server: ServeProcess, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=server.headers("ci"))
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_for(server: ServeProcess, job_id: str, *states: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (state := job(server, job_id)["state"]) not in states:
        assert time.monotonic() < deadline, f"job {job_id} is still {state}"
        time.sleep(0.1)


def gated(gate: Path, before: str = "first line", after: str = "second line") -> list[str]:
    """A command that prints ``before``, waits for ``gate``, prints ``after``."""
    script = f'echo "{before}"; while [ ! -e "{gate}" ]; do sleep 0.05; done; echo "{after}"'
    return ["sh", "-c", script]


def sign_in(page: Page, server: ServeProcess, who: str) -> None:
    page.goto(f"{server.url}/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.get_by_label("API token").fill(server.tokens[who])
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who")).to_have_text(who)


def open_running_job(page: Page, server: ServeProcess, who: str, job_id: str) -> None:
    """Sign in as ``who`` and open ``job_id``'s page once its first line is in it."""
    sign_in(page, server, who)
    page.goto(f"{server.url}/ui/#/jobs/{job_id}")
    expect(page.get_by_role("log", name="Job output")).to_contain_text("first line")
    expect(page.locator(".job-state .badge")).to_have_text("running")


# --- signing in -----------------------------------------------------------------------------------


def test_a_wrong_token_is_refused(page: Page, server: ServeProcess) -> None:
    page.goto(f"{server.url}/ui/")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.get_by_label("API token").fill("stk_this-is-not-a-token")
    with page.expect_response(re.compile(r"/ui/login$")) as answer:
        page.get_by_role("button", name="Sign in").click()
    assert answer.value.status == 401
    expect(page.get_by_role("alert")).to_have_text("That token is not valid here.")
    assert not page.context.cookies()
    # The page itself still sends a signed-out visitor back to the form.
    page.goto(f"{server.url}/ui/#/jobs")
    expect(page).to_have_url(re.compile(r"/ui/login(#/jobs)?$"))
    # Signing in there leads back to the address that sent the visitor to the form.
    page.get_by_label("API token").fill(server.tokens["viewer"])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/ui/#/jobs$"))
    expect(page.locator("#jobs")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    page.goto(f"{server.url}/ui/login")
    # A token without the read scope cannot look either.
    page.get_by_label("API token").fill(server.tokens["pusher"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("lacks the 'read' scope")


# --- a job from queued to succeeded, its output streaming in ------------------------------------


def test_read_token_sees_a_job_run_and_its_log_stream(
    page: Page, server: ServeProcess, gate: Path
) -> None:
    sign_in(page, server, "viewer")
    expect(page.locator("#hosts")).to_contain_text("serve-test")
    expect(page.locator("#pools")).to_contain_text("default")
    page.screenshot(path=screenshot_path("overview"), full_page=True)

    job_id = submit(server, gated(gate), labels=["dashboard"])
    page.get_by_role("link", name="Jobs").click()
    row = page.locator("#jobs tbody tr").filter(has_text=job_id[:12])
    expect(row).to_have_count(1)
    row.get_by_role("link").click()
    expect(page).to_have_url(re.compile(rf"#/jobs/{job_id}$"))

    log = page.get_by_role("log", name="Job output")
    # The job waits for the gate: its first line is in the page while it still runs.
    expect(log).to_contain_text("first line")
    expect(page.locator(".job-state .badge")).to_have_text("running")
    assert "second line" not in log.inner_text()
    assert job(server, job_id)["state"] == "running"
    gate.touch()
    expect(log).to_contain_text("second line")
    expect(page.locator(".job-state .badge")).to_have_text("succeeded")
    timeline = page.get_by_role("list", name="State changes")
    for state in ("queued", "assigned", "booting", "running", "succeeded"):
        expect(timeline).to_contain_text(state)
    # A read token is never offered the cancel button.
    expect(page.locator("#cancel")).to_have_count(0)
    page.screenshot(path=screenshot_path("job"), full_page=True)


def test_read_token_has_no_cancel_and_the_api_refuses_it(
    page: Page, server: ServeProcess, gate: Path
) -> None:
    job_id = submit(server, gated(gate))
    try:
        open_running_job(page, server, "viewer", job_id)
        expect(page.locator("#cancel")).to_have_count(0)
        # Trying anyway, as the page would (cookie + the CSRF header): the API says no.
        status = page.evaluate(
            """async (id) => (await fetch(`/v1/jobs/${id}/cancel`,
                   {method: "POST", headers: {"X-Stoker-CSRF": "1"}})).status""",
            job_id,
        )
        assert status == 403
        assert job(server, job_id)["state"] == "running"
    finally:
        gate.touch()
        wait_for(server, job_id, "succeeded")


def test_submit_token_cancels_a_running_job(page: Page, server: ServeProcess, gate: Path) -> None:
    job_id = submit(server, gated(gate))
    try:
        open_running_job(page, server, "ci", job_id)
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Cancel job").click()
        expect(page.locator(".job-state .badge")).to_have_text("cancelled", timeout=30_000)
        expect(page.locator("#cancel")).to_have_count(0)
        assert job(server, job_id)["state"] == "cancelled"
        assert "second line" not in page.get_by_role("log", name="Job output").inner_text()
    finally:
        gate.touch()


def test_job_page_shows_its_network_and_artifacts(page: Page, server: ServeProcess) -> None:
    job_id = submit(server, [sys.executable, "-c", NET_CLIENT], pool="net", artifacts=["out/*"])
    wait_for(server, job_id, "failed")
    sign_in(page, server, "viewer")
    page.goto(f"{server.url}/ui/#/jobs/{job_id}")
    expect(page.locator(".job-state .badge")).to_have_text("failed")
    network = page.get_by_role("region", name="Network")
    expect(network).to_contain_text("egress")
    expect(network).to_contain_text("pkg.test")
    expect(network).to_contain_text("0 allowed, 2 denied")
    expect(network.locator("ul.denied li")).to_contain_text("denied.test:80")
    artifacts = page.locator("#artifacts")
    expect(artifacts).to_contain_text("out/report.txt")
    [listed] = httpx.get(
        f"{server.url}/v1/jobs/{job_id}/artifacts", headers=server.headers("viewer")
    ).json()["artifacts"]
    expect(artifacts).to_contain_text(listed["sha256"])
    expect(artifacts).to_contain_text("9 B")
    link = artifacts.get_by_role("link", name="out/report.txt")
    body = page.evaluate("async (href) => (await fetch(href)).text()", link.get_attribute("href"))
    assert body == "all good\n"


def test_vms_page_lists_a_running_vm(page: Page, server: ServeProcess, gate: Path) -> None:
    job_id = submit(server, gated(gate))
    try:
        open_running_job(page, server, "viewer", job_id)
        vm_name = job(server, job_id)["vm_name"]
        page.get_by_role("link", name="VMs").click()
        row = page.locator("#vms tbody tr").filter(has_text=vm_name)
        expect(row).to_have_count(1)
        cells = row.locator("td")
        expect(cells.nth(1)).to_have_text("serve-test")
        expect(cells.nth(2)).to_have_text("default")
        expect(cells.nth(3)).to_have_text("busy")
        expect(cells.nth(4)).to_contain_text(" s")  # its age
        expect(cells.nth(6)).to_have_text("1 vCPU · 256 MiB")
        cells.nth(5).get_by_role("link").click()
        expect(page).to_have_url(re.compile(rf"#/jobs/{job_id}$"))
    finally:
        gate.touch()
        wait_for(server, job_id, "succeeded")


# --- hostile output -------------------------------------------------------------------------------

SECRET_VALUE = "hunter2-do-not-show"
HOSTILE = (
    r'echo "the key is $API_KEY";'
    r"printf '<script>window.pwned = 1</script>\n';"
    "printf '<img src=x onerror=\"window.pwned = 2\">\\n';"
    r"printf '\033[1;31mbold red\033[0m plain \033[38;5;208morange\033[0m\n';"
    r"printf '\033]0;pwned title\007\033]8;;https://evil.test\033\\link\033]8;;\033\\ ';"
    r"printf '\033[2J\033[Hcleared?\n';"
    r"printf 'bad bytes: \377\376 end\n';"
    r"printf 'progress 10%%\rprogress 100%%\n';"
    f"head -c {LONG_LINE} /dev/zero | tr '\\0' A; echo;"
    r"echo after the long line"
)


def test_hostile_output_is_shown_as_text(page: Page, server: ServeProcess) -> None:
    sign_in(page, server, "viewer")
    job_id = submit(server, ["sh", "-c", HOSTILE], secrets={"API_KEY": SECRET_VALUE})
    page.goto(f"{server.url}/ui/#/jobs/{job_id}")
    log = page.get_by_role("log", name="Job output")
    expect(page.locator(".job-state .badge")).to_have_text("succeeded", timeout=120_000)
    expect(log).to_contain_text("after the long line", timeout=120_000)
    text = log.inner_text()
    # Markup is text: nothing ran, no element was made from it.
    assert "<script>window.pwned = 1</script>" in text
    # A secret the job prints is masked, as the API masks it; the page shows only ***.
    assert "the key is ***" in text
    assert SECRET_VALUE not in page.content()
    expect(page.locator("dl.details").first).to_contain_text("API_KEY=***")
    assert '<img src=x onerror="window.pwned = 2">' in text
    assert page.evaluate("window.pwned") is None
    assert log.locator("script, img, a").count() == 0
    # Colours are rendered; other escape sequences are dropped, not obeyed.
    expect(log.locator("span.fg-red.bold")).to_have_text("bold red")
    assert log.locator("span", has_text="orange").evaluate("e => e.style.color") == (
        "rgb(255, 135, 0)"
    )
    assert "\x1b" not in text and "pwned title" not in text
    assert "link cleared?" in text
    assert page.title() == "Jobs · stoker"
    assert "bad bytes: \ufffd\ufffd end" in text
    assert "progress 100%" in text and "progress 10%" not in text
    # The 50 MB line: its start is shown, the rest counted; the page stays small and alive.
    expect(log.locator(".truncated")).to_contain_text("more characters of this line not shown")
    shown = page.evaluate("() => document.querySelector('.log').textContent.length")
    assert shown < 100_000
    started = time.monotonic()
    assert page.evaluate("() => 6 * 7") == 42
    assert time.monotonic() - started < 5, "the page did not answer"


# --- the jobs list: filters and pages -------------------------------------------------------------


def test_jobs_list_filters_and_pages(page: Page, server: ServeProcess) -> None:
    # Only this test submits as "root": 53 labelled jobs, one unlabelled, one by "ci".
    ids = [submit(server, ["true"], who="root", labels=["dashboard"]) for _ in range(53)]
    others = [submit(server, ["true"], who="root"), submit(server, ["true"], labels=["dashboard"])]
    for job_id in (*ids, *others):
        wait_for(server, job_id, "succeeded")
    sign_in(page, server, "viewer")
    page.goto(f"{server.url}/ui/#/jobs")
    page.get_by_label("Label").fill("dashboard")
    page.get_by_label("Submitter").fill("root")
    page.get_by_label("State").select_option("succeeded")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"label=dashboard"))
    rows = page.locator("#jobs tbody tr")
    expect(rows).to_have_count(50)
    newest = [i[:12] for i in reversed(ids)]
    assert rows.nth(0).get_by_role("link").inner_text() == newest[0]
    for other in others:
        expect(page.locator("#jobs")).not_to_contain_text(other[:12])
    page.screenshot(path=screenshot_path("jobs"), full_page=True)
    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(3)
    assert [rows.nth(i).get_by_role("link").inner_text() for i in range(3)] == newest[50:]
    expect(page.get_by_role("link", name="Older →")).to_have_count(0)
    page.get_by_role("link", name="← Newer").click()
    expect(rows).to_have_count(50)
    assert rows.nth(0).get_by_role("link").inner_text() == newest[0]


#: Every visible text's contrast with the background it is drawn on (WCAG 2 ratio), the
#: failures as [text, ratio, needed]: 4.5 for body text, 3 for large (24px, or 18.7px bold).
CONTRAST = """() => {
  const rgb = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map((v) => {
    v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
  }).reduce((sum, v, i) => sum + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length === 3 || c[3] > 0.5) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const failures = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    const el = node.parentElement;
    if (!node.textContent.trim() || !el.checkVisibility()) continue;
    const style = getComputedStyle(el);
    if (Number(style.opacity) < 1) continue;  // dimmed on purpose (disabled, ANSI dim)
    const [a, b] = [lum(rgb(style.color)), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    const needed = large ? 3 : 4.5;
    if (ratio < needed) failures.push([node.textContent.trim().slice(0, 40), ratio, needed]);
  }
  return failures;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_text_contrast(browser: Browser, server: ServeProcess, scheme: str) -> None:
    context = browser.new_context(color_scheme=scheme)  # type: ignore[arg-type]
    try:
        page = context.new_page()
        sign_in(page, server, "viewer")
        expect(page.locator("#pools")).to_contain_text("default")
        assert page.evaluate(CONTRAST) == []
        job_id = submit(
            server, ["sh", "-c", r"printf 'plain \033[31mred\033[0m \033[30mblack\033[0m\n' >&2"]
        )
        page.goto(f"{server.url}/ui/#/jobs/{job_id}")
        expect(page.locator(".job-state .badge")).to_have_text("succeeded")
        expect(page.get_by_role("log", name="Job output")).to_contain_text("black")
        assert page.evaluate(CONTRAST) == []
    finally:
        context.close()


# --- phones, keyboards, labels --------------------------------------------------------------------


def test_phone_layout_and_keyboard(browser: Browser, server: ServeProcess) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        sign_in(page, server, "viewer")
        expect(page.locator("#pools")).to_contain_text("default")
        page.goto(f"{server.url}/ui/#/jobs")
        expect(page.locator("#jobs tbody tr").first).to_be_visible()
        # Nothing wider than the screen but the tables, which scroll in their own box.
        assert page.evaluate("() => document.body.scrollWidth <= window.innerWidth")
        page.screenshot(path=screenshot_path("jobs-phone"), full_page=True)
        # Every form control has a label.
        unlabelled = page.evaluate(
            """() => [...document.querySelectorAll('input, select')]
                   .filter(e => e.type !== 'hidden' && !e.labels.length).map(e => e.outerHTML)"""
        )
        assert unlabelled == []
        # Keyboard only: the skip link first, then the sections.
        page.goto(f"{server.url}/ui/#/")
        page.reload()  # a fresh document: focus starts at the top
        expect(page.locator("#hosts")).to_be_visible()
        page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page.locator("#main")).to_be_focused()
        expect(page).to_have_url(re.compile(r"#/$"))  # the view stayed
        page.reload()
        expect(page.locator("#hosts")).to_be_visible()
        page.keyboard.press("Tab")
        for _ in range(3):
            page.keyboard.press("Tab")
        expect(page.get_by_role("link", name="Jobs")).to_be_focused()
        page.keyboard.press("Enter")
        expect(page).to_have_url(re.compile(r"#/jobs$"))
        expect(page.get_by_role("link", name="Jobs")).to_have_attribute("aria-current", "page")
    finally:
        context.close()


# --- a slow or absent service, a job with no output yet -------------------------------------------


def test_no_output_yet_then_a_slow_and_a_stopped_service(
    browser: Browser, tmp_path: Path, gate: Path
) -> None:
    with ServeProcess(tmp_path, pool_max=1) as serve:
        blocker = submit(serve, gated(gate))
        waiting = submit(serve, ["echo", "my turn"])
        context = browser.new_context()
        try:
            page = context.new_page()
            sign_in(page, serve, "viewer")
            page.goto(f"{serve.url}/ui/#/jobs/{waiting}")
            expect(page.locator(".job-state .badge")).to_have_text("queued")
            expect(page.locator(".log-empty")).to_have_text("No output yet.")
            gate.touch()
            log = page.get_by_role("log", name="Job output")
            expect(log).to_contain_text("my turn")
            expect(page.locator(".log-empty")).to_be_hidden()
            wait_for(serve, blocker, "succeeded")

            banner = page.locator("#banner")
            page.goto(f"{serve.url}/ui/#/")
            expect(page.locator("#hosts")).to_be_visible()
            expect(banner).to_be_hidden()
            # A stopped process answers nothing: the page says so instead of hanging.
            os.kill(serve.pid, signal.SIGSTOP)
            try:
                expect(banner).to_contain_text("did not answer within", timeout=30_000)
            finally:
                os.kill(serve.pid, signal.SIGCONT)
            expect(banner).to_be_hidden(timeout=30_000)
            serve.stop()
            expect(banner).to_contain_text("not reachable", timeout=30_000)
            expect(page.locator("#hosts")).to_be_visible()  # what it last knew stays
        finally:
            context.close()
