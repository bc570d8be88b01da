"""Operator accounts: roles, what a user name and a password may be, password hashes, API tokens.

A role is one of three, each allowed everything the one before it is:

- ``viewer``: read batches, recipients, dead letters, suppressions (and manage their own
  password and API tokens);
- ``sender``: also create, send, cancel and edit batches, redrive and discard dead letters,
  suppress and unsuppress addresses;
- ``admin``: also manage users and read the audit log.

Passwords are hashed with argon2id (argon2-cffi's defaults: about 0.2 s of CPU and 64 MiB each),
so verifying one is work for a thread, never the event loop. Personal API tokens are random
(256 bits), so a SHA-256 of one is all that is stored: nothing can be guessed from it faster
than the token itself.
"""

from __future__ import annotations

import enum
import hashlib
import re
import secrets
import unicodedata
from dataclasses import dataclass
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

# The audit log's name for whoever used MAILROOM_API_TOKEN; no user may be called this.
BOOTSTRAP_ACTOR = "api-token"
# What the command line writes to the audit log as its actor.
CLI_ACTOR = "cli"
RESERVED_NAMES = frozenset({BOOTSTRAP_ACTOR, CLI_ACTOR})
# The audit log's actors for suppressions nobody logged in made: a provider's webhook, the
# bounce mailbox, a recipient's unsubscribe link. Each holds a ":", which no user name can.
WEBHOOK_ACTOR_PREFIX = "webhook:"
BOUNCE_MAILBOX_ACTOR = "imap:bounce-mailbox"
UNSUBSCRIBE_ACTOR = "link:unsubscribe"

MAX_NAME_CHARS = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 256
MAX_TOKEN_NAME_CHARS = 100
# Personal API tokens start with this, so the middleware knows which lookup a Bearer needs and
# a leaked one is easy to recognise (and to search for in a repository).
TOKEN_PREFIX = "mrt_"


class Role(enum.StrEnum):
    """What a user may do; each role includes the ones before it."""

    VIEWER = "viewer"
    SENDER = "sender"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        """Whether a user with this role may do what ``needed`` is required for."""
        return _RANK[self] >= _RANK[needed]


_RANK = {Role.VIEWER: 0, Role.SENDER: 1, Role.ADMIN: 2}
ROLES = tuple(role.value for role in Role)


class InvalidAccount(ValueError):
    """A user name, password, role or token name that is refused; the message says why."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: a user, or (``user_id`` None) the bootstrap API token."""

    name: str
    role: Role
    user_id: int | None = None

    @property
    def is_bootstrap(self) -> bool:
        return self.user_id is None


BOOTSTRAP = Principal(BOOTSTRAP_ACTOR, Role.ADMIN)


def _has_unsafe_character(text: str) -> bool:
    return any(unicodedata.category(c) in {"Cc", "Cs"} for c in text)


def check_name(name: str) -> str:
    """``name`` as a user name, or :class:`InvalidAccount` saying why not.

    1 to 64 characters: letters, digits and ``. _ @ -``, starting with a letter or digit (no
    spaces, nothing that could pass for another name on a page). Unique regardless of case.
    """
    if not name:
        raise InvalidAccount("a user name is required")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidAccount(f"a user name is at most {MAX_NAME_CHARS} characters")
    if not name.isascii() or not _NAME.match(name):
        raise InvalidAccount(
            "a user name is letters, digits and . _ @ -, starting with a letter or digit"
        )
    if name.lower() in RESERVED_NAMES:
        raise InvalidAccount(f"the user name {name!r} is reserved")
    return name


def check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise InvalidAccount(f"a role is one of: {', '.join(ROLES)}") from None


def check_password(password: str) -> str:
    """``password`` if it may be one: 10 to 256 characters, no control character."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidAccount(f"a password is at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise InvalidAccount(f"a password is at most {MAX_PASSWORD_CHARS} characters")
    if _has_unsafe_character(password):
        raise InvalidAccount("a password may not hold a control character")
    return password


def check_token_name(name: str) -> str:
    """A personal token's label: one line of 1 to 100 characters, spaces around it trimmed."""
    name = name.strip()
    if not name:
        raise InvalidAccount("a token needs a name (what it is for)")
    if len(name) > MAX_TOKEN_NAME_CHARS:
        raise InvalidAccount(f"a token name is at most {MAX_TOKEN_NAME_CHARS} characters")
    if _has_unsafe_character(name):
        raise InvalidAccount("a token name may not hold a control character")
    return name


@cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()


def hash_password(password: str) -> str:
    """The argon2id hash to store for ``password`` (CPU-heavy: call it in a thread)."""
    return _hasher().hash(check_password(password))


@cache
def _dummy_hash() -> str:
    return _hasher().hash(secrets.token_urlsafe(16))


def verify_password(stored: str | None, password: str) -> bool:
    """Whether ``password`` is the one ``stored`` was made from (CPU-heavy: call it in a thread).

    ``stored`` None (no such user) still verifies against a dummy hash, so an unknown name
    takes as long to refuse as a wrong password. Any text is accepted: one that cannot be
    encoded (a lone surrogate from a form) is simply wrong.
    """
    try:
        candidate = password.encode("utf-8")
    except UnicodeEncodeError:
        candidate = password.encode("utf-8", "surrogatepass")
    try:
        return _hasher().verify(stored or _dummy_hash(), candidate) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def new_api_token() -> str:
    """A fresh personal API token (shown once; only :func:`token_hash` of it is stored)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> bytes:
    """What ``api_tokens`` stores for a token: its SHA-256 (any text, never raising)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
