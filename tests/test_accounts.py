"""Operator accounts: roles on every route, password logins, personal tokens, the audit log."""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared.accounts import Role, hash_password
from shared.db import Database
from shared.settings import Settings
from tests.conftest import API_TOKEN, AUTH, make_batch, query
from web.app import RouteWithoutRole, check_roles, create_app
from web.auth import required_role
from web.middlewares import is_public

PASSWORD = "correct horse battery"
NO_BATCH = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
async def users(db: Database) -> dict[str, int]:
    """One user of each role, all with :data:`PASSWORD`."""
    password_hash = hash_password(PASSWORD)
    return {
        role.value: await db.add_user(f"{role.value}-ann", password_hash, role, actor="test")
        for role in Role
    }


async def log_in_as(client: TestClient, name: str, password: str = PASSWORD, **headers: str) -> str:
    """Log in with a password; the CSRF token of the session."""
    response = await client.post(
        "/login", data={"name": name, "password": password}, headers=headers, allow_redirects=False
    )
    assert response.status == 303, await response.text()
    page = await (await client.get("/account")).text()
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match
    return match.group(1)


@pytest.fixture
async def second(settings: Settings, db: Database) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(create_app(settings, db=db))) as other:
        yield other


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def make_token(client: TestClient, csrf: str, name: str = "laptop") -> dict[str, Any]:
    response = await client.post("/api/tokens", json={"name": name}, headers={"X-CSRF-Token": csrf})
    assert response.status == 201, await response.text()
    return dict(await response.json())


# -- every route declares a role ---------------------------------------------------------------


def test_every_route_is_public_or_declares_its_role(settings: Settings) -> None:
    app = create_app(settings)
    undeclared = [
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and not isinstance(route.resource, web.StaticResource)
        and not is_public(route.resource.canonical)
        and required_role(route.handler) is None
    ]
    assert undeclared == []
    # Mutating routes need at least a sender; the account routes anyone logged in.
    for route in app.router.routes():
        role = required_role(route.handler)
        if role is not None and route.method in {"POST", "PATCH", "DELETE"}:
            path = route.resource.canonical if route.resource else ""
            if path not in {"/logout", "/account", "/api/tokens", "/api/tokens/{token_id}"}:
                assert role is not Role.VIEWER, (route.method, path)


def test_an_app_with_a_route_without_a_role_is_refused(settings: Settings) -> None:
    app = create_app(settings)

    async def forgotten(request: web.Request) -> web.Response:
        return web.Response(text="anyone")

    app.router.add_post("/api/forgotten", forgotten)
    with pytest.raises(RouteWithoutRole, match="POST /api/forgotten"):
        check_roles(app)


# -- roles are enforced -----------------------------------------------------------------------


async def test_a_viewer_reads_but_changes_nothing(
    client: TestClient, db: Database, settings: Settings, users: dict[str, int]
) -> None:
    batch_id = await make_batch(db, ["a@example.org"])
    csrf = await log_in_as(client, "viewer-ann")
    assert (await client.get(f"/api/batches/{batch_id}")).status == 200
    writes = [
        ("POST", f"/api/batches/{batch_id}/cancel", None),
        ("POST", "/api/batches", {"recipients": ["a@example.org"], "subject": "S", "body": "B"}),
        ("POST", "/api/dead-letters/redrive", {"all": True}),
        ("POST", "/api/suppressions", {"addresses": ["a@example.org"]}),
        ("GET", "/api/audit", None),
    ]
    for method, path, body in writes:
        response = await client.request(method, path, json=body, headers={"X-CSRF-Token": csrf})
        assert response.status == 403, (method, path)
        error = (await response.json())["error"]
        assert error["code"] == "forbidden" and set(error) == {"code", "message", "details"}
        assert "viewer-ann is a viewer" in error["message"]
    # Pages: no buttons to press, and a clear page if one is pressed anyway.
    index = await (await client.get("/")).text()
    assert 'id="new-batch"' not in index and "needs the sender role" in index
    batch = await (await client.get(f"/batches/{batch_id}")).text()
    assert "cancel-batch" not in batch
    page = await client.post(f"/batches/{batch_id}/cancel", data={"csrf_token": csrf})
    assert page.status == 403
    assert "it needs the sender role" in await page.text()
    assert (await client.get("/users")).status == 403
    rows = await query(
        settings.database_url or "", "SELECT count(*) FROM recipients WHERE status = 'cancelled'"
    )
    assert rows == [(0,)]


