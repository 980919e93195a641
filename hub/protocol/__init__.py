"""Sans-IO device protocol codecs and the events they produce.

Layer: core. No sockets, no asyncio: bytes in, events out; events in, bytes out.
The TCP bridge moves bytes, the firmware simulator uses the same codecs in the
device role.

Modules, each importing only those above it in this list:
- `events`: the events, `Role`, `NakReason`, and `NEED_DATA` (of type `NeedData`),
  which `next_event()` returns when it needs more bytes;
- `rules`: what both built-in codecs share (the handshake state machine,
  limits, JSON, command bodies, NAK codes);
- `buffer`: `ReceiveBuffer`, the bounded receive side both codecs inherit;
- `base`: the `Codec` and `CodecFactory` interface;
- `native`, `lines`: the two built-in codecs;
- `discovery`: codecs by name (`load_codec`, `available_codecs`), built-in or
  registered under the `hub.codecs` entry point group.
"""

from hub.protocol.events import NEED_DATA, NeedData

__all__ = ["NEED_DATA", "NeedData"]
