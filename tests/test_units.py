"""Specifications of the pure pieces: sandbox, backoff, failure classification, MIME."""

from __future__ import annotations

import asyncio
import random
import sys
from email.parser import BytesParser
from email.policy import default
from types import SimpleNamespace
from typing import Any

import aiosmtplib
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import stopping
from shared.addresses import InvalidAddress, normalize_address
from shared.settings import Settings, SmtpSecurity
from shared.signing import Purpose, SignedValues
from shared.templating import TemplateProblem, fields_used, render
from shared.unsubscribe import make_token, read_token
from worker.failures import PermanentFailure, TransientFailure, asks_to_slow_down, classify_smtp
from worker.llm import LlmOptions
from worker.retry import BackoffRetry
from worker.smtp import AdaptiveLimiter, SmtpServer, build_message, text_to_html

# -- templates ------------------------------------------------------------------------------


def test_templates_report_the_fields_they_read() -> None:
    assert fields_used("Hi {{ name }} from {{ company|upper }} {% if vip %}!{% endif %}") == {
        "name",
        "company",
        "vip",
    }


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ("{{ missing }}", "undefined: 'missing'"),
        ("{{ ''.__class__.__mro__ }}", "not allowed"),
        ("{{ 'x' * 100000000 }}", "not allowed"),
        ("{{ 10 ** 100000 }}", "not allowed"),
        ("{% for i in range(10**9) %}{% endfor %}", "Range too big"),
        ("{{ name.upper.__globals__ }}", "undefined|not allowed"),
        ("{{ 1 / 0 }}", "template failed"),
    ],
)
def test_the_sandbox_refuses_what_a_hostile_template_tries(source: str, fragment: str) -> None:
    with pytest.raises(TemplateProblem, match=fragment):
        render(source, {"name": "Ada"})


def test_rendered_text_has_a_size_limit() -> None:
    with pytest.raises(TemplateProblem, match="longer than"):
        render("{% for i in range(20) %}{{ big }}{% endfor %}", {"big": "x" * 9000})


def test_templates_render_fields_without_escaping_text() -> None:
    assert render("Hi {{ name }} <3", {"name": "O'Brien & Co"}) == "Hi O'Brien & Co <3"


# -- retries --------------------------------------------------------------------------------


def test_backoff_ceiling_doubles_from_the_base_up_to_the_cap() -> None:
    policy = BackoffRetry(max_attempts=8, base_seconds=5, cap_seconds=3600)
    assert [policy.ceiling_seconds(n) for n in range(1, 11)] == [
        5,
        10,
        20,
        40,
        80,
        160,
        320,
        640,
        1280,
        2560,
    ]
    assert policy.ceiling_seconds(11) == 3600
    assert policy.ceiling_seconds(10_000) == 3600  # no overflow on absurd attempt counts


def test_full_jitter_spreads_delays_across_the_whole_window() -> None:
    policy = BackoffRetry(base_seconds=5, cap_seconds=3600, rng=random.Random(7))
    delays = [policy.delay_seconds(3) for _ in range(2000)]
    assert all(0 <= d <= 20 for d in delays)
    assert min(delays) < 2 and max(delays) > 18  # full jitter, not "base ± a little"


def test_a_longer_retry_after_wins_but_never_beyond_the_cap() -> None:
    policy = BackoffRetry(base_seconds=1, cap_seconds=60, rng=random.Random(1))
    assert policy.delay_seconds(1, retry_after_seconds=30) >= 30
    assert policy.delay_seconds(1, retry_after_seconds=10_000) == 60


def _job(attempts: int) -> SimpleNamespace:
    return SimpleNamespace(attempts=attempts)