async def test_a_sender_sends_but_does_not_manage_users(
    client: TestClient, users: dict[str, int]
) -> None:
    csrf = await log_in_as(client, "SENDER-ANN")  # any case
    created = await client.post(
        "/api/batches",
        json={"recipients": ["a@example.org"], "subject": "S", "body": "B"},
        headers={"X-CSRF-Token": csrf},
    )
    assert created.status == 201
    assert 'id="new-batch"' in await (await client.get("/")).text()
    assert (await client.get("/api/audit")).status == 403
    assert (await client.get("/users")).status == 403
    assert (await client.get("/audit")).status == 403


async def test_the_bootstrap_token_is_still_an_admin(client: TestClient) -> None:
    assert (await client.get("/api/audit", headers=AUTH)).status == 200
    login = await client.post("/login", data={"token": API_TOKEN}, allow_redirects=False)
    assert login.status == 303
    assert (await client.get("/users")).status == 200
    assert "MAILROOM_API_TOKEN" in await (await client.get("/account")).text()


# -- password logins --------------------------------------------------------------------------


async def test_a_wrong_password_and_an_unknown_name_get_the_same_answer(
    client: TestClient, db: Database, users: dict[str, int]
) -> None:
    await db.disable_user("viewer-ann", actor="test")
    answers = []
    for name, password in [
        ("sender-ann", "wrong password!"),
        ("nobody", PASSWORD),
        ("viewer-ann", PASSWORD),  # disabled
        ("sender-ann\x00", PASSWORD),
        ("\u00fcber", "\u2028" * 10),
        ("x" * 5000, "y" * 5000),
    ]:
        response = await client.post(
            "/login", data={"name": name, "password": password}, allow_redirects=False
        )
        answers.append((response.status, "do not match" in await response.text()))
    assert answers == [(401, True)] * len(answers)


async def test_failed_passwords_lock_a_user_name_out_from_any_client(
    settings: Settings, db: Database, users: dict[str, int]
) -> None:
    app = create_app(settings.model_copy(update={"trust_proxy": True}), db=db)
    async with TestClient(TestServer(app)) as client:
        for n in range(settings.login_attempts_per_minute):
            response = await client.post(
                "/login",
                data={"name": "Sender-Ann", "password": "guess"},
                headers={"X-Forwarded-For": f"198.51.100.{n}"},
            )
            assert response.status == 401
        locked = await client.post(
            "/login",
            data={"name": "sender-ann", "password": PASSWORD},
            headers={"X-Forwarded-For": "192.0.2.99"},
            allow_redirects=False,
        )
        assert locked.status == 429 and locked.headers["Retry-After"] == "60"
        # Another user from a fresh client is not affected.
        await log_in_as(client, "viewer-ann", **{"X-Forwarded-For": "192.0.2.100"})


async def test_disabling_a_user_ends_their_sessions_and_tokens_at_once(
    client: TestClient, db: Database, users: dict[str, int]
) -> None:
    csrf = await log_in_as(client, "sender-ann")
    token = (await make_token(client, csrf))["token"]
    assert (await client.get("/api/batches", headers=bearer(token))).status == 200
    await db.disable_user("sender-ann", actor="test")
    assert (await client.get("/", allow_redirects=False)).status == 303
    client.session.cookie_jar.clear()
    assert (await client.get("/api/batches", headers=bearer(token))).status == 401


