"""The hub's pure core: what every other package builds on.

Layer: core, the lowest. Here live the `Envelope`, the settings, the sans-IO
protocol codecs (`hub.protocol`), the MQTT topic scheme, the routing table
(task names and queue names, as data), the device registry, the storage schema
and its queries, and the errors. It imports no other project package and no
I/O library: no asyncio, no sockets, no Celery, kombu, amqtt or paho (an
import-linter contract in pyproject.toml checks this for every module here).
The code that wires the core to the network lives in `bridges` and the
composition root `hubapp`.
"""

__version__ = "0.1.0"
