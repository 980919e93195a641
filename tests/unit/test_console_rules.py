"""Pure rules of the console: roles, password and token storage, login throttling,
CSV import parsing, the login page's redirect target, control messages."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from console.actions import InvalidInput, parse_id_csv
from console.routers.pages import _safe_next
from console.throttle import LoginThrottle
from hub import accounts
from hub.accounts import Principal, allows
from hub.control import disconnect_message, is_control, parse_control
from hub.storage import make_engine, migrate


@pytest.fixture
def engine(tmp_path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    migrate(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def test_roles_are_ordered() -> None:
    assert allows("admin", "operator") and allows("admin", "viewer")
    assert allows("operator", "viewer") and not allows("operator", "admin")
    assert not allows("viewer", "operator")
    assert not allows("root", "viewer")


def test_passwords_are_stored_as_argon2_and_checked(engine) -> None:  # type: ignore[no-untyped-def]
    password = accounts.add_user(engine, "alice", "operator")
    with engine.connect() as conn:
        stored = conn.execute(select(accounts.UserRow.password_hash)).scalar_one()
    assert stored.startswith("$argon2id$") and password not in stored
    assert accounts.check_password(engine, "alice", password) == Principal(
        "user", "alice", "operator"
    )
    assert accounts.check_password(engine, "alice", password + "x") is None
    assert accounts.check_password(engine, "bob", password) is None
    with pytest.raises(accounts.AccountExists):
        accounts.add_user(engine, "alice", "viewer")
    with pytest.raises(accounts.AccountError, match="unknown role"):
        accounts.add_user(engine, "carol", "root")
    with pytest.raises(accounts.AccountError, match="invalid name"):
        accounts.add_user(engine, "has space", "viewer")


def test_tokens_are_stored_as_sha256_and_revocable(engine) -> None:  # type: ignore[no-untyped-def]
    token = accounts.add_token(engine, "ci", "viewer")
    with engine.connect() as conn:
        stored = conn.execute(select(accounts.TokenRow.token_sha256)).scalar_one()
    assert stored == accounts.sha256(token) and token not in stored
    assert accounts.token_principal(engine, token) == Principal("token", "ci", "viewer")
    assert accounts.remove_token(engine, "ci")
    assert accounts.token_principal(engine, token) is None


def test_sessions_end_with_logout_expiry_and_the_user(engine) -> None:  # type: ignore[no-untyped-def]
    accounts.add_user(engine, "alice", "admin")
    who = Principal("user", "alice", "admin")
    cookie, csrf = accounts.start_session(engine, who, timedelta(hours=1))
    session = accounts.session_of(engine, cookie)
    assert session is not None and session.principal == who and session.csrf_token == csrf
    accounts.end_session(engine, cookie)
    assert accounts.session_of(engine, cookie) is None

    expired, _ = accounts.start_session(engine, who, timedelta(seconds=-1))
    assert accounts.session_of(engine, expired) is None
    live, _ = accounts.start_session(engine, who, timedelta(hours=1))
    accounts.remove_user(engine, "alice")
    assert accounts.session_of(engine, live) is None


def test_failed_logins_are_slowed_down_per_key() -> None:
    now = [100.0]
    throttle = LoginThrottle(free=3, max_wait_s=8, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait_s("user:a", "addr:1") == 0
        throttle.failed("user:a", "addr:1")
    assert throttle.wait_s("user:a") == pytest.approx(1.0)
    assert throttle.wait_s("addr:1", "user:b") == pytest.approx(1.0)
    assert throttle.wait_s("user:b", "addr:2") == 0
    for _ in range(10):
        throttle.failed("user:a")
    assert throttle.wait_s("user:a") == pytest.approx(8.0)  # capped
    now[0] += 8.5
    assert throttle.wait_s("user:a") == 0
    throttle.succeeded("user:a")
    throttle.failed("user:a")
    assert throttle.wait_s("user:a") == 0


def test_csv_import_reads_an_id_column_or_the_first() -> None:
    assert parse_id_csv("a\nb\n\n c \n") == ["a", "b", "c"]
    assert parse_id_csv("name,id\nx,d1\ny,d2\n") == ["d1", "d2"]
    with pytest.raises(InvalidInput, match="no device ids"):
        parse_id_csv("\n\n")


def test_the_login_redirect_stays_on_the_console() -> None:
    assert _safe_next("/devices/x") == "/devices/x"
    assert _safe_next("https://evil.example/") == "/devices"
    assert _safe_next("//evil.example/") == "/devices"
    assert _safe_next(None) == "/devices"


def test_control_messages_are_told_apart_from_commands() -> None:
    message = disconnect_message("d1", "re-keyed")
    assert is_control(message) and not is_control({"id": "c", "device_id": "d1"})
    control = parse_control(message)
    assert control is not None and control.device_id == "d1"
    assert parse_control({"control": "reboot-the-world"}) is None
