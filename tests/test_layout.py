"""Every page fits its screen: at a phone's 390 px and a desktop's 1100 px nothing scrolls
sideways, with the longest addresses and subjects an operator will meet.

Screenshots land in test-artifacts/layout/ (look at them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from shared.db import Database, NewBatch, NewRecipient
from shared.settings import Settings
from tests.conftest import drain
from tests.smtp_server import RecordingSMTPServer, Rule
from tests.test_browser import CHROMIUM_ARGS, chromium, log_in  # noqa: F401  (a fixture)
from web.app import create_app
from web.captured_mail import CapturedMail

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "layout"
LONG_LOCAL = "a-very-long-mailbox-name-that-never-breaks-by-itself" * 2
WIDTHS = {"phone": 390, "desktop": 1100}


@pytest.mark.parametrize("device", WIDTHS)
async def test_no_page_scrolls_sideways(
    chromium: str,  # noqa: F811
    device: str,
    settings: Settings,
    db: Database,
    smtp: RecordingSMTPServer,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    bounced = f"{LONG_LOCAL}@example.org"
    smtp.rules[bounced] = Rule("550 5.1.1 no such user " + "x" * 80)
    batch = await db.create_batch(
        NewBatch(
            created_by="test",
            subject_template="A subject long enough to need a line of its own " * 3,
            body_template="Body",
            recipients=[
                NewRecipient(bounced),
                *(NewRecipient(f"p{i}@example.org") for i in range(5)),
            ],
        )
    )
    await drain(settings)
    mail = CapturedMail(tmp_path / "mail")
    (mail.directory / "new" / "1.M1.host").write_bytes(smtp.received[0].raw)
    app = create_app(settings, db=db, captured_mail=mail)
    server = TestServer(app)
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    width = WIDTHS[device]
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": width, "height": 800})
            pages = {
                "login": "/login",
                "batches": "/",
                "batch": f"/batches/{batch}",
                "dead-letters": "/dead-letters",
                "suppressions": "/suppressions",
                "captured-mail": "/dev/mail",
            }
            overflowing = {}
            for name, path in pages.items():
                await page.goto(base + path)
                await page.screenshot(path=ARTIFACTS / f"{device}-{name}.png", full_page=True)
                extra = await page.evaluate(
                    "document.documentElement.scrollWidth - window.innerWidth"
                )
                if extra > 0:
                    overflowing[name] = extra
                if name == "login":  # the login page has no navigation; the rest need a session
                    await log_in(page, base)
                    continue
                # The navigation stays whole: every link is on screen, none clipped.
                clipped = await page.evaluate(
                    """() => [...document.querySelectorAll('header a, header button')]
                        .filter(e => { const r = e.getBoundingClientRect();
                                       return r.left < 0 || r.right > window.innerWidth; })
                        .map(e => e.textContent.trim())"""
                )
                assert clipped == [], f"{name}: clipped {clipped}"
            await browser.close()
    finally:
        await server.close()
    assert overflowing == {}, f"pages wider than {width} px (by px): {overflowing}"
