"""Who may use the web tier: a Bearer token for the API, a signed session cookie for pages.

The session cookie holds a random session id, an expiry, a CSRF token and a fingerprint of the
API token it was issued under, signed with ``MAILROOM_SECRET_KEY`` for sessions alone
(:mod:`shared.signing`: an unsubscribe link is never a cookie). A cookie is a session only while
all of these hold:

- its signature verifies (changing ``MAILROOM_SECRET_KEY`` ends every session, and so did the
  move to :mod:`shared.signing`: every session lives in ``web_sessions`` under a random id
  anyway, so a cookie of the earlier format is refused and its owner logs in again);
- it has not expired (``SESSION_TTL_SECONDS``);
- a session of the bootstrap token (``MAILROOM_API_TOKEN``) carries the current token's
  fingerprint (rotating the token ends every such session: whoever logged in with a token that
  leaked is logged out with it). The fingerprint is an HMAC of the token under a key of its
  own, so a cookie reveals nothing to test guesses of the token against. A user's session
  carries ``"user"`` there instead, and its row names the user;
- the session's row is in ``web_sessions`` and its user is not disabled (checked by the
  middleware): logging out, disabling the user or changing their password deletes it, so a
  copied cookie stops working at once, in every web process.

Every route declares the role it needs with :func:`requires` (or is public, see
``web/middlewares.py``); ``create_app`` refuses to build an app with a route that does not.

Tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from shared.accounts import Role
from shared.signing import Purpose, SignedValues

SESSION_COOKIE = "mailroom_session"
SESSION_TTL_SECONDS = 12 * 3600
# What a user's session cookie carries where a bootstrap session has the token's fingerprint.
USER_SESSION = "user"
ROLE_ATTRIBUTE = "mailroom_required_role"

Handler = TypeVar("Handler", bound=Callable[..., object])


def requires(role: Role) -> Callable[[Handler], Handler]:
    """Declare the least role a route's handler needs (the auth middleware enforces it).

    Put it under the route decorator or over it: it marks the function itself.
    """

    def mark(handler: Handler) -> Handler:
        setattr(handler, ROLE_ATTRIBUTE, role)
        return handler

    return mark


def required_role(handler: object) -> Role | None:
    """The role a handler declared with :func:`requires`, None if it declared none."""
    role = getattr(handler, ROLE_ATTRIBUTE, None)
    return role if isinstance(role, Role) else None


@dataclass(frozen=True)
class Session:
    id: str
    expires_at: float
    csrf_token: str
    # A user's session (its row names the user), or one of the bootstrap token.
    of_user: bool = False

    @property
    def id_hash(self) -> bytes:
        """What ``web_sessions`` stores: the id's SHA-256, never the id itself."""
        return hashlib.sha256(self.id.encode()).digest()

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
        self._cookies = SignedValues(secret_key, Purpose.SESSION)
        self._token_fingerprint = SignedValues(
            secret_key, Purpose.API_TOKEN_FINGERPRINT
        ).fingerprint(api_token)

    def token_matches(self, candidate: str) -> bool:
        return secret_equal(candidate, self._api_token)

    @staticmethod
    def bearer_of(request: web.Request) -> str | None:
        """The Bearer token the ``Authorization`` header gives, None if it gives none."""
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        return token if scheme.lower() == "bearer" and token else None

    def bearer_ok(self, request: web.Request) -> bool:
        """Whether the request's Bearer is ``MAILROOM_API_TOKEN``."""
        token = self.bearer_of(request)
        return token is not None and self.token_matches(token)

    def new_session(self, *, of_user: bool = False) -> tuple[Session, str]:
        """A new session and its cookie value; the caller records it (``start_session``)."""
        session = Session(
            id=secrets.token_urlsafe(32),
            expires_at=time.time() + SESSION_TTL_SECONDS,
            csrf_token=secrets.token_urlsafe(24),
            of_user=of_user,
        )
        claims = {
            "sid": session.id,
            "exp": session.expires_at,
            "csrf": session.csrf_token,
            "tok": USER_SESSION if of_user else self._token_fingerprint,
        }
        return session, self._cookies.sign(claims)

    def read_session(self, request: web.Request) -> Session | None:
        """The session the cookie claims, if signed by us, unexpired and of the current token.

        Whether it is still logged in is the database's to say (``session_active``).
        """
        data = self._cookies.read(request.cookies.get(SESSION_COOKIE, ""))
        if not isinstance(data, dict):
            return None
        try:
            fingerprint = str(data["tok"])
            session = Session(
                id=str(data["sid"]),
                expires_at=float(data["exp"]),
                csrf_token=str(data["csrf"]),
                of_user=fingerprint == USER_SESSION,
            )
        except (ValueError, KeyError, TypeError):
            return None
        if not session.of_user and not hmac.compare_digest(
            fingerprint.encode("utf-8", "surrogatepass"), self._token_fingerprint.encode()
        ):
            return None
        return session if session.expires_at > time.time() else None


