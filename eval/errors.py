"""The one exception type the evaluation code raises for bad input or missing models.

The command-line drivers catch it and print its message (no traceback), so every message
says what is wrong, which file or folder is concerned, and which flag fixes it.
"""


class EvaluationError(RuntimeError):
    """Bad input (empty folder, undecodable image, count mismatch) or unavailable model."""
