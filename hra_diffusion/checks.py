"""Input checks shared by every command-line tool, so that each refuses bad input alike.

Each check raises ``ValueError`` (or, as an argparse ``type``,
``argparse.ArgumentTypeError``) with one line that names the problem and the fix; the
CLIs print that line without a traceback.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File suffixes (lower case) read as images by the training data and the evaluators."""


def image_error(path: str | os.PathLike) -> str | None:
    """Why ``path`` does not decode as an image (fully, not just its header), or None."""
    try:
        with Image.open(path) as image:
            image.convert("RGB").load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__
    return None


def positive_int(text: str) -> int:
    """argparse ``type`` for counts (batch sizes, steps, images): integers >= 1.

    Example:
        >>> positive_int("4")
        4
    """
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def check_multiple_of_8(value: int | None, flag: str) -> None:
    """Refuse an image side that is not a positive multiple of 8 (the VAE's factor).

    ``None`` (the model's own size) passes.

    Example:
        >>> check_multiple_of_8(60, "--height")
        Traceback (most recent call last):
        ValueError: --height 60 is not a multiple of 8 (the VAE downsamples 8x); use 56 or 64.
    """
    if value is None or (value >= 8 and value % 8 == 0):
        return
    lower = max(value // 8 * 8, 8)
    upper = max(value // 8 * 8 + 8, 16)
    raise ValueError(
        f"{flag} {value} is not a multiple of 8 (the VAE downsamples 8x); use {lower} or {upper}."
    )


def check_no_finished_run(out: str | os.PathLike, marker: str) -> None:
    """Refuse an output folder that holds ``marker``, the file a finished run writes last,
    so that nothing finished is overwritten unless the user asks (``--overwrite``).

    Example:
        >>> check_no_finished_run("a-folder-that-does-not-exist", "generation.json")
    """
    if (Path(out) / marker).exists():
        raise ValueError(
            f"--out {out} holds a finished run ({marker}); pass --overwrite to replace its "
            "images, or choose another --out."
        )


def looks_like_path(name: str) -> bool:
    """True for names that cannot be a hub id ("owner/name"): ./x, /x, ~/x, a/b/c."""
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    )


def check_model_path(name_or_path: str, flag: str = "--model") -> None:
    """Refuse a local model path that does not exist, and a folder without model_index.json.

    Hub ids (``owner/name``) pass: whether the hub has them is for the loader to say. A
    missing ``/x`` gives ``--model /x does not exist: give a diffusers folder (with
    model_index.json) or a hub id.``
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"{flag} {name_or_path} is a folder but not a diffusers pipeline (no "
                "model_index.json): give the folder that pipe.save_pretrained() wrote, or a hub id."
            )
        return
    if path.exists():
        raise ValueError(
            f"{flag} {name_or_path} is a file: give a diffusers folder (with model_index.json) "
            "or a hub id."
        )
    if looks_like_path(name_or_path):
        raise ValueError(
            f"{flag} {name_or_path} does not exist: give a diffusers folder (with "
            "model_index.json) or a hub id."
        )


def warn_truncated_prompts(tokenizer, prompts: Iterable[str], what: str = "prompt") -> int:
    """Warn once when prompts exceed the tokenizer's length; returns the most tokens dropped.

    CLIP tokenizers keep ``model_max_length`` (77) tokens, start and end included, and
    silently drop the rest.
    """
    limit = tokenizer.model_max_length
    special = tokenizer.num_special_tokens_to_add()
    dropped = [len(tokenizer.tokenize(prompt)) + special - limit for prompt in set(prompts)]
    long = [n for n in dropped if n > 0]
    if long:
        warnings.warn(
            f"{len(long)} {what}(s) longer than the tokenizer's {limit} tokens: {max(long)} "
            f"tokens are dropped from the end of the longest; shorten them to keep every word.",
            UserWarning,
            stacklevel=2,
        )
    return max(long, default=0)
