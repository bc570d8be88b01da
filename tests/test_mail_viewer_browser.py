"""The captured-mail viewer in a real browser, at a desktop's 1100 px and a phone's 390 px.

The real worker sends a batch through the real dev capture (``mailroom.capture``); the operator
opens the list, searches it, reads a message decoded, follows its unsubscribe link to the
site's unsubscribe page and unsubscribes, and at the end deletes every message. A captured
message whose HTML part carries a script, a remote image and a remote stylesheet is opened
too: nothing in it runs or loads (a local server sees every request it would make, and the
same HTML opened outside the viewer proves that server would be reached). Screenshots land in
test-artifacts/viewer/ (look at them).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from mailroom.capture import MailCapture
from shared.db import Database
from shared.settings import Settings
from tests.conftest import API_TOKEN, AUTH, drain, query
from tests.test_browser import CHROMIUM_ARGS, chromium  # noqa: F401  (a fixture)
from web.app import create_app
from web.captured_mail import CapturedMail

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "viewer"
WIDTHS = {"desktop": 1100, "phone": 390}
EN_DASH = "\N{EN DASH}"


def hostile_html(beacon: str) -> str:
    """An HTML part that, if anything in it ran or loaded, would reach ``beacon``."""
    return (
        "<html><head>"
        f'<link rel="stylesheet" href="{beacon}/style.css">'
        "</head><body>"
        '<h1 id="shown">Hostile HTML</h1>'
        "<script>"
        "document.write('<p id=\"ran\">the script ran</p>');"
        "document.title = 'pwned';"
        f"fetch('{beacon}/fetch');"
        f"var x = new XMLHttpRequest(); x.open('GET', '{beacon}/xhr', false); x.send();"
        "</script>"
        f'<img src="{beacon}/pixel.gif" alt="">'
        "</body></html>"
    )


def hostile_message(beacon: str) -> bytes:
    return (
        "To: eve@example.org\r\nSubject: Hostile <script>alert(1)</script>\r\n"
        "Message-ID: <hostile@example.org>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/html; charset=utf-8\r\n\r\n" + hostile_html(beacon) + "\r\n"
    ).encode()


async def _no_sideways_scroll(page: object, name: str, overflowing: dict[str, int]) -> None:
    extra = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")  # type: ignore[attr-defined]
    if extra > 0:
        overflowing[name] = extra


@pytest.mark.parametrize("device", WIDTHS)
async def test_an_operator_reads_captured_mail_and_unsubscribes_from_it(
    chromium: str,  # noqa: F811
    device: str,
    settings: Settings,
    db: Database,
    tmp_path: Path,
) -> None:
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    hits: list[str] = []
    xhr_seen = asyncio.Event()

    async def seen(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == "/xhr":
            xhr_seen.set()
        return web.Response(text="seen", headers={"Access-Control-Allow-Origin": "*"})

    beacon_app = web.Application()
    beacon_app.router.add_route("*", "/{tail:.*}", seen)
    beacon = TestServer(beacon_app)
    await beacon.start_server()
    beacon_url = f"http://127.0.0.1:{beacon.port}"

    capture = MailCapture(tmp_path / "mail")
    smtp_port = await capture.start("127.0.0.1", 0)
    server = TestServer(create_app(settings, db=db, captured_mail=CapturedMail(capture.directory)))
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    width = WIDTHS[device]
    try:
        # The real worker, through the real capture, with links back to this web tier.
        sender = settings.model_copy(update={"smtp_port": smtp_port, "public_url": base})
        async with aiohttp.ClientSession(base) as http:
            created = await http.post(
                "/api/batches",
                json={
                    "recipients": ["ann@example.org", "bob@example.org"],
                    "subject": "Grüße {{ email }}",
                    "body": "Ünïcödé greetings from Mailroom.\n\n"
                    "Read the whole story at https://example.org/news/" + "long-" * 20 + "end",
                },
                headers=AUTH,
            )
            assert created.status == 201, await created.text()
        await drain(sender)
        (capture.directory / "new" / "9999999999.M1P1Q1.hostile").write_bytes(
            hostile_message(beacon_url)
        )

        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            context = await browser.new_context(
                viewport={"width": width, "height": 900}, accept_downloads=True
            )
            # Requests the browser completed (one the policy blocks fails instead).
            loaded: list[str] = []
            context.on("requestfinished", lambda r: loaded.append(r.url))
            page = await context.new_page()
            overflowing: dict[str, int] = {}

            await page.goto(base + "/login?next=/dev/mail")
            await page.fill("input[name=token]", API_TOKEN)
            await page.click(".token-login button[type=submit]")
            await page.wait_for_url("**/dev/mail")
            await expect(page.locator("#mail-range")).to_have_text(f"1{EN_DASH}3 of 3")
            # The subject is shown as text, never as markup.
            await expect(page.locator("table")).to_contain_text("Hostile <script>alert(1)")
            await page.screenshot(path=ARTIFACTS / f"{device}-1-list.png", full_page=True)
            await _no_sideways_scroll(page, "list", overflowing)

            await page.fill("#mail-q", "BOB@")
            await page.press("#mail-q", "Enter")
            await expect(page.locator("#mail-range")).to_contain_text(f"1{EN_DASH}1 of 1")
            await expect(page.locator("table")).not_to_contain_text("ann@example.org")
            await page.screenshot(path=ARTIFACTS / f"{device}-2-search.png", full_page=True)

            await page.click("text=Grüße bob@example.org")
            await expect(page.locator("h1")).to_have_text("Grüße bob@example.org")
            text = page.locator(".mail-text")
            await expect(text).to_contain_text("Ünïcödé greetings from Mailroom.")
            await expect(text).not_to_contain_text("=C3")
            story = text.locator("a", has_text="https://example.org/news/")
            await expect(story).to_have_attribute(
                "href", "https://example.org/news/" + "long-" * 20 + "end"
            )
            await expect(story).to_have_attribute("rel", "noopener noreferrer")
            # The worker's HTML part, in its sandboxed frame.
            frame = page.frame_locator("iframe.mail-html")
            await expect(frame.locator("body")).to_contain_text("Ünïcödé greetings")
            await expect(page.locator(".mail-headers")).to_contain_text("List-Unsubscribe")
            await page.screenshot(path=ARTIFACTS / f"{device}-3-message.png", full_page=True)
            await _no_sideways_scroll(page, "message", overflowing)

            async with page.expect_download() as download_info:
                await page.click("text=Raw (.eml)")
            download = await download_info.value
            assert download.suggested_filename.endswith(".eml")
            saved = await asyncio.to_thread(Path(await download.path()).read_bytes)
            assert b"Subject: =?utf-8?" in saved

            async with context.expect_page() as opened:
                await text.locator(f"a[href^='{base}/u/']").click()
            unsubscribe = await opened.value
            await expect(unsubscribe.locator("h1")).to_have_text("Unsubscribe")
            await expect(unsubscribe.locator("main")).to_contain_text("bob@example.org")
            await unsubscribe.click("button:has-text('Unsubscribe')")
            await expect(unsubscribe.locator("h1")).to_have_text("You are unsubscribed")
            await unsubscribe.screenshot(
                path=ARTIFACTS / f"{device}-4-unsubscribed.png", full_page=True
            )
            assert await query(
                settings.database_url or "", "SELECT address, reason FROM suppressions"
            ) == [("bob@example.org", "unsubscribed")]
            await unsubscribe.close()

            await page.goto(base + "/dev/mail?q=hostile")
            await page.click("table a")
            frame = page.frame_locator("iframe.mail-html")
            await expect(frame.locator("#shown")).to_have_text("Hostile HTML")
            # The load event waits for the frame's images and for a synchronous request the
            # script would make: after it, whatever the part could do has been done.
            await page.wait_for_load_state("load")
            await expect(frame.locator("#ran")).to_have_count(0)
            assert await page.title() != "pwned"
            await page.screenshot(path=ARTIFACTS / f"{device}-5-hostile.png", full_page=True)
            assert hits == [], "something in the captured HTML ran or loaded"
            assert not [url for url in loaded if url.startswith(beacon_url)]

            # The same HTML outside the viewer does reach the beacon: the check above can fail.
            control = await context.new_page()
            await control.set_content(hostile_html(beacon_url))
            await expect(control.locator("#ran")).to_have_text("the script ran")
            async with asyncio.timeout(10):
                await xhr_seen.wait()
            await control.close()

            await page.goto(base + "/dev/mail")
            await page.click("button:has-text('Delete all…')")
            await expect(page.locator("h1")).to_have_text("Delete all captured mail?")
            await expect(page.locator("main")).to_contain_text("all 3 captured messages")
            await page.screenshot(path=ARTIFACTS / f"{device}-6-delete.png", full_page=True)
            await page.click("button:has-text('Delete all')")
            await expect(page.locator("main")).to_contain_text("Nothing captured yet.")
            assert CapturedMail(capture.directory).page().total == 0
            await browser.close()
        assert overflowing == {}, f"pages that scroll sideways at {width} px: {overflowing}"
    finally:
        await server.close()
        await beacon.close()
        await capture.close()
