"""``mailroom check``: what mail providers will see of the sender, checked before sending.

Offline: the DKIM key loads, signs a message and the signature verifies against its own public
key. Online (unless ``--offline``): the sender domain's DKIM record matches that key, and it
has SPF and DMARC records. Each line says ok, warn or FAIL; the status is 1 if any failed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import dkim

from shared.settings import ConfigError, Settings
from worker.dkim import DkimSigner
from worker.smtp import build_message

DNS_TIMEOUT_SECONDS = 3.0
Lookup = Callable[[str], list[str] | None]


def run_checks(
    settings: Settings, *, online: bool, out: TextIO = sys.stdout, lookup: Lookup | None = None
) -> int:
    """Print one line per check; return 1 if any failed, else 0."""
    assert settings.from_address is not None
    domain = settings.from_address.rsplit("@", 1)[1]
    failed = False

    def report(state: str, what: str) -> None:
        nonlocal failed
        failed |= state == "FAIL"
        print(f"{state:>4}  {what}", file=out)

    try:
        signer = DkimSigner.from_settings(settings)
    except ConfigError as exc:
        report("FAIL", f"DKIM: {exc}")
        signer = None
    else:
        if signer is None:
            report(
                "warn", "DKIM: not configured (set MAILROOM_DKIM_PRIVATE_KEY_PATH and _SELECTOR)"
            )
        else:
            record = signer.public_record()
            report(
                "ok" if _signs_and_verifies(signer, settings, record) else "FAIL",
                f"DKIM: the key signs as {signer.record_name} and the signature verifies",
            )
            print(f'      publish: {signer.record_name} TXT "{record}"', file=out)
    if not online:
        report("warn", "DNS: not looked up (--offline)")
        return 1 if failed else 0
    lookup = lookup or _txt_records
    if signer is not None:
        found = lookup(signer.record_name)
        if found is None:
            report("warn", f"DKIM record: could not look up {signer.record_name}")
        else:
            published = "".join(found).replace(" ", "")
            expected = signer.public_record().replace(" ", "")
            report(
                "ok" if expected.split("p=")[1] in published else "FAIL",
                f"DKIM record at {signer.record_name} holds this key",
            )
    for name, prefix, what in (
        (domain, "v=spf1", "SPF"),
        (f"_dmarc.{domain}", "v=DMARC1", "DMARC"),
    ):
        records = lookup(name)
        if records is None:
            report("warn", f"{what}: could not look up {name} (no network?)")
        elif any(r.startswith(prefix) for r in records):
            report("ok", f"{what}: {name} has a {prefix} record")
        else:
            report("FAIL", f"{what}: {name} has no {prefix} record")
    return 1 if failed else 0


def _signs_and_verifies(signer: DkimSigner, settings: Settings, record: str) -> bool:
    assert settings.from_address is not None
    sample = build_message(
        sender=settings.from_address,
        to="check@example.org",
        subject="mailroom check",
        body="A message signed to check the DKIM key.",
        message_id="<check@mailroom>",
    ).data
    return bool(dkim.verify(signer.sign(sample), dnsfunc=lambda name, timeout=5: record.encode()))


def _txt_records(name: str) -> list[str] | None:
    """The TXT records at ``name`` ([] if none), or ``None`` if DNS could not be asked."""
    import dns.exception
    import dns.resolver

    try:
        answer = dns.resolver.resolve(name, "TXT", lifetime=DNS_TIMEOUT_SECONDS)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException:
        return None
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
