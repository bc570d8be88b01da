"""The batch page follows a batch without a reload, in headless Chromium at a desktop's
1100 px and a phone's 390 px: the state badge goes from scheduled to paused (a full daily
window) to done with failures (a 550), and the counts, the bar's summary and the filter links
change with it, links appearing and disappearing as statuses do.

Screenshots of each step land in test-artifacts/states/ (look at them).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from shared.db import Database, NewBatch, NewRecipient
from shared.settings import Settings
from tests.conftest import make_settings, query
from tests.smtp_server import RecordingSMTPServer, Rule
from tests.test_browser import CHROMIUM_ARGS, chromium, log_in, running_worker  # noqa: F401 (fixtures)
from web.app import create_app

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "states"
WIDTHS = {"desktop": 1100, "phone": 390}
ADDRESSES = ["ada@example.org", "bounce@example.org", *(f"p{i}@example.org" for i in range(3))]
# Long enough for the page to notice a change through its back-off (at most 15 s apart).
SEEN_WITHIN_MS = 30_000


@pytest.fixture
def settings(database_url: str, smtp: RecordingSMTPServer) -> Settings:
    """The web tier and the worker may send three messages a day."""
    return make_settings(database_url, smtp.port, rate_per_day=3)


@pytest.mark.parametrize("device", WIDTHS)
async def test_the_batch_page_follows_state_counts_and_filters_live(
    chromium: str,  # noqa: F811
    running_worker: None,  # noqa: F811
    device: str,
    settings: Settings,
    db: Database,
    smtp: RecordingSMTPServer,
) -> None:
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    smtp.rules["bounce@example.org"] = Rule("550 5.1.1 no such user")
    url = settings.database_url or ""
    batch_id = await db.create_batch(
        NewBatch(
            created_by="test",
            subject_template="Spring launch",
            body_template="Hello",
            recipients=[NewRecipient(a) for a in ADDRESSES],
            send_at=datetime.now(UTC) + timedelta(hours=2),
            name="Spring launch <b>2027</b>",
        )
    )
    server = TestServer(create_app(settings, db=db))
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    shot = f"{device}-"
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": WIDTHS[device], "height": 900})
            await log_in(page, base)
            await page.goto(f"{base}/batches/{batch_id}")
            # Marks this document: a reload would lose it.
            await page.evaluate("window.sameDocument = true")

            badge = page.locator("#batch-status")
            filters = page.locator("#filters a")
            await expect(page.locator("h1")).to_have_text("Spring launch <b>2027</b>")
            await expect(badge).to_have_text("scheduled")
            await expect(page.locator("#batch-scheduled")).to_be_visible()
            await expect(filters).to_have_text(["all", "queued (5)"])
            await page.screenshot(path=ARTIFACTS / f"{shot}1-scheduled.png", full_page=True)

            # The time has come: the worker takes three slots of the day and holds the rest.
            await query(url, "UPDATE batches SET send_at = now()")
            await query(url, "UPDATE procrastinate_jobs SET scheduled_at = now()")
            await expect(badge).to_have_text("paused", timeout=SEEN_WITHIN_MS)
            await expect(page.locator("#batch-scheduled")).to_be_hidden()
            await expect(page.locator("#batch-paused")).to_be_visible()
            await expect(page.locator('[data-count="queued"]')).to_have_text("2")
            await expect(page.locator("#batch-summary")).to_contain_text("of 5 · 2 to go")
            await expect(filters.filter(has_text="queued")).to_have_text("queued (2)")
            await page.screenshot(path=ARTIFACTS / f"{shot}2-paused.png", full_page=True)

            # A new day: the rest goes out, and the bounce is a dead letter.
            await query(url, "DELETE FROM send_windows")
            await query(url, "UPDATE procrastinate_jobs SET scheduled_at = now()")
            await expect(badge).to_have_text("done with failures", timeout=SEEN_WITHIN_MS)
            await expect(badge).to_have_class("status status-done_with_failures")
            await expect(page.locator("#batch-summary")).to_have_text(
                "4 delivered · 1 failed · 0 suppressed · 0 cancelled of 5"
            )
            await expect(filters).to_have_text(["all", "sent (4)", "dead (1)"])
            await expect(page.locator("#batch-paused")).to_be_hidden()
            await expect(page.locator("#cancel-batch")).to_be_hidden()
            await expect(page.locator("#redrive-button")).to_have_text("Redrive 1 dead letter(s)")
            await expect(page.locator("#recipients")).to_contain_text("550")
            assert await page.evaluate("window.sameDocument === true"), "the page reloaded"
            extra = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert extra <= 0, f"the batch page is {extra} px wider than the screen"
            await page.screenshot(path=ARTIFACTS / f"{shot}3-done.png", full_page=True)

            # The list shows the same batch by name, with its state and counts.
            await page.goto(f"{base}/?q=spring")
            row = page.locator("table.batches tbody tr")
            await expect(row).to_have_count(1)
            await expect(row).to_contain_text("Spring launch <b>2027</b>")
            await expect(row).to_contain_text("done with failures")
            await expect(row).to_contain_text("4 delivered · 1 failed")
            await page.screenshot(path=ARTIFACTS / f"{shot}4-list.png", full_page=True)
            await browser.close()
    finally:
        await server.close()
    assert smtp.to_addresses() == {a: 1 for a in ADDRESSES if a != "bounce@example.org"}
