"""People and programs that use the console: users, API tokens, login sessions, roles.

Layer: core; imports `hub.storage` and `hub.errors`, and argon2-cffi. No web
framework: the console (`console/`) calls these functions and the `hub users` /
`hub tokens` commands do too.

- A user logs in with a name and a generated password. Passwords are hashed
  with argon2id (argon2-cffi's defaults): slow on purpose, because a person's
  password may be guessed offline from a stolen database.
- An API token is 32 random bytes; only its SHA-256 is stored. A fast hash is
  right for it (as for device credentials, hub/registry.py): it is random and
  long, so there is nothing to guess, and every API request checks one.
- A login session is server-side: the browser's cookie holds a random id whose
  SHA-256 is the row's key, so a session ends (logout, expiry, the user
  removed) the moment its row goes, and a stolen database holds no usable
  cookie. Each session carries its own CSRF token for form posts.
- Roles are ordered: a viewer reads everything, an operator also sends commands
  and replays dead letters, an admin also changes devices, users and tokens.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal, get_args

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, String, delete, insert, select, update
from sqlalchemy.orm import Mapped, mapped_column

from hub.errors import HubError
from hub.storage import Base, UtcDateTime

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
_RANK: dict[str, int] = {role: rank for rank, role in enumerate(ROLES)}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_hasher = PasswordHasher()


class AccountError(HubError):
    """A user or token operation that cannot be done (bad name, exists, unknown)."""


class AccountExists(AccountError):
    pass


class UserRow(Base):
    __tablename__ = "console_users"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class TokenRow(Base):
    __tablename__ = "console_tokens"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class SessionRow(Base):
    __tablename__ = "console_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_name: Mapped[str] = mapped_column(String(64), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking: a user (by login) or an API token, and the role it has."""

    kind: Literal["user", "token"]
    name: str
    role: Role

    @property
    def label(self) -> str:
        """How the audit log names it: `user:alice`, `token:ci`."""
        return f"{self.kind}:{self.name}"

    def may(self, needed: Role) -> bool:
        return allows(self.role, needed)


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    role: str
    created_at: datetime
    last_used_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class LoginSession:
    principal: Principal
    csrf_token: str
    expires_at: datetime


def allows(role: str, needed: Role) -> bool:
    """True when `role` may do what `needed` may (roles are ordered)."""
    return _RANK.get(role, -1) >= _RANK[needed]


def check_role(role: str) -> Role:
    if role not in _RANK:
        raise AccountError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    return role  # type: ignore[return-value]


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise AccountError(
            f"invalid name {name!r}: 1-64 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- users -------------------------------------------------------------------------


def add_user(engine: Engine, name: str, role: str) -> str:
    """Create a user; returns its generated password (shown once, stored hashed)."""
    _check_name(name)
    check_role(role)
    password = secrets.token_urlsafe(15)
    with engine.begin() as conn:
        if conn.execute(select(UserRow.name).where(UserRow.name == name)).first():
            raise AccountExists(f"user {name!r} already exists")
        conn.execute(
            insert(UserRow).values(
                name=name,
                password_hash=_hasher.hash(password),
                role=role,
                created_at=datetime.now(UTC),
            )
        )
    return password


def remove_user(engine: Engine, name: str) -> bool:
    """Remove a user and end its sessions at once."""
    with engine.begin() as conn:
        conn.execute(delete(SessionRow).where(SessionRow.user_name == name))
        return conn.execute(delete(UserRow).where(UserRow.name == name)).rowcount > 0


def users(engine: Engine) -> list[Account]:
    with engine.connect() as conn:
        rows = conn.execute(select(UserRow).order_by(UserRow.name)).all()
    return [Account(r.name, r.role, r.created_at) for r in rows]


def check_password(engine: Engine, name: str, password: str) -> Principal | None:
    """The user if `password` is theirs, else None (same cost for an unknown name)."""
    with engine.connect() as conn:
        row = conn.execute(select(UserRow).where(UserRow.name == name)).first()
    # An unknown name still costs one hash, so timing does not tell who exists.
    stored = row.password_hash if row is not None else _DUMMY_HASH
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if row is None:
        return None
    return Principal("user", row.name, check_role(row.role))


_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(15))


# -- tokens ------------------------------------------------------------------------


def add_token(engine: Engine, name: str, role: str) -> str:
    """Create an API token; returns it (shown once, stored as SHA-256)."""
    _check_name(name)
    check_role(role)
    token = "hubt_" + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        if conn.execute(select(TokenRow.name).where(TokenRow.name == name)).first():
            raise AccountExists(f"token {name!r} already exists")
        conn.execute(
            insert(TokenRow).values(
                name=name, token_sha256=sha256(token), role=role, created_at=datetime.now(UTC)
            )
        )
    return token


def remove_token(engine: Engine, name: str) -> bool:
    with engine.begin() as conn:
        return conn.execute(delete(TokenRow).where(TokenRow.name == name)).rowcount > 0


def tokens(engine: Engine) -> list[Account]:
    with engine.connect() as conn:
        rows = conn.execute(select(TokenRow).order_by(TokenRow.name)).all()
    return [Account(r.name, r.role, r.created_at, r.last_used_at) for r in rows]


def token_principal(engine: Engine, token: str) -> Principal | None:
    """The token's principal, or None for an unknown or revoked token."""
    digest = sha256(token)
    with engine.begin() as conn:
        row = conn.execute(select(TokenRow).where(TokenRow.token_sha256 == digest)).first()
        if row is None:
            return None
        now = datetime.now(UTC)
        # Written at most once a minute: a busy client must not turn reads into writes.
        if row.last_used_at is None or now - row.last_used_at > timedelta(minutes=1):
            conn.execute(update(TokenRow).where(TokenRow.name == row.name).values(last_used_at=now))
    return Principal("token", row.name, check_role(row.role))


# -- login sessions ----------------------------------------------------------------


def start_session(engine: Engine, principal: Principal, lifetime: timedelta) -> tuple[str, str]:
    """A new login session for a user; returns (cookie value, CSRF token)."""
    session_id = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(24)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        # Expired sessions are swept here rather than by a timer of their own.
        conn.execute(delete(SessionRow).where(SessionRow.expires_at < now))
        conn.execute(
            insert(SessionRow).values(
                id_sha256=sha256(session_id),
                user_name=principal.name,
                csrf_token=csrf,
                created_at=now,
                expires_at=now + lifetime,
            )
        )
    return session_id, csrf


def session_of(engine: Engine, session_id: str) -> LoginSession | None:
    """The live session behind a cookie value, or None (unknown, expired, user removed)."""
    now = datetime.now(UTC)
    query = (
        select(SessionRow.csrf_token, SessionRow.expires_at, UserRow.name, UserRow.role)
        .join(UserRow, UserRow.name == SessionRow.user_name)
        .where(SessionRow.id_sha256 == sha256(session_id), SessionRow.expires_at > now)
    )
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        return None
    return LoginSession(
        Principal("user", row.name, check_role(row.role)), row.csrf_token, row.expires_at
    )


def end_session(engine: Engine, session_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(SessionRow).where(SessionRow.id_sha256 == sha256(session_id)))
