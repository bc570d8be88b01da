"""Who may use the web tier: a Bearer token for the API, a signed session cookie for pages.

The session cookie holds only an expiry and a CSRF token, signed with ``MAILROOM_SECRET_KEY``
(HMAC-SHA256); tokens are compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

SESSION_COOKIE = "mailroom_session"
SESSION_TTL_S = 12 * 3600


@dataclass(frozen=True)
class Session:
    expires_at: float
    csrf_token: str

    def csrf_matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is this session's CSRF token (constant time, any text)."""
        return secret_equal(candidate, self.csrf_token.encode())


def secret_equal(candidate: str, secret: bytes) -> bool:
    """Whether ``candidate`` is ``secret``, in constant time, for any text a client can send.

    aiohttp decodes header bytes as UTF-8 with ``surrogateescape``, so a header can hold lone
    surrogates that ``str.encode()`` refuses; ``surrogatepass`` encodes every string (as bytes
    no real token has) instead of raising.
    """
    return hmac.compare_digest(candidate.encode("utf-8", "surrogatepass"), secret)


class Authenticator:
    """Checks API tokens and issues/reads session cookies."""

    def __init__(self, api_token: str, secret_key: str) -> None:
        self._api_token = api_token.encode()
        self._key = hashlib.sha256(b"mailroom-session\0" + secret_key.encode()).digest()

    def token_matches(self, candidate: str) -> bool:
        return secret_equal(candidate, self._api_token)

    def bearer_ok(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and bool(token) and self.token_matches(token.strip())

    def new_session(self) -> tuple[Session, str]:
        session = Session(
            expires_at=time.time() + SESSION_TTL_S, csrf_token=secrets.token_urlsafe(24)
        )
        body = base64.urlsafe_b64encode(
            json.dumps({"exp": session.expires_at, "csrf": session.csrf_token}).encode()
        ).decode()
        return session, f"{body}.{self._sign(body)}"

    def read_session(self, request: web.Request) -> Session | None:
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if not cookie.isascii():  # we only ever issue ASCII; anything else is forged
            return None
        body, _, signature = cookie.partition(".")
        if not body or not hmac.compare_digest(signature.encode(), self._sign(body).encode()):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(body))
            session = Session(expires_at=float(data["exp"]), csrf_token=str(data["csrf"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires_at > time.time() else None

    def _sign(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()


class LoginLimiter:
    """At most ``per_minute`` failed logins per client address in any sliding minute."""

    def __init__(self, per_minute: int) -> None:
        self._per_minute = per_minute
        self._failures: dict[str, list[float]] = {}

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self._per_minute

    def failed(self, client: str) -> None:
        self._recent(client).append(time.monotonic())
        if len(self._failures) > 10_000:  # forget the quiet ones rather than grow forever
            for key in [k for k, v in self._failures.items() if not v][:5_000]:
                del self._failures[key]

    def _recent(self, client: str) -> list[float]:
        cutoff = time.monotonic() - 60
        recent = [t for t in self._failures.get(client, []) if t > cutoff]
        self._failures[client] = recent
        return recent
