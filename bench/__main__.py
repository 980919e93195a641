"""`python -m bench`: the benchmark command (ingest, connections, tls-connections, against,
workers, partition-query, insert-cost, scale-out).

Layer: benchmarks; may import anything.

Every run starts what it needs itself (RabbitMQ vhosts, databases in a
temporary folder, the hub, workers, the simulated fleet) on 127.0.0.1 and
removes it all at the end, also on Ctrl+C. Progress goes to stderr; stdout
gets the readable table and, as its last line, one line of JSON with every
figure (only the JSON with `--json`, the table then going to stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.against import add_against_parser
from bench.services import BenchError, log, terminate_as_interrupt

_INGEST_EPILOG = """\
examples:
  python -m bench ingest --transport tcp --devices 50 --duration 60
  python -m bench ingest --transport mqtt --devices 200 --duration 30 --json
  python -m bench ingest --transport tcp --sweep 10,50,200 --duration 30 \\
      --plot docs/img/throughput.png --out results.json
  python -m bench ingest --transport tcp --no-baseline --duration 20 --profile hub.txt
  python -m bench ingest --transport tcp --tls --devices 20 --duration 20
  python -m bench ingest --transport mqtt --tls --devices 20 --duration 20
  python -m bench ingest --transport mqtt --against rabbitmq-mqtt --duration 20
  python -m bench ingest --fleet 10,100,1000 --duration 10 --plot docs/img/fleet.png

Each run measures the hub, then the baseline (a hand-written server calling
task.delay() once per message), each with a fresh vhost, database, worker and
the same fleet, and prints both with the ratio hub/baseline. Needs RabbitMQ on
127.0.0.1:5672 (guest/guest) and rabbitmqctl; the MQTT baseline also needs
the mosquitto binary. With --tls, one hub serves a clear and a TLS listener,
and the same fleet is measured against each (the ratio TLS/clear, no
baseline). With --against rabbitmq-mqtt, the baseline is replaced by
RabbitMQ's own MQTT plugin on a private node of the run's own (the same
fleet publishes to it; messages counted in a durable queue). See
docs/benchmarks.md.
"""

_CONNECTIONS_EPILOG = """\
examples:
  python -m bench connections
  python -m bench connections --tcp 10000 --mqtt 10000 --json

Connects the devices (TCP: authenticated, idle, with keep-alive pings; MQTT:
authenticated and subscribed to their command topic), holds them for --hold
seconds, and reports how long connecting took and the hub's memory per
connection (RSS growth / devices). Each transport gets a fresh hub process.
"""


_SCALE_OUT_EPILOG = """\
examples:
  python -m bench scale-out
  python -m bench scale-out --devices 50 --duration 15 --transport tcp,mqtt --json

