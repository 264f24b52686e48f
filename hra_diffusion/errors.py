"""How the command lines stop on input they cannot use."""

from __future__ import annotations

from typing import NoReturn


def fail(message: str) -> NoReturn:
    """Stop with ``error: <message>`` on stderr and exit status 1.

    Messages should name the problem and the fix, e.g.
    ``fail("--resolution 100 is not a multiple of 8; use 96 or 104.")``.
    """
    raise SystemExit(f"error: {message}")
