"""Checks of files, folders and prompts shared by the library and every command-line tool.

Each check raises :class:`~hra_diffusion.errors.InputError` (a ``ValueError``) with one
line that names the problem and the fix; the argparse types of :mod:`hra_diffusion.cli`
call them at parse time, and the CLIs print that line without a traceback.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from PIL import Image

from hra_diffusion.errors import InputError

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


PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")
"""How torch.save files start: a zip archive (torch >= 1.6) or a raw pickle."""


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a readable safetensors file (reads its header only), or None.

    Example:
        >>> safetensors_problem("out/hra_weights.safetensors")  # doctest: +SKIP
        'is truncated or corrupt (not a complete safetensors file)'
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            return None
    except SafetensorError:
        pass
    with open(path, "rb") as file:  # not safetensors: say what it is instead
        start = file.read(4)
    if start.startswith(PICKLE_MAGIC):
        return "is a pickle (torch.save), not safetensors: unpickling can run code"
    return "is truncated or corrupt (not a complete safetensors file)"


def pipeline_problem(folder: Path) -> str | None:
    """The first unreadable file of a diffusers pipeline folder (a config that is not JSON,
    a truncated or pickled safetensors file), as ``<file> <problem>``, or None."""
    for config in sorted(folder.glob("*/config.json")) + [folder / "model_index.json"]:
        try:
            json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return f"{config.relative_to(folder)} is not JSON (truncated or corrupt)"
    for weights in sorted(folder.glob("*/*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            return f"{weights.relative_to(folder)} {problem}"
    return None


def check_no_finished_run(out: str | os.PathLike, marker: str) -> None:
    """Refuse an output folder that holds ``marker``, the file a finished run writes last,
    so that nothing finished is overwritten unless the user asks (``--overwrite``).

    Example:
        >>> check_no_finished_run("a-folder-that-does-not-exist", "generation.json")
    """
    if (Path(out) / marker).exists():
        raise InputError(
            f"--out {out} holds a finished run ({marker}); pass --overwrite to replace its "
            "images, or choose another --out."
        )


def looks_like_path(name: str) -> bool:
    """True for names that cannot be a hub id ("owner/name"): ./x, /x, ~/x, a/b/c."""
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    )


def check_model_path(name_or_path: str, flag: str = "--model") -> None:
    """Refuse a local model path that does not exist, a folder without model_index.json, and
    one with an unreadable file (:func:`pipeline_problem`).

    Hub ids (``owner/name``) pass: whether the hub has them is for the loader to say. A
    missing ``/x`` gives ``--model /x does not exist: give a diffusers folder (with
    model_index.json) or a hub id.``
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InputError(
                f"{flag} {name_or_path} has no model_index.json: give a diffusers pipeline "
                "folder (what save_pretrained wrote) or a hub id."
            )
        problem = pipeline_problem(path)
        if problem:
            raise InputError(f"{flag} {name_or_path}: {problem}; save or download it again.")
        return
    if path.exists():
        raise InputError(
            f"{flag} {name_or_path} is a file: give a diffusers folder (with model_index.json) "
            "or a hub id."
        )
    if looks_like_path(name_or_path):
        raise InputError(
            f"{flag} {name_or_path} does not exist: give a diffusers folder (with "
            "model_index.json) or a hub id."
        )


def warn_truncated_prompts(tokenizer, prompts: Iterable[str], what: str = "prompt") -> int:
    """Warn once when prompts exceed the tokenizer's length, naming the words the longest
    loses; returns the most tokens dropped.

    CLIP tokenizers keep ``model_max_length`` (77) tokens, start and end included, and
    silently drop the rest.
    """
    limit = tokenizer.model_max_length
    keep = limit - tokenizer.num_special_tokens_to_add()
    tokens = {prompt: tokenizer.tokenize(prompt) for prompt in set(prompts)}
    long = [prompt for prompt, found in tokens.items() if len(found) > keep]
    if not long:
        return 0
    longest = max(long, key=lambda prompt: len(tokens[prompt]))
    dropped = len(tokens[longest]) - keep
    text = tokenizer.decode(tokenizer.convert_tokens_to_ids(tokens[longest][keep:])).strip()
    shown = text if len(text) <= 60 else text[:57] + "..."
    warnings.warn(
        f"{len(long)} {what}(s) longer than the tokenizer's {limit} tokens: {dropped} tokens "
        f'are dropped from the end of the longest ("{shown}"); shorten it to keep every word.',
        UserWarning,
        stacklevel=2,
    )
    return dropped
