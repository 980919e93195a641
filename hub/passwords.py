"""Service users of the MQTT broker: a password file in Mosquitto's format, parsed and checked.

Layer: core; imports only `hub.errors` and the standard `base64`, `hashlib`
and `hmac`. Pure: the broker reads the file (`mqtt_password_file`) and calls
`parse_passwords` (docs/security.md, "Service users and the password file").

One line per user, as `mosquitto_passwd` writes them (SALT and HASH in base64):

    name:$7$ITERATIONS$SALT$HASH    PBKDF2-HMAC-SHA512, 64-byte hash (its default)
    name:$6$SALT$HASH               SHA-512 of password + salt (Mosquitto 1.6 and earlier)

Blank lines and lines starting with `#` are ignored. A plain-text password
(what `mosquitto_passwd -U` would hash) is refused with its line number: the
hub never keeps a readable password.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from hub.errors import ConfigError

KEY = "mqtt_password_file"
ENV = "HUB_MQTT_PASSWORD_FILE"
#: PBKDF2 rounds beyond this are refused: a typo must not make every login take minutes.
MAX_ITERATIONS = 10_000_000


class PasswordFileError(ConfigError):
    """A line of the password file that does not parse; `line` is 1-based."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}, line {line}: {reason} ({KEY} / {ENV})", key=KEY, env=ENV)
        self.source = source
        self.line = line


@dataclass(frozen=True, slots=True)
class PasswordHash:
    """One user's stored hash: PBKDF2-SHA512 (`iterations` > 0) or salted SHA-512 (0)."""

    salt: bytes
    digest: bytes
    iterations: int = 0

    def matches(self, password: str) -> bool:
        secret = password.encode("utf-8")
        if self.iterations:
            computed = hashlib.pbkdf2_hmac(
                "sha512", secret, self.salt, self.iterations, len(self.digest)
            )
        else:
            computed = hashlib.sha512(secret + self.salt).digest()
        return hmac.compare_digest(computed, self.digest)


@dataclass(frozen=True, slots=True)
class PasswordFile:
    """A parsed password file: user name -> hash."""

    users: dict[str, PasswordHash]

    def __contains__(self, name: object) -> bool:
        return name in self.users

    def verify(self, name: str, password: str | None) -> bool:
        """Whether `password` is the user's (False for an unknown user or none)."""
        stored = self.users.get(name)
        return stored is not None and password is not None and stored.matches(password)


def _b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _parse_hash(text: str) -> PasswordHash | str:
    """The hash of one line, or why it is not one."""
    parts = text.split("$")
    try:
        if len(parts) == 5 and parts[0] == "" and parts[1] == "7":
            iterations = int(parts[2])
            if not 0 < iterations <= MAX_ITERATIONS:
                return f"iterations must be between 1 and {MAX_ITERATIONS:,}"
            return PasswordHash(_b64(parts[3]), _b64(parts[4]), iterations)
        if len(parts) == 4 and parts[0] == "" and parts[1] == "6":
            return PasswordHash(_b64(parts[2]), _b64(parts[3]))
    except (ValueError, binascii.Error):
        return "salt and hash must be base64, iterations a number"
    return "not a hash as mosquitto_passwd writes ($7$... or $6$...); plain passwords are refused"


def parse_passwords(text: str, source: str = "password file") -> PasswordFile:
    """Parse a password file; PasswordFileError naming `source` and the line otherwise."""
    users: dict[str, PasswordHash] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, rest = line.partition(":")
        if not colon or not name:
            raise PasswordFileError(source, number, "expected name:hash")
        parsed = _parse_hash(rest)
        if isinstance(parsed, str):
            raise PasswordFileError(source, number, f"user {name!r}: {parsed}")
        users[name] = parsed
    return PasswordFile(users)


def load_passwords(path: Path | str) -> PasswordFile:
    """Read and parse the password file at `path`; ConfigError naming it otherwise."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(
            f"password file {path} cannot be read ({reason}); check {KEY} / {ENV}",
            key=KEY,
            env=ENV,
        ) from None
    return parse_passwords(text, str(path))
