"""Provider webhooks: SES through SNS, Postmark and SendGrid, against real HTTP and real keys.

Nothing here reaches the internet. "AWS" is a loopback HTTPS server with a certificate from a
test CA, and the web tier's HTTP client (``create_app(webhook_http=…)``) resolves every host
name to it and trusts that CA: SNS's real host names are used as they are, so the URL checks
run unchanged, and a URL the app must not fetch would reach the same server and be seen
there. The SNS signing certificate, SendGrid's key pair and every signature are made here with
cryptography, the way SNS and SendGrid make them; the canonical SNS string is built in this
file from AWS's documented field lists, not by the code under test.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from shared.db import Database, make_pool
from shared.metrics import WEB_REGISTRY
from shared.settings import ConfigError, Settings, load_settings
from tests.conftest import AUTH, make_settings, query
from web.app import create_app
from web.keys import SNS

TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-feedback"
SNS_HOST = "sns.us-east-1.amazonaws.com"
CERT_PATH = "/SimpleNotificationService-0123456789abcdef0123456789abcdef.pem"
CERT_URL = f"https://{SNS_HOST}{CERT_PATH}"
POSTMARK_CREDENTIALS = "postmark:s3cret-Pa55"
# Every name the loopback "AWS" answers for; a request to any of them is recorded.
SERVED_HOSTS = [
    SNS_HOST,
    "sns.eu-west-1.amazonaws.com",
    "evil.example",
    f"{SNS_HOST}.evil.example",
]


# -- keys and certificates --------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None = None,
    *,
    hosts: list[str] | None = None,
    ca: bool = False,
    valid_days: int = 30,
) -> x509.Certificate:
    now = datetime.now(UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if hosts:
        san = x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@dataclass
class Pki:
    ca_pem: bytes
    server_cert_pem: bytes
    server_key_pem: bytes
    signing_key: rsa.RSAPrivateKey
    signing_cert_pem: bytes
    other_key: rsa.RSAPrivateKey  # signs like SNS, but is not the certificate's key
    expired_cert_pem: bytes
    sendgrid_key: ec.EllipticCurvePrivateKey
    sendgrid_public_b64: str


@pytest.fixture(scope="module")
def pki() -> Pki:
    def rsa_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    ca_key, server_key, signing_key, other_key = rsa_key(), rsa_key(), rsa_key(), rsa_key()
    ca = _certificate("Mailroom test CA", ca_key, ca=True)
    server = _certificate("aws", server_key, (ca.subject, ca_key), hosts=SERVED_HOSTS)
    signing = _certificate("sns.amazonaws.com", signing_key, (ca.subject, ca_key))
    expired = _certificate("sns.amazonaws.com", signing_key, (ca.subject, ca_key), valid_days=-1)
    sendgrid_key = ec.generate_private_key(ec.SECP256R1())
    public_der = sendgrid_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Pki(
        ca_pem=_pem(ca),
        server_cert_pem=_pem(server),
        server_key_pem=server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        signing_key=signing_key,
        signing_cert_pem=_pem(signing),
        other_key=other_key,
        expired_cert_pem=_pem(expired),
        sendgrid_key=sendgrid_key,
        sendgrid_public_b64=base64.b64encode(public_der).decode(),
    )


# -- "AWS" on loopback ------------------------------------------------------------------------


class LoopbackResolver(AbstractResolver):
    """Every host name is this machine, at the test server's port."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": self.port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        pass


@dataclass
class FakeAws:
    http: aiohttp.ClientSession
    requests: list[str] = field(default_factory=list)  # "host path?query", in order


@pytest.fixture
async def aws(pki: Pki, tmp_path: Any) -> AsyncIterator[FakeAws]:
    requests: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        requests.append(f"{request.host.split(':')[0]} {request.path_qs}")
        if request.path == CERT_PATH:
            return web.Response(body=pki.signing_cert_pem)
        if request.path == "/SimpleNotificationService-expired.pem":
            return web.Response(body=pki.expired_cert_pem)
        if request.path == "/SimpleNotificationService-huge.pem":
            return web.Response(body=b"-" * 200_000)
        if request.path == "/SimpleNotificationService-down.pem":
            return web.Response(status=500)
        if request.path == "/" and request.query.get("Action") == "ConfirmSubscription":
            return web.Response(body=b"<ConfirmSubscriptionResponse/>")
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", serve)
    (tmp_path / "cert.pem").write_bytes(pki.server_cert_pem)
    (tmp_path / "key.pem").write_bytes(pki.server_key_pem)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ssl)
    await site.start()
    port = runner.addresses[0][1]
    client_ssl = ssl.create_default_context(cadata=pki.ca_pem.decode())
    connector = aiohttp.TCPConnector(resolver=LoopbackResolver(port), ssl=client_ssl)
    async with aiohttp.ClientSession(connector=connector) as http:
        yield FakeAws(http, requests)
    await runner.cleanup()


# -- the web tier -----------------------------------------------------------------------------


@pytest.fixture
def hook_settings(database_url: str, pki: Pki) -> Settings:
    return make_settings(
        database_url,
        25,
        ses_topic_arns=(TOPIC,),
        postmark_webhook_credentials=POSTMARK_CREDENTIALS,
        sendgrid_webhook_public_key=pki.sendgrid_public_b64,
    )


