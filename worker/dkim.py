"""DKIM signatures (RFC 6376) on every message the worker sends, made with dkimpy.

Optional: set ``MAILROOM_DKIM_PRIVATE_KEY_PATH`` (a PEM RSA key) and ``MAILROOM_DKIM_SELECTOR``;
the signing domain is ``MAILROOM_DKIM_DOMAIN`` or the sender's. Headers and body are
canonicalized "relaxed", which survives the re-folding some relays do.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import dkim
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

from shared.settings import ConfigError, Settings, env_name

# rsaEncryption (1.2.840.113549.1.1.1), DER-encoded with its NULL parameters.
_RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")


@dataclass(frozen=True)
class DkimSigner:
    """Signs a message's wire bytes as ``selector._domainkey.domain``."""

    selector: str
    domain: str
    private_key: bytes

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
        try:
            parse_pem_private_key(key)
        except (UnparsableKeyError, ValueError, IndexError) as exc:
            raise ConfigError(f"{variable}: {path} is not a PEM RSA private key ({exc})") from None
        domain = settings.dkim_domain or settings.from_address.rsplit("@", 1)[1]
        return cls(selector=settings.dkim_selector, domain=domain, private_key=key)

    def sign(self, message: bytes) -> bytes:
        """``message`` with a DKIM-Signature header in front."""
        signature = dkim.sign(
            message,
            self.selector.encode(),
            self.domain.encode(),
            self.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
        )
        return bytes(signature) + message

    @property
    def record_name(self) -> str:
        """Where the public key must be published."""
        return f"{self.selector}._domainkey.{self.domain}"

    def public_record(self) -> str:
        """The TXT record to publish at :attr:`record_name`."""
        key = parse_pem_private_key(self.private_key)
        rsa_public_key = _der(0x30, _der_int(key["modulus"]) + _der_int(key["publicExponent"]))
        spki = _der(0x30, _RSA_ALGORITHM + _der(0x03, b"\0" + rsa_public_key))
        return f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"


def _der_int(value: int) -> bytes:
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")  # a leading 0 keeps it positive
    return _der(0x02, body)


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + length + body
