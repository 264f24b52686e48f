"""The one exception type the evaluation code raises for bad input or missing models.

It is an :class:`~hra_diffusion.errors.InputError`: the command-line drivers' guard
(:func:`hra_diffusion.cli.cli_main`) prints its message in one line (no traceback) and
exits 2, so every message says what is wrong, which file or folder, and which flag fixes it.
"""

from hra_diffusion.errors import InputError


class EvaluationError(InputError):
    """Bad input (empty folder, undecodable image, count mismatch) or unavailable model."""
