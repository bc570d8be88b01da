"""What the operator is told, in a real browser at desktop (1100 px) and phone (390 px) width.

Submit the form with duplicate addresses and a template field they lack, read the summary,
fix it and read what the batch page says was removed; redrive the dead letter the SMTP server
caused, through the browser's prompt with JavaScript and through the confirmation page without
it, and see it requeued; visit a page that does not exist and find the navigation. Screenshots
land in test-artifacts/forms/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from shared.db import Database
from shared.settings import Settings
from tests.conftest import API_TOKEN, drain
from tests.smtp_server import RecordingSMTPServer, Rule
from tests.test_browser import CHROMIUM_ARGS, chromium  # noqa: F401 (a fixture)
from web.app import create_app

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "forms"
WIDTHS = {"desktop": 1100, "phone": 390}


async def _log_in(page: Any, base: str) -> None:
    from playwright.async_api import expect

    await page.goto(f"{base}/")
    await page.fill("#token", API_TOKEN)
    await page.click(".token-login button[type=submit]")
    await expect(page.locator("h1")).to_have_text("New batch")


async def _fits(page: Any, width: int) -> None:
    scroll = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll <= width, f"the page scrolls sideways: {scroll} px at {width} px"


@pytest.mark.parametrize("screen", ["desktop", "phone"])
async def test_the_operator_is_told_what_happened_at_each_width(
    chromium: str,  # noqa: F811
    settings: Settings,
    db: Database,
    smtp: RecordingSMTPServer,
    screen: str,
) -> None:
    from playwright.async_api import async_playwright, expect

    width = WIDTHS[screen]
    shots = ARTIFACTS / screen
    shots.mkdir(parents=True, exist_ok=True)
    smtp.rules["bounce@example.org"] = Rule("550 5.1.1 no such user")
    server = TestServer(create_app(settings, db=db))
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            # With JavaScript the browser's prompt confirms; without it, the server's page.
            javascript = screen == "desktop"
            context = await browser.new_context(
                viewport={"width": width, "height": 900}, java_script_enabled=javascript
            )
            page = await context.new_page()
            await _log_in(page, base)
            llm = page.locator("input[name=drafter][value=llm]")
            await expect(llm).to_be_disabled()
            await expect(page.locator("#llm-unavailable")).to_contain_text("no LLM key")

            pasted = "ada@example.org\nADA@example.org\nbounce@example.org\nada@example.org"
            await page.fill("#recipients", pasted)
            await page.fill("#subject", "Hello {{ name }}")
            await page.fill("#body", "Hi there.")
            await page.click("#new-batch button[type=submit]")
            summary = page.locator("#form-problems")
            await expect(summary).to_contain_text("1 problem(s)")
            await expect(summary).to_contain_text(
                "Recipients, lines 1, 3: 2 recipients (the first ada@example.org):"
                " the subject template fails"
            )
            await _fits(page, width)
            await page.screenshot(path=shots / "1-form-problems.png", full_page=True)

            await page.fill("#subject", "Hello {{ name | default(email) }}")
            await page.click("#new-batch button[type=submit]")
            await page.wait_for_url("**/batches/*")
            await expect(page.locator(".notice-done")).to_have_text(
                "2 duplicate addresses removed."
            )
            await _fits(page, width)
            await page.screenshot(path=shots / "2-batch-notice.png", full_page=True)

            await drain(settings)
            smtp.rules.clear()  # the mailbox exists now
            await page.click("nav >> text=Dead letters")
            await expect(page.locator("table")).to_contain_text("bounce@example.org")
            if javascript:
                prompts: list[str] = []

                async def accept(dialog: Any) -> None:
                    prompts.append(dialog.message)
                    await dialog.accept()

                page.once("dialog", accept)
                await page.click("td button:has-text('Redrive')")
                await page.wait_for_url("**/dead-letters?notice=*")
                assert prompts == ["Redrive the dead letter to bounce@example.org?"]
            else:
                await page.click("td button:has-text('Redrive')")
                await expect(page.locator("#confirm h2")).to_have_text("Redrive 1 dead letter?")
                await _fits(page, width)
                await page.screenshot(path=shots / "3-confirm.png", full_page=True)
                await page.click("#confirm button:has-text('Yes, redrive 1 dead letter')")
            await expect(page.locator(".notice-done")).to_have_text("1 dead letter requeued.")
            requeued = page.locator("#requeued")
            await expect(requeued).to_contain_text("bounce@example.org")
            await expect(requeued).to_contain_text("requeued · queued")
            await expect(page.locator("main")).to_contain_text("No dead letters left.")
            await _fits(page, width)
            await page.screenshot(path=shots / "4-requeued.png", full_page=True)

            await drain(settings)
            await requeued.locator("a").click()
            await page.wait_for_url("**/batches/*")
            await expect(page.locator('[data-count="sent"]')).to_have_text("2")

            missing = await page.goto(f"{base}/no/such/page")
            assert missing is not None and missing.status == 404
            await expect(page.locator("h1")).to_have_text("Page not found")
            await expect(page.locator("header nav")).to_contain_text("Dead letters")
            await _fits(page, width)
            await page.screenshot(path=shots / "5-not-found.png", full_page=True)
            await page.click("header nav >> text=Batches")
            await expect(page.locator("h1")).to_have_text("New batch")
            await browser.close()
    finally:
        await server.close()
    assert smtp.to_addresses() == {"ada@example.org": 1, "bounce@example.org": 1}
