"""`tasks.handlers.transaction()` exists only inside a handler run."""

from __future__ import annotations

import pytest

from tasks.handlers import transaction


def test_the_run_transaction_outside_a_run_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="only available inside a handler run"):
        transaction()