@pytest.fixture
async def db(hook_settings: Settings) -> AsyncIterator[Database]:
    assert hook_settings.database_url is not None
    pool = make_pool(hook_settings.database_url, max_size=4, name="mailroom-test")
    await pool.open(wait=True)
    yield Database(pool)
    await pool.close()


@pytest.fixture
async def hooks(hook_settings: Settings, db: Database, aws: FakeAws) -> AsyncIterator[TestClient]:
    app = create_app(hook_settings, db=db, webhook_http=aws.http)
    async with TestClient(TestServer(app)) as client:
        yield client


async def _suppressed(database_url: str) -> dict[str, str]:
    rows = await query(database_url, "SELECT address, reason FROM suppressions")
    return {address: reason for address, reason in rows}


async def _recorded(database_url: str) -> list[tuple[str, str]]:
    rows = await query(database_url, "SELECT provider, event_id FROM webhook_events")
    return sorted((provider, event_id) for provider, event_id in rows)


def _requests_counted(provider: str, outcome: str) -> float:
    value = WEB_REGISTRY.get_sample_value(
        "mailroom_webhook_requests_total", {"provider": provider, "outcome": outcome}
    )
    return value or 0.0


# -- SNS messages, signed as SNS signs them ---------------------------------------------------

# AWS's documented order of the signed fields (Subject only when present).
_NOTIFICATION_ORDER = ["Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"]
_CONFIRMATION_ORDER = [
    "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type",
]  # fmt: skip


