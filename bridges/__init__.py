"""Adapters between one transport and envelopes.

Layer: bridges. May import the `hub` core; never `tasks`, `firmware_sim`, or
the composition root (`hub.app`, `hub.cli`).
"""