def test_retries_wait_behind_fresh_jobs_and_shutdown_requeues_at_once() -> None:
    import asyncio
    import datetime

    policy = BackoffRetry(max_attempts=3, base_seconds=10, cap_seconds=10)
    decision = policy.get_retry_decision(exception=TransientFailure("451"), job=_job(0))  # type: ignore[arg-type]
    assert decision is not None and decision.priority == -1
    requeue = policy.get_retry_decision(exception=asyncio.CancelledError(), job=_job(5))  # type: ignore[arg-type]
    assert requeue is not None and requeue.priority is None
    assert requeue.retry_at is not None
    assert requeue.retry_at <= datetime.datetime.now(datetime.UTC)


def test_infrastructure_failures_never_use_up_the_budget() -> None:
    from worker.failures import InfrastructureFailure

    policy = BackoffRetry(max_attempts=3, base_seconds=1, cap_seconds=10)
    decision = policy.get_retry_decision(exception=InfrastructureFailure("db"), job=_job(50))  # type: ignore[arg-type]
    assert decision is not None
    assert not policy.gives_up(InfrastructureFailure("db"), attempt=99)
    assert policy.gives_up(PermanentFailure("550"), attempt=1)


def test_the_recipients_attempt_count_decides_when_to_stop() -> None:
    policy = BackoffRetry(max_attempts=3, base_seconds=1, cap_seconds=10)
    failure = TransientFailure("451")
    assert policy.get_retry_decision(exception=failure.at_attempt(3), job=_job(0)) is None  # type: ignore[arg-type]
    assert policy.get_retry_decision(exception=failure.at_attempt(2), job=_job(7)) is not None  # type: ignore[arg-type]


def test_only_transient_failures_are_retried_and_only_up_to_max_attempts() -> None:
    policy = BackoffRetry(max_attempts=3, base_seconds=1, cap_seconds=10)
    transient = TransientFailure("451")
    assert policy.get_retry_decision(exception=transient, job=_job(0)) is not None  # type: ignore[arg-type]
    assert policy.get_retry_decision(exception=transient, job=_job(1)) is not None  # type: ignore[arg-type]
    assert policy.get_retry_decision(exception=transient, job=_job(2)) is None  # type: ignore[arg-type]
    assert policy.get_retry_decision(exception=PermanentFailure("550"), job=_job(0)) is None  # type: ignore[arg-type]
    assert policy.get_retry_decision(exception=RuntimeError("bug"), job=_job(0)) is None  # type: ignore[arg-type]


# -- SMTP failure classification ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "stage", "kind", "code"),
    [
        (
            aiosmtplib.SMTPResponseException(550, "5.1.1 user unknown"),
            "rcpt",
            PermanentFailure,
            550,
        ),
        (
            aiosmtplib.SMTPResponseException(553, "mailbox name not allowed"),
            "rcpt",
            PermanentFailure,
            553,
        ),
        (
            aiosmtplib.SMTPResponseException(554, "transaction failed"),
            "data",
            PermanentFailure,
            554,
        ),
        (aiosmtplib.SMTPResponseException(552, "too big"), "data", PermanentFailure, 552),
        (aiosmtplib.SMTPResponseException(550, "sender rejected"), "mail", PermanentFailure, 550),
        (aiosmtplib.SMTPResponseException(421, "closing"), "rcpt", TransientFailure, 421),
        (aiosmtplib.SMTPResponseException(450, "mailbox busy"), "rcpt", TransientFailure, 450),
        (aiosmtplib.SMTPResponseException(451, "local error"), "data", TransientFailure, 451),
        (aiosmtplib.SMTPResponseException(452, "storage"), "rcpt", TransientFailure, 452),
        (aiosmtplib.SMTPResponseException(535, "auth failed"), "connect", TransientFailure, 535),
        (
            aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(550, "no", "a@b.c")]),
            "rcpt",
            PermanentFailure,
            550,
        ),
        (aiosmtplib.SMTPConnectError("refused"), "connect", TransientFailure, None),
        (aiosmtplib.SMTPServerDisconnected("gone"), "data", TransientFailure, None),
        (aiosmtplib.SMTPTimeoutError("slow"), "data", TransientFailure, None),
        (ConnectionResetError("reset"), "data", TransientFailure, None),
        (ConnectionRefusedError("refused"), "connect", TransientFailure, None),
        (TimeoutError(), "connect", TransientFailure, None),
    ],
)
def test_smtp_errors_are_classified_in_one_table(
    error: BaseException, stage: str, kind: type, code: int | None
) -> None:
    failure = classify_smtp(error, stage=stage)
    assert type(failure) is kind
    assert failure.smtp_code == code
    if code is not None:
        assert str(code) in failure.message


