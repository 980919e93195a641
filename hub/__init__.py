"""The hub's core package.

Layer: core. Modules here are pure (no sockets, no asyncio servers, no Celery
calls) and import no other project package; only the composition root
(`hub.cli`, `hub.app`) may import `bridges`.
"""

__version__ = "0.1.0"
