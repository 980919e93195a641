"""Registering simulated devices in the hub's database, and credential files.

Layer: firmware simulator; imports the hub core (`hub.registry`,
`hub.settings`, `hub.storage`, `hub.errors`) only, never bridges or tasks.

The hub stores only a hash of each credential, so a device that is already
registered is removed and added again to learn a credential it can use.
Registering with one fixed credential (`credential=`) keeps the stored hash
the same from run to run, so a running hub's cached hashes stay valid.
Blocking (database I/O): call it before starting the event loop, or in a thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from sqlalchemy.engine import make_url

from hub.registry import DeviceExists, Registry
from hub.settings import Settings, load_settings
from hub.storage import make_engine, migrate

__all__ = [
    "CredentialsFileError",
    "load_credentials_file",
    "provision_devices",
    "redacted_url",
    "save_credentials_file",
]


class CredentialsFileError(ValueError):
    """A credentials file is missing, not JSON, or not an object of strings."""


def provision_devices(
    device_ids: Sequence[str],
    *,
    credential: str | None = None,
    settings: Settings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, str]:
    """Register `device_ids` in the hub's database; their credentials by device id.

    The database is the hub's (`load_settings()`: `HUB_DATABASE_URL`,
    `HUB_DATA_DIR`, `HUB_CONFIG` apply) and is migrated to the newest schema
    first. Credentials are random unless `credential` is given. `progress` is
    called with (done, total) every 500 devices.
    """
    settings = settings if settings is not None else load_settings()
    url = settings.effective_database_url
    migrate(url)
    engine = make_engine(url)
    credentials: dict[str, str] = {}
    try:
        registry = Registry(engine)
        for done, device_id in enumerate(device_ids, start=1):
            try:
                credentials[device_id] = registry.add(device_id, credential)
            except DeviceExists:
                registry.remove(device_id)
                credentials[device_id] = registry.add(device_id, credential)
            if progress is not None and (done % 500 == 0 or done == len(device_ids)):
                progress(done, len(device_ids))
    finally:
        engine.dispose()
    return credentials


def redacted_url(url: str) -> str:
    """`url` with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown as its scheme only
        return url.split(":", 1)[0] + ":..."


def load_credentials_file(path: str | Path) -> dict[str, str]:
    """A JSON object mapping device id -> credential."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CredentialsFileError(f"cannot read credentials file {path}: {exc}") from None
    except ValueError as exc:
        raise CredentialsFileError(f"credentials file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise CredentialsFileError(
            f"credentials file {path} must be a JSON object of device id -> credential strings"
        )
    return data


def save_credentials_file(path: str | Path, credentials: Mapping[str, str]) -> None:
    """Write credentials as JSON, readable by the owner only (they are secrets)."""
    target = Path(path)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(dict(credentials), fh, indent=1, sort_keys=False)
        fh.write("\n")
