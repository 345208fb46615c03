"""The built-in admin page in a real headless Chromium (Debian's, driven by Playwright).

Rows come from real requests through the gateway; the page signs in with the admin key, lists
them, narrows them with a filter, opens a request, shows usage with its chart, and renders a
prompt full of markup as text. Screenshots land in test-output/ for a human to look at.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from tests.admin_traffic import ADMIN_KEY, CONFIG, LOG_ENV, MARKUP, send_traffic, wait_for_rows

from .conftest import GatewayFactory

CHROMIUM = "/usr/bin/chromium"  # `make browser` installs it; Playwright's own download is not used
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SHOTS = Path(__file__).resolve().parent.parent / "test-output"
ROWS = "#requests-table tbody tr[data-id]"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser) -> tuple[Page, list[str]]:
    """A page that collects console errors and uncaught exceptions (CSP violations are console errors)."""
    page = await browser.new_page(viewport={"width": 1440, "height": 900})
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            problems.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: problems.append(str(error)))
    return page, problems


async def test_admin_page_end_to_end(start_gateway: GatewayFactory, browser: Browser) -> None:
    gateway = await start_gateway(CONFIG, {**LOG_ENV, "EDGEPROXY_ADMIN_KEY": ADMIN_KEY}, logs="embedded")
    sent = await send_traffic(gateway.url)
    await wait_for_rows(gateway.url, len(sent), ADMIN_KEY)
    SHOTS.mkdir(exist_ok=True)
    page, problems = await open_page(browser)

    # Signing in: a wrong key is refused and asked again; the right one lists every request.
    await page.goto(f"{gateway.url}/admin")
    login = page.locator("#login")
    await expect(login).to_be_visible()
    await page.fill("#login-key", "wrong-key")
    await page.click("#login-submit")
    await expect(page.locator("#login-error")).to_have_text("That key was refused.")
    await page.fill("#login-key", ADMIN_KEY)
    await page.click("#login-submit")
    await expect(login).to_be_hidden()
    rows = page.locator(ROWS)
    await expect(rows).to_have_count(len(sent))
    await expect(rows.first).to_have_attribute("data-id", sent[-1].request_id)
    await expect(page.locator("#requests-summary")).to_contain_text(f"{len(sent)} requests shown")
    await page.screenshot(path=str(SHOTS / "admin-requests.png"))

    # A filter narrows the list to alice's two requests, newest first.
    await page.fill("#filter-user", "alice")
    await page.click("#apply-filters")
    alice = [s.request_id for s in reversed(sent) if s.call.user == "alice"]
    await expect(rows).to_have_count(len(alice))
    assert [await row.get_attribute("data-id") for row in await rows.all()] == alice
    await page.select_option("#filter-outcome", "upstream_error")
    await page.click("#apply-filters")
    await expect(page.locator("#requests-table tbody td.empty")).to_have_text("No requests match.")
    await page.click("#clear-filters")
    await expect(rows).to_have_count(len(sent))

    # The detail view: prompt, response, tokens, cost, timing and the logged headers.
    newest_alice = next(s for s in reversed(sent) if s.call.user == "alice")
    await page.click(f'{ROWS}[data-id="{newest_alice.request_id}"]')
    detail = page.locator("#detail")
    await expect(detail).to_be_visible()
    await expect(detail).to_contain_text(newest_alice.request_id)
    await expect(detail.locator(".message .content").first).to_have_text(newest_alice.call.prompt)
    await expect(detail).to_contain_text("echo: " + newest_alice.call.prompt)
    await expect(detail).to_contain_text(f"{newest_alice.prompt_tokens} prompt + {newest_alice.completion_tokens} completion")
    await expect(detail).to_contain_text("Helicone-Property-Env")
    await expect(detail).to_contain_text("Gateway overhead")
    await expect(detail).not_to_contain_text("Bearer")
    await page.screenshot(path=str(SHOTS / "admin-detail.png"))
    await page.click("#detail-close")
    await expect(detail).to_be_hidden()

    # A prompt full of markup is shown as text and runs nothing.
    await page.click(f'{ROWS}[data-id="{sent[-1].request_id}"]')
    await expect(detail.locator(".message .content").first).to_have_text("anonymous " + MARKUP)
    assert await detail.locator("img, script").count() == 0
    assert await page.evaluate("window.__xss") is None
    await page.keyboard.press("Escape")

    # Usage: totals, a line per top user over time, and the table per user.
    await page.click("#tab-usage")
    cards = page.locator("#usage-cards .card")
    await expect(cards.first).to_contain_text(str(len(sent)))
    await expect(page.locator("#usage-table tbody tr")).to_have_count(len({s.call.user for s in sent}))
    lines = page.locator("#usage-chart svg polyline")
    await expect(lines).to_have_count(len({s.call.user for s in sent}))
    await expect(page.locator("#chart-legend")).to_contain_text("alice")
    await expect(cards.nth(4)).to_contain_text("14.3%")  # one cache hit in seven requests
    await page.screenshot(path=str(SHOTS / "admin-usage.png"))
    await page.select_option("#usage-group", "model")
    await expect(page.locator("#usage-key-header")).to_have_text("Model")
    await expect(page.locator("#usage-table tbody tr").first).to_contain_text("mock-gpt")

    # The key stays for the tab's session: a reload lists rows without asking again.
    await page.goto(f"{gateway.url}/admin/#requests")
    await expect(rows).to_have_count(len(sent))
    await expect(login).to_be_hidden()
    assert await page.evaluate("sessionStorage.getItem('edgeproxy.adminKey')") == ADMIN_KEY
    # The browser reports each 401 before sign-in; anything else (a script error, a CSP
    # violation) is a fault.
    assert problems and all("status of 401" in problem for problem in problems), problems


async def test_page_without_a_key_on_loopback_shows_api_errors(start_gateway: GatewayFactory, browser: Browser) -> None:
    gateway = await start_gateway()  # no admin key, no request log
    page, problems = await open_page(browser)
    await page.goto(f"{gateway.url}/admin/")
    await expect(page.locator("#banner")).to_contain_text("The request log is disabled")
    await expect(page.locator("#login")).to_be_hidden()
    assert await page.locator(ROWS).count() == 0
    # The API's 503 is the one console error a browser reports for a failed fetch.
    assert all("503" in problem for problem in problems), problems
