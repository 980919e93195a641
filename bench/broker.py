"""The embedded broker's cost: stock amqtt against the hub's hardened broker.

Layer: benchmarks; may import anything.

`python -m bench.broker` starts, one after the other on 127.0.0.1, a stock
amqtt 0.12.1 `Broker` (anonymous) and the hub's embedded broker
(`bridges.mqtt.broker.EmbeddedMqtt` with `mqtt_allow_anonymous`, a dispatcher
stand-in that resolves every future at once), each in a process of its own.
For QoS 0 and QoS 1, four paho-mqtt publisher processes send a bounded number
of messages each while one paho subscriber (QoS as published) counts them.
The rate is the messages delivered to the subscriber per second, from the
first publish to the last delivery. Prints a table, then one JSON line with
every figure and the ratio hardened / stock. With `--websockets`, the hub's
broker runs a third time with every client on its MQTT over WebSockets
listener (`hardened-ws`, paho's `transport="websockets"`, path /mqtt), and the
JSON line adds the ratio WebSockets / TCP.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

PUBLISHERS = 4
QUIET_S = 2.0  # no delivery for this long after the publishers finished: done
PAYLOAD = b'{"values": {"temp": 21.5, "door": "open"}}'


# -- the brokers, each in a process of its own -------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _until(stop: EventType) -> None:
    """Wait for the parent's stop signal (a process event) off the loop."""
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)


async def _serve(kind: str, ports: Any, stop: EventType) -> None:
    broker: Any
    if kind == "stock":
        from amqtt.broker import Broker

        port = _free_port()
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
                "plugins": {
                    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
                },
            }
        )
        await broker.start()
        ports.put(port)
        await _until(stop)
        await broker.shutdown()
        return

    from bridges.backpressure import Room
    from bridges.mqtt.broker import EmbeddedMqtt
    from hub.envelope import Envelope
    from hub.metrics import Metrics
    from hub.registry import CredentialCache
    from hub.settings import load_settings

    class Immediate:
        """Stands in for the dispatcher: every envelope is durable at once."""

        room = Room(1_000_000)  # never full: nothing waits

        def submit(self, envelope: Envelope) -> asyncio.Future[None]:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future

        def submit_batched(self, envelope: Envelope) -> asyncio.Future[None]:
            return self.submit(envelope)

    async def no_refresh(_device_id: str) -> None:
        return None

    with tempfile.TemporaryDirectory() as data_dir:
        settings = load_settings(
            None,
            data_dir=Path(data_dir),
            host="127.0.0.1",
            mqtt_port=0,
            # 0 is off: the WebSocket run picks a free port for its listener.
            mqtt_ws_port=_free_port() if kind == "hardened-ws" else 0,
            mqtt_wss_port=0,
            mqtt_allow_anonymous=True,
        )
        hub = EmbeddedMqtt(settings, Immediate(), CredentialCache(), no_refresh, Metrics())
        await hub.start()
        ports.put(hub.ws_port if kind == "hardened-ws" else hub.port)
        await _until(stop)
        await hub.stop()


def _broker_main(kind: str, ports: Any, stop: EventType) -> None:
    # Stock amqtt logs a warning for every late PUBACK; the figures are the point.
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_serve(kind, ports, stop))


# -- clients ---------------------------------------------------------------------------


def _client(client_id: str, websockets: bool = False) -> mqtt.Client:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv311,
        transport="websockets" if websockets else "tcp",
    )
    if websockets:
        client.ws_set_options(path="/mqtt")
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    return client


def _publisher_main(
    port: int, index: int, count: int, qos: int, go: EventType, websockets: bool
) -> None:
    client = _client(f"bench-pub-{index}", websockets)
    acked = threading.Event()
    done = [0]

    def on_publish(*_args: Any) -> None:
        done[0] += 1
        if done[0] == count:
            acked.set()

    client.on_publish = on_publish
    client.connect("127.0.0.1", port, keepalive=60)
    client.loop_start()
    go.wait()
    for _ in range(count):
        client.publish(f"bench/{index}", PAYLOAD, qos=qos)
    acked.wait(120)
    client.disconnect()
    client.loop_stop()


