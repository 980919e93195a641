"""The console's routers, one per resource (API under /api, pages at the root).

Layer: console.
"""
