"""How the library and its command lines stop on input they cannot use.

:class:`InputError` is bad input the user can fix (its message names the problem and the
fix); :class:`Refused` is a command line stopping with one line and an exit status, which
:func:`hra_diffusion.cli.cli_main` prints.
"""

from __future__ import annotations

from typing import NoReturn


class InputError(ValueError):
    """Bad input (a file, folder or value the user gave): one line naming problem and fix."""


class Refused(SystemExit):
    """A CLI stopping on bad input (status 2) or a failure at run time (status 1).

    ``str()`` is the line shown to the user, so ``pytest.raises(SystemExit, match=...)``
    matches it; ``printed`` says whether it is already on stderr.
    """

    def __init__(self, message: str, status: int = 2, printed: bool = False) -> None:
        super().__init__(status)
        self.message = message
        self.printed = printed

    def __str__(self) -> str:
        return self.message


def fail(message: str) -> NoReturn:
    """Refuse bad input: ``<prog>: error: <message>``, exit status 2, no traceback.

    Messages name the problem and the fix, e.g.
    ``fail("--resolution 100 is not a multiple of 8; use 96 or 104.")``.
    """
    raise Refused(f"error: {message}", 2)