async def test_changing_the_password_ends_the_other_sessions(
    client: TestClient, second: TestClient, users: dict[str, int]
) -> None:
    csrf = await log_in_as(client, "viewer-ann")
    await log_in_as(second, "viewer-ann")
    weak = await client.post(
        "/account",
        data={
            "csrf_token": csrf,
            "action": "password",
            "current": PASSWORD,
            "new": "short",
            "confirm": "short",
        },
    )
    assert weak.status == 422
    changed = await client.post(
        "/account",
        data={
            "csrf_token": csrf,
            "action": "password",
            "current": PASSWORD,
            "new": "a new long password",
            "confirm": "a new long password",
        },
        allow_redirects=False,
    )
    assert changed.status == 303
    assert (await second.get("/", allow_redirects=False)).status == 303
    # This browser carries on under a new session; the new password logs in, the old does not.
    assert (await client.get("/", allow_redirects=False)).status == 200
    refused = await second.post("/login", data={"name": "viewer-ann", "password": PASSWORD})
    assert refused.status == 401
    await log_in_as(second, "viewer-ann", "a new long password")


# -- personal tokens --------------------------------------------------------------------------


async def test_a_personal_token_acts_as_its_user_until_revoked(
    client: TestClient, users: dict[str, int]
) -> None:
    csrf = await log_in_as(client, "viewer-ann")
    made = await make_token(client, csrf)
    assert made["token"].startswith("mrt_") and made["user_name"] == "viewer-ann"
    client.session.cookie_jar.clear()
    as_viewer = bearer(made["token"])
    assert (await client.get("/api/batches", headers=as_viewer)).status == 200
    refused = await client.post(f"/api/batches/{NO_BATCH}/cancel", headers=as_viewer)
    assert refused.status == 403
    listed = await (await client.get("/api/tokens", headers=as_viewer)).json()
    assert [t["name"] for t in listed["tokens"]] == ["laptop"]
    assert "token" not in listed["tokens"][0]
    revoked = await client.delete(f"/api/tokens/{made['id']}", headers=as_viewer)
    assert revoked.status == 200
    assert (await client.get("/api/batches", headers=as_viewer)).status == 401


async def test_only_an_admin_revokes_another_users_token(
    client: TestClient, second: TestClient, users: dict[str, int]
) -> None:
    made = await make_token(client, await log_in_as(client, "sender-ann"))
    viewer_csrf = await log_in_as(second, "viewer-ann")
    other = await second.delete(f"/api/tokens/{made['id']}", headers={"X-CSRF-Token": viewer_csrf})
    assert other.status == 404
    client.session.cookie_jar.clear()
    assert (await client.get("/api/batches", headers=bearer(made["token"]))).status == 200
    admin = await client.delete(f"/api/tokens/{made['id']}", headers=AUTH)
    assert admin.status == 200
    assert (await client.get("/api/batches", headers=bearer(made["token"]))).status == 401


@pytest.mark.parametrize(
    "header",
    ["Bearer mrt_", "Bearer mrt_" + "A" * 43, "Bearer mrt_' OR 1=1 --", "Bearer mrt_" + "x" * 5000],
)
async def test_a_garbage_personal_token_is_401(client: TestClient, header: str) -> None:
    response = await client.get("/api/batches", headers={"Authorization": header})
    assert response.status == 401


@pytest.mark.parametrize("name", ["", "   ", "x" * 101, "a\nb", "\x00"])
async def test_a_bad_token_name_is_422(
    client: TestClient, users: dict[str, int], name: str
) -> None:
    csrf = await log_in_as(client, "viewer-ann")
    response = await client.post("/api/tokens", json={"name": name}, headers={"X-CSRF-Token": csrf})
    assert response.status == 422
    assert (await response.json())["error"]["code"] == "invalid_token"


async def test_the_bootstrap_token_makes_no_personal_token(client: TestClient) -> None:
    response = await client.post("/api/tokens", json={"name": "x"}, headers=AUTH)
    assert response.status == 409


# -- the users page ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "role", "password", "error"),
    [
        ("", "viewer", PASSWORD, "required"),
        ("ann smith", "viewer", PASSWORD, "letters, digits"),
        ("api-token", "viewer", PASSWORD, "reserved"),
        ("ann", "root", PASSWORD, "a role is one of"),
        ("ann", "viewer", "short", "at least 10"),
        ("ann", "viewer", "ten chars\x00!", "control character"),
        ("SENDER-ann", "viewer", PASSWORD, "exists already"),
    ],
)
async def test_the_users_page_refuses_garbage(
    client: TestClient, users: dict[str, int], name: str, role: str, password: str, error: str
) -> None:
    login = await client.post("/login", data={"token": API_TOKEN}, allow_redirects=False)
    assert login.status == 303
    page = await (await client.get("/users")).text()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf
    response = await client.post(
        "/users",
        data={
            "csrf_token": csrf[1],
            "action": "add",
            "name": name,
            "role": role,
            "password": password,
        },
    )
    assert response.status == 422
    assert error in await response.text()


