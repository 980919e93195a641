"""Simulated device fleets for load tests, benchmarks and demos of the hub.

Layer: firmware simulator; imports the hub core only (codecs, topics,
registry, settings, storage), never bridges, tasks or the composition root.

What lives here, from the bottom up (each module imports only those above it
in this list, never one below):

- `summary`: the fleet's counters (`FleetStats`), its `FleetSummary` and
  progress reports; `pacing`: `RatePacer`, `Backoff`, `ConnectLimiter`;
  `faults`: ready byte-level faults (`SplitRandomly`, `FlipByte`,
  `DropEvery`, `DelayWrites`) and `parse_fault`; `commands`: the commands a
  device answers; `provision`: registering devices in the hub's database.
- `options`: `FleetOptions`, the frozen options of a fleet run.
- `outbox`: the fault seam every device write passes through when a fault is
  given.
- `device`: `SimulatedDevice`, the life cycle shared by the transports.
- `tcp_device.TcpDevice` and `mqtt_device.MqttDevice`.
- `fleet`: `run_fleet(options)` with its table of transports `TRANSPORTS`,
  and `run_devices` for an already built (mixed) fleet.
- `cli`: the `firmware-sim` command.
"""
