"""Codecs by name: the built-in ones and those registered by other packages.

Layer: core; imports `hub.errors` and `hub.protocol` (the interface and the
built-in codecs). Nothing in `hub.protocol` imports this module, so the codecs
never depend on how they are found.

Codecs are registered under the `hub.codecs` entry point group, so a
third-party package can add a protocol without touching the hub
(docs/protocol.md, "Writing a codec").
"""

from __future__ import annotations

from importlib.metadata import entry_points

from hub.errors import ConfigError
from hub.protocol.base import CodecFactory

__all__ = ["available_codecs", "load_codec"]


def available_codecs() -> dict[str, CodecFactory]:
    """Every codec registered under the `hub.codecs` entry point group, by name."""
    found: dict[str, CodecFactory] = {}
    for ep in entry_points(group="hub.codecs"):
        found[ep.name] = ep.load()
    # The built-in codecs work from a source checkout that was never installed, too.
    if "native" not in found:
        from hub.protocol.native import NativeCodec

        found["native"] = NativeCodec
    if "lines" not in found:
        from hub.protocol.lines import LinesCodec

        found["lines"] = LinesCodec
    return found


def load_codec(name: str) -> CodecFactory:
    """The codec factory registered as `name`; a clear ConfigError otherwise."""
    codecs = available_codecs()
    try:
        return codecs[name]
    except KeyError:
        raise ConfigError(
            f"unknown codec {name!r}; available: {', '.join(sorted(codecs))}",
            key="tcp.listeners.codec",
        ) from None
