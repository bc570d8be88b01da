"""A Dovecot IMAP server of a test's own (Debian's ``dovecot-imapd``) on loopback.

Each :class:`Dovecot` writes its configuration, certificates, password file and maildirs to a
directory of its own, listens on two free loopback ports (``imaps``, TLS from the first byte,
and ``imap``, which offers STARTTLS and also takes a plain login from loopback) and serves
one user from a passwd-file. Its certificate is signed by a CA the helper makes
(:attr:`Dovecot.ca_file`); :attr:`Dovecot.other_ca_file` is a CA that signed nothing it serves.

Dovecot does not give mail access to root: as root the user's mail belongs to Debian's
``dovecot`` user; as anyone else Dovecot runs rootless as that user.
"""

from __future__ import annotations

import asyncio
import datetime
import imaplib
import ipaddress
import os
import pwd
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.processes import free_port, stop, wait_until

DEBIAN_BINARY = Path("/usr/sbin/dovecot")
USERNAME = "bounces"
PASSWORD = "imap-test-password"


def dovecot_binary() -> str | None:
    """The dovecot program (Debian installs it in /usr/sbin, off a user's PATH), or None."""
    found = shutil.which("dovecot")
    if found:
        return found
    return str(DEBIAN_BINARY) if os.access(DEBIAN_BINARY, os.X_OK) else None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
) -> x509.Certificate:
    """A certificate for ``subject``: a CA when ``issuer`` is None, else a loopback server's."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class Dovecot:
    """Dovecot with one user; use as ``async with``: started on entry, stopped on exit."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.imaps_port = free_port()
        self.imap_port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="mailroom-dovecot-"))
        self.ca_file = self.directory / "ca.pem"
        self.other_ca_file = self.directory / "other-ca.pem"
        self._proc: asyncio.subprocess.Process | None = None

    def _write_certificates(self) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("Mailroom test CA", ca_key, None)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = _certificate("localhost", server_key, ("Mailroom test CA", ca_key))
        other_key = ec.generate_private_key(ec.SECP256R1())
        self.ca_file.write_bytes(_pem(ca))
        self.other_ca_file.write_bytes(_pem(_certificate("Another CA", other_key, None)))
        (self.directory / "server.pem").write_bytes(_pem(server))
        key_file = self.directory / "server.key"
        key_file.write_bytes(
            server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)

    def _config(self, mail_user: pwd.struct_passwd) -> str:
        d = self.directory
        rootless = os.geteuid() != 0
        own = pwd.getpwuid(os.geteuid()).pw_name
        lines = [
            f"base_dir = {d}/run",
            f"state_dir = {d}/state",
            f"log_path = {self.log_path}",
            "protocols = imap",
            "listen = 127.0.0.1",
            "ssl = yes",
            f"ssl_cert = <{d}/server.pem",
            f"ssl_key = <{d}/server.key",
            "ssl_min_protocol = TLSv1.2",
            # Plain logins on the imap port are for the tests of MAILROOM_IMAP_SECURITY=none.
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            "auth_failure_delay = 0",  # a wrong password's test need not wait 2 s
            # Nor the next login after it: the auth process cannot reach anvil's penalty
            # socket, so there is no anti-guessing delay.
            "service anvil {\n  unix_listener anvil-auth-penalty {\n    mode = 0\n  }\n"
            + ("  chroot =\n" if rootless else "")
            + "}",
            f"passdb {{\n  driver = passwd-file\n  args = scheme=PLAIN {d}/passwd\n}}",
            f"userdb {{\n  driver = passwd-file\n  args = {d}/passwd\n}}",
            "mail_location = maildir:~/Maildir",
            f"first_valid_uid = {min(mail_user.pw_uid, 100)}",
            "service imap-login {\n"
            f"  inet_listener imap {{\n    address = 127.0.0.1\n    port = {self.imap_port}\n  }}\n"
            f"  inet_listener imaps {{\n    address = 127.0.0.1\n    port = {self.imaps_port}\n"
            "    ssl = yes\n  }\n" + ("  chroot =\n" if rootless else "") + "}",
        ]
        if rootless:
            lines += [
                f"default_internal_user = {own}",
                f"default_internal_group = {own}",
                f"default_login_user = {own}",
            ]
        return "\n".join(lines) + "\n"

    async def __aenter__(self) -> Dovecot:
        binary = dovecot_binary()
        assert binary is not None, "apt-get install dovecot-imapd"
        mail_user = pwd.getpwnam("dovecot") if os.geteuid() == 0 else pwd.getpwuid(os.geteuid())
        for sub in ("run", "state", "home"):
            (self.directory / sub).mkdir()
        self.directory.chmod(0o755)
        os.chown(self.directory / "home", mail_user.pw_uid, mail_user.pw_gid)
        self._write_certificates()
        (self.directory / "passwd").write_text(
            f"{USERNAME}:{{PLAIN}}{PASSWORD}:{mail_user.pw_uid}:{mail_user.pw_gid}"
            f"::{self.directory / 'home'}::\n"
        )
        (self.directory / "dovecot.conf").write_text(self._config(mail_user))
        output = self.log_path.open("ab")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                binary,
                "-F",
                "-c",
                str(self.directory / "dovecot.conf"),
                stdout=output,
                stderr=output,
            )
        finally:
            output.close()
        await wait_until(self._answers, 15, f"dovecot on port {self.imaps_port}")
        return self

    async def _answers(self) -> bool:
        assert self._proc is not None
        if self._proc.returncode is not None:
            raise AssertionError(
                f"dovecot exited with {self._proc.returncode}: {self.log_path.read_text()}"
            )
        for port in (self.imaps_port, self.imap_port):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    pass
            except OSError:
                return False
        return True

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            await stop(self._proc)
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- what a test does to the mailbox, as a mail client would ----------------------------

    def client(self) -> imaplib.IMAP4_SSL:
        """A logged-in IMAP connection over TLS, trusting the test CA."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        conn = imaplib.IMAP4_SSL("127.0.0.1", self.imaps_port, ssl_context=context, timeout=10)
        conn.login(USERNAME, PASSWORD)
        return conn

    def create(self, *mailboxes: str) -> None:
        with self.client() as conn:
            for name in mailboxes:
                typ, data = conn.create(f'"{name}"')
                assert typ == "OK", data

    def append(self, mailbox: str, *messages: bytes) -> None:
        """Deliver ``messages`` to ``mailbox`` (APPEND), unread."""
        with self.client() as conn:
            for raw in messages:
                typ, data = conn.append(f'"{mailbox}"', None, None, _crlf(raw))
                assert typ == "OK", data

    def flags(self, mailbox: str) -> list[set[str]]:
        """The flags of every message in ``mailbox``, in order (empty if it has none)."""
        with self.client() as conn:
            typ, data = conn.select(f'"{mailbox}"', readonly=True)
            assert typ == "OK", data
            if int(data[0] or 0) == 0:
                return []
            typ, data = conn.fetch("1:*", "(FLAGS)")
            assert typ == "OK", data
            found = []
            for line in data:
                assert isinstance(line, bytes)
                inside = line.split(b"FLAGS (", 1)[1].split(b")", 1)[0]
                found.append({f.decode() for f in inside.split()})
            return found


def _crlf(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
