"""Sans-IO device protocol codecs and the events they produce.

Layer: core. No sockets, no asyncio: bytes in, events out; events in, bytes out.
The TCP bridge moves bytes, the firmware simulator uses the same codecs in the
device role.
"""