async def test_an_admin_adds_a_user_changes_the_role_and_disables_them(
    client: TestClient, second: TestClient
) -> None:
    await client.post("/login", data={"token": API_TOKEN})
    page = await (await client.get("/users")).text()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf
    form = {"csrf_token": csrf[1], "action": "add", "name": "bea", "role": "viewer"}
    added = await client.post("/users", data={**form, "password": PASSWORD}, allow_redirects=False)
    assert added.status == 303
    await log_in_as(second, "bea")
    assert (await second.get("/api/batches")).status == 200
    assert (await second.post(f"/api/batches/{NO_BATCH}/cancel")).status in {403}
    promoted = await client.post("/users", data={**form, "action": "role", "role": "sender"})
    assert promoted.status == 200
    second_csrf = re.search(
        r'name="csrf_token" value="([^"]+)"', await (await second.get("/")).text()
    )
    assert second_csrf
    cancel = await second.post(
        f"/api/batches/{NO_BATCH}/cancel", headers={"X-CSRF-Token": second_csrf[1]}
    )
    assert cancel.status == 404  # allowed now: there is just no such batch
    await client.post("/users", data={**form, "action": "disable"})
    assert (await second.get("/", allow_redirects=False)).status == 303


# -- the audit log ----------------------------------------------------------------------------


async def test_every_change_through_the_api_is_in_the_audit_log(
    client: TestClient, db: Database, settings: Settings, users: dict[str, int]
) -> None:
    csrf = await log_in_as(client, "sender-ann")
    headers = {"X-CSRF-Token": csrf}
    review = await client.post(
        "/api/batches",
        json={
            "recipients": ["a@example.org", "b@example.org"],
            "subject": "S",
            "body": "B",
            "send": False,
        },
        headers=headers,
    )
    batch_id = (await review.json())["id"]
    # Drafts as a worker leaves them for review.
    await query(
        settings.database_url or "",
        "UPDATE recipients SET status = 'drafted', subject = 's', body = 'b' WHERE batch_id = %s",
        uuid.UUID(batch_id),
    )
    (rid,) = (await query(settings.database_url or "", "SELECT min(id) FROM recipients"))[0]
    edited = await client.patch(
        f"/api/batches/{batch_id}/recipients/{rid}",
        json={"subject": "s2", "body": "b2"},
        headers=headers,
    )
    assert edited.status == 200
    assert (await client.post(f"/api/batches/{batch_id}/send", headers=headers)).status == 200
    assert (await client.post(f"/api/batches/{batch_id}/cancel", headers=headers)).status == 200
    await query(settings.database_url or "", "UPDATE recipients SET status = 'dead'")
    redriven = await client.post("/api/dead-letters/redrive", json={"ids": [rid]}, headers=headers)
    assert (await redriven.json())["redriven"] == 1
    discarded = await client.post(
        "/api/dead-letters/discard", json={"batch_id": batch_id}, headers=headers
    )
    assert (await discarded.json())["discarded"] == 1
    addresses = {"addresses": ["x@example.org", "y@example.org"]}
    await client.post("/api/suppressions", json=addresses, headers=headers)
    await client.post(
        "/api/suppressions/remove", json={"addresses": ["x@example.org"]}, headers=headers
    )
    made = await make_token(client, csrf)
    await client.delete(f"/api/tokens/{made['id']}", headers=headers)

    log = await (await client.get("/api/audit?limit=50", headers=AUTH)).json()
    entries = [
        (e["actor"], e["action"], e["batch_id"], e["recipient_ids"], e["count"])
        for e in reversed(log["entries"])
        if e["actor"] != "test"
    ]
    assert entries == [
        ("sender-ann", "batch_created", batch_id, None, 2),
        ("sender-ann", "draft_edited", batch_id, [rid], 1),
        ("sender-ann", "batch_sent", batch_id, None, 2),
        ("sender-ann", "batch_cancelled", batch_id, None, 2),
        ("sender-ann", "dead_letters_redriven", None, [rid], 1),
        ("sender-ann", "dead_letters_discarded", batch_id, None, 1),
        ("sender-ann", "addresses_suppressed", None, None, 2),
        ("sender-ann", "addresses_unsuppressed", None, None, 1),
        ("sender-ann", "token_created", None, None, None),
        ("sender-ann", "token_revoked", None, None, None),
    ]
    assert log["next_after"] is None
    # Paged, newest first; the bootstrap token is named as such.
    await client.post("/api/suppressions", json=addresses, headers=AUTH)
    first = await (await client.get("/api/audit?limit=2", headers=AUTH)).json()
    assert first["entries"][0]["actor"] == "api-token"
    older = await (
        await client.get(f"/api/audit?limit=2&after={first['next_after']}", headers=AUTH)
    ).json()
    assert older["entries"][0]["id"] < first["entries"][-1]["id"]
    page = await (await client.get("/audit", headers=AUTH)).text()
    assert "dead letters redriven" in page and "sender-ann" in page


