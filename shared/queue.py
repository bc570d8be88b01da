"""The procrastinate side of Mailroom: queue and task names, and the App factory.

The web tier defers jobs with SQL on its own transaction, so it only needs the names here; the
worker builds an :class:`procrastinate.App` on the same pool it uses for its own queries.
"""

from __future__ import annotations

import procrastinate

EMAIL_QUEUE = "emails"
SEND_EMAIL_TASK = "send_email"
# Periodic housekeeping (the stalled-job sweep, pruning) so it never waits behind emails.
MAINTENANCE_QUEUE = "maintenance"


def build_app() -> procrastinate.App:
    """A procrastinate App; open it with ``await app.open_async(pool)`` to share a pool.

    Jobs carry identifiers only (``{"recipient_id": 42}``); every attempt reads fresh state.
    """
    return procrastinate.App(connector=procrastinate.PsycopgConnector())
