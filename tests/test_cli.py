"""The command line: --help everywhere, configuration errors exit 2 naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.settings import ConfigError, load_settings


def mailroom(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILROOM_")}
    return subprocess.run(
        [sys.executable, "-m", "mailroom", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "command", [[], ["dev"], ["web"], ["worker"], ["migrate"], ["bounces", "poll"]]
)
def test_every_command_has_help(command: list[str]) -> None:
    result = mailroom(*command, "--help")
    assert result.returncode == 0
    assert "usage: mailroom" in result.stdout
    assert len(result.stdout.splitlines()) > 4


@pytest.mark.slow
def test_no_command_is_a_usage_error() -> None:
    result = mailroom()
    assert result.returncode == 2
    assert (
        "required: COMMAND" in result.stderr
        or "the following arguments are required" in result.stderr
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "command", "variable", "fragment"),
    [
        ({"MAILROOM_SMTP_PORT": "abc"}, "worker", "MAILROOM_SMTP_PORT", "valid integer"),
        ({"MAILROOM_SMTP_PORT": "70000"}, "worker", "MAILROOM_SMTP_PORT", "less than or equal"),
        (
            {"MAILROOM_SMTP_SECURITY": "ssl3"},
            "worker",
            "MAILROOM_SMTP_SECURITY",
            "'none', 'starttls' or 'tls'",
        ),
        (
            {"MAILROOM_SMTP_RELAYS": '[{"name": "a", "host": "h", "weight": 0}]'},
            "worker",
            "MAILROOM_SMTP_RELAYS[0].weight",
            "greater than or equal",
        ),
        (
            {"MAILROOM_WORKER_CONCURRENCY": "0"},
            "worker",
            "MAILROOM_WORKER_CONCURRENCY",
            "greater than or equal",
        ),
        ({"MAILROOM_FROM_ADDRESS": "not an address"}, "worker", "MAILROOM_FROM_ADDRESS", "@-sign"),
        (
            {"MAILROOM_FROM_ADDRESS": "a@example.org\nBcc: x@y.org"},
            "worker",
            "MAILROOM_FROM_ADDRESS",
            "line breaks",
        ),
        (
            {"MAILROOM_FROM_NAME": "News\nBcc: x@y.org"},
            "worker",
            "MAILROOM_FROM_NAME",
            "U+000A (line feed)",
        ),
        (
            {"MAILROOM_FROM_NAME": "gro.elpmaxe\u202e"},
            "worker",
            "MAILROOM_FROM_NAME",
            "U+202E (right-to-left override)",
        ),
        ({"MAILROOM_FROM_NAME": "n" * 101}, "worker", "MAILROOM_FROM_NAME", "at most 100"),
        (
            {"MAILROOM_REPLY_TO": "a@example.org, b@example.org"},
            "worker",
            "MAILROOM_REPLY_TO",
            "@-sign",
        ),
        (
            {"MAILROOM_REPLY_TO": "a@example.org\r\nBcc: x@y.org"},
            "worker",
            "MAILROOM_REPLY_TO",
            "U+000D (carriage return)",
        ),
        (
            {"MAILROOM_DATABASE_URL": "mysql://x"},
            "migrate",
            "MAILROOM_DATABASE_URL",
            "postgresql://",
        ),
        ({"MAILROOM_LOG_LEVEL": "LOUD"}, "migrate", "MAILROOM_LOG_LEVEL", "one of DEBUG"),
        ({"MAILROOM_PUBLIC_URL": "mail.example.org"}, "worker", "MAILROOM_PUBLIC_URL", "http"),
        ({"MAILROOM_RATE_PER_DAY": "0"}, "worker", "MAILROOM_RATE_PER_DAY", "greater than"),
        ({"MAILROOM_RATE_PER_SECOND": "lots"}, "worker", "MAILROOM_RATE_PER_SECOND", "integer"),
        (
            {
                "MAILROOM_DATABASE_URL": "postgresql://localhost/x",
                "MAILROOM_FROM_ADDRESS": "a@example.org",
                "MAILROOM_DKIM_PRIVATE_KEY_PATH": "/nonexistent/dkim.pem",
                "MAILROOM_DKIM_SELECTOR": "mr",
            },
            "worker",
            "MAILROOM_DKIM_PRIVATE_KEY_PATH",
            "cannot read",
        ),
        (
            {
                "MAILROOM_DATABASE_URL": "postgresql://localhost/x",
                "MAILROOM_FROM_ADDRESS": "a@example.org",
                "MAILROOM_DKIM_PRIVATE_KEY_PATH": "/etc/hostname",
                "MAILROOM_DKIM_SELECTOR": "mr",
            },
            "worker",
            "MAILROOM_DKIM_PRIVATE_KEY_PATH",
            "not a PEM RSA private key",
        ),
        (
            {"MAILROOM_DKIM_SELECTOR": "bad selector;"},
            "worker",
            "MAILROOM_DKIM_SELECTOR",
            "pattern",
        ),
        (
            {"MAILROOM_UNSUBSCRIBE_MAILTO": "unsubscribe at example"},
            "worker",
            "MAILROOM_UNSUBSCRIBE_MAILTO",
            "@-sign",
        ),
        (
            {
                "MAILROOM_DATABASE_URL": "postgresql://localhost/x",
                "MAILROOM_FROM_ADDRESS": "a@example.org",
                "MAILROOM_PUBLIC_URL": "https://mail.example.org",
            },
            "worker",
            "MAILROOM_SECRET_KEY",
            "required",
        ),
        (
            {"MAILROOM_RETRY_BASE_SECONDS": "10", "MAILROOM_RETRY_CAP_SECONDS": "5"},
            "worker",
            "MAILROOM_RETRY_CAP_SECONDS",
            "must not be below",
        ),
        ({}, "migrate", "MAILROOM_DATABASE_URL", "required but not set"),
        (
            {"MAILROOM_DATABASE_URL": "postgresql://localhost/x"},
            "bounces poll",
            "MAILROOM_IMAP_HOST",
            "required but not set",
        ),
        ({"MAILROOM_IMAP_HOST": "imap.example.org"}, "bounces poll", "MAILROOM_IMAP_USERNAME", ""),
        (
            {
                "MAILROOM_DATABASE_URL": "postgresql://localhost/x",
                "MAILROOM_FROM_ADDRESS": "news@example.org",
                "MAILROOM_BOUNCE_ADDRESS": "bounces@example.org",
            },
            "worker",
            "MAILROOM_SECRET_KEY",
            "required",
        ),
        ({}, "worker", "MAILROOM_DATABASE_URL", "required but not set"),
        (
            {"MAILROOM_DATABASE_URL": "postgresql://localhost/x"},
            "worker",
            "MAILROOM_FROM_ADDRESS",
            "required",
        ),
        (
            {"MAILROOM_DATABASE_URL": "postgresql://localhost/x"},
            "web",
            "MAILROOM_API_TOKEN",
            "required",
        ),
        (
            {"MAILROOM_DATABASE_URL": "postgresql://localhost/x", "MAILROOM_API_TOKEN": "t"},
            "web",
            "MAILROOM_SECRET_KEY",
            "required",
        ),
    ],
)
def test_configuration_errors_exit_2_with_one_clear_line(
    env: dict[str, str], command: str, variable: str, fragment: str
) -> None:
    result = mailroom(*command.split(), env=env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mailroom: configuration error: ")
    assert variable in lines[0] and fragment in lines[0]


@pytest.mark.slow
def test_secrets_are_never_echoed_in_configuration_errors() -> None:
    result = mailroom(
        "worker",
        env={
            "MAILROOM_SMTP_PASSWORD": "",
            "MAILROOM_SMTP_PORT": "x",
            "MAILROOM_API_TOKEN": "hunter2",
        },
    )
    assert result.returncode == 2
    assert "hunter2" not in result.stderr


@pytest.mark.slow
def test_an_unreachable_database_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = mailroom(
        "migrate", env={"MAILROOM_DATABASE_URL": f"postgresql://nobody@/x?host={tmp_path}"}
    )
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr
    assert "Traceback" not in result.stderr


def test_settings_object_validates_in_process() -> None:
    with pytest.raises(ConfigError, match="MAILROOM_WEB_PORT"):
        load_settings(web_port="eighty", _env_file=None)


@pytest.mark.slow
async def test_migrate_twice_is_a_no_op(database_url: str) -> None:
    result = mailroom("migrate", env={"MAILROOM_DATABASE_URL": database_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "schema is up to date"
