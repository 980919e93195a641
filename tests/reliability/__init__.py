"""The reliability suite: faults injected into real processes, and the books kept (see harness)."""
