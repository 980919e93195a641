"""The embedded default's durable local queue: a kombu transport over SQLite.

Layer: localqueue, below `bridges` and `tasks`, beside the `hub` core; imports
kombu, psutil and the standard library, no other project package.

It is a package of its own because both sides of the queue need it: the
dispatcher (`bridges`) publishes into it and the worker (`tasks`) consumes from
it, `tasks` may not import `bridges`, and the pure core may not import kombu.
Importing it registers the `localqueue://` URL scheme with kombu, so every
process that imports `bridges` or `tasks` can use the URL that
`Settings.effective_broker_url` builds for the embedded default.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from localqueue.transport import SCHEME, path_of, url_for

TRANSPORT_ALIASES.setdefault(SCHEME, "localqueue.transport:Transport")

__all__ = ["SCHEME", "path_of", "url_for"]
