"""The composition root: the `hub` command, `hub run`, `hub console` and `hub demo`.

Layer: composition root, above every other package. It wires the pure `hub`
core, the transports in `bridges`, the Celery side in `tasks`, the `console`
and the simulator in `firmware_sim` into running processes, so it may import
all of them; no other package may import it.

- `hubapp.app`: `HubApp`, one hub process (dispatcher, listeners, MQTT side,
  status endpoint); `hubapp.serve`: `hub run` until a stop signal;
  `hubapp.worker_child`: the in-hub worker child.
- `hubapp.cli` (with `cli_common`, `cli_devices`, `cli_accounts`,
  `cli_dead_letters`): the `hub` command.
- `hubapp.console_child`: the console as a child process of the demo.
- `hubapp.demo`: `hub demo`, its orchestration and its view.
"""
