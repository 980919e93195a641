"""Benchmarks of the hub against a hand-written baseline, measured in one run.

Layer: benchmarks; may import anything.

`python -m bench ingest` measures end-to-end ingest (devices to stored rows)
of the hub and of the baseline a user would write by hand; `python -m bench
connections` measures how many idle device connections the hub holds and what
each costs. docs/benchmarks.md describes the method and the latest figures.
"""
