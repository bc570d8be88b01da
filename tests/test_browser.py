"""The operator's path in a real browser: headless Chromium driven by Playwright.

Log in, upload a CSV with a bad line and see it named, fix it, submit, watch the batch finish
with one failure, find the dead letter the misbehaving SMTP server caused, fix the cause and
redrive it.
Screenshots of each page land in test-artifacts/browser/ (look at them).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from procrastinate.worker import Worker

from shared.db import Database
from shared.settings import Settings
from tests.conftest import API_TOKEN, query
from tests.smtp_server import RecordingSMTPServer, Rule
from web.app import create_app
from worker.main import worker_options, worker_runtime

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def log_in(page: Any, base: str) -> None:
    """Log the browser in through the login form, as an operator does."""
    await page.goto(f"{base}/login")
    await page.fill("input[name=token]", API_TOKEN)
    await page.click(".token-login button[type=submit]")


@pytest.fixture
def chromium() -> str:
    if not shutil.which(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
async def running_worker(settings: Settings) -> AsyncIterator[None]:
    async with worker_runtime(settings) as (app, deps):
        worker = Worker(app=app, **worker_options(settings, deps, install_signal_handlers=False))
        task = asyncio.create_task(worker.run())  # type: ignore[no-untyped-call]
        yield
        worker.stop()  # type: ignore[no-untyped-call]
        await task


async def test_an_operator_uploads_fixes_watches_and_redrives(
    chromium: str, settings: Settings, db: Database, smtp: RecordingSMTPServer, running_worker: None
) -> None:
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    smtp.rules["bounce@example.org"] = Rule("550 5.1.1 no such user")
    server = TestServer(create_app(settings, db=db))
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1100, "height": 900})

            await page.goto(f"{base}/")
            await expect(page.locator("h1")).to_have_text("Log in")
            await page.screenshot(path=ARTIFACTS / "1-login.png")
            await page.fill("#token", API_TOKEN)
            await page.click(".token-login button[type=submit]")
            await expect(page.locator("h1")).to_have_text("New batch")

            bad = b"email,name\nada@example.org,Ada\nnot-an-address,Oops\nbounce@example.org,Bo\n"
            await page.set_input_files(
                "#csv", {"name": "people.csv", "mimeType": "text/csv", "buffer": bad}
            )
            await page.fill("#subject", "Hello {{ name }}")
            await page.fill("#body", "Hi {{ name }}, <b>welcome</b>.")
            await page.click("#new-batch button[type=submit]")
            await expect(page.locator(".field-error")).to_contain_text("CSV file, line 3:")
            await page.screenshot(path=ARTIFACTS / "2-csv-error.png", full_page=True)
            assert await query(settings.database_url or "", "SELECT count(*) FROM batches") == [
                (0,)
            ]
            assert await page.input_value("#subject") == "Hello {{ name }}", "the input is kept"

            good = bad.replace(b"not-an-address,Oops", b"grace@example.org,Grace")
            await page.set_input_files(
                "#csv", {"name": "people.csv", "mimeType": "text/csv", "buffer": good}
            )
            await page.click("#new-batch button[type=submit]")
            await page.wait_for_url("**/batches/*")
            await expect(page.locator("#batch-status")).to_have_text(
                "done with failures", timeout=30_000
            )
            await expect(page.locator("#batch-summary")).to_have_text(
                "2 delivered · 1 failed · 0 suppressed · 0 cancelled of 3"
            )
            await expect(page.locator('[data-count="dead"]')).to_have_text("1")
            await expect(page.locator('[data-count="sent"]')).to_have_text("2")
            await page.screenshot(path=ARTIFACTS / "3-batch-done.png", full_page=True)

            await page.click("text=Dead letters")
            await expect(page.locator("table")).to_contain_text("bounce@example.org")
            await expect(page.locator("table")).to_contain_text("550")
            await page.screenshot(path=ARTIFACTS / "4-dead-letters.png", full_page=True)

            smtp.rules.clear()  # the mailbox exists now
            page.once("dialog", lambda dialog: dialog.accept())  # "Redrive all 1 …?"
            await page.click("button:has-text('Redrive all')")
            await expect(page.locator("main")).to_contain_text("1 dead letter requeued.")
            await expect(page.locator("#requeued")).to_contain_text("bounce@example.org")
            for _ in range(100):
                if "bounce@example.org" in smtp.to_addresses():
                    break
                await asyncio.sleep(0.1)
            await page.goto(page.url.replace("/dead-letters", "/"))
            await page.click("table a")
            await expect(page.locator('[data-count="sent"]')).to_have_text("3", timeout=15_000)
            await page.screenshot(path=ARTIFACTS / "5-after-redrive.png", full_page=True)
            await browser.close()
    finally:
        await server.close()
    assert smtp.to_addresses() == {
        "ada@example.org": 1,
        "grace@example.org": 1,
        "bounce@example.org": 1,
    }