def test_something_that_is_not_an_smtp_error_is_not_silently_classified() -> None:
    with pytest.raises(TypeError):
        classify_smtp(KeyError("x"), stage="data")


@pytest.mark.parametrize(
    ("code", "stage", "slows_down"),
    [
        (421, "connect", True),  # "too many connections" in the greeting
        (421, "mail", True),
        (421, "rcpt", True),  # the server closes the connection: not about the recipient
        (421, "data", True),
        (450, "connect", True),
        (451, "mail", True),  # "rate limited"
        (452, "mail", True),  # "too many messages"
        (451, "data", True),
        (452, "data", True),
        (450, "rcpt", False),  # mailbox busy
        (451, "rcpt", False),  # greylisting
        (452, "rcpt", False),  # mailbox full
        (550, "mail", False),  # permanent: never retried, nothing to pace
        (554, "data", False),
        (535, "connect", False),
    ],
)
def test_only_a_reply_about_the_connection_or_the_sender_asks_to_slow_down(
    code: int, stage: str, slows_down: bool
) -> None:
    failure = classify_smtp(aiosmtplib.SMTPResponseException(code, "x"), stage=stage)
    assert failure.stage == stage
    assert asks_to_slow_down(failure) is slows_down
    refused = aiosmtplib.SMTPRecipientsRefused([aiosmtplib.SMTPRecipientRefused(code, "x", "a@b")])
    assert classify_smtp(refused, stage="data").stage == "rcpt"


def test_network_failures_do_not_ask_to_slow_down() -> None:
    for error, stage in [
        (ConnectionRefusedError("refused"), "connect"),
        (aiosmtplib.SMTPTimeoutError("slow"), "data"),
        (aiosmtplib.SMTPServerDisconnected("gone"), "rcpt"),
    ]:
        failure = classify_smtp(error, stage=stage)
        assert failure.stage == stage and not asks_to_slow_down(failure)
    assert not asks_to_slow_down(TransientFailure("no code, no stage"))


# -- the adjustable sending limit -----------------------------------------------------------------


async def test_the_limiter_admits_up_to_its_limit_and_follows_it_down_and_up() -> None:
    limiter = AdaptiveLimiter(4)
    entered: list[int] = []
    release = asyncio.Event()

    async def hold(i: int) -> None:
        async with limiter:
            entered.append(i)
            await release.wait()

    tasks = [asyncio.create_task(hold(i)) for i in range(6)]
    await asyncio.sleep(0)
    assert entered == [0, 1, 2, 3] and limiter.active == 4
    limiter.set_limit(0)
    assert limiter.limit == 1, "never below one"
    limiter.set_limit(9)
    assert limiter.limit == 4, "never above the size"
    limiter.set_limit(2)
    await asyncio.sleep(0)
    assert entered == [0, 1, 2, 3], "the holders above the limit finish; no one new yet"
    limiter.set_limit(4)
    await asyncio.sleep(0)
    assert entered == [0, 1, 2, 3], "still full at four"
    release.set()
    await asyncio.gather(*tasks)
    assert sorted(entered) == list(range(6)) and limiter.active == 0


async def test_a_lowered_limit_admits_one_at_a_time_in_order() -> None:
    limiter = AdaptiveLimiter(3)
    order: list[str] = []
    gate = asyncio.Event()

    async def job(name: str) -> None:
        async with limiter:
            order.append(f"+{name}")
            await gate.wait()
            order.append(f"-{name}")

    first = [asyncio.create_task(job(n)) for n in "abc"]
    await asyncio.sleep(0)
    limiter.set_limit(1)
    later = [asyncio.create_task(job(n)) for n in "de"]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*first, *later)
    # d waits for all three holders to leave (a limit of one), e for d.
    assert order[:3] == ["+a", "+b", "+c"]
    assert order[3:] == ["-a", "-b", "-c", "+d", "-d", "+e", "-e"]


