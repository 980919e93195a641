"""Unit tests of what the private RabbitMQ node of `bench ingest --against
rabbitmq-mqtt` is given: password hashes RabbitMQ checks, and definitions with
the devices, the durable queue and its binding to the MQTT plugin's exchange."""

from __future__ import annotations

import base64
import hashlib

from bench.rabbitmq_mqtt import QUEUE, definitions, password_hash


def test_password_hash_is_rabbitmqs_salted_sha256() -> None:
    raw = base64.b64decode(password_hash("s3cret"))
    salt, digest = raw[:4], raw[4:]
    assert digest == hashlib.sha256(salt + b"s3cret").digest()
    assert password_hash("s3cret") != password_hash("s3cret")  # a fresh salt each time


def test_definitions_hold_every_device_a_durable_queue_and_the_telemetry_binding() -> None:
    defs = definitions({"d1": "a", "d2": "b"}, "site")

    assert {u["name"] for u in defs["users"]} == {"guest", "d1", "d2"}
    assert {p["user"] for p in defs["permissions"]} == {"guest", "d1", "d2"}
    assert defs["queues"] == [
        {"name": QUEUE, "vhost": "/", "durable": True, "auto_delete": False, "arguments": {}}
    ]
    (binding,) = defs["bindings"]
    assert binding["source"] == "amq.topic"
    assert binding["destination"] == QUEUE
    # The plugin maps MQTT's "/" to AMQP's ".": site/<id>/telemetry -> site.<id>.telemetry.
    assert binding["routing_key"] == "site.*.telemetry"
