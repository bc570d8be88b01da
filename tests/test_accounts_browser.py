"""Accounts in a real browser: an admin adds a viewer on the users page, the viewer logs in with
a password, sees no button to press, makes a personal token and is logged out when disabled.
Screenshots land in test-artifacts/browser/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from shared.db import Database
from shared.settings import Settings
from tests.conftest import make_batch
from tests.test_browser import CHROMIUM_ARGS, chromium, log_in  # noqa: F401 (a fixture)
from web.app import create_app

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"
PASSWORD = "a long enough password"


async def test_an_admin_adds_a_viewer_who_logs_in_and_can_only_read(
    chromium: str,  # noqa: F811
    settings: Settings,
    db: Database,
) -> None:
    from playwright.async_api import async_playwright, expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    batch_id = await make_batch(db, ["a@example.org"])
    server = TestServer(create_app(settings, db=db))
    await server.start_server()
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            admin = await (await browser.new_context()).new_page()
            await log_in(admin, base)
            await admin.click("text=Users")
            await admin.fill("#new-name", "vera")
            await admin.select_option("#new-role", "viewer")
            await admin.fill("#new-password", PASSWORD)
            await admin.click("#add-user button[type=submit]")
            await expect(admin.locator("#users")).to_contain_text("vera")
            await admin.screenshot(path=str(ARTIFACTS / "accounts-users.png"), full_page=True)

            viewer = await (await browser.new_context()).new_page()
            await viewer.goto(f"{base}/login")
            await viewer.fill("#password", "not the password")
            await viewer.fill("#name", "vera")
            await viewer.click(".password-login button[type=submit]")
            await expect(viewer.locator(".error")).to_have_text(
                "That user name and password do not match."
            )
            await viewer.fill("#name", "Vera")
            await viewer.fill("#password", PASSWORD)
            await viewer.click(".password-login button[type=submit]")
            await expect(viewer.locator("#read-only")).to_contain_text("needs the sender role")
            await expect(viewer.locator("#new-batch")).to_have_count(0)
            await expect(viewer.locator("header .account")).to_have_text("vera (viewer)")
            await expect(viewer.locator("header")).not_to_contain_text("Users")
            await viewer.goto(f"{base}/batches/{batch_id}")
            await expect(viewer.locator("#cancel-batch")).to_have_count(0)
            await viewer.goto(f"{base}/account")
            await viewer.fill("#token-name", "reports")
            await viewer.click("text=Make a token")
            await expect(viewer.locator("#token-value")).to_contain_text("mrt_")
            await viewer.screenshot(path=str(ARTIFACTS / "accounts-token.png"), full_page=True)

            admin.on("dialog", lambda dialog: dialog.accept())
            await admin.goto(f"{base}/users")
            await admin.click("#users button:has-text('Disable')")
            await expect(admin.locator("#users button:has-text('Disable')")).to_have_count(0)
            await viewer.goto(f"{base}/")
            await expect(viewer.locator("h1")).to_have_text("Log in")
            await browser.close()
    finally:
        await server.close()
