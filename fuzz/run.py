"""One fuzz target under atheris, in a process of its own (libFuzzer exits when done).

Layer: tooling (see `fuzz/__init__.py`). Started by `python -m fuzz`:
`python -m fuzz.run TARGET [libFuzzer options] [corpus folders]`.
"""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    import atheris

    import fuzz.instrument

    fuzz.instrument.ENABLED = True
    target = importlib.import_module(f"fuzz.{sys.argv[1]}")
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
