"""Mailroom's configuration: one object, read from ``MAILROOM_*`` variables once per process.

Every process builds a :class:`Settings` in its ``main()`` and passes it down; nothing else
reads the environment. Field names carry their units (``smtp_timeout_seconds``). A missing or
invalid value becomes a :class:`ConfigError` that names the environment variable, which the
command line prints as one line before exiting with status 2.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.addresses import InvalidAddress, normalize_address
from shared.composition import checked_reply_to, from_name_problem
from shared.headers import find_unsafe, unsafe_message
from shared.queue import DEFAULT_CHUNK_SIZE

ENV_PREFIX = "MAILROOM_"


class ConfigError(Exception):
    """Configuration that cannot work; the message names the variable to fix."""


class SmtpSecurity(enum.StrEnum):
    """How the SMTP connection is secured."""

    NONE = "none"
    STARTTLS = "starttls"
    TLS = "tls"


class ImapSecurity(enum.StrEnum):
    """How the bounce mailbox's IMAP connection is secured: TLS from the first byte (port
    993), STARTTLS (port 143), or ``none``, which must be asked for (a server on loopback)."""

    TLS = "tls"
    STARTTLS = "starttls"
    NONE = "none"


# A VERP envelope sender is <local>+<token>@<domain> (worker/verp.py); the token takes up to
# 37 characters and RFC 5321 allows 64 in a local part, so the bounce address keeps 26.
BOUNCE_LOCAL_PART_MAX = 26
# Mailbox names as Mailroom writes them in IMAP commands (quoted): printable ASCII without
# quotes, backslashes, wildcards or "&" (which starts modified UTF-7, RFC 3501 5.1.3).
_MAILBOX_NAME = r"^[A-Za-z0-9 ._/+-]{1,200}$"


class LogFormat(enum.StrEnum):
    """``auto`` is console output on a TTY and JSON lines otherwise."""

    AUTO = "auto"
    JSON = "json"
    CONSOLE = "console"


# An SNS topic's ARN: partition, region, account, topic name (a FIFO topic ends in .fifo).
_SNS_TOPIC_ARN = re.compile(
    r"arn:aws(?:-cn|-us-gov)?:sns:[a-z0-9-]{1,30}:[0-9]{12}:[A-Za-z0-9_-]{1,256}(?:\.fifo)?"
)


def p256_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """An ECDSA P-256 public key from PEM or from base64 DER (as SendGrid shows its
    verification key), or ValueError saying what is wrong."""
    given = text.strip()
    try:
        if given.startswith("-----BEGIN"):
            key = load_pem_public_key(given.encode())
        else:
            key = load_der_public_key(base64.b64decode(given, validate=True))
    except (ValueError, binascii.Error, TypeError):
        raise ValueError("must be a public key, PEM or base64 DER") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("must be an ECDSA P-256 public key")
    return key


def _header_safe(value: str | None) -> str | None:
    """The value, if it can go into a header or an SMTP command (shared.headers' rule)."""
    if value is None or find_unsafe(value) is None:
        return value
    problem = unsafe_message(value)
    if "\r" in value or "\n" in value:
        problem = f"must not contain line breaks; {problem}"
    raise ValueError(problem)


DEFAULT_RELAY_NAME = "default"


class SmtpRelay(BaseModel):
    """One SMTP server the worker may send through: an entry of ``MAILROOM_SMTP_RELAYS``.

    ``name`` labels the relay's metrics and log lines (so it is short and plain); ``weight`` is
    its share of the sends among the healthy relays of its ``role``; a ``fallback`` carries mail
    only while no ``primary`` is healthy. ``max_connections`` defaults to the worker's
    concurrency; ``rate_per_second`` / ``rate_per_minute`` cap what each worker process sends
    through it (unset: no cap of its own).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=25, ge=1, le=65535)
    security: SmtpSecurity = SmtpSecurity.NONE
    username: str | None = None
    password: SecretStr | None = None
    timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    max_connections: int | None = Field(default=None, ge=1, le=256)
    rate_per_second: int | None = Field(default=None, ge=1, le=100_000)
    rate_per_minute: int | None = Field(default=None, ge=1, le=6_000_000)
    weight: int = Field(default=1, ge=1, le=1000)
    role: Literal["primary", "fallback"] = "primary"

    @field_validator("host", "username")
    @classmethod
    def _no_line_breaks(cls, value: str | None) -> str | None:
        return _header_safe(value)


class Settings(BaseSettings):
    """Everything Mailroom can be told, with the defaults it runs with."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        populate_by_name=True,
    )

    database_url: str | None = None
    database_pool_size: int = Field(default=10, ge=1, le=500)
    # The URL reaches PostgreSQL through a transaction-mode pooler (PgBouncer
    # pool_mode = transaction): no prepared statements, no session-level SET.
    database_transaction_pooling: bool = False

    smtp_host: str = "localhost"
    smtp_port: int = Field(default=25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_security: SmtpSecurity = SmtpSecurity.NONE
    smtp_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # Several SMTP servers, as a JSON list of SmtpRelay objects. Unset, the MAILROOM_SMTP_*
    # values above are the one relay (named "default").
    smtp_relays: list[SmtpRelay] | None = None
    from_address: str | None = None
    # The sender's display name ("News" <news@example.org>) and a Reply-To address, for every
    # batch that does not give its own.
    from_name: str | None = None
    reply_to: str | None = None
    # The web tier's address as recipients reach it (https://mail.example.org): unsubscribe
    # links point there. Unset, messages carry no unsubscribe link.
    public_url: str | None = None
    # Also offered in List-Unsubscribe (RFC 2369), e.g. unsubscribe@example.org.
    unsubscribe_mailto: str | None = None
    # DKIM signing: a PEM RSA private key and its selector; the domain defaults to the sender's.
    dkim_private_key_path: Path | None = None
    dkim_selector: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
    dkim_domain: str | None = Field(default=None, pattern=r"^[A-Za-z0-9.-]{1,253}$")

    api_token: SecretStr | None = None
    # When set, GET /metrics needs "Authorization: Bearer <token>"; unset, it is open.
    metrics_token: SecretStr | None = None
    secret_key: SecretStr | None = None
    # Behind a TLS-terminating proxy, trust its X-Forwarded-Proto (cookies become Secure).
    trust_proxy: bool = False
    login_attempts_per_minute: int = Field(default=10, ge=1, le=10_000)
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8080, ge=1, le=65535)
    # The worker's /metrics and /healthz; 0 turns that endpoint off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9100, ge=0, le=65535)

    worker_concurrency: int = Field(default=8, ge=1, le=256)
    # Recipients of a batch per queue job: each keeps its own status, attempts and claim, and
    # the queue's cost per job is shared by the chunk (see bench/README.md for the default).
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1, le=1000)
    # Below systemd's (90 s) and compose's (10 s, raised to 30 s in ours) stop timeouts.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=3600)
    job_timeout_seconds: float = Field(default=120.0, gt=0, le=3600)
    stalled_after_seconds: float = Field(default=30.0, ge=2, le=86_400)
    sweep_interval_seconds: int = Field(default=15, ge=1, le=3600)
    retention_days: int = Field(default=30, ge=1, le=3650)
    max_batch_size: int = Field(default=10_000, ge=1, le=1_000_000)
    max_upload_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, le=100 * 1024 * 1024)

    # Sending-rate limits shared by every worker (unset: no limit). Providers cap senders:
    # Gmail's SMTP allows a few hundred to two thousand messages a day per account.
    rate_per_second: int | None = Field(default=None, ge=1, le=100_000)
    rate_per_hour: int | None = Field(default=None, ge=1, le=10_000_000)
    rate_per_day: int | None = Field(default=None, ge=1, le=100_000_000)
    rate_per_domain_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)

    retry_max_attempts: int = Field(default=8, ge=1, le=100)
    retry_base_seconds: float = Field(default=5.0, gt=0, le=86_400)
    retry_cap_seconds: float = Field(default=3600.0, gt=0, le=7 * 86_400)

    # LLM drafting through Groq (or any server speaking its OpenAI-compatible API).
    groq_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("MAILROOM_GROQ_API_KEY", "GROQ_API_KEY")
    )
    groq_base_url: str | None = None
    groq_model: str = "llama-3.3-70b-versatile"
    llm_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    llm_concurrency: int = Field(default=4, ge=1, le=256)

    # VERP: the envelope sender of every message is <local>+<token>@<domain> of this address,
    # the token a signed id of the recipient, so a bounce names its recipient even without a
    # usable DSN. Unset, the envelope sender is MAILROOM_FROM_ADDRESS.
    bounce_address: str | None = None

    # The bounce mailbox, polled over IMAP by the worker when a host is set.
    imap_host: str | None = None
    imap_port: int | None = Field(default=None, ge=1, le=65535)  # 993 for tls, else 143
    imap_security: ImapSecurity = ImapSecurity.TLS
    imap_username: str | None = None
    imap_password: SecretStr | None = None
    imap_mailbox: str = Field(default="INBOX", pattern=_MAILBOX_NAME)
    # Reports read are moved here; unset, they are flagged \Seen where they are.
    imap_processed_mailbox: str | None = Field(default=None, pattern=_MAILBOX_NAME)
    # A PEM file of the CA that signed the server's certificate (a private CA); unset, the
    # system's trusted CAs.
    imap_ca_file: Path | None = None
    imap_poll_interval_seconds: int = Field(default=60, ge=1, le=3600)
    imap_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # The budget of one poll: at most this many messages, each read up to this many bytes
    # (a larger one is recorded as too large and skipped).
    imap_max_messages: int = Field(default=200, ge=1, le=10_000)
    imap_max_message_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # Provider webhooks for bounces and complaints; each endpoint answers 404 until its
    # setting is given. SES through SNS: the topic ARNs accepted (comma-separated).
    ses_topic_arns: Annotated[tuple[str, ...], NoDecode] = ()
    # Postmark: the "user:password" written into the webhook URL (HTTP Basic).
    postmark_webhook_credentials: SecretStr | None = None
    # SendGrid's signed event webhook: its verification key (base64 DER, or PEM).
    sendgrid_webhook_public_key: str | None = None
    # A signed SNS message or SendGrid request older than this is refused as a replay.
    webhook_max_age_seconds: float = Field(default=3600.0, ge=60, le=7 * 86_400)

    log_level: str = "INFO"
    log_format: LogFormat = LogFormat.AUTO

    @field_validator("from_address", "unsubscribe_mailto")
    @classmethod
    def _an_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _header_safe(value)
        try:
            return normalize_address(value)
        except InvalidAddress as exc:
            raise ValueError(str(exc)) from None

    @field_validator("from_name")
    @classmethod
    def _a_display_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip(" ")
        problem = from_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
        return name

    @field_validator("reply_to")
    @classmethod
    def _one_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return checked_reply_to(value)
        except InvalidAddress as exc:
            raise ValueError(str(exc)) from None

    @field_validator("bounce_address")
    @classmethod
    def _a_bounce_address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _header_safe(value)
        try:
            address = normalize_address(value)
        except InvalidAddress as exc:
            raise ValueError(str(exc)) from None
        local = address.rsplit("@", 1)[0]
        if not address.isascii() or "+" in local or '"' in local:
            raise ValueError("the local part must be ASCII without '+' or quotes")
        if len(local) > BOUNCE_LOCAL_PART_MAX:
            raise ValueError(
                f"the local part may have at most {BOUNCE_LOCAL_PART_MAX} characters"
                " (the recipient's token takes the rest of the 64)"
            )
        return address

    @field_validator("imap_ca_file")
    @classmethod
    def _a_readable_file(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("smtp_host", "smtp_username", "imap_host", "imap_username")
    @classmethod
    def _no_line_breaks(cls, value: str | None) -> str | None:
        return _header_safe(value)

    @field_validator("ses_topic_arns", mode="before")
    @classmethod
    def _topic_arns(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            for arn in value:
                if not isinstance(arn, str) or not _SNS_TOPIC_ARN.fullmatch(arn):
                    shown = arn[:80] if isinstance(arn, str) else type(arn).__name__
                    raise ValueError(
                        "must be SNS topic ARNs separated by commas, like "
                        f"arn:aws:sns:us-east-1:123456789012:ses-bounces (not {shown!r})"
                    )
            return tuple(value)
        return value

    @field_validator("postmark_webhook_credentials")
    @classmethod
    def _user_and_password(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        user, colon, password = value.get_secret_value().partition(":")
        text = value.get_secret_value()
        if not colon or not user or not password or any(ord(c) < 33 or ord(c) > 126 for c in text):
            raise ValueError("must be user:password, printable ASCII without spaces")
        return value

    @field_validator("sendgrid_webhook_public_key")
    @classmethod
    def _p256_key(cls, value: str | None) -> str | None:
        if value is None:
            return None
        p256_public_key(value)
        return value.strip()

    @field_validator("smtp_relays", mode="before")
    @classmethod
    def _a_json_list(cls, value: Any) -> Any:
        # pydantic-settings decodes the variable's JSON and passes on what it cannot decode.
        if isinstance(value, str):
            raise ValueError("must be a JSON list of relay objects (it is not valid JSON)")
        return value

    @field_validator("smtp_relays")
    @classmethod
    def _relays_that_can_work(cls, value: list[SmtpRelay] | None) -> list[SmtpRelay] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("needs at least one relay (or leave it unset)")
        names = [relay.name for relay in value]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"relay names must be unique: {', '.join(repeated)} repeated")
        if not any(relay.role == "primary" for relay in value):
            raise ValueError('needs at least one relay with "role": "primary"')
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("groq_base_url", "public_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return _header_safe(value)

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("postgresql://", "postgres://")) and "=" not in value:
            raise ValueError("must be a postgresql:// URL or a libpq key=value string")
        return value

    def require(self, *fields: str) -> None:
        """Raise :class:`ConfigError` naming the first of ``fields`` that is unset."""
        for name in fields:
            value = getattr(self, name)
            if value is None or (isinstance(value, SecretStr) and not value.get_secret_value()):
                raise ConfigError(f"{env_name(name)} is required but not set")

    def require_valid(self) -> None:
        """Cross-field checks that a single field validator cannot make."""
        if self.retry_cap_seconds < self.retry_base_seconds:
            raise ConfigError(
                f"{env_name('retry_cap_seconds')} ({self.retry_cap_seconds}) must not be below "
                f"{env_name('retry_base_seconds')} ({self.retry_base_seconds})"
            )
        if self.sweep_interval_seconds > 59 and self.sweep_interval_seconds % 60:
            raise ConfigError(
                f"{env_name('sweep_interval_seconds')} above 59 must be whole minutes "
                f"(got {self.sweep_interval_seconds})"
            )
        if self.imap_poll_interval_seconds > 59 and self.imap_poll_interval_seconds % 60:
            raise ConfigError(
                f"{env_name('imap_poll_interval_seconds')} above 59 must be whole minutes "
                f"(got {self.imap_poll_interval_seconds})"
            )
        if self.imap_host is not None:
            try:
                self.require("imap_username", "imap_password")
            except ConfigError as exc:
                raise ConfigError(f"{exc} (MAILROOM_IMAP_HOST is set)") from None
        if self.imap_processed_mailbox is not None and self.imap_processed_mailbox.lower() == (
            self.imap_mailbox.lower()
        ):
            raise ConfigError(
                f"{env_name('imap_processed_mailbox')} must not be {env_name('imap_mailbox')}"
            )

    def relays(self) -> list[SmtpRelay]:
        """The SMTP relays to send through: ``MAILROOM_SMTP_RELAYS``, or the one relay of the
        ``MAILROOM_SMTP_*`` values when that is unset."""
        if self.smtp_relays is not None:
            return list(self.smtp_relays)
        return [self.smtp_relay()]

    def smtp_relay(self) -> SmtpRelay:
        """The relay of the ``MAILROOM_SMTP_*`` values, named ``default``."""
        # Each value was checked as a MAILROOM_SMTP_* field already.
        return SmtpRelay.model_construct(
            name=DEFAULT_RELAY_NAME,
            host=self.smtp_host,
            port=self.smtp_port,
            security=self.smtp_security,
            username=self.smtp_username,
            password=self.smtp_password,
            timeout_seconds=self.smtp_timeout_seconds,
            max_connections=None,
            rate_per_second=None,
            rate_per_minute=None,
            weight=1,
            role="primary",
        )

    @property
    def imap_port_or_default(self) -> int:
        """``imap_port``, or the usual port of ``imap_security`` (993 for TLS, else 143)."""
        if self.imap_port is not None:
            return self.imap_port
        return 993 if self.imap_security is ImapSecurity.TLS else 143

    @property
    def heartbeat_interval_seconds(self) -> float:
        """How often a worker proves it is alive: well inside ``stalled_after_seconds``."""
        return min(10.0, self.stalled_after_seconds / 3)


def env_name(field: str) -> str:
    """The environment variable behind a settings field."""
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment (and ``.env``), or raise :class:`ConfigError`."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    settings.require_valid()
    return settings


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        field = ".".join(loc) or "settings"
        value = error.get("input")
        if loc[:1] == ["smtp_relays"]:
            # A relay's values are never echoed: the input may be the whole list, passwords and
            # all, or a password under a misspelt key. Its position and key say where to look.
            where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc[1:])
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{env_name('smtp_relays')}{where}: {message}")
            continue
        shown = "" if _is_secret(field) or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{env_name(field)}: {error['msg']}{shown}")
    return "; ".join(lines)


def _is_secret(field: str) -> bool:
    return field in {
        "smtp_password",
        "api_token",
        "secret_key",
        "metrics_token",
        "groq_api_key",
        "imap_password",
        "postmark_webhook_credentials",
    }
