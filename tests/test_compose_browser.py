"""Writing a batch in a real browser: a Markdown body, a sender name and a Reply-To, chosen on
the form at a desktop's 1100 px and a phone's 390 px, sent by the real worker through the dev
capture, and read back in the captured-mail viewer as the recipient's client would show it.

Screenshots land in test-artifacts/compose/ (look at them).
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from mailroom.capture import MailCapture
from shared.db import Database
from shared.settings import Settings
from tests.conftest import drain
from tests.test_browser import CHROMIUM_ARGS, chromium, log_in  # noqa: F401  (a fixture)
from web.app import create_app
from web.captured_mail import CapturedMail

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "compose"
WIDTHS = {"desktop": 1100, "phone": 390}
BODY = "Hello **{{ email }}**,\n\nread [the spring report](https://example.org/report).\n"


@pytest.mark.parametrize("device", WIDTHS)
async def test_an_operator_writes_markdown_with_a_sender_name_and_reply_to(
    chromium: str,  # noqa: F811
    device: str,
    settings: Settings,
    db: Database,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    capture = MailCapture(tmp_path / "mail")
    smtp_port = await capture.start("127.0.0.1", 0)
    mail = CapturedMail(capture.directory)
    server = TestServer(create_app(settings, db=db, captured_mail=mail))
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": WIDTHS[device], "height": 900})
            await log_in(page, base)

            await page.fill("textarea[name=recipients]", "zoe@example.org")
            await page.fill("input[name=subject]", "Spring news")
            await page.fill("textarea[name=body]", BODY)
            await page.check("input[name=body_format][value=markdown]")
            await page.fill("input[name=from_name]", 'Zoë "Spring" News')
            await page.fill("input[name=reply_to]", "replies@example.org")
            await page.screenshot(path=ARTIFACTS / f"{device}-1-form.png", full_page=True)
            await page.click("button:has-text('Queue batch')")
            await expect(page.locator("h1")).to_contain_text("Spring news")

            await drain(settings.model_copy(update={"smtp_port": smtp_port}))
            [captured] = mail.messages()
            raw = mail.raw(captured.key or "")
            assert raw is not None
            message = email.message_from_bytes(raw, policy=email.policy.default)
            assert message["From"].addresses[0].display_name == 'Zoë "Spring" News'
            assert str(message["Reply-To"]) == "replies@example.org"

            await page.goto(f"{base}/dev/mail/{captured.key}")
            text = page.locator("#text")
            await expect(text).to_contain_text("Hello zoe@example.org,")
            await expect(text).to_contain_text("the spring report (https://example.org/report)")
            await expect(text.locator("a[href='https://example.org/report']")).to_have_count(1)
            frame = page.frame_locator("iframe")
            await expect(frame.locator("strong")).to_have_text("zoe@example.org")
            await expect(frame.locator("a[href='https://example.org/report']")).to_have_text(
                "the spring report"
            )
            await page.screenshot(path=ARTIFACTS / f"{device}-2-received.png", full_page=True)
            extra = await page.evaluate("document.documentElement.scrollWidth - innerWidth")
            assert extra <= 0, f"the message page scrolls sideways by {extra} px"
            await browser.close()
    finally:
        await server.close()
        await capture.close()
