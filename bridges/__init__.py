"""Adapters between one transport and envelopes.

Layer: bridges. May import the `hub` core and `localqueue`; never `tasks`,
`firmware_sim`, `console` or the composition root (`hubapp`).
"""

# The dispatcher, the downlink and `hub status` reach the embedded default's
# local queue by its `localqueue://` URL, which this import registers.
import localqueue  # noqa: F401