@dataclass
class Result:
    broker: str
    qos: int
    sent: int
    delivered: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


def run_one(kind: str, qos: int, per_publisher: int) -> Result:
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    stop = ctx.Event()
    server = ctx.Process(target=_broker_main, args=(kind, ports, stop), daemon=True)
    server.start()
    try:
        port = int(ports.get(timeout=30))
        received = [0]
        last = [time.monotonic()]
        subscribed = threading.Event()
        websockets = kind == "hardened-ws"
        subscriber = _client(f"bench-sub-{kind}-{qos}", websockets)

        def on_message(*_args: Any) -> None:
            received[0] += 1
            last[0] = time.monotonic()

        subscriber.on_message = on_message
        subscriber.on_subscribe = lambda *_a: subscribed.set()
        subscriber.connect("127.0.0.1", port, keepalive=60)
        subscriber.loop_start()
        subscriber.subscribe("bench/#", qos=qos)
        if not subscribed.wait(10):
            raise RuntimeError(f"{kind}: no SUBACK")

        go = ctx.Event()
        publishers = [
            ctx.Process(target=_publisher_main, args=(port, i, per_publisher, qos, go, websockets))
            for i in range(PUBLISHERS)
        ]
        for process in publishers:
            process.start()
        time.sleep(1.0)  # let them connect
        started = time.monotonic()
        go.set()
        total = per_publisher * PUBLISHERS
        for process in publishers:
            process.join(120)
        while received[0] < total and time.monotonic() - last[0] < QUIET_S:
            time.sleep(0.05)
        subscriber.disconnect()
        subscriber.loop_stop()
        return Result(kind, qos, total, received[0], max(last[0] - started, 1e-6))
    finally:
        stop.set()
        server.join(15)
        if server.is_alive():
            server.terminate()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.broker",
        description="Delivered messages per second: stock amqtt against the hub's broker.",
    )
    parser.add_argument("--qos0", type=int, default=5000, help="messages per publisher, QoS 0")
    parser.add_argument("--qos1", type=int, default=2500, help="messages per publisher, QoS 1")
    parser.add_argument(
        "--websockets",
        action="store_true",
        help="also run the hub's broker with every client over MQTT over WebSockets",
    )
    args = parser.parse_args(argv)

    kinds = ("stock", "hardened", "hardened-ws") if args.websockets else ("stock", "hardened")
    results: list[Result] = []
    for qos, per_publisher in ((0, args.qos0), (1, args.qos1)):
        for kind in kinds:
            print(f"{kind} broker, QoS {qos} ...", file=sys.stderr, flush=True)
            results.append(run_one(kind, qos, per_publisher))

    print(f"{'broker':<11} {'QoS':>3} {'sent':>7} {'delivered':>9} {'seconds':>8} {'msg/s':>9}")
    for r in results:
        print(
            f"{r.broker:<11} {r.qos:>3} {r.sent:>7} {r.delivered:>9} "
            f"{r.seconds:>8.2f} {r.rate:>9.0f}"
        )
    summary: dict[str, Any] = {}
    for qos in (0, 1):
        stock = next(r for r in results if r.qos == qos and r.broker == "stock")
        hardened = next(r for r in results if r.qos == qos and r.broker == "hardened")
        summary[f"qos{qos}"] = {
            "stock_msgs_per_s": round(stock.rate, 1),
            "hardened_msgs_per_s": round(hardened.rate, 1),
            "stock_delivered": stock.delivered,
            "hardened_delivered": hardened.delivered,
            "sent": stock.sent,
            "ratio": round(hardened.rate / stock.rate, 3) if stock.rate else None,
        }
        ws = next((r for r in results if r.qos == qos and r.broker == "hardened-ws"), None)
        if ws is not None:
            summary[f"qos{qos}"] |= {
                "websockets_msgs_per_s": round(ws.rate, 1),
                "websockets_delivered": ws.delivered,
                "ratio_websockets_to_tcp": round(ws.rate / hardened.rate, 3)
                if hardened.rate
                else None,
            }
    print(json.dumps({"benchmark": "broker", "publishers": PUBLISHERS, **summary}))


if __name__ == "__main__":
    main()
