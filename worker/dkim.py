"""DKIM signatures (RFC 6376) on every message the worker sends.

Optional: set ``MAILROOM_DKIM_PRIVATE_KEY_PATH`` (a PEM RSA key) and ``MAILROOM_DKIM_SELECTOR``;
the signing domain is ``MAILROOM_DKIM_DOMAIN`` or the sender's. Headers and body are
canonicalized "relaxed", which survives the re-folding some relays do.

The rsa-sha256 signature is OpenSSL's, through ``cryptography``: about 0.4 ms of CPU per
message with a 2048-bit key, where dkimpy's pure-Python RSA took 7.5 ms. Canonicalization and
the choice of header fields are a few rules of the RFC, written out below; dkimpy still
verifies (``mailroom check``, the tests).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from shared.settings import ConfigError, Settings, env_name

# Signed when present: RFC 6376 5.4.1's recommended fields, the list dkimpy signed by default.
_SIGNED_FIELDS = frozenset(
    b"from sender reply-to subject date message-id to cc mime-version content-type "
    b"content-transfer-encoding content-id content-description resent-date resent-from "
    b"resent-sender resent-to resent-cc resent-message-id in-reply-to references list-id "
    b"list-help list-unsubscribe list-subscribe list-post list-owner list-archive".split()
)
# aiosmtplib sends a lone CR or LF as CRLF, so that is what receivers verify: sign the same.
_LINE_END = re.compile(rb"\r\n|\r|\n")
_WSP = re.compile(rb"[ \t]+")
_FOLD_AT = 76  # RFC 5322 asks for lines of at most 78 characters
_B64_WIDTH = _FOLD_AT - 4  # after " b=" on the first line


@dataclass(frozen=True)
class DkimSigner:
    """Signs a message's wire bytes as ``selector._domainkey.domain``."""

    selector: str
    domain: str
    private_key: bytes
    # Parsed once: loading checks the RSA key, which costs the CPU of about 100 signatures.
    _key: rsa.RSAPrivateKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key", _load_rsa_key(self.private_key))

    @classmethod
    def from_settings(cls, settings: Settings) -> DkimSigner | None:
        """The signer the settings ask for, ``None`` without a key, or :class:`ConfigError`."""
        path = settings.dkim_private_key_path
        if path is None:
            return None
        settings.require("dkim_selector", "from_address")
        assert settings.dkim_selector is not None and settings.from_address is not None
        variable = env_name("dkim_private_key_path")
        try:
            key = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
        domain = settings.dkim_domain or settings.from_address.rsplit("@", 1)[1]
        try:
            return cls(selector=settings.dkim_selector, domain=domain, private_key=key)
        except ValueError as exc:
            raise ConfigError(f"{variable}: {path} is not a PEM RSA private key ({exc})") from None

    def sign(self, message: bytes) -> bytes:
        """``message`` with a DKIM-Signature header in front (and CRLF line ends, as sent)."""
        lines = _LINE_END.split(message)
        if lines[-1] == b"":
            lines.pop()  # the message ended with a line break, not with an empty line
        fields, body = _split(lines)
        names = [name for name, _ in fields if name in _SIGNED_FIELDS]
        if b"from" not in names:
            raise ValueError("a message without a From header cannot be DKIM-signed")
        # From is named once more than it appears, so a From added later breaks the signature.
        names += [name for name in names if name == b"from"]
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())
        tags = [
            b"v=1",
            b"a=rsa-sha256",
            b"c=relaxed/relaxed",
            b"d=" + self.domain.encode(),
            b"i=@" + self.domain.encode(),
            b"q=dns/txt",
            b"s=" + self.selector.encode(),
            b"t=%d" % int(time.time()),
            b"h=" + b" : ".join(names),
            b"bh=" + body_hash,
        ]
        # Folded at spaces only: relaxed canonicalization reads each fold as the space it was.
        header = _fold(b"DKIM-Signature: " + b"; ".join(tags)) + b";\r\n b="
        # RFC 6376 3.7: the chosen fields, then this header with b= empty and no final CRLF.
        signed = _pick(fields, names) + _relaxed_field(header.replace(b"\r\n", b""))[1][:-2]
        b64 = base64.b64encode(self._key.sign(signed, padding.PKCS1v15(), hashes.SHA256()))
        # b= is not hashed (3.7 empties it), so its base64 may be cut anywhere.
        b64_lines = b"\r\n ".join(b64[i : i + _B64_WIDTH] for i in range(0, len(b64), _B64_WIDTH))
        return header + b64_lines + b"\r\n" + b"".join(line + b"\r\n" for line in lines)

    @property
    def record_name(self) -> str:
        """Where the public key must be published."""
        return f"{self.selector}._domainkey.{self.domain}"

    def public_record(self) -> str:
        """The TXT record to publish at :attr:`record_name`."""
        spki = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"


def _load_rsa_key(pem: bytes) -> rsa.RSAPrivateKey:
    """The RSA private key in ``pem``, or ValueError saying why it is not one."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's answer to an encrypted key and no password
        raise ValueError(
            "it is encrypted: store it without a passphrase, e.g. `openssl pkey -in KEY -out NEW`"
        ) from None
    except UnsupportedAlgorithm as exc:
        raise ValueError(str(exc)) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        kind = type(key).__name__.removesuffix("PrivateKey")
        raise ValueError(f"the key is {kind}, not RSA")
    return key


def _split(lines: list[bytes]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """The header fields as (lower-case name, relaxed form), and the body's lines."""
    unfolded: list[bytes] = []
    for i, line in enumerate(lines):
        if not line:
            body = lines[i + 1 :]
            break
        if line[:1] in (b" ", b"\t") and unfolded:
            unfolded[-1] += line  # a continuation: unfolding drops the CRLF before it
        else:
            unfolded.append(line)
    else:
        body = []
    return [_relaxed_field(line) for line in unfolded], body


def _relaxed_field(unfolded: bytes) -> tuple[bytes, bytes]:
    """RFC 6376 3.4.2: the name in lower case, WSP runs as one SP, none around the value."""
    name, _, value = unfolded.partition(b":")
    name = name.rstrip(b" \t").lower()
    return name, name + b":" + _WSP.sub(b" ", value).strip(b" \t") + b"\r\n"


def _relaxed_body(lines: list[bytes]) -> bytes:
    """RFC 6376 3.4.4: WSP runs as one SP, none at line ends, no empty lines at the end."""
    lines = [_WSP.sub(b" ", line).rstrip(b" ") for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def _pick(fields: list[tuple[bytes, bytes]], names: list[bytes]) -> bytes:
    """RFC 6376 5.4.2: each name takes the last instance not yet taken; a missing one, none."""
    instances: dict[bytes, list[bytes]] = {}
    for name, relaxed in fields:
        instances.setdefault(name, []).append(relaxed)
    return b"".join(instances[name].pop() for name in names if instances.get(name))


def _fold(line: bytes) -> bytes:
    """``line`` broken at spaces into lines of at most ``_FOLD_AT`` characters, where it can."""
    lines = [b""]
    for word in line.split(b" "):
        if lines[-1] and len(lines[-1]) + 1 + len(word) > _FOLD_AT:
            lines.append(b"")
        lines[-1] += b" " + word if lines[-1] else word
    return b"\r\n ".join(lines)
