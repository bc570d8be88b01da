"""Server-rendered pages, one module per feature; ``html.py`` is what every page shares."""

from __future__ import annotations

from aiohttp.web import RouteDef

from web.pages import accounts, batches, dead_letters, dev_mail, login, suppressions, unsubscribe

routes: list[RouteDef] = [
    *login.routes,
    *batches.routes,
    *dead_letters.routes,
    *suppressions.routes,
    *unsubscribe.routes,
    *dev_mail.routes,
    *accounts.routes,
]
