"""The local spool (bounded, ordered, durable) and the credential checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridges.spool import Spool
from hub.errors import AuthError
from hub.registry import CredentialCache, DeviceExists, Registry, hash_credential
from hub.storage import make_engine, migrate


def test_the_spool_keeps_order_bound_and_survives_reopening(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.sqlite3", max_messages=10)
    spool.append("t", "q", "[1]", 4)
    spool.append("t", "q", "[2]", 4)
    assert spool.messages == 8
    assert not spool.has_room(4)
    assert spool.has_room(2)
    spool.close()

    reopened = Spool(tmp_path / "spool.sqlite3", max_messages=10)
    assert reopened.messages == 8
    first, second = reopened.oldest(10)
    assert (first.body, second.body) == ("[1]", "[2]")
    reopened.remove(first)
    assert reopened.messages == 4
    assert [b.body for b in reopened.oldest(10)] == ["[2]"]
    reopened.close()


def test_an_empty_spool_takes_even_an_oversized_batch(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.sqlite3", max_messages=3)
    assert spool.has_room(50)
    spool.close()


def test_credentials_are_stored_hashed_and_checked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(url)
    registry = Registry(make_engine(url))
    credential = registry.add("dev-1")
    with pytest.raises(DeviceExists):
        registry.add("dev-1")
    hashes = registry.credential_hashes()
    assert hashes == {"dev-1": hash_credential(credential)}
    assert credential not in str(hashes)

    cache = CredentialCache(hashes)
    cache.verify("dev-1", credential)
    with pytest.raises(AuthError) as wrong:
        cache.verify("dev-1", credential + "x")
    assert wrong.value.reason == "bad_credential"
    with pytest.raises(AuthError) as unknown:
        cache.verify("dev-2", credential)
    assert unknown.value.reason == "unknown_device"
    assert [d.id for d in registry.devices()] == ["dev-1"]
    assert registry.remove("dev-1") and not registry.remove("dev-1")
