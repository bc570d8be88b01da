"""The JSON API's handlers, one module per resource; the contract is ``web/contract.py``."""

from __future__ import annotations

from aiohttp.web import RouteDef

from web.api import accounts, batches, dead_letters, dev_mail, suppressions

routes: list[RouteDef] = [
    *batches.routes,
    *dead_letters.routes,
    *suppressions.routes,
    *dev_mail.routes,
    *accounts.routes,
]