async def test_a_raised_limit_admits_waiters_at_once() -> None:
    limiter = AdaptiveLimiter(3)
    limiter.set_limit(1)
    await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert limiter.active == 1 and not any(w.done() for w in waiters)
    limiter.set_limit(3)
    await asyncio.sleep(0)
    assert limiter.active == 3 and [w.done() for w in waiters] == [True, True, False]
    limiter.release()
    await asyncio.wait_for(waiters[2], 1)
    assert limiter.active == 3


async def test_a_cancelled_waiter_never_loses_a_slot() -> None:
    limiter = AdaptiveLimiter(1)
    await limiter.acquire()
    waiting = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    waiting.cancel()  # cancelled while it waits
    with pytest.raises(asyncio.CancelledError):
        await waiting
    granted = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0)
    limiter.release()  # hands the slot to `granted` ...
    granted.cancel()  # ... which is cancelled before it runs: the slot must come back
    with pytest.raises(asyncio.CancelledError):
        await granted
    assert limiter.active == 0
    await asyncio.wait_for(limiter.acquire(), 1)
    assert limiter.active == 1


# -- messages -------------------------------------------------------------------------------


def test_the_html_part_escapes_everything_and_keeps_paragraphs() -> None:
    markup = text_to_html('Hi <b>"you"</b> & co\nline two\n\nnext <script>')
    assert "<p>Hi &lt;b&gt;&quot;you&quot;&lt;/b&gt; &amp; co<br>\nline two</p>" in markup
    assert "<p>next &lt;script&gt;</p>" in markup


_HEADER_FIELDS = {
    "sender": "From",
    "to": "To",
    "subject": "Subject",
    "message_id": "Message-ID",
    "unsubscribe_url": "List-Unsubscribe",
    "unsubscribe_mailto": "List-Unsubscribe",
}


@pytest.mark.parametrize("field", list(_HEADER_FIELDS))
@pytest.mark.parametrize(
    "injection",
    [
        "\r\nBcc: evil@example.org",
        "\nBcc: evil@example.org",
        "\rBcc: evil@example.org",
        "\x0bBcc: evil@example.org",  # what str.splitlines() also breaks at
        "\x0c",
        "\x1c",
        "\x1e",
        "\x85",
        "\u2028",
        "\u2029",
        "\x00",
        "\x08",
        "\x1b[31m",
        "\x7f",
        "\x9f",
        "\ud800",  # half a surrogate pair: not encodable
    ],
)
def test_a_header_value_with_a_control_character_is_refused(field: str, injection: str) -> None:
    values = {
        "sender": "a@example.org",
        "to": "b@example.org",
        "subject": "Hi",
        "message_id": "<1@example.org>",
        "unsubscribe_url": "https://example.org/u/t",
        "unsubscribe_mailto": "u@example.org",
    }
    values[field] += injection
    with pytest.raises(PermanentFailure, match=f"^unsafe header: {_HEADER_FIELDS[field]}$"):
        build_message(body="x", **values)


@pytest.mark.parametrize("field", [f for f in _HEADER_FIELDS if f != "subject"])
def test_a_tab_is_refused_everywhere_but_in_the_subject(field: str) -> None:
    values = {
        "sender": "a@example.org",
        "to": "b@example.org",
        "subject": "Hi\tthere",
        "message_id": "<1@example.org>",
    }
    message = build_message(body="x", **values)
    assert BytesParser(policy=default).parsebytes(message.data)["Subject"] == "Hi\tthere"
    values[field] = values.get(field, "x@example.org") + "\t"
    with pytest.raises(PermanentFailure, match="unsafe header"):
        build_message(body="x", **values)


