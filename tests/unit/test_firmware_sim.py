"""Unit tests of the firmware simulator: summary, pacing, commands, CLI, and a
loopback run of TCP devices against an in-process hub stand-in."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from firmware_sim.cli import main
from firmware_sim.commands import FIRMWARE_VERSION, CommandAnswer, SimState, answer
from firmware_sim.faults import DelayWrites, DropEvery, Fault, SplitRandomly, chain
from firmware_sim.fleet import FleetOptions, device_ids, run_fleet
from firmware_sim.mqtt_device import MqttDevice
from firmware_sim.pacing import Backoff, ConnectLimiter, RatePacer
from firmware_sim.provision import (
    CredentialsFileError,
    load_credentials_file,
    provision_devices,
    save_credentials_file,
)
from firmware_sim.summary import (
    SUMMARY_KEYS,
    FleetStats,
    FleetSummary,
    Progress,
    format_progress,
    format_summary,
)
from hub.envelope import Kind
from hub.protocol.discovery import load_codec
from hub.protocol.events import (
    NEED_DATA,
    Ack,
    Command,
    CommandResult,
    ConnectionClosed,
    Hello,
    Nak,
    NakReason,
    Ping,
    Pong,
    Role,
    Telemetry,
)
from hub.registry import Registry, hash_credential
from hub.settings import Settings
from hub.storage import make_engine
from hub.topics import command_result_topic, command_topic, data_topic

# ---------------------------------------------------------------------------
# Summary and progress
# ---------------------------------------------------------------------------


def _summary(**changes: Any) -> FleetSummary:
    values: dict[str, Any] = {
        "transport": "tcp",
        "devices": 10,
        "connected": 10,
        "sent": 1000,
        "acknowledged": 1000,
        "refused": 0,
        "errors": 0,
        "duration_s": 2.0,
        "rate_per_s": 500.0,
        "commands_answered": 3,
    }
    values.update(changes)
    return FleetSummary(**values)


def test_summary_json_is_one_line_with_exactly_the_documented_keys() -> None:
    text = _summary(duration_s=2.0004, rate_per_s=499.94, refused_reasons={"X": 1}).to_json()
    assert "\n" not in text
    data = json.loads(text)
    assert tuple(data) == SUMMARY_KEYS
    assert set(data) == {
        "transport",
        "devices",
        "connected",
        "sent",
        "acknowledged",
        "refused",
        "errors",
        "duration_s",
        "rate_per_s",
        "commands_answered",
    }
    assert data["duration_s"] == 2.0
    assert data["rate_per_s"] == 499.9


def test_summary_from_stats_computes_the_rate() -> None:
    stats = FleetStats(devices=2, connected=2, sent=10, acknowledged=8, refused=1)
    stats.refused_reasons["BAD_CREDENTIAL"] += 1
    summary = FleetSummary.from_stats("mqtt", stats, 4.0, qos=1)
    assert summary.rate_per_s == 2.0
    assert summary.refused_reasons == {"BAD_CREDENTIAL": 1}
    assert FleetSummary.from_stats("tcp", stats, 0.0).rate_per_s == 0.0


@pytest.mark.parametrize(
    ("changes", "ok"),
    [
        ({}, True),
        ({"acknowledged": 999}, False),
        ({"errors": 1}, False),
        ({"refused": 1}, False),
        ({"connected": 9}, False),
    ],
)
def test_summary_ok_only_when_everything_was_acknowledged(
    changes: dict[str, Any], ok: bool
) -> None:
    assert _summary(**changes).ok is ok


def test_format_summary_names_every_counter() -> None:
    text = format_summary(_summary(refused=2, refused_reasons={"BAD_CREDENTIAL": 2}))
    for word in ("devices", "connected", "sent", "acknowledged", "refused", "errors"):
        assert word in text
    assert "BAD_CREDENTIAL x2" in text
    assert "2.00 s" in text
    assert "500.0 acknowledged/s" in text
    assert "FAILED" in text
    assert "result        ok" in format_summary(_summary())


def test_format_summary_says_what_qos_0_acknowledgement_means() -> None:
    text = format_summary(_summary(transport="mqtt", qos=0))
    assert "QoS 0" in text and "written" in text


def test_format_progress() -> None:
    line = format_progress(
        Progress(
            elapsed_s=4.0,
            devices=5,
            connected=5,
            online=4,
            sent=100,
            acknowledged=90,
            refused=0,
            errors=1,
            rate_per_s=45.4,
        )
    )
    assert "online 4/5" in line and "sent 100" in line and "acked 90" in line
    assert "45 acked/s" in line


def test_device_ids_are_numbered_from_one() -> None:
    assert device_ids("tcp-", 3) == ["tcp-1", "tcp-2", "tcp-3"]


# ---------------------------------------------------------------------------
# Pacing
# ---------------------------------------------------------------------------


def test_pacer_unlimited_never_waits() -> None:
    pacer = RatePacer(0)
    pacer.start(100.0, 0.5)
    for _ in range(5):
        assert pacer.delay(100.0) == 0.0
        pacer.consume(100.0)


def test_pacer_spaces_messages_by_the_interval() -> None:
    pacer = RatePacer(10)
    pacer.start(0.0)
    assert pacer.delay(0.0) == 0.0
    pacer.consume(0.0)
    assert pacer.delay(0.0) == pytest.approx(0.1)
    assert pacer.delay(0.05) == pytest.approx(0.05)
    pacer.consume(0.1)
    assert pacer.delay(0.1) == pytest.approx(0.1)


def test_pacer_schedule_does_not_drift_with_late_wakeups() -> None:
    pacer = RatePacer(10)
    pacer.start(0.0)
    sent = 0
    now = 0.0
    # Every wake-up is 10 ms late; the average rate must still be 10/s.
    while now < 10.0:
        now += pacer.delay(now) + 0.01
        pacer.consume(now)
        sent += 1
    assert 99 <= sent <= 101


def test_pacer_catches_up_by_at_most_the_burst_after_a_stall() -> None:
    pacer = RatePacer(10, burst=1)
    pacer.start(0.0)
    pacer.consume(0.0)
    # Stalled for 5 s (a full window, a reconnect): one catch-up message, not 50.
    pacer.consume(5.0)
    assert pacer.delay(5.0) == 0.0
    pacer.consume(5.0)
    assert pacer.delay(5.0) == pytest.approx(0.1)


def test_pacer_phase_spreads_the_first_message() -> None:
    pacer = RatePacer(2)
    pacer.start(10.0, 0.5)
    assert pacer.delay(10.0) == pytest.approx(0.25)


def test_pacer_set_rate_applies_from_the_last_message() -> None:
    pacer = RatePacer(1)
    pacer.start(0.0)
    pacer.consume(0.0)  # next due at 1.0
    pacer.set_rate(0.25, 0.5)  # every 4 s: due 4 s after the last message
    assert pacer.delay(0.5) == pytest.approx(3.5)
    assert pacer.interval_s == 4.0


def test_pacer_rejects_a_negative_rate() -> None:
    with pytest.raises(ValueError):
        RatePacer(-1)


def test_backoff_doubles_to_five_seconds_and_resets() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(7)]
    assert delays == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0])
    backoff.reset()
    assert backoff.next_delay() == 0.2


def test_connect_limiter_spaces_reservations() -> None:
    limiter = ConnectLimiter(4)
    waits = [limiter.reserve(0.0) for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.25, 0.5, 0.75])
    # After a quiet spell there is no backlog to pay for.
    assert limiter.reserve(10.0) == 0.0


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _state() -> tuple[SimState, _Clock]:
    clock = _Clock()
    return SimState("dev-1", 42, clock=clock), clock


def test_ping_answers_with_device_and_uptime() -> None:
    state, clock = _state()
    clock.now += 12.5
    assert answer(state, "ping", {}) == CommandAnswer(
        ok=True, result={"pong": True, "device": "dev-1", "uptime_s": 12.5}
    )


def test_set_interval_changes_the_interval() -> None:
    state, _ = _state()
    result = answer(state, "set_interval", {"seconds": 2})
    assert result == CommandAnswer(ok=True, result={"interval_s": 2.0})
    assert state.interval_s == 2.0


@pytest.mark.parametrize(
    "args",
    [
        {},
        {"seconds": 0},
        {"seconds": -1},
        {"seconds": "5"},
        {"seconds": True},
        {"seconds": math.inf},
    ],
)
def test_set_interval_rejects_bad_args(args: dict[str, Any]) -> None:
    state, _ = _state()
    result = answer(state, "set_interval", args)
    assert not result.ok and "seconds" in result.error
    assert state.interval_s is None


def test_fail_fails_on_purpose() -> None:
    state, _ = _state()
    assert answer(state, "fail", {}) == CommandAnswer(ok=False, error="failed on purpose")


def test_get_state_returns_the_simulated_state() -> None:
    state, _ = _state()
    state.sent = 7
    result = answer(state, "get_state")
    assert result.ok
    assert result.result["device_id"] == "dev-1"
    assert result.result["boot_id"] == 42
    assert result.result["firmware"] == FIRMWARE_VERSION
    assert result.result["sent"] == 7
    assert set(result.result["values"]) == {"temperature", "humidity", "battery"}


def test_unknown_command_and_bad_args() -> None:
    state, _ = _state()
    assert answer(state, "reboot", {}) == CommandAnswer(ok=False, error="unknown command reboot")
    assert not answer(state, "ping", ["not", "an", "object"]).ok  # type: ignore[arg-type]


def test_answer_payloads_for_mqtt() -> None:
    assert CommandAnswer(ok=True, result=1).to_json_object() == {"ok": True, "result": 1}
    assert CommandAnswer(ok=False, error="no").to_json_object() == {"ok": False, "error": "no"}


def test_readings_stay_plausible() -> None:
    import random

    state, _ = _state()
    rng = random.Random(1)
    for _ in range(10_000):
        values = state.next_reading(rng)
    assert 0 <= values["temperature"] <= 40
    assert 0 <= values["humidity"] <= 100
    assert 0 <= values["battery"] < 100


# ---------------------------------------------------------------------------
# Credentials and provisioning
# ---------------------------------------------------------------------------


def test_credentials_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    save_credentials_file(path, {"a": "1", "b": "2"})
    assert load_credentials_file(path) == {"a": "1", "b": "2"}
    assert path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("content", ["[1, 2]", '{"a": 1}', "not json"])
def test_credentials_file_must_be_an_object_of_strings(tmp_path: Path, content: str) -> None:
    path = tmp_path / "creds.json"
    path.write_text(content)
    with pytest.raises(CredentialsFileError):
        load_credentials_file(path)


def test_provision_registers_and_reregisters(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    settings = Settings(database_url=url, data_dir=tmp_path)
    first = provision_devices(["p-1", "p-2"], settings=settings)
    again = provision_devices(["p-2", "p-3"], settings=settings)
    fixed = provision_devices(["p-3"], settings=settings, credential="same")
    assert first["p-2"] != again["p-2"]
    engine = make_engine(url)
    try:
        hashes = Registry(engine).credential_hashes()
    finally:
        engine.dispose()
    assert hashes == {
        "p-1": hash_credential(first["p-1"]),
        "p-2": hash_credential(again["p-2"]),
        "p-3": hash_credential(fixed["p-3"]),
    }
    assert fixed == {"p-3": "same"}


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], ["tcp", "mqtt", "provision", "Examples"]),
        (["tcp"], ["--codec", "--window", "--rate", "--provision", "--json", "--tls", "Examples"]),
        (["mqtt"], ["--qos", "--window", "--credentials-file", "PUBACK", "Examples"]),
        (["provision"], ["--out", "--devices", "--prefix"]),
    ],
)
def test_cli_help(args: list[str], expected: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    for text in expected:
        assert text in result.output


def test_cli_needs_exactly_one_of_messages_or_duration() -> None:
    runner = CliRunner()
    neither = runner.invoke(main, ["tcp", "--credential", "x"])
    both = runner.invoke(main, ["tcp", "--credential", "x", "--messages", "1", "--duration", "1"])
    for result in (neither, both):
        assert result.exit_code == 2
        assert "--messages or --duration" in result.output


def test_cli_tls_files_need_tls(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("not read before --tls is checked")
    result = CliRunner().invoke(
        main, ["tcp", "--credential", "x", "--messages", "1", "--cafile", str(ca)]
    )
    assert result.exit_code == 2
    assert "needs --tls" in result.output


def test_cli_needs_credentials() -> None:
    result = CliRunner().invoke(main, ["mqtt", "--messages", "1"])
    assert result.exit_code == 2
    assert "--provision" in result.output and "--credential" in result.output


def test_cli_reports_devices_missing_from_the_credentials_file(tmp_path: Path) -> None:
    path = tmp_path / "creds.json"
    save_credentials_file(path, {"tcp-1": "a"})
    result = CliRunner().invoke(
        main, ["tcp", "--devices", "2", "--messages", "1", "--credentials-file", str(path)]
    )
    assert result.exit_code == 2
    assert "tcp-2" in result.output


def test_cli_rejects_an_unknown_codec() -> None:
    result = CliRunner().invoke(main, ["tcp", "--codec", "nope", "--messages", "1"])
    assert result.exit_code == 2
    assert "unknown codec" in result.output


# ---------------------------------------------------------------------------
# Loopback: TCP devices against an in-process stand-in for the hub
# ---------------------------------------------------------------------------


class _StandInHub:
    """Just enough of the hub's TCP side: checks credentials, ACKs frames, records
    every (device, boot id, seq), and can drop a connection or send commands."""

    def __init__(self, codec: str, credentials: dict[str, str]) -> None:
        self.codec = load_codec(codec)
        self.credentials = credentials
        self.received: dict[tuple[str, int], list[int]] = {}
        self.results: list[CommandResult] = []
        self.drop_after: dict[str, int] = {}
        self.pings = 0
        self.links: dict[str, tuple[asyncio.StreamWriter, Any]] = {}

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        codec = self.codec(Role.HUB)
        key: tuple[str, int] | None = None
        try:
            while True:
                data = await reader.read(65536)
                codec.receive_data(data)
                while True:
                    event = codec.next_event()
                    if event is NEED_DATA or isinstance(event, ConnectionClosed):
                        break
                    match event:
                        case Hello(device_id=device_id, credential=credential, boot_id=boot):
                            if self.credentials.get(device_id) != credential:
                                reason = (
                                    NakReason.BAD_CREDENTIAL
                                    if device_id in self.credentials
                                    else NakReason.UNKNOWN_DEVICE
                                )
                                writer.write(codec.send(Nak(0, reason)))
                                return
                            key = (device_id, boot)
                            self.links[device_id] = (writer, codec)
                            writer.write(codec.send(Ack(0)))
                        case Telemetry(seq=seq):
                            assert key is not None
                            self.received.setdefault(key, []).append(seq)
                            left = self.drop_after.get(key[0])
                            if left is not None:
                                if left <= 0:
                                    # Drop without acknowledging: the device must resend.
                                    del self.drop_after[key[0]]
                                    writer.transport.abort()
                                    return
                                self.drop_after[key[0]] = left - 1
                            writer.write(codec.send(Ack(seq)))
                        case CommandResult(seq=seq):
                            self.results.append(event)
                            writer.write(codec.send(Ack(seq)))
                        case Ping(seq=seq):
                            self.pings += 1
                            writer.write(codec.send(Pong(seq)))
                if not data:
                    return
        except ConnectionError:
            pass
        finally:
            writer.close()

    def command(self, device_id: str, command_id: str, name: str, args: dict[str, Any]) -> None:
        writer, codec = self.links[device_id]
        writer.write(codec.send(Command(0, command_id, name, args)))


async def _until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    for _ in range(int(within_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def _tcp(port: int, devices: list[tuple[str, str]], **options: Any) -> FleetOptions:
    """Options for a TCP fleet against the stand-in hub on `port`."""
    return FleetOptions(transport="tcp", host="127.0.0.1", port=port, devices=devices, **options)


def _with_hub(
    codec: str,
    credentials: dict[str, str],
    body: Callable[[_StandInHub, int], Awaitable[None]],
) -> _StandInHub:
    hub = _StandInHub(codec, credentials)

    async def run() -> None:
        server = await asyncio.start_server(hub.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await asyncio.wait_for(body(hub, port), 30)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(run())
    return hub


@pytest.mark.parametrize("codec", ["native", "lines"])
def test_tcp_fleet_delivers_every_message_once_in_order(codec: str) -> None:
    devices = [(f"d-{n}", f"secret-{n}") for n in range(1, 6)]
    summaries: list[FleetSummary] = []

    async def body(hub: _StandInHub, port: int) -> None:
        summaries.append(await run_fleet(_tcp(port, devices, messages=50, window=8, codec=codec)))

    hub = _with_hub(codec, dict(devices), body)
    (summary,) = summaries
    assert summary.ok, summary
    assert (summary.sent, summary.acknowledged, summary.connected) == (250, 250, 5)
    assert len(hub.received) == 5  # one boot id per device
    for seqs in hub.received.values():
        assert seqs == list(range(1, 51))


@pytest.mark.parametrize(
    "fault",
    [
        SplitRandomly(6, seed=11),
        DelayWrites(0.01),
        chain(SplitRandomly(3, seed=4), DelayWrites(0.001)),
    ],
    ids=["split", "delay", "split+delay"],
)
def test_tcp_fleet_through_a_harmless_fault_delivers_every_message(fault: Fault) -> None:
    devices = [(f"d-{n}", f"secret-{n}") for n in range(1, 4)]
    summaries: list[FleetSummary] = []

    async def body(hub: _StandInHub, port: int) -> None:
        summaries.append(await run_fleet(_tcp(port, devices, messages=30, window=4, fault=fault)))

    hub = _with_hub("native", dict(devices), body)
    (summary,) = summaries
    assert summary.ok, summary
    for seqs in hub.received.values():
        assert seqs == list(range(1, 31))


def test_tcp_fleet_recovers_from_dropped_writes_by_resending() -> None:
    summaries: list[FleetSummary] = []

    async def body(hub: _StandInHub, port: int) -> None:
        options = _tcp(
            port,
            [("d-1", "s")],
            messages=30,
            window=4,
            fault=DropEvery(7),
            connect_timeout_s=0.3,
            ack_timeout_s=0.3,
            drain_timeout_s=1.0,
        )
        summaries.append(await run_fleet(options))

    hub = _with_hub("native", {"d-1": "s"}, body)
    (summary,) = summaries
    assert summary.sent == 30
    # A stall with a full window reconnects and resends; only a write lost in
    # the final drain (at most one of its four) stays unacknowledged, since
    # the device resends on a reconnect and a drain does not reconnect.
    assert summary.acknowledged >= 29
    assert summary.errors >= 1  # each stall is a lost connection
    ((_, seqs),) = hub.received.items()
    # A dropped message came later, resent with its original seq.
    assert seqs != sorted(seqs)
    assert len(set(seqs)) >= summary.acknowledged


def test_tcp_device_resends_unacknowledged_messages_after_a_drop() -> None:
    summaries: list[FleetSummary] = []

    async def body(hub: _StandInHub, port: int) -> None:
        hub.drop_after["d-1"] = 10
        summaries.append(await run_fleet(_tcp(port, [("d-1", "s")], messages=40, window=4)))

    hub = _with_hub("native", {"d-1": "s"}, body)
    (summary,) = summaries
    assert summary.acknowledged == summary.sent == 40
    assert summary.errors == 1  # the dropped connection
    ((_, seqs),) = hub.received.items()  # the same boot id after reconnecting
    assert sorted(set(seqs)) == list(range(1, 41))
    assert len(seqs) > 40  # some were sent twice, with their original seq


def test_tcp_refusals_are_counted_and_not_retried() -> None:
    summaries: list[FleetSummary] = []

    async def body(hub: _StandInHub, port: int) -> None:
        devices = [("ok", "s"), ("known", "wrong"), ("stranger", "s")]
        summaries.append(await run_fleet(_tcp(port, devices, messages=3)))

    _with_hub("native", {"ok": "s", "known": "s"}, body)
    (summary,) = summaries
    assert summary.refused == 2
    assert summary.refused_reasons == {"BAD_CREDENTIAL": 1, "UNKNOWN_DEVICE": 1}
    assert (summary.connected, summary.acknowledged, summary.errors) == (1, 3, 0)
    assert not summary.ok


def test_tcp_device_answers_commands_and_keeps_alive() -> None:
    summaries: list[FleetSummary] = []

    async def body(hub: _StandInHub, port: int) -> None:
        stop = asyncio.Event()
        stats = FleetStats()
        task = asyncio.create_task(
            run_fleet(
                _tcp(port, [("d-1", "s")], messages=0, linger=True, keepalive_s=0.1),
                stop=stop,
                stats=stats,
            )
        )
        await _until(lambda: stats.online == 1)
        hub.command("d-1", "c1", "ping", {})
        hub.command("d-1", "c2", "set_interval", {"seconds": 5})
        hub.command("d-1", "c3", "fail", {})
        hub.command("d-1", "c4", "reboot", {})
        await _until(lambda: len(hub.results) == 4)
        await asyncio.sleep(0.3)
        stop.set()
        summaries.append(await task)

    hub = _with_hub("native", {"d-1": "s"}, body)
    (summary,) = summaries
    assert summary.commands_answered == 4
    by_id = {r.command_id: r for r in hub.results}
    assert by_id["c1"].ok and by_id["c1"].result["device"] == "d-1"
    assert by_id["c2"].result == {"interval_s": 5.0}
    assert (by_id["c3"].ok, by_id["c3"].error) == (False, "failed on purpose")
    assert by_id["c4"].error == "unknown command reboot"
    # Results share the device's sequence space, so each has its own seq.
    assert len({r.seq for r in hub.results}) == 4
    assert hub.pings >= 1


def test_tcp_fleet_stops_when_asked() -> None:
    summaries: list[FleetSummary] = []

    async def body(hub: _StandInHub, port: int) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_fleet(_tcp(port, [("d-1", "s"), ("d-2", "s")], rate=50), stop=stop)
        )
        await asyncio.sleep(0.5)
        stop.set()
        summaries.append(await task)

    _with_hub("native", {"d-1": "s", "d-2": "s"}, body)
    (summary,) = summaries
    assert summary.ok
    assert 20 <= summary.sent <= 70


def test_tcp_fleet_with_no_messages_only_connects() -> None:
    summaries: list[FleetSummary] = []

    async def body(hub: _StandInHub, port: int) -> None:
        devices = [(f"d-{n}", "s") for n in range(1, 21)]
        summaries.append(await run_fleet(_tcp(port, devices, messages=0)))

    hub = _with_hub("native", {f"d-{n}": "s" for n in range(1, 21)}, body)
    (summary,) = summaries
    assert summary.ok and summary.connected == 20 and summary.sent == 0
    assert len(hub.links) == 20


def test_fleet_without_an_end_is_refused() -> None:
    with pytest.raises(ValueError, match="never ends"):
        asyncio.run(run_fleet(_tcp(9, [("d", "s")])))


def test_mqtt_device_topics_are_the_hub_topic_scheme() -> None:
    options = FleetOptions(
        transport="mqtt", host="127.0.0.1", port=1, devices=[], topic_root="site"
    )
    device = MqttDevice("m-1", "s", options)
    assert device.telemetry_topic == data_topic("site", "m-1", Kind.TELEMETRY)
    assert device.telemetry_topic == "site/m-1/telemetry"
    assert device.command_topic == command_topic("site", "m-1") == "site/m-1/commands"
    device._command(b'{"id": "c-1", "name": "ping", "args": {}}')
    device._command(b'{"id": "no spaces", "name": "ping"}')  # no topic to answer on: ignored
    assert [topic for topic, _ in device._results.values()] == [
        command_result_topic("site", "m-1", "c-1")
    ]