@pytest.mark.parametrize("after", ["-1", "x", "99999999999999999999", "\x00"])
async def test_garbage_audit_paging_is_refused(client: TestClient, after: str) -> None:
    response = await client.get("/api/audit", params={"after": after}, headers=AUTH)
    assert response.status == 422
    page = await client.get("/audit", params={"after": after}, headers=AUTH)
    assert page.status in {400, 303}


# -- the command line -------------------------------------------------------------------------


def users_cli(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, *args: str, stdin: str = ""
) -> int:
    from mailroom.cli import main

    monkeypatch.setenv("MAILROOM_DATABASE_URL", settings.database_url or "")
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["users", *args])


def test_the_cli_adds_lists_and_disables_users(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        users_cli(
            settings,
            monkeypatch,
            "add",
            "cli-ann",
            "--role",
            "sender",
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )
        == 0
    )
    assert users_cli(settings, monkeypatch, "list") == 0
    out = capsys.readouterr().out
    assert re.search(r"^cli-ann\s+sender\s+0\s", out, re.MULTILINE), out
    assert users_cli(settings, monkeypatch, "disable", "CLI-ANN") == 0
    assert "disabled CLI-ANN: 0 session(s) ended, 0 token(s) revoked" in capsys.readouterr().out
    with psycopg.connect(settings.database_url or "") as conn:
        rows = conn.execute("SELECT actor, action, subject FROM audit_log ORDER BY id").fetchall()
    assert rows == [("cli", "user_added", "cli-ann"), ("cli", "user_disabled", "cli-ann")]


@pytest.mark.parametrize(
    ("args", "stdin", "status", "error"),
    [
        (["add", "ann", "--role", "root", "--password-stdin"], PASSWORD, 2, "a role is one of"),
        (["add", "ann smith", "--role", "viewer", "--password-stdin"], PASSWORD, 2, "letters"),
        (["add", "api-token", "--role", "viewer", "--password-stdin"], PASSWORD, 2, "reserved"),
        (["add", "ann", "--role", "viewer", "--password-stdin"], "short\n", 2, "at least 10"),
        (["add", "ann", "--role", "viewer", "--password-stdin"], "", 2, "at least 10"),
        (["add", "ann", "--role", "viewer"], PASSWORD, 2, "use --password-stdin"),
        (["disable", "nobody"], "", 1, "no user 'nobody'"),
    ],
)
def test_the_cli_refuses_garbage_clearly(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    stdin: str,
    status: int,
    error: str,
) -> None:
    assert users_cli(settings, monkeypatch, *args, stdin=stdin) == status
    assert error in capsys.readouterr().err