def test_a_message_reads_back_as_written_in_both_parts() -> None:
    body = "Grüße, Ada <3\n\n" + "a long line " * 200 + "\n.\nend = fin"
    subject = "Héllo wörld, " + "x" * 150
    wire = build_message(
        sender="a@example.org",
        to="b@example.org",
        subject=subject,
        body=body,
        message_id="<1@example.org>",
    ).data
    assert b"\r\n" in wire and b"\n" not in wire.replace(b"\r\n", b"")
    assert max(len(line) for line in wire.split(b"\r\n")) <= 998
    parsed = BytesParser(policy=default).parsebytes(wire)
    assert parsed["Subject"] == subject
    assert parsed["To"] == "b@example.org" and parsed["Message-ID"] == "<1@example.org>"
    assert parsed.get_content_type() == "multipart/alternative"
    # MIME text travels with CRLF line breaks; the words and the breaks are the same.
    plain, markup = (part.get_content().replace("\r\n", "\n") for part in parsed.iter_parts())
    assert plain == body
    assert markup == text_to_html(body)


# -- addresses ------------------------------------------------------------------------------

_ADDRESS_PIECES = st.text(alphabet="aZ09.+_-!#'\"@[] (),:;\\ÿé€xn-", max_size=12)
_DOMAINS = st.sampled_from(
    [
        "example.org",
        "EXAMPLE.org",
        "ex--ample.org",
        "xn--bcher-kva.example",
        "bücher.de",
        "localhost",
        "test",
        "a..b",
        "-a.org",
        "a-.org",
        "org",
        "1.2.3.4",
        "[1.2.3.4]",
        "x" * 64 + ".org",
        "münchen.DE",
        "a_b.org",
        "",
    ]
)


def _reference(text: str) -> str | None:
    try:
        return validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError:
        return None


@settings(max_examples=400, deadline=None)
@given(
    local=st.one_of(_ADDRESS_PIECES, st.emails().map(lambda a: a.rsplit("@", 1)[0])),
    domain=st.one_of(_DOMAINS, st.emails().map(lambda a: a.rsplit("@", 1)[1])),
)
def test_address_normalization_agrees_with_email_validator(local: str, domain: str) -> None:
    # The fast path for plain local parts must accept, refuse and normalize exactly as the
    # library does on its own.
    text = f"{local}@{domain}"
    expected = _reference(text.strip()) if text.strip() and len(text.strip()) <= 254 else None
    try:
        got: str | None = normalize_address(text)
    except InvalidAddress:
        got = None
    if not any(ch in text for ch in "\r\n\0"):
        assert got == expected


def test_an_address_keeps_its_local_part_and_lowers_its_domain() -> None:
    assert normalize_address("  Ada.Lovelace+x@Example.ORG ") == "Ada.Lovelace+x@example.org"
    with pytest.raises(InvalidAddress, match="special-use or reserved"):
        normalize_address("ada@printer.local")
    with pytest.raises(InvalidAddress):
        normalize_address("ada..lovelace@example.org")


# -- unsubscribe tokens -----------------------------------------------------------------------


def test_an_unsubscribe_token_names_its_address_and_sender_and_nothing_else_reads_it() -> None:
    token = make_token("Zoë@bücher.de", sender="news@example.org", secret="k1")
    assert token.isascii() and "/" not in token and "+" not in token
    found = read_token(token, secret="k1")
    assert found is not None
    assert (found.address, found.sender) == ("Zoë@bücher.de", "news@example.org")
    assert read_token(token, secret="k2") is None
    _, mac = token.rsplit(".", 1)
    other = make_token("eve@example.org", sender="news@example.org", secret="k1")
    assert read_token(f"{other.rsplit('.', 1)[0]}.{mac}", secret="k1") is None


