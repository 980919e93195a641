"""`hub run` as the benchmark starts it: the product's own command, with a choice of event loop.

Layer: benchmarks; may import anything.

`python -m bench.hub_process [--loop asyncio|uvloop] run ...` sets the event
loop policy and then runs `hubapp.cli` unchanged with the remaining arguments.
With `--loop asyncio` (the default) it is exactly `hub run`.
"""

from __future__ import annotations

import asyncio
import sys


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    loop = "asyncio"
    if args[:1] == ["--loop"] and len(args) >= 2:
        loop, args = args[1], args[2:]
    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif loop != "asyncio":
        raise SystemExit(f"unknown loop {loop!r}: asyncio or uvloop")

    from hubapp.cli import main as hub_main

    hub_main(args, prog_name="hub")


if __name__ == "__main__":
    main()