def _sns_time(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def sns(
    pki: Pki,
    message: str,
    *,
    kind: str = "Notification",
    version: str = "1",
    key: rsa.RSAPrivateKey | None = None,
    cert_url: str = CERT_URL,
    topic: str = TOPIC,
    when: datetime | None = None,
    subject: str | None = None,
    subscribe_url: str | None = None,
    message_id: str | None = None,
) -> dict[str, str]:
    body = {
        "Type": kind,
        "MessageId": message_id or str(uuid.uuid4()),
        "TopicArn": topic,
        "Message": message,
        "Timestamp": _sns_time(when or datetime.now(UTC)),
        "SignatureVersion": version,
        "SigningCertURL": cert_url,
    }
    if subject is not None:
        body["Subject"] = subject
    order = _NOTIFICATION_ORDER
    if kind != "Notification":
        token = "2336412f37fb687f5d51e6e2425f004aed8a2c2d7c1c"
        body["Token"] = token
        body["SubscribeURL"] = subscribe_url or (
            f"https://{SNS_HOST}/?Action=ConfirmSubscription&TopicArn={topic}&Token={token}"
        )
        order = _CONFIRMATION_ORDER
    canonical = "".join(f"{name}\n{body[name]}\n" for name in order if name in body)
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    signature = (key or pki.signing_key).sign(canonical.encode(), padding.PKCS1v15(), algorithm)
    body["Signature"] = base64.b64encode(signature).decode()
    body["UnsubscribeURL"] = f"https://{SNS_HOST}/?Action=Unsubscribe"
    return body


def ses_bounce(*addresses: str, bounce_type: str = "Permanent", event: bool = False) -> str:
    kind = {"eventType": "Bounce"} if event else {"notificationType": "Bounce"}
    return json.dumps(
        {
            **kind,
            "bounce": {
                "bounceType": bounce_type,
                "bounceSubType": "General",
                "bouncedRecipients": [
                    {"emailAddress": a, "action": "failed", "status": "5.1.1"} for a in addresses
                ],
                "timestamp": "2026-12-02T18:00:00.000Z",
                "feedbackId": "0100017-feedback",
            },
            "mail": {"source": "sender@example.com", "destination": list(addresses)},
        }
    )


def ses_complaint(*addresses: str, feedback: str | None = "abuse") -> str:
    complaint: dict[str, Any] = {
        "complainedRecipients": [{"emailAddress": a} for a in addresses],
        "timestamp": "2026-12-02T18:00:00.000Z",
    }
    if feedback is not None:
        complaint["complaintFeedbackType"] = feedback
    return json.dumps({"eventType": "Complaint", "complaint": complaint, "mail": {}})


async def post_sns(client: TestClient, body: Any) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    # SNS posts its JSON as text/plain.
    response = await client.post(
        "/webhooks/ses",
        data=data,
        headers={"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "x"},
    )
    return response.status, await response.json()


# -- SES --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1", "2"])
async def test_a_permanent_ses_bounce_suppresses_each_recipient_as_a_hard_bounce(
    hooks: TestClient, pki: Pki, aws: FakeAws, hook_settings: Settings, version: str
) -> None:
    accepted = _requests_counted("ses", "accepted")
    message = ses_bounce("ada@example.org", "Grace@Example.ORG", "not an address")
    status, body = await post_sns(hooks, sns(pki, message, version=version, subject="Bounce"))
    assert status == 200, body
    assert body["hard_bounces"] == 2 and body["suppressed"] == 2
    assert body["invalid_addresses"] == 1  # skipped and counted, not a 500
    assert await _suppressed(str(hook_settings.database_url)) == {
        "ada@example.org": "hard_bounce",
        "Grace@example.org": "hard_bounce",
    }
    assert aws.requests == [f"{SNS_HOST} {CERT_PATH}"]
    assert _requests_counted("ses", "accepted") == accepted + 1


async def test_ses_complaints_suppress_and_soft_feedback_does_not(
    hooks: TestClient, pki: Pki, hook_settings: Settings
) -> None:
    for message in [
        ses_complaint("ada@example.org"),
        ses_complaint("bob@example.org", feedback=None),  # on the account's suppression list
        ses_complaint("cy@example.org", feedback="not-spam"),
        ses_bounce("dee@example.org", bounce_type="Transient"),
        ses_bounce("eve@example.org", bounce_type="Undetermined", event=True),
        json.dumps({"notificationType": "Delivery", "delivery": {"recipients": ["f@x.org"]}}),
        json.dumps({"eventType": "DeliveryDelay"}),
        "this is not JSON",
    ]:
        status, body = await post_sns(hooks, sns(pki, message))
        assert status == 200, body
    assert await _suppressed(str(hook_settings.database_url)) == {
        "ada@example.org": "complaint",
        "bob@example.org": "complaint",
    }


async def test_a_permanent_bounce_in_a_configuration_set_event_suppresses_too(
    hooks: TestClient, pki: Pki, hook_settings: Settings
) -> None:
    status, body = await post_sns(hooks, sns(pki, ses_bounce("ada@example.org", event=True)))
    assert (status, body["hard_bounces"]) == (200, 1)
    assert await _suppressed(str(hook_settings.database_url)) == {"ada@example.org": "hard_bounce"}


async def test_a_bad_signature_is_refused_and_changes_nothing(
    hooks: TestClient, pki: Pki, hook_settings: Settings
) -> None:
    refused = _requests_counted("ses", "bad_signature")
    tampered = sns(pki, ses_bounce("ada@example.org"))
    tampered["Message"] = ses_bounce("victim@example.org")
    other_key = sns(pki, ses_bounce("victim@example.org"), key=pki.other_key)
    wrong_version = sns(pki, ses_bounce("victim@example.org"), version="2")
    wrong_version["SignatureVersion"] = "1"  # a SHA256 signature checked as SHA1
    for message in [tampered, other_key, wrong_version]:
        status, body = await post_sns(hooks, message)
        assert (status, body["error"]["code"]) == (403, "bad_signature")
    assert await _suppressed(str(hook_settings.database_url)) == {}
    assert await _recorded(str(hook_settings.database_url)) == []
    assert _requests_counted("ses", "bad_signature") == refused + 3


async def test_a_topic_that_is_not_listed_is_refused_before_anything_is_fetched(
    hooks: TestClient, pki: Pki, aws: FakeAws, hook_settings: Settings
) -> None:
    other = "arn:aws:sns:us-east-1:123456789012:someone-else"
    status, body = await post_sns(hooks, sns(pki, ses_bounce("ada@example.org"), topic=other))
    assert (status, body["error"]["code"]) == (403, "unknown_topic")
    assert aws.requests == []
    assert await _suppressed(str(hook_settings.database_url)) == {}


@pytest.mark.parametrize(
    "cert_url",
    [
        f"http://{SNS_HOST}{CERT_PATH}",
        f"https://evil.example{CERT_PATH}",
        f"https://{SNS_HOST}.evil.example{CERT_PATH}",
        f"https://{SNS_HOST}@evil.example{CERT_PATH}",
        f"https://evil.example\\@{SNS_HOST}{CERT_PATH}",
        f"https://evil.example#@{SNS_HOST}{CERT_PATH}",
        f"https://{SNS_HOST}:8443{CERT_PATH}",
        f"https://SNS.US-EAST-1.AMAZONAWS.COM{CERT_PATH}",
        f"https://{SNS_HOST}/cert.txt",
        f"https://{SNS_HOST}{CERT_PATH}?x=1",
        f" https://{SNS_HOST}{CERT_PATH}",
    ],
)
async def test_a_certificate_url_off_sns_is_refused_and_never_fetched(
    hooks: TestClient, pki: Pki, aws: FakeAws, hook_settings: Settings, cert_url: str
) -> None:
    # Signed with the real key and naming a certificate the server would serve.
    message = sns(pki, ses_bounce("ada@example.org"), cert_url=cert_url)
    status, body = await post_sns(hooks, message)
    assert (status, body["error"]["code"]) == (403, "bad_url")
    assert aws.requests == []
    assert await _suppressed(str(hook_settings.database_url)) == {}


async def test_a_certificate_that_is_missing_expired_or_huge_is_refused(
    hooks: TestClient, pki: Pki, aws: FakeAws, hook_settings: Settings
) -> None:
    for name, expected in [
        ("nothing-here", (403, "bad_certificate")),
        ("expired", (403, "bad_certificate")),
        ("huge", (403, "bad_certificate")),
        ("down", (503, "certificate_unavailable")),
    ]:
        url = f"https://{SNS_HOST}/SimpleNotificationService-{name}.pem"
        response = await hooks.post(
            "/webhooks/ses", data=json.dumps(sns(pki, ses_bounce("a@example.org"), cert_url=url))
        )
        body = await response.json()
        assert (response.status, body["error"]["code"]) == expected, name
        if response.status == 503:
            assert response.headers["Retry-After"] == "60"
    assert await _suppressed(str(hook_settings.database_url)) == {}
    assert await _recorded(str(hook_settings.database_url)) == []


async def test_the_signing_certificate_is_fetched_once_and_kept(
    hooks: TestClient, pki: Pki, aws: FakeAws
) -> None:
    for address in ["a@example.org", "b@example.org", "c@example.org"]:
        status, _ = await post_sns(hooks, sns(pki, ses_bounce(address)))
        assert status == 200
    assert aws.requests == [f"{SNS_HOST} {CERT_PATH}"]


@pytest.mark.parametrize("age", [timedelta(hours=2), timedelta(minutes=-30)])
async def test_a_message_signed_too_long_ago_or_in_the_future_is_refused(
    hooks: TestClient, pki: Pki, aws: FakeAws, hook_settings: Settings, age: timedelta
) -> None:
    message = sns(pki, ses_bounce("ada@example.org"), when=datetime.now(UTC) - age)
    status, body = await post_sns(hooks, message)
    assert (status, body["error"]["code"]) == (403, "stale_message")
    assert aws.requests == []
    assert await _suppressed(str(hook_settings.database_url)) == {}


async def test_a_replayed_message_id_is_refused_and_changes_nothing(
    hooks: TestClient, pki: Pki, db: Database, hook_settings: Settings
) -> None:
    message = sns(pki, ses_bounce("ada@example.org"))
    assert (await post_sns(hooks, message))[0] == 200
    # An operator lifts the suppression; the replay must not put it back.
    assert await db.unsuppress(["ada@example.org"]) == 1
    status, body = await post_sns(hooks, message)
    assert (status, body["error"]["code"]) == (409, "replayed")
    assert await _suppressed(str(hook_settings.database_url)) == {}
    assert [e["actor"] for e in await db.list_audit()] == ["webhook:ses"]
    # The same id with another (validly signed) message is the same delivery.
    again = sns(pki, ses_bounce("bob@example.org"), message_id=message["MessageId"])
    assert (await post_sns(hooks, again))[0] == 409
    assert await _suppressed(str(hook_settings.database_url)) == {}


def _without(body: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in body.items() if k != name}


async def test_malformed_sns_bodies_are_refused_before_anything_is_fetched(
    hooks: TestClient, pki: Pki, aws: FakeAws, hook_settings: Settings
) -> None:
    good = sns(pki, ses_bounce("ada@example.org"))
    naive = "2026-12-02T18:00:00"  # no time zone
    cases: list[tuple[bytes, int, str]] = [
        (b"not json", 400, "malformed_json"),
        (b"\xff\xfe{}", 400, "malformed_json"),
        (b"[" * 1000 + b"]" * 1000, 400, "json_too_deep"),
        (b"[]", 400, "malformed_message"),
        (json.dumps({**good, "Message": "\ud800"}).encode(), 400, "malformed_json"),
        (json.dumps({**good, "Type": "Surprise"}).encode(), 400, "malformed_message"),
        (json.dumps({**good, "Timestamp": "yesterday"}).encode(), 400, "malformed_message"),
        (json.dumps({**good, "Timestamp": naive}).encode(), 400, "malformed_message"),
        (json.dumps({**good, "MessageId": "a b"}).encode(), 400, "malformed_message"),
        (json.dumps({**good, "Message": 7}).encode(), 400, "malformed_message"),
        (json.dumps({**good, "Subject": ["x"]}).encode(), 400, "malformed_message"),
        (json.dumps({**good, "Signature": "***"}).encode(), 403, "bad_signature"),
        (json.dumps({**good, "SignatureVersion": "3"}).encode(), 403, "bad_signature"),
    ]
    for name in ["Type", "MessageId", "TopicArn", "Message", "Timestamp", "Signature",
                 "SignatureVersion", "SigningCertURL"]:  # fmt: skip
        cases.append((json.dumps(_without(good, name)).encode(), 400, "malformed_message"))
    confirmation = sns(pki, "confirm", kind="SubscriptionConfirmation")
    for name in ["SubscribeURL", "Token"]:
        cases.append((json.dumps(_without(confirmation, name)).encode(), 400, "malformed_message"))
    for data, status, code in cases:
        got, body = await post_sns(hooks, data)
        assert (got, body["error"]["code"]) == (status, code), data[:120]
    assert aws.requests == []
    assert await _suppressed(str(hook_settings.database_url)) == {}
    assert await _recorded(str(hook_settings.database_url)) == []


async def test_a_huge_body_is_refused_unread(hooks: TestClient, aws: FakeAws) -> None:
    huge = b'{"Type": "Notification", "Message": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    response = await hooks.post("/webhooks/ses", data=io.BytesIO(huge))
    assert response.status == 413
    assert (await response.json())["error"]["code"] == "payload_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length to go by
        for _ in range(40):
            yield b"x" * 64 * 1024

    response = await hooks.post("/webhooks/ses", data=chunks())
    assert response.status == 413
    assert aws.requests == []


async def test_a_subscription_confirmation_visits_the_subscribe_url_exactly_once(
    hooks: TestClient, pki: Pki, aws: FakeAws
) -> None:
    confirmation = sns(pki, "You have chosen to subscribe", kind="SubscriptionConfirmation")
    status, body = await post_sns(hooks, confirmation)
    assert status == 200 and body["subscription_confirmed"] is True
    status, body = await post_sns(hooks, confirmation)
    assert (status, body["error"]["code"]) == (409, "replayed")
    visits = [r for r in aws.requests if "Action=ConfirmSubscription" in r]
    assert len(visits) == 1 and visits[0].startswith(f"{SNS_HOST} /?")
    assert f"Token={confirmation['Token']}" in visits[0]


@pytest.mark.parametrize(
    "subscribe_url",
    [
        "https://evil.example/?Action=ConfirmSubscription",
        f"http://{SNS_HOST}/?Action=ConfirmSubscription",
        f"https://{SNS_HOST}.evil.example/?Action=ConfirmSubscription",
    ],
)
async def test_a_subscribe_url_off_sns_is_refused_and_never_visited(
    hooks: TestClient, pki: Pki, aws: FakeAws, subscribe_url: str
) -> None:
    confirmation = sns(
        pki, "subscribe", kind="SubscriptionConfirmation", subscribe_url=subscribe_url
    )
    status, body = await post_sns(hooks, confirmation)
    assert (status, body["error"]["code"]) == (403, "bad_url")
    assert aws.requests == []


async def test_an_unsigned_subscription_confirmation_is_never_visited(
    hooks: TestClient, pki: Pki, aws: FakeAws
) -> None:
    confirmation = sns(pki, "subscribe", kind="SubscriptionConfirmation", key=pki.other_key)
    status, body = await post_sns(hooks, confirmation)
    assert (status, body["error"]["code"]) == (403, "bad_signature")
    assert [r for r in aws.requests if "ConfirmSubscription" in r] == []


async def test_an_unsubscribe_confirmation_is_verified_recorded_and_ignored(
    hooks: TestClient, pki: Pki, aws: FakeAws, hook_settings: Settings
) -> None:
    confirmation = sns(pki, "You have unsubscribed", kind="UnsubscribeConfirmation")
    status, body = await post_sns(hooks, confirmation)
    assert (status, body["ignored"], body["subscription_confirmed"]) == (200, 1, False)
    assert [r for r in aws.requests if "Action=" in r] == []  # nothing is visited
    recorded = await _recorded(str(hook_settings.database_url))
    assert recorded == [("ses", confirmation["MessageId"])]


async def test_repeated_forgeries_lock_the_client_out_of_the_webhooks_only(
    pki: Pki, db: Database, aws: FakeAws, hook_settings: Settings
) -> None:
    strict = hook_settings.model_copy(update={"login_attempts_per_minute": 5})
    async with TestClient(TestServer(create_app(strict, db=db, webhook_http=aws.http))) as hooks:
        forged = sns(pki, ses_bounce("ada@example.org"), key=pki.other_key)
        statuses = [(await post_sns(hooks, forged))[0] for _ in range(6)]
        assert statuses == [403] * 5 + [429]
        # Now even a good request from this client waits out the minute...
        response = await hooks.post(
            "/webhooks/ses", data=json.dumps(sns(pki, ses_bounce("ada@example.org")))
        )
        assert response.status == 429 and response.headers["Retry-After"] == "60"
        assert await _suppressed(str(hook_settings.database_url)) == {}
        # ...but the operator's own API token still works from the same address.
        assert (await hooks.get("/api/suppressions", headers=AUTH)).status == 200


# -- Postmark ---------------------------------------------------------------------------------


def _basic(credentials: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credentials.encode()).decode()}


def postmark(record_type: str, bounce_type: str, email: str, record_id: Any) -> dict[str, Any]:
    return {
        "RecordType": record_type,
        "ID": record_id,
        "Type": bounce_type,
        "TypeCode": 1,
        "Email": email,
        "MessageStream": "outbound",
        "BouncedAt": "2026-12-02T18:00:00Z",
        "Inactive": True,
    }


async def post_postmark(
    client: TestClient, body: Any, credentials: str = POSTMARK_CREDENTIALS
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await client.post(
        "/webhooks/postmark",
        data=data,
        headers={"Content-Type": "application/json", **_basic(credentials)},
    )
    return response.status, await response.json()


async def test_postmark_hard_bounces_and_spam_complaints_suppress_and_the_rest_do_not(
    hooks: TestClient, hook_settings: Settings, db: Database
) -> None:
    records = [
        postmark("Bounce", "HardBounce", "ada@example.org", 4323372036854775807),
        postmark("Bounce", "BadEmailAddress", "bob@example.org", 2),
        postmark("SpamComplaint", "SpamComplaint", "cy@example.org", "3"),
        postmark("Bounce", "SoftBounce", "dee@example.org", 4),
        postmark("Bounce", "Transient", "eve@example.org", 5),
        postmark("Bounce", "DnsError", "fay@example.org", 6),
        postmark("Bounce", "ManuallyDeactivated", "gus@example.org", 7),
        postmark("Delivery", "", "hal@example.org", 8),
        postmark("Bounce", "HardBounce", "<not an address>", 9),
    ]
    for record in records:
        status, body = await post_postmark(hooks, record)
        assert status == 200, body
    assert body["invalid_addresses"] == 1
    assert await _suppressed(str(hook_settings.database_url)) == {
        "ada@example.org": "hard_bounce",
        "bob@example.org": "hard_bounce",
        "cy@example.org": "complaint",
    }
    # The audit log says who suppressed them: one entry per record that changed something.
    entries = [e for e in await db.list_audit() if e["action"] == "addresses_suppressed"]
    assert [(e["actor"], e["count"], e["detail"]["reason"]) for e in reversed(entries)] == [
        ("webhook:postmark", 1, "hard_bounce"),
        ("webhook:postmark", 1, "hard_bounce"),
        ("webhook:postmark", 1, "complaint"),
    ]


async def test_postmark_needs_its_credentials(
    hooks: TestClient, hook_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    record = json.dumps(postmark("Bounce", "HardBounce", "ada@example.org", 1))
    wrong = [
        {},
        _basic("postmark:wrong"),
        _basic(POSTMARK_CREDENTIALS + "x"),
        _basic("postmark"),
        {"Authorization": f"Bearer {POSTMARK_CREDENTIALS}"},
        {"Authorization": "Basic ***"},
        {"Authorization": "Basic " + "é" * 10},
    ]
    for headers in wrong:
        response = await hooks.post("/webhooks/postmark", data=record, headers=headers)
        assert response.status == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("Basic")
        assert (await response.json())["error"]["code"] == "unauthorized"
    assert await _suppressed(str(hook_settings.database_url)) == {}
    assert "s3cret" not in caplog.text and "ada@example.org" not in caplog.text
    assert "webhook_refused" in caplog.text


async def test_a_repeated_postmark_record_changes_nothing(
    hooks: TestClient, db: Database, hook_settings: Settings
) -> None:
    record = postmark("Bounce", "HardBounce", "ada@example.org", 77)
    assert (await post_postmark(hooks, record))[0] == 200
    await db.unsuppress(["ada@example.org"])
    status, body = await post_postmark(hooks, record)
    assert (status, body["error"]["code"]) == (409, "replayed")
    assert await _suppressed(str(hook_settings.database_url)) == {}
    assert [e["actor"] for e in await db.list_audit()] == ["webhook:postmark"]
    assert await _recorded(str(hook_settings.database_url)) == [("postmark", "77")]


async def test_malformed_postmark_bodies_are_refused(
    hooks: TestClient, hook_settings: Settings
) -> None:
    good = postmark("Bounce", "HardBounce", "ada@example.org", 1)
    for body, code in [
        (b"{", "malformed_json"),
        (b"[]", "malformed_message"),
        (json.dumps(_without(good, "ID")).encode(), "malformed_message"),
        (json.dumps({**good, "ID": True}).encode(), "malformed_message"),
        (json.dumps({**good, "ID": -1}).encode(), "malformed_message"),
        (json.dumps({**good, "ID": "x" * 300}).encode(), "malformed_message"),
        (json.dumps({**good, "Email": "a\ud800@example.org"}).encode(), "malformed_json"),
    ]:
        status, answer = await post_postmark(hooks, body)
        assert (status, answer["error"]["code"]) == (400, code), body[:80]
    assert await _suppressed(str(hook_settings.database_url)) == {}
    response = await hooks.post(
        "/webhooks/postmark",
        data=io.BytesIO(b"x" * (1024 * 1024 + 1)),
        headers=_basic(POSTMARK_CREDENTIALS),
    )
    assert response.status == 413


# -- SendGrid ---------------------------------------------------------------------------------


def sendgrid_headers(
    pki: Pki, body: bytes, *, when: datetime | None = None, key: Any = None
) -> dict[str, str]:
    timestamp = str(int((when or datetime.now(UTC)).timestamp()))
    signer = key or pki.sendgrid_key
    signature = signer.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def sg(event: str, email: str, event_id: str | None, **more: Any) -> dict[str, Any]:
    item = {"email": email, "event": event, "timestamp": 1764698400, **more}
    if event_id is not None:
        item["sg_event_id"] = event_id
    return item


async def post_sendgrid(
    client: TestClient, events: Any, pki: Pki, **signing: Any
) -> tuple[int, dict[str, Any]]:
    body = events if isinstance(events, bytes) else json.dumps(events).encode()
    headers = sendgrid_headers(pki, body, **signing)
    response = await client.post("/webhooks/sendgrid", data=body, headers=headers)
    return response.status, await response.json()


async def test_signed_sendgrid_events_suppress_bounces_and_spam_reports(
    hooks: TestClient, pki: Pki, hook_settings: Settings
) -> None:
    events = [
        sg("processed", "ada@example.org", "e1"),
        sg("bounce", "ada@example.org", "e2", type="bounce", status="5.1.1"),
        sg("bounce", "bob@example.org", "e3", type="blocked", status="5.7.1"),
        sg("spamreport", "cy@example.org", "e4"),
        sg("dropped", "dee@example.org", "e5", reason="Bounced Address"),
        sg("dropped", "eve@example.org", "e6", reason="Spam Reporting Address"),
        sg("dropped", "fay@example.org", "e7", reason="Unsubscribed Address"),
        sg("deferred", "gus@example.org", "e8", response="451 try later"),
        sg("bounce", "no address at all", "e9", type="bounce"),
        sg("bounce", "hal@example.org", None, type="bounce"),  # no id: cannot be deduplicated
        "not an event",
    ]
    status, body = await post_sendgrid(hooks, events, pki)
    assert status == 200, body
    assert (body["hard_bounces"], body["complaints"], body["suppressed"]) == (2, 2, 4)
    assert (body["ignored"], body["invalid_addresses"], body["malformed"]) == (4, 1, 2)
    assert await _suppressed(str(hook_settings.database_url)) == {
        "ada@example.org": "hard_bounce",
        "cy@example.org": "complaint",
        "dee@example.org": "hard_bounce",
        "eve@example.org": "complaint",
    }


async def test_a_bad_or_missing_sendgrid_signature_is_refused(
    hooks: TestClient, pki: Pki, hook_settings: Settings
) -> None:
    body = json.dumps([sg("bounce", "ada@example.org", "e1", type="bounce")]).encode()
    good = sendgrid_headers(pki, body)
    other_key = sendgrid_headers(pki, body, key=ec.generate_private_key(ec.SECP256R1()))
    other_time = sendgrid_headers(pki, body, when=datetime.now(UTC) - timedelta(seconds=5))
    other_time["X-Twilio-Email-Event-Webhook-Timestamp"] = good[
        "X-Twilio-Email-Event-Webhook-Timestamp"
    ]
    signature = "X-Twilio-Email-Event-Webhook-Signature"
    timestamp = "X-Twilio-Email-Event-Webhook-Timestamp"
    cases: list[tuple[dict[str, str], bytes]] = [
        (good, body.replace(b"ada@", b"bob@")),  # the body changed after signing
        (other_key, body),
        (other_time, body),
        (_without(good, signature), body),
        (_without(good, timestamp), body),
        ({**good, signature: "not base64!"}, body),
        ({**good, signature: base64.b64encode(b"\x30\x03junk").decode()}, body),
        ({**good, timestamp: "12 34"}, body),
        ({**good, timestamp: "9" * 40}, body),
        ({**good, timestamp: "9" * 12}, body),  # past the year 9999
    ]
    for headers, data in cases:
        response = await hooks.post("/webhooks/sendgrid", data=data, headers=headers)
        answer = await response.json()
        assert (response.status, answer["error"]["code"]) == (403, "bad_signature"), headers
    assert await _suppressed(str(hook_settings.database_url)) == {}
    assert await _recorded(str(hook_settings.database_url)) == []


@pytest.mark.parametrize("age", [timedelta(hours=2), timedelta(minutes=-30)])
async def test_a_sendgrid_request_signed_too_long_ago_is_refused(
    hooks: TestClient, pki: Pki, hook_settings: Settings, age: timedelta
) -> None:
    events = [sg("bounce", "ada@example.org", "e1", type="bounce")]
    status, body = await post_sendgrid(hooks, events, pki, when=datetime.now(UTC) - age)
    assert (status, body["error"]["code"]) == (403, "stale_message")
    assert await _suppressed(str(hook_settings.database_url)) == {}


async def test_replayed_sendgrid_events_are_refused_and_repeats_are_duplicates(
    hooks: TestClient, pki: Pki, db: Database, hook_settings: Settings
) -> None:
    first = [sg("bounce", "ada@example.org", "e1", type="bounce")]
    assert (await post_sendgrid(hooks, first, pki))[0] == 200
    await db.unsuppress(["ada@example.org"])
    status, body = await post_sendgrid(hooks, first, pki)  # freshly signed, same events
    assert (status, body["error"]["code"]) == (409, "replayed")
    assert await _suppressed(str(hook_settings.database_url)) == {}
    assert [e["actor"] for e in await db.list_audit()] == ["webhook:sendgrid"]
    second = [*first, sg("spamreport", "bob@example.org", "e2"), *first]
    status, body = await post_sendgrid(hooks, second, pki)
    assert (status, body["duplicates"], body["complaints"]) == (200, 2, 1)
    assert await _suppressed(str(hook_settings.database_url)) == {"bob@example.org": "complaint"}


async def test_a_sendgrid_body_that_is_not_a_list_of_events_is_refused(
    hooks: TestClient, pki: Pki
) -> None:
    for data, code in [
        (b'{"event": "bounce"}', "malformed_message"),
        (b"[1, 2", "malformed_json"),
        (b'[{"email": NaN}]', "malformed_json"),
    ]:
        status, body = await post_sendgrid(hooks, data, pki)
        assert (status, body["error"]["code"]) == (400, code)
    huge = b"[" + b" " * (1024 * 1024) + b"]"
    headers = sendgrid_headers(pki, huge)
    response = await hooks.post("/webhooks/sendgrid", data=io.BytesIO(huge), headers=headers)
    assert response.status == 413


# -- common -----------------------------------------------------------------------------------


async def test_each_webhook_is_off_until_configured(
    database_url: str, db: Database, aws: FakeAws
) -> None:
    app = create_app(make_settings(database_url, 25), db=db, webhook_http=aws.http)
    async with TestClient(TestServer(app)) as client:
        for path, variable in [
            ("/webhooks/ses", "MAILROOM_SES_TOPIC_ARNS"),
            ("/webhooks/postmark", "MAILROOM_POSTMARK_WEBHOOK_CREDENTIALS"),
            ("/webhooks/sendgrid", "MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY"),
        ]:
            response = await client.post(path, data=b"{}")
            body = await response.json()
            assert (response.status, body["error"]["code"]) == (404, "webhook_disabled")
            assert variable in body["error"]["message"]
    assert aws.requests == []


async def test_without_a_client_of_its_own_the_app_opens_and_closes_one(
    hook_settings: Settings, db: Database
) -> None:
    async with TestClient(TestServer(create_app(hook_settings, db=db))) as client:
        http = client.app[SNS].http
        assert not http.closed
    assert http.closed


async def test_a_delivery_that_fails_midway_leaves_nothing(db: Database, database_url: str) -> None:
    with pytest.raises(RuntimeError):
        async with db.webhook_events("sendgrid", ["e1"]) as delivery:
            assert delivery.new == {"e1"}
            assert await delivery.suppress(["ada@example.org"], reason="hard_bounce") == 1
            raise RuntimeError("the request failed after the suppression")
    assert await _suppressed(database_url) == {}
    assert await _recorded(database_url) == []
    async with db.webhook_events("sendgrid", ["e1", "e1"]) as delivery:
        assert delivery.new == {"e1"}
    async with db.webhook_events("sendgrid", ["e1"]) as delivery:
        assert delivery.new == frozenset()


async def test_old_webhook_event_ids_are_pruned(db: Database, database_url: str) -> None:
    async with db.webhook_events("postmark", ["old", "new"]):
        pass
    await query(
        database_url,
        "UPDATE webhook_events SET received_at = now() - interval '31 days' WHERE event_id = 'old'",
    )
    assert await db.prune_webhook_events(retention_days=30) == 1
    assert await _recorded(database_url) == [("postmark", "new")]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    for name in ["SES_TOPIC_ARNS", "POSTMARK_WEBHOOK_CREDENTIALS", "SENDGRID_WEBHOOK_PUBLIC_KEY"]:
        monkeypatch.delenv(f"MAILROOM_{name}", raising=False)
    yield monkeypatch


def test_webhook_settings_are_read_from_the_environment(
    clean_env: pytest.MonkeyPatch, pki: Pki
) -> None:
    other = "arn:aws-cn:sns:cn-north-1:123456789012:bounces.fifo"
    clean_env.setenv("MAILROOM_SES_TOPIC_ARNS", f" {TOPIC} ,{other},")
    clean_env.setenv("MAILROOM_SENDGRID_WEBHOOK_PUBLIC_KEY", pki.sendgrid_public_b64)
    pem = (
        pki.sendgrid_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    settings = load_settings(_env_file=None)
    assert settings.ses_topic_arns == (TOPIC, other)
    assert settings.sendgrid_webhook_public_key == pki.sendgrid_public_b64
    from_pem = load_settings(_env_file=None, sendgrid_webhook_public_key=pem)
    assert from_pem.sendgrid_webhook_public_key == pem.strip()


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("SES_TOPIC_ARNS", "arn:aws:sqs:us-east-1:123456789012:q", "SNS topic ARNs"),
        ("SES_TOPIC_ARNS", "https://sns.us-east-1.amazonaws.com", "SNS topic ARNs"),
        ("SES_TOPIC_ARNS", f"{TOPIC};{TOPIC}", "SNS topic ARNs"),
        ("POSTMARK_WEBHOOK_CREDENTIALS", "no-colon-s3cret", "user:password"),
        ("POSTMARK_WEBHOOK_CREDENTIALS", ":s3cret", "user:password"),
        ("POSTMARK_WEBHOOK_CREDENTIALS", "user:s3cret with space", "user:password"),
        ("SENDGRID_WEBHOOK_PUBLIC_KEY", "not a key", "public key"),
        ("SENDGRID_WEBHOOK_PUBLIC_KEY", "RSA", "P-256"),
        ("WEBHOOK_MAX_AGE_SECONDS", "5", "greater than or equal"),
    ],
)
def test_a_bad_webhook_setting_is_a_config_error_naming_it(
    clean_env: pytest.MonkeyPatch, variable: str, value: str, says: str
) -> None:
    if value == "RSA":  # a real public key, of the wrong kind
        rsa_public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
        value = base64.b64encode(
            rsa_public.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).decode()
    clean_env.setenv(f"MAILROOM_{variable}", value)
    with pytest.raises(ConfigError) as raised:
        load_settings(_env_file=None)
    assert f"MAILROOM_{variable}" in str(raised.value) and says in str(raised.value)
    assert "s3cret" not in str(raised.value)  # the Postmark credentials are a secret
