"""Coverage instrumentation of the modules a target imports, when atheris is there.

Layer: tooling (see `fuzz/__init__.py`).

Outside `fuzz.run` (the runner's own process, a test run) the targets import
as ordinary modules, so that pytest replays the seeds and the kept corpus
through the same harness without atheris.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

#: Set by `fuzz.run` before it imports a target; a test run leaves code as it is.
ENABLED = False


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    if not ENABLED:
        yield
        return
    import atheris

    with atheris.instrument_imports(include=["hub", "bridges"]):
        yield
