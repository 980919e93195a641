"""The device registry: who may connect, and with which credential.

Layer: core; imports `hub.storage`, `hub.envelope` and `hub.errors`.

A credential is 32 random bytes (URL-safe text) shown once when the device is
added; only its SHA-256 is stored. A fast hash is right here (unlike for
passwords) because the secret is random and long: there is nothing to guess,
and the hub must check thousands of connects per second.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine, delete, insert, select, update

from hub.envelope import validate_device_id
from hub.errors import AuthError, EnvelopeError, HubError
from hub.storage import Device


def hash_credential(credential: str) -> str:
    return hashlib.sha256(credential.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: str
    created_at: datetime


class DeviceExists(HubError):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} is already registered")
        self.device_id = device_id


class UnknownDevice(HubError):
    def __init__(self, device_id: str) -> None:
        super().__init__(f"no device {device_id!r}")
        self.device_id = device_id


class Registry:
    """Registry operations on the database (blocking; call off the event loop)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine

    def add(self, device_id: str, credential: str | None = None) -> str:
        """Register a device; returns its credential (generated unless given)."""
        try:
            validate_device_id(device_id)
        except EnvelopeError as exc:
            raise HubError(str(exc)) from None
        credential = credential or secrets.token_urlsafe(32)
        with self._engine.begin() as conn:
            if conn.execute(select(Device.id).where(Device.id == device_id)).first():
                raise DeviceExists(device_id)
            conn.execute(
                insert(Device).values(
                    id=device_id,
                    credential_sha256=hash_credential(credential),
                    created_at=datetime.now(UTC),
                )
            )
        return credential

    def rekey(self, device_id: str) -> str:
        """Give a device a new credential; the old one stops matching at once.

        Hubs keep a cache of the hashes (CredentialCache): the console tells
        them to reload the device and drop its connection (hub/control.py).
        """
        credential = secrets.token_urlsafe(32)
        with self._engine.begin() as conn:
            changed = conn.execute(
                update(Device)
                .where(Device.id == device_id)
                .values(credential_sha256=hash_credential(credential))
            ).rowcount
        if not changed:
            raise UnknownDevice(device_id)
        return credential

    def exists(self, device_id: str) -> bool:
        with self._engine.connect() as conn:
            return conn.execute(select(Device.id).where(Device.id == device_id)).first() is not None

    def remove(self, device_id: str) -> bool:
        with self._engine.begin() as conn:
            result = conn.execute(delete(Device).where(Device.id == device_id))
        return result.rowcount > 0

    def devices(self) -> list[DeviceRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(Device.id, Device.created_at).order_by(Device.id))
            return [DeviceRecord(id=r.id, created_at=r.created_at) for r in rows]

    def credential_hashes(self, device_ids: list[str] | None = None) -> dict[str, str]:
        """Stored hashes, of every device or of the ones named."""
        query = select(Device.id, Device.credential_sha256)
        if device_ids is not None:
            query = query.where(Device.id.in_(device_ids))
        with self._engine.connect() as conn:
            return {r.id: r.credential_sha256 for r in conn.execute(query)}


class CredentialCache:
    """An in-memory copy of the registry's hashes, so that checking a connect costs
    no database round trip on the event loop. `missing` tells the caller to
    refresh one device from the database (off the loop) before refusing it."""

    def __init__(self, hashes: dict[str, str] | None = None) -> None:
        self._hashes: dict[str, str] = dict(hashes or {})

    def update(self, hashes: dict[str, str]) -> None:
        self._hashes.update(hashes)

    def forget(self, device_id: str) -> None:
        self._hashes.pop(device_id, None)

    def missing(self, device_id: str) -> bool:
        return device_id not in self._hashes

    def verify(self, device_id: str, credential: str) -> None:
        """Raise AuthError unless `credential` is the device's."""
        stored = self._hashes.get(device_id)
        if stored is None:
            raise AuthError(
                f"unknown device {device_id!r}", device_id=device_id, reason="unknown_device"
            )
        if not hmac.compare_digest(stored, hash_credential(credential)):
            raise AuthError(
                f"wrong credential for device {device_id!r}",
                device_id=device_id,
                reason="bad_credential",
            )