def test_a_token_of_the_earlier_format_still_names_its_address_and_sender() -> None:
    # As links were made before tokens moved to shared.signing (Zoë@bücher.de, key "k1").
    earlier = (
        "Wm_Dq0Biw7xjaGVyLmRlCm5ld3NAZXhhbXBsZS5vcmc.fL2XMP75xhPDxJk35a3DGFscNReJUKnUb7Z0rRcPORY"
    )
    found = read_token(earlier, secret="k1")
    assert found is not None
    assert (found.address, found.sender) == ("Zoë@bücher.de", "news@example.org")
    assert read_token(earlier, secret="k2") is None
    assert make_token("Zoë@bücher.de", sender="news@example.org", secret="k1") != earlier


def test_a_value_signed_for_one_use_is_never_read_as_another() -> None:
    unsubscription = {"a": "ada@example.org", "s": "news@example.org"}
    for purpose in Purpose:
        signed = SignedValues("k1", purpose).sign(unsubscription)
        assert (read_token(signed, secret="k1") is not None) is (purpose is Purpose.UNSUBSCRIBE)
        readers = {other: SignedValues("k1", other).read(signed) for other in Purpose}
        assert readers == {other: unsubscription if other is purpose else None for other in Purpose}
    fingerprints = {SignedValues("k1", purpose).fingerprint("token") for purpose in Purpose}
    assert len(fingerprints) == len(Purpose)


@given(st.text(max_size=300))
def test_any_text_as_a_token_is_refused_not_crashed_on(text: str) -> None:
    assert read_token(text, secret="k1") is None


# -- what the worker's SMTP and LLM clients are given -----------------------------------------


def test_the_smtp_server_and_llm_options_come_from_the_settings_and_hide_their_secrets() -> None:
    values: dict[str, Any] = {
        "smtp_host": "mx.example.org",
        "smtp_port": 587,
        "smtp_security": "starttls",
        "smtp_username": "ada",
        "smtp_password": "pw-1234",
        "smtp_timeout_seconds": 7,
        "groq_api_key": "gsk-5678",
        "groq_model": "some-model",
        "llm_concurrency": 2,
    }
    read = Settings(_env_file=None, **values)  # type: ignore[call-arg]
    server = SmtpServer.from_settings(read)
    assert server == SmtpServer(
        host="mx.example.org",
        port=587,
        timeout_seconds=7.0,
        security=SmtpSecurity.STARTTLS,
        username="ada",
        password="pw-1234",
    )
    options = LlmOptions.from_settings(read)
    assert options is not None
    assert (options.api_key, options.model, options.concurrency) == ("gsk-5678", "some-model", 2)
    assert "pw-1234" not in repr(server) and "gsk-5678" not in repr(options)


def test_a_worker_without_an_api_key_has_no_llm_options() -> None:
    no_key: dict[str, Any] = {"groq_api_key": ""}
    assert LlmOptions.from_settings(Settings(_env_file=None, **no_key)) is None  # type: ignore[call-arg]


# -- stop requests ----------------------------------------------------------------------------


def test_a_signal_delivered_twice_at_once_is_one_stop_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = iter([100.0, 100.02, 100.5, 101.0])
    monkeypatch.setattr(stopping.time, "monotonic", lambda: next(clock))
    requests = stopping.StopRequests()
    assert [requests.received() for _ in range(4)] == ["first", "duplicate", "again", "again"]


# -- the test suite's own rule: a test that starts a process is marked slow ------------------------


def test_the_suite_sees_a_process_start_through_the_audit_hook() -> None:
    from tests import conftest

    assert conftest.process_starts == [], "recording for this test, and nothing started yet"
    sys.audit("subprocess.Popen", "/bin/true", ["true"], None, None)
    assert conftest.process_starts == ["subprocess.Popen: /bin/true"]
    conftest.process_starts.clear()  # it was only the event: this test started nothing


@pytest.mark.slow
async def test_an_asyncio_subprocess_is_recorded_as_a_process_start() -> None:
    from tests import conftest

    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    assert await proc.wait() == 0
    assert conftest.process_starts == [f"subprocess.Popen: {sys.executable}"]
