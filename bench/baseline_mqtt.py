"""The MQTT baseline: the paho-mqtt subscriber a user would write by hand around `task.delay()`.

Layer: benchmarks; may import anything.

`python -m bench.baseline_mqtt --port P --topic-root R` subscribes (QoS 1,
nothing kept between connections) to `R/+/telemetry` on a plain broker (the benchmark starts a
Mosquitto of its own, with unbounded queues so nothing is dropped) and calls
`store_reading.delay(...)` once for every message, in paho's network thread.
Devices publish to that broker; their PUBACK comes from the broker as soon as
it has the message, so for the baseline "acknowledged" does not mean
"durable", and the stored rate is the figure to compare. It prints
`subscribed` when ready.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.baseline_tasks import store_reading

log = logging.getLogger("bench.baseline_mqtt")


def _on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
    # <root>/<device id>/telemetry, payload {"seq", "boot", "ts", "values"}
    device_id = message.topic.split("/")[-2]
    try:
        body = json.loads(message.payload)
        ts = body.get("ts")
        store_reading.delay(
            device_id,
            int(body.get("boot") or 0),
            int(body.get("seq") or 0),
            datetime.fromtimestamp(ts / 1000, UTC).isoformat() if ts else None,
            datetime.now(UTC).isoformat(),
            body.get("values", body),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("dropping a bad message on %s: %s", message.topic, exc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baseline_mqtt",
        description="The hand-written MQTT baseline: one task.delay() per message.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--topic-root", default="devices")
    parser.add_argument("--qos", type=int, choices=[0, 1], default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    topic = f"{args.topic_root}/+/telemetry"
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-baseline-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv311,  # a clean start on every connect
    )

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        c.subscribe(topic, qos=args.qos)

    def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        print(f"subscribed to {topic}", flush=True)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = _on_message

    def stop(signum: int, frame: object) -> None:
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    client.connect(args.host, args.port, keepalive=60)
    client.loop_forever()


if __name__ == "__main__":
    main()