Per transport, two configurations in turn, each on a fresh RabbitMQ vhost
and PostgreSQL database with one worker of the same options: one `hub run`
with the fleet connected to it, then two `hub run` (distinct hub_id, the same
vhost and database) behind HAProxy configured by docs/haproxy.cfg, the same
fleet connected to HAProxy. Reports stored msg/s (and over how many seconds),
hub CPU us/msg (summed over the hubs), worker and HAProxy CPU us/msg, the
ratio two/one, and checks that every acknowledged message is stored exactly
once. Needs RabbitMQ (guest/guest) with rabbitmqctl, PostgreSQL (user
postgres) on 127.0.0.1 and the haproxy binary. See docs/benchmarks.md.
"""


def _transports(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(n not in ("tcp", "mqtt") for n in names):
        raise argparse.ArgumentTypeError("tcp, mqtt or tcp,mqtt")
    return list(dict.fromkeys(names))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _device_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of device counts") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError("device counts must be >= 1")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the hub against a hand-written baseline, in one run.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ingest = sub.add_parser(
        "ingest",
        help="end-to-end ingest throughput and latency, hub vs baseline",
        description="Devices -> server -> RabbitMQ -> worker -> database: messages\n"
        "acknowledged and stored per second, device-to-stored latency, CPU and memory\n"
        "of every process, for the hub and for the baseline.",
        epilog=_INGEST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ingest.add_argument(
        "--transport",
        choices=["tcp", "mqtt"],
        default="tcp",
        help="device transport (default: tcp)",
    )
    ingest.add_argument(
        "--devices", type=_positive_int, default=50, help="simulated devices (default: 50)"
    )
    bound = ingest.add_mutually_exclusive_group()
    bound.add_argument("--duration", type=float, help="seconds the devices send (default: 20)")
    bound.add_argument("--messages", type=_positive_int, help="messages per device instead")
    ingest.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="messages/s per device; 0 = as fast as acknowledged (default)",
    )
    ingest.add_argument(
        "--window",
        type=_positive_int,
        default=64,
        help="unacknowledged messages per device (default: 64)",
    )
    ingest.add_argument(
        "--qos", type=int, choices=[0, 1], default=1, help="MQTT QoS of telemetry (default: 1)"
    )
    ingest.add_argument(
        "--worker-concurrency",
        type=_positive_int,
        default=os.cpu_count() or 1,
        help="pool processes of the one worker of each system (default: the number of "
        "CPUs, as Celery's own default; here %(default)s)",
    )
    ingest.add_argument(
        "--worker-pool",
        choices=["prefork", "solo", "threads"],
        default="prefork",
        help="Celery pool of both workers (default: prefork)",
    )
    ingest.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="event loop of the hub (its event_loop setting) and of the baseline server "
        "(default: auto, what `hub run` uses: uvloop where installed); the table "
        "reports the loop the hub says it runs on",
    )
    ingest.add_argument(
        "--against",
        choices=["rabbitmq-mqtt"],
        help="MQTT: measure RabbitMQ's own MQTT plugin (a private node, messages counted "
        "in a durable queue) instead of the baseline, with the ratio hub/plugin",
    )
    ingest.add_argument(
        "--paho",
        action="store_true",
        help="MQTT: paho-based simulated devices (subscribed to their command topic) "
        "instead of the lean raw-socket publishers",
    )
    ingest.add_argument(
        "--database-url",
        help="use this database (e.g. postgresql://...) instead of a fresh "
        "SQLite file; the run's rows are deleted afterwards",
    )
    ingest.add_argument(
        "--tls",
        action="store_true",
        help="measure the hub's TLS listener against its clear one in one run, TCP or "
        "MQTT (the ratio TLS/clear; no baseline)",
    )
    only = ingest.add_mutually_exclusive_group()
    only.add_argument("--no-baseline", action="store_true", help="measure the hub only")
    only.add_argument("--baseline-only", action="store_true", help="measure the baseline only")
    ingest.add_argument(
        "--baseline-no-confirms",
        action="store_true",
        help="baseline publishes without publisher confirms (not durable "
        "when acknowledged; faster)",
    )
    ingest.add_argument(
        "--batch-max-messages",
        type=_positive_int,
        help="hub setting batch_max_messages (default: the hub's)",
    )
    ingest.add_argument(
        "--batch-window-ms", type=float, help="hub setting batch_window_ms (default: the hub's)"
    )
    ingest.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="most seconds to wait for the workers to store everything "
        "after the fleet stopped (default: 300)",
    )
    ingest.add_argument(
        "--sweep",
        type=_device_counts,
        metavar="N,N,...",
        help="run once per device count (e.g. 10,50,200)",
    )
    ingest.add_argument(
        "--fleet",
        type=_device_counts,
        metavar="N,N,...",
        help="throughput against fleet size: per device count, a TCP hub run and an MQTT "
        "run against RabbitMQ's MQTT plugin (--transport and --against are ignored)",
    )
    ingest.add_argument(
        "--plot",
        metavar="PNG",
        help="with --sweep or --fleet: plot throughput against devices (needs matplotlib)",
    )
    ingest.add_argument(
        "--profile",
        metavar="FILE",
        help="sample the hub with py-spy during the run (raw collapsed stacks "
        "to FILE) and print its top functions (needs py-spy)",
    )
    ingest.add_argument(
        "--profile-worker",
        metavar="FILE",
        help="the same for the hub's worker and its pool processes",
    )
    ingest.add_argument(
        "--profile-gil",
        action="store_true",
        help="profile only the thread holding the GIL (py-spy --gil): what competes "
        "for the interpreter, rather than what runs or waits",
    )
    ingest.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    ingest.add_argument(
        "--json", action="store_true", help="stdout: only the JSON line (the table goes to stderr)"
    )
    ingest.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    add_against_parser(sub, _positive_int)

    conns = sub.add_parser(
        "connections",
        help="how many idle TCP and MQTT devices one hub holds, and at what memory",
        description="Concurrent authenticated device connections held by one hub process.",
        epilog=_CONNECTIONS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    conns.add_argument(
        "--tcp",
        type=int,
        default=2000,
        metavar="N",
        help="TCP devices (default: 2000; 0 skips TCP)",
    )
    conns.add_argument(
        "--mqtt",
        type=int,
        default=2000,
        metavar="N",
        help="MQTT devices (default: 2000; 0 skips MQTT)",
    )
    conns.add_argument(
        "--hold", type=float, default=10.0, help="seconds to hold the connected fleet (default: 10)"
    )
    conns.add_argument(
        "--connect-rate",
        type=float,
        help="new connections per second (default: as fast as possible)",
    )
    conns.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="most seconds to wait for the fleet to connect (default: 300)",
    )
    conns.add_argument(
        "--loop",
        choices=["auto", "asyncio", "uvloop"],
        default="auto",
        help="the hub's event_loop setting (default: auto, uvloop where installed)",
    )
    conns.add_argument(
        "--lean",
        action="store_true",
        help="MQTT devices are raw-socket clients that subscribe to their command topic "
        "(firmware_sim.lean_mqtt), not paho: a fleet of 10,000 costs the load generator less",
    )
    conns.add_argument(
        "--publish-probe",
        type=float,
        default=0.0,
        metavar="S",
        help="MQTT: lean QoS 1 publishers at full speed for S seconds on the idle hub "
        "and again with the fleet held (default: 0, none)",
    )
    conns.add_argument(
        "--publish-probe-devices",
        type=_positive_int,
        default=20,
        metavar="N",
        help="publishers of the publish probe (default: 20)",
    )
    conns.add_argument(
        "--restart",
        action="store_true",
        help="then stop the hub and start it again on the same ports while the fleet stays "
        "up: how long until every device is back (the reconnection storm)",
    )
    conns.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    conns.add_argument(
        "--json", action="store_true", help="stdout: only the JSON line (the table goes to stderr)"
    )
    conns.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")

    tls_conns = sub.add_parser(
        "tls-connections",
        help="memory and handshake time per TLS device connection, against clear text",
        description="N idle native TCP devices held by a clear listener, then by a TLS one "
        "(each on a fresh hub): hub memory per connection, and the handshake and "
        "connect-to-HELLO-ack times of new connections made while they are held.",
        epilog="examples:\n  python -m bench tls-connections\n"
        "  python -m bench tls-connections --devices 200 --probes 50 --hold 2\n\n"
        "See docs/benchmarks.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tls_conns.add_argument(
        "--devices", type=_positive_int, default=5000, help="devices held (default: 5000)"
    )
    tls_conns.add_argument(
        "--probes",
        type=_positive_int,
        default=200,
        help="connections timed one after another while they are held (default: 200)",
    )
    tls_conns.add_argument(
        "--hold", type=float, default=5.0, help="seconds to hold the fleet (default: 5)"
    )
    tls_conns.add_argument(
        "--connect-rate",
        type=float,
        default=300.0,
        help="new connections per second, both fleets (default: 300; 0: all at once)",
    )
    tls_conns.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        help="most seconds to wait for the fleet to connect (default: 300)",
    )
    tls_conns.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop of the hub (default: asyncio)",
    )
    tls_conns.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    tls_conns.add_argument(
        "--json", action="store_true", help="stdout: only the JSON line (the table goes to stderr)"
    )
    tls_conns.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")
    _add_table_parsers(sub)
    _add_scale_out_parser(sub)
    return parser  # fmt: skip


def _add_scale_out_parser(sub: Any) -> None:
    scale = sub.add_parser(
        "scale-out",
        help="ingest through one hub against two hubs behind HAProxy, with the ratio",
        description="Devices -> one hub, then devices -> HAProxy -> two hubs: the same\n"
        "fleet, each on a fresh RabbitMQ vhost and PostgreSQL database with one worker\n"
        "of the same options. Stored msg/s, CPU per message of the hubs, the worker and\n"
        "HAProxy, and the ratio two/one.",
        epilog=_SCALE_OUT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scale.add_argument(
        "--transport",
        type=_transports,
        default=["tcp"],
        metavar="tcp,mqtt",
        help="device transports, each measured in both configurations (default: tcp)",
    )
    scale.add_argument(
        "--devices", type=_positive_int, default=50, help="simulated devices (default: 50)"
    )
    scale.add_argument(
        "--duration", type=float, default=15.0, help="seconds the devices send (default: 15)"
    )
    scale.add_argument(
        "--window",
        type=_positive_int,
        default=64,
        help="unacknowledged messages per device (default: 64)",
    )
    scale.add_argument(
        "--worker-concurrency",
        type=_positive_int,
        default=os.cpu_count() or 1,
        help="prefork pool processes of the one worker of each configuration "
        "(default: the number of CPUs, here %(default)s)",
    )
    scale.add_argument(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="most seconds to wait for everything to be stored after the fleet stopped "
        "(default: 300)",
    )
    _common(scale)


def _scale_out(args: argparse.Namespace) -> None:
    from bench.scale_out import ScaleOutConfig, run_scale_out, scale_out_table

    if args.duration <= 0:
        raise BenchError("--duration must be > 0")
    result = run_scale_out(
        ScaleOutConfig(
            transports=args.transport,
            devices=args.devices,
            duration_s=args.duration,
            window=args.window,
            worker_concurrency=args.worker_concurrency,
            drain_timeout_s=args.drain_timeout,
            quiet=args.quiet,
        )
    )
    _emit(result, scale_out_table(result), args)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    parser.add_argument(
        "--json", action="store_true", help="stdout: only the JSON line (the table goes to stderr)"
    )
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def _add_table_parsers(sub: Any) -> None:
    workers = sub.add_parser(
        "workers",
        help="telemetry stored per second with 1, 2, 4 worker processes, and as other hosts",
        description="Worker processes on one RabbitMQ and one PostgreSQL database: stored\n"
        "msg/s in all and per worker, and a check that no envelope is stored twice\n"
        "(redelivered and retransmitted copies are published too). Needs RabbitMQ and\n"
        "PostgreSQL on 127.0.0.1. See docs/benchmarks.md.",
        epilog="examples:\n  python -m bench workers\n"
        "  python -m bench workers --counts 1,2,4 --hosts 2 --batches 400 \\\n"
        "      --plot docs/img/workers.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    workers.add_argument(
        "--counts",
        type=_device_counts,
        default=[1, 2, 4],
        metavar="N,N,...",
        help="worker processes per run (default: 1,2,4)",
    )
    workers.add_argument(
        "--hosts",
        type=int,
        default=2,
        metavar="N",
        help="workers of the 'other hosts' run, each with its own working "
        "directory, data folder and host name (default: 2; 0 skips it)",
    )
    workers.add_argument(
        "--batches",
        type=_positive_int,
        default=100,
        help="task messages of new envelopes (default: 100)",
    )
    workers.add_argument(
        "--batch-size",
        type=_positive_int,
        default=500,
        help="envelopes per task message (default: 500, the hub's batch_max_messages)",
    )
    workers.add_argument(
        "--devices",
        type=_positive_int,
        default=200,
        help="devices the envelopes come from (default: 200)",
    )
    workers.add_argument(
        "--rounds",
        type=_positive_int,
        default=1,
        help="run every configuration this many times, in turn; medians (default: 1)",
    )
    workers.add_argument("--plot", metavar="PNG", help="plot stored msg/s against workers")
    _common(workers)

    query = sub.add_parser(
        "partition-query",
        help="one device's newest rows: partitioned against unpartitioned telemetry (PostgreSQL)",
        description="Fills a partitioned (newest schema) and an unpartitioned (the schema\n"
        "before it) telemetry table with the same rows by generate_series, then times\n"
        "one device's newest --last rows on each. Needs PostgreSQL on 127.0.0.1.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    query.add_argument(
        "--rows",
        type=_positive_int,
        default=20_000_000,
        help="rows in each table (default: 20,000,000)",
    )
    query.add_argument("--devices", type=_positive_int, default=1000, help="default: 1000")
    query.add_argument(
        "--days",
        type=_positive_int,
        default=30,
        help="days the rows span, ending now (default: 30)",
    )
    query.add_argument(
        "--last", type=_positive_int, default=1000, help="rows asked (default: 1000)"
    )
    query.add_argument(
        "--repeats", type=_positive_int, default=30, help="queries per table and kind (default: 30)"
    )
    _common(query)

    cost = sub.add_parser(
        "insert-cost",
        help="insert cost per row as the table grows: random key against time key "
        "(SQLite, or --postgres)",
    )
    cost.add_argument(
        "--rows",
        type=_positive_int,
        default=2_000_000,
        help="rows inserted into each table (default: 2,000,000)",
    )
    cost.add_argument(
        "--step",
        type=_positive_int,
        default=200_000,
        help="rows per reported slice (default: 200,000)",
    )
    cost.add_argument(
        "--postgres",
        action="store_true",
        help="PostgreSQL instead: two databases of the run's own filled step by step "
        "with generate_series (the time-keyed table partitioned by day, as the hub "
        "makes it), and at each size 20,000 new rows stored as the workers store them",
    )
    _common(cost)


def _tables(args: argparse.Namespace) -> None:
    import tempfile

    if args.command == "workers":
        from bench.workers import WorkersConfig, plot_workers, run_workers, workers_table

        if args.plot:
            from bench.plot import require_matplotlib

            require_matplotlib()
        result = run_workers(
            WorkersConfig(
                counts=args.counts,
                hosts=args.hosts,
                batches=args.batches,
                batch_size=args.batch_size,
                devices=args.devices,
                rounds=args.rounds,
                quiet=args.quiet,
            )
        )
        table = workers_table(result)
        if args.plot:
            plot_workers(result, Path(args.plot))
            table += f"\n\nplot written to {args.plot}"
        _emit(result, table, args)
    elif args.command == "partition-query":
        from bench.tables import partition_query_table, run_partition_query

        result = run_partition_query(
            args.rows,
            devices=args.devices,
            days=args.days,
            last=args.last,
            repeats=args.repeats,
            quiet=args.quiet,
        )
        _emit(result, partition_query_table(result), args)
    else:
        from bench.tables import insert_cost_table, run_insert_cost, run_insert_cost_postgres

        if args.step > args.rows:
            raise BenchError("--step must not exceed --rows")
        if args.postgres:
            result = run_insert_cost_postgres(args.rows, step=args.step, quiet=args.quiet)
            _emit(result, insert_cost_table(result), args)
            return
        with tempfile.TemporaryDirectory(prefix="bench-insert-cost-") as tmp:
            result = run_insert_cost(args.rows, step=args.step, folder=Path(tmp), quiet=args.quiet)
        _emit(result, insert_cost_table(result), args)


def _emit(result: Any, table: str, args: argparse.Namespace) -> None:
    print(table, file=sys.stderr if args.json else sys.stdout, flush=True)
    line = json.dumps(result, separators=(",", ":"))
    if args.out:
        Path(args.out).write_text(line + "\n", "utf-8")
    print(line, flush=True)


def _ingest(args: argparse.Namespace) -> None:
    from bench.ingest import IngestConfig, run_ingest
    from bench.report import ingest_table, sweep_table

    if args.against and args.transport != "mqtt" and not args.fleet:
        raise BenchError("--against rabbitmq-mqtt compares MQTT ingest: add --transport mqtt")
    if args.against and (args.no_baseline or args.tls):
        raise BenchError("--against replaces the baseline: leave out --no-baseline and --tls")
    if args.plot and not (args.sweep or args.fleet):
        raise BenchError("--plot needs --sweep or --fleet (throughput against fleet size)")
    if args.plot:
        from bench.plot import require_matplotlib

        require_matplotlib()
    if (args.profile or args.profile_worker) and args.sweep:
        raise BenchError("--profile profiles one run; leave out --sweep")
    duration = args.duration if args.duration is not None or args.messages else 20.0

    def config(devices: int) -> IngestConfig:
        return IngestConfig(
            transport=args.transport,
            devices=devices,
            duration_s=duration if args.messages is None else None,
            messages=args.messages,
            rate=args.rate,
            window=args.window,
            qos=args.qos,
            worker_concurrency=args.worker_concurrency,
            worker_pool=args.worker_pool,
            loop=args.loop,
            lean=not args.paho,
            against=args.against,
            database_url=args.database_url,
            baseline=not args.no_baseline,
            systems=["baseline"] if args.baseline_only else ["hub", "baseline"],
            baseline_confirms=not args.baseline_no_confirms,
            batch_max_messages=args.batch_max_messages,
            batch_window_ms=args.batch_window_ms,
            drain_timeout_s=args.drain_timeout,
            profile_path=args.profile,
            profile_worker_path=args.profile_worker,
            profile_gil=args.profile_gil,
            quiet=args.quiet,
        )

    if args.fleet:
        _fleet(args, config(args.devices))
        return
    if args.tls:
        from bench.tls_ingest import run_tls_ingest, tls_table

        if args.sweep or args.profile or args.profile_worker:
            raise BenchError("--tls runs once: leave out --sweep and --profile")
        result = run_tls_ingest(config(args.devices))
        _emit(result, tls_table(result), args)
        return
    if not args.sweep:
        result = run_ingest(config(args.devices))
        table = ingest_table(result)
        from bench.profile import top_functions

        if args.profile:
            table += "\n\n" + top_functions(Path(args.profile), "the hub")
        if args.profile_worker:
            table += "\n\n" + top_functions(Path(args.profile_worker), "the hub's worker")
        _emit(result, table, args)
        return
    runs = []
    for devices in args.sweep:
        if not args.quiet:
            log(f"sweep: {devices} devices")
        runs.append(run_ingest(config(devices)))
    result = {"benchmark": "ingest-sweep", "transport": args.transport, "runs": runs}
    table = "\n\n".join([*(ingest_table(r) for r in runs), sweep_table(runs)])
    if args.plot:
        from bench.plot import plot_sweep

        plot_sweep(result, Path(args.plot))
        table += f"\n\nplot written to {args.plot}"
    _emit(result, table, args)


def _fleet(args: argparse.Namespace, base: Any) -> None:
    from bench.fleet_sweep import fleet_table, plot_fleet, run_fleet_sweep
    from bench.report import ingest_table

    if args.sweep or args.tls or args.profile or args.profile_worker:
        raise BenchError("--fleet makes its own runs: leave out --sweep, --tls and --profile")
    result = run_fleet_sweep(base, args.fleet)
    table = "\n\n".join([*(ingest_table(r) for r in result["runs"]), fleet_table(result)])
    if args.plot:
        plot_fleet(result, Path(args.plot))
        table += f"\n\nplot written to {args.plot}"
    _emit(result, table, args)


def _connections(args: argparse.Namespace) -> None:
    from bench.connections import ConnectionsConfig, run_connections
    from bench.report import connections_table

    if args.tcp < 0 or args.mqtt < 0 or (args.tcp == 0 and args.mqtt == 0):
        raise BenchError("give --tcp N and/or --mqtt N (>= 1)")
    result = run_connections(
        ConnectionsConfig(
            tcp=args.tcp,
            mqtt=args.mqtt,
            hold_s=args.hold,
            connect_rate=args.connect_rate,
            connect_timeout_s=args.connect_timeout,
            loop=args.loop,
            quiet=args.quiet,
            lean=args.lean,
            publish_probe_s=args.publish_probe,
            publish_probe_devices=args.publish_probe_devices,
            restart=args.restart,
        )
    )
    _emit(result, connections_table(result), args)


def _tls_connections(args: argparse.Namespace) -> None:
    from bench.tls_connections import (
        TlsConnectionsConfig,
        run_tls_connections,
        tls_connections_table,
    )

    result = run_tls_connections(
        TlsConnectionsConfig(
            devices=args.devices,
            probes=args.probes,
            hold_s=args.hold,
            connect_rate=args.connect_rate,
            connect_timeout_s=args.connect_timeout,
            loop=args.loop,
            quiet=args.quiet,
        )
    )
    _emit(result, tls_connections_table(result), args)


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """`against ... -- INGEST_OPTIONS`: argparse cannot take options after a positional
    and `--` for a subcommand, so the options for `bench ingest` are split off here."""
    if argv[:1] == ["against"] and "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    own, passthrough = _split_passthrough(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(own)
    try:
        with terminate_as_interrupt():
            if args.command == "ingest":
                _ingest(args)
            elif args.command in ("workers", "partition-query", "insert-cost"):
                _tables(args)
            elif args.command == "against":
                from bench.against import against_command

                against_command(args, passthrough, _emit, build_parser)
            elif args.command == "tls-connections":
                _tls_connections(args)
            elif args.command == "scale-out":
                _scale_out(args)
            else:
                _connections(args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything started was stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