def test_the_cli_refuses_a_duplicate_name_in_any_case(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    add = ["add", "dup", "--role", "viewer", "--password-stdin"]
    assert users_cli(settings, monkeypatch, *add, stdin=PASSWORD) == 0
    assert users_cli(settings, monkeypatch, "add", "DUP", *add[2:], stdin=PASSWORD) == 1
    assert "exists already" in capsys.readouterr().err


def test_the_cli_takes_no_password_as_an_argument(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        users_cli(settings, monkeypatch, "add", "ann", "--role", "viewer", "--password", PASSWORD)
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


async def test_every_change_through_the_pages_is_in_the_audit_log(
    client: TestClient, db: Database, settings: Settings, users: dict[str, int]
) -> None:
    csrf = await log_in_as(client, "sender-ann")
    created = await client.post(
        "/batches",
        data={"csrf_token": csrf, "recipients": "a@example.org", "subject": "S", "body": "B"},
        allow_redirects=False,
    )
    assert created.status == 303
    (batch_id,) = (await query(settings.database_url or "", "SELECT id FROM batches"))[0]
    await client.post(f"/batches/{batch_id}/cancel", data={"csrf_token": csrf})
    await query(settings.database_url or "", "UPDATE recipients SET status = 'dead'")
    await client.post(
        "/dead-letters",
        data={"csrf_token": csrf, "action": "discard", "target": "all", "confirm": "1"},
    )
    await client.post(
        "/suppressions", data={"csrf_token": csrf, "addresses": "z@example.org", "reason": "manual"}
    )
    await client.post(
        "/suppressions", data={"csrf_token": csrf, "action": "remove", "address": "z@example.org"}
    )
    made = await client.post(
        "/account", data={"csrf_token": csrf, "action": "create_token", "name": "cron"}
    )
    shown = re.search(r'<code id="token-value">(mrt_[^<]+)</code>', await made.text())
    assert shown
    assert "mrt_" not in await (await client.get("/account")).text()  # shown once
    rows = await db.list_audit(limit=50)
    assert [(r["actor"], r["action"]) for r in reversed(rows) if r["actor"] != "test"] == [
        ("sender-ann", "batch_created"),
        ("sender-ann", "batch_cancelled"),
        ("sender-ann", "dead_letters_discarded"),
        ("sender-ann", "addresses_suppressed"),
        ("sender-ann", "addresses_unsuppressed"),
        ("sender-ann", "token_created"),
    ]
    assert rows[3]["detail"] == {"all": True}  # newest first
    # An admin sees everyone's tokens; the token made on the page works as a Bearer.
    client.session.cookie_jar.clear()
    everyone = await (await client.get("/api/tokens?all=true", headers=AUTH)).json()
    assert [t["user_name"] for t in everyone["tokens"]] == ["sender-ann"]
    assert (await client.get("/api/batches", headers=bearer(shown[1]))).status == 200


async def test_the_command_line_is_audited_as_cli(
    settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from mailroom.cli import main

    batch_id = await make_batch(db, ["a@example.org"])
    await query(settings.database_url or "", "UPDATE recipients SET status = 'dead'")
    monkeypatch.setenv("MAILROOM_DATABASE_URL", settings.database_url or "")
    # main() runs its own event loop: in a thread, as from a shell.
    assert await asyncio.to_thread(main, ["dead-letters", "redrive", "--batch", str(batch_id)]) == 0
    rows = await db.list_audit(limit=1)
    assert (rows[0]["actor"], rows[0]["action"], rows[0]["count"]) == (
        "cli",
        "dead_letters_redriven",
        1,
    )
    assert rows[0]["batch_id"] == batch_id


@pytest.mark.parametrize(
    ("command", "fragment"),
    [
        (["users"], "sender (create, send, cancel"),
        (["users", "add"], "--password-stdin"),
        (["users", "disable"], "tokens are revoked"),
    ],
)
def test_the_users_command_explains_itself(
    command: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from mailroom.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mailroom users")
    assert fragment in " ".join(out.split())


@pytest.mark.parametrize("name", ["\x00", "nobody", "a b", "x" * 1000])
@pytest.mark.parametrize("action", ["role", "disable"])
async def test_the_users_page_answers_an_unknown_or_impossible_name_with_404(
    client: TestClient, name: str, action: str
) -> None:
    await client.post("/login", data={"token": API_TOKEN})
    page = await (await client.get("/users")).text()
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf
    response = await client.post(
        "/users", data={"csrf_token": csrf[1], "action": action, "name": name, "role": "admin"}
    )
    assert response.status == 404
    assert "There is no such user." in await response.text()
