"""`hub run` as the benchmark starts it: the product's own command, with a choice of event loop.

Layer: benchmarks; may import anything.

`python -m bench.hub_process [--loop auto|asyncio|uvloop] run ...` sets the
hub's own `event_loop` setting (`HUB_EVENT_LOOP`) and then runs `hubapp.cli`
unchanged with the remaining arguments, so the hub chooses its loop exactly
as `hub run` does (`auto`: uvloop where installed). The loop it really runs
on is in its startup lines (`loop`) and in `/status` (`event_loop`); the
benchmark reports that, not what it asked for.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    loop = "auto"
    if args[:1] == ["--loop"] and len(args) >= 2:
        loop, args = args[1], args[2:]
    if loop not in ("auto", "asyncio", "uvloop"):
        raise SystemExit(f"unknown loop {loop!r}: auto, asyncio or uvloop")
    os.environ["HUB_EVENT_LOOP"] = loop

    from hubapp.cli import main as hub_main

    hub_main(args, prog_name="hub")


if __name__ == "__main__":
    main()