class LoginLimiter:
    """At most ``per_minute`` failed attempts per client in any sliding minute, then a lock-out.

    A failed attempt is a wrong token or password at the login form or a wrong
    ``Authorization`` header on any protected route: they guess the same secrets, so they share
    one budget per client. A wrong password also counts against the user name it was tried for
    (``name_key``), so guesses at one account from many clients are locked out too.

    The client is the peer address, or with ``trust_proxy`` (``MAILROOM_TRUST_PROXY``) the
    right-most ``X-Forwarded-For`` hop: the address the proxy in front of us saw and appended.
    Everything left of it was written by the client and cannot be trusted, so a guesser cannot
    pick a fresh counter by sending its own header. This trusts exactly one proxy hop; behind a
    chain of proxies the right-most hop is the next proxy, and everyone behind it shares one
    counter (safe, never spoofable). IPv6 clients are counted by their /64, which one host
    usually holds whole.
    """

    MAX_CLIENTS = 10_000

    def __init__(self, per_minute: int, *, trust_proxy: bool = False) -> None:
        self._per_minute = per_minute
        self._trust_proxy = trust_proxy
        self._failures: dict[str, list[float]] = {}

    def client_of(self, request: web.Request) -> str:
        """The key a request's failed attempts are counted under (see the class docstring)."""
        peer = request.remote or "unknown"
        if self._trust_proxy:
            hops = ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")
            hop = next((h.strip() for h in reversed(hops) if h.strip()), None)
            if hop is not None:
                return _address_key(hop)
        return _address_key(peer)

    @staticmethod
    def name_key(name: str) -> str:
        """The key failed passwords for a user name are counted under (any case, bounded)."""
        return "user:" + name[:100].lower()

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self._per_minute

    def failed(self, client: str) -> None:
        recent = self._recent(client)
        recent.append(time.monotonic())
        self._failures[client] = recent
        if len(self._failures) > self.MAX_CLIENTS:
            self._forget()

    def _recent(self, client: str) -> list[float]:
        failures = self._failures.get(client)
        if not failures:
            return []
        cutoff = time.monotonic() - 60
        recent = [t for t in failures if t > cutoff]
        if recent:
            self._failures[client] = recent
        else:
            del self._failures[client]
        return recent

    def _forget(self) -> None:
        """Drop clients quiet for a minute, then (a flood of clients) the oldest half."""
        cutoff = time.monotonic() - 60
        for key in [k for k, v in self._failures.items() if v[-1] <= cutoff]:
            del self._failures[key]
        if len(self._failures) > self.MAX_CLIENTS:
            by_age = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in by_age[: len(by_age) // 2]:
                del self._failures[key]


def _address_key(hop: str) -> str:
    """An address as a counter key: canonical, IPv6 by its /64, a port dropped."""
    text = hop.strip()[:100]
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443"
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # "192.0.2.1:443"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text  # an obfuscated identifier (RFC 7239) or "unknown": used as written
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
