"""The one command-line convention of every hra-diffusion tool: argparse types and a guard.

Every option declares what it accepts through a type of this module (a count, a
probability, an image side within :data:`MAX_IMAGE_SIDE`, an existing file, an output
folder, a non-blank prompt...), so bad values are refused at parse time, before any
model loads; path types return the text given (JSON-friendly), once checked. Each CLI
parses with :class:`ArgumentParser` and wraps its ``main`` in :func:`cli_main`, which
turns the expected failures of real use into one line:

- bad input: ``<prog>: error: <problem and fix>``, exit status 2 (argparse's form);
- a failure at run time (out of memory, a full disk): one line, exit status 1.

Unexpected exceptions keep their traceback.
"""

from __future__ import annotations

import argparse
import errno
import functools
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from hra_diffusion.errors import InputError, Refused

MAX_IMAGE_SIDE = 2048
"""Largest image side (pixels) the CLIs accept: beyond it one SD/SDXL step at batch 1 does
not fit a 24 GiB machine."""

MAX_SEED = 2**32 - 1
"""Largest seed numpy's and torch's generators both accept."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, refusing bad input in one line (no usage block) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Raise :class:`Refused` with ``<prog>: error: <message>``; :func:`cli_main` prints it."""
        raise Refused(f"{self.prog}: error: {message} (see --help)", 2)


# ----------------------------------------------------------------------------- numbers


def _number(text: str, kind: type) -> float:
    """``text`` as a finite ``kind`` (int or float), or an ArgumentTypeError."""
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"must be {noun}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    """Counts (batch sizes, steps, images): integers >= 1.

    Example:
        >>> positive_int("4")
        4
    """
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """Integers >= 0 (warmup steps, worker processes, timesteps)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def seed(text: str) -> int:
    """Random seeds: integers in [0, :data:`MAX_SEED`]."""
    value = _number(text, int)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a seed in [0, {MAX_SEED}], got {text}")
    return value


def positive_float(text: str) -> float:
    """Finite numbers > 0 (learning rates, epsilons, gammas)."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """Finite numbers >= 0 (weights, offsets, guidance scales, weight decay)."""
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """Numbers in [0, 1] (proportions, shares)."""
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def open_unit(text: str) -> float:
    """Numbers strictly between 0 and 1 (decays, Adam's betas)."""
    value = _number(text, float)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text}")
    return value


def below_one(text: str) -> float:
    """Numbers in [0, 1): moment decays of Adam-like optimisers, shares that cannot be all."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text}")
    return value


def between(low: float, high: float, unit: str = "") -> Callable[[str], float]:
    """A type for finite numbers in [``low``, ``high``]; ``bounds`` holds the two."""

    def number_between(text: str) -> float:
        value = _number(text, float)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low:g}, {high:g}]{unit}, got {text}")
        return value

    number_between.bounds = (low, high)
    return number_between


def image_side(text: str) -> int:
    """Image sides in pixels: a multiple of 8 (the VAE's factor) in [8, :data:`MAX_IMAGE_SIDE`].

    Example:
        >>> image_side("60")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: 60 is not a multiple of 8 (the VAE downsamples 8x); use 56 or 64
    """
    value = _number(text, int)
    if value > MAX_IMAGE_SIDE:
        raise argparse.ArgumentTypeError(
            f"{text} pixels is over the limit of {MAX_IMAGE_SIDE} (what a 24 GiB machine holds); "
            f"use at most {MAX_IMAGE_SIDE}"
        )
    if value < 8 or value % 8:
        lower, upper = max(value // 8 * 8, 8), max(value // 8 * 8 + 8, 16)
        raise argparse.ArgumentTypeError(
            f"{text} is not a multiple of 8 (the VAE downsamples 8x); use {lower} or {upper}"
        )
    return value


def str_to_bool(text: str) -> bool:
    """true/false, yes/no, 1/0 (any case)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text!r}")


# ----------------------------------------------------------------------------- text


def text(value: str) -> str:
    """Names and prompts: refuses an empty or whitespace-only value."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"must not be empty or blank, got {value!r}")
    return value


# ----------------------------------------------------------------------------- paths


def existing_file(value: str) -> str:
    """An input file that must exist now."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; give a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{value} does not exist; give an existing file")
    return value


def existing_dir(value: str) -> str:
    """An input folder that must exist now."""
    path = Path(value).expanduser()
    if path.is_file():
        raise argparse.ArgumentTypeError(f"{value} is a file; give a folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} does not exist; give an existing folder")
    return value


def existing_path(value: str) -> str:
    """An input that may be a file or a folder (weights or their run folder)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist; give an existing file or folder")
    return value


def _under_a_file(path: Path) -> Path | None:
    """The first existing non-folder among ``path``'s parents, or None."""
    return next((p for p in path.parents if p.exists() and not p.is_dir()), None)


def output_file(value: str) -> str:
    """A file to write: not an existing folder, and no parent of it may be a file.

    Whether an existing file may be replaced is the CLI's ``--overwrite`` question.
    """
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; name the file to write")
    blocker = _under_a_file(path)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{blocker} is a file, not a folder; choose another path")
    return value


def output_path(value: str) -> str:
    """A file or folder to write (the CLI says which): no parent of it may be a file."""
    blocker = _under_a_file(Path(value).expanduser())
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{blocker} is a file, not a folder; choose another path")
    return value


def output_dir(value: str) -> str:
    """A folder to write into (created if missing): not an existing file, nor under one."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file; give a folder to write into")
    blocker = _under_a_file(path)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{blocker} is a file, not a folder; choose another path")
    return value


def model_ref(value: str) -> str:
    """A diffusers pipeline: a local folder holding model_index.json, or a hub id."""
    from hra_diffusion.checks import check_model_path

    try:
        check_model_path(value, "")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).lstrip()) from None
    return value


def model_or_checkpoint(value: str) -> str:
    """A :func:`model_ref`, or a single-file SD 1.x/XL ``.safetensors`` checkpoint (used
    with ``--base_config``, see :mod:`hra_diffusion.single_file`)."""
    from hra_diffusion.single_file import checkpoint_family, is_checkpoint_file

    if not is_checkpoint_file(value):
        return model_ref(value)
    try:
        checkpoint_family(Path(value).expanduser())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def pipeline_dir(value: str) -> str:
    """A local diffusers pipeline folder (with model_index.json), not a hub id."""
    existing_dir(value)
    return model_ref(value)


def component_ref(value: str) -> str:
    """One model component (a VAE, an image model): a local path that exists, or a hub id."""
    from hra_diffusion.checks import looks_like_path

    if looks_like_path(value) and not Path(value).expanduser().exists():
        raise argparse.ArgumentTypeError(
            f"{value} does not exist; give the model's local folder or a hub id"
        )
    return text(value)


def checkpoint_ref(value: str) -> str:
    """``latest`` or an existing checkpoint folder."""
    if value == "latest":
        return value
    path = Path(value).expanduser()
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{value} is not a checkpoint folder; give checkpoint-<step> of a run, or latest"
        )
    return value


# ----------------------------------------------------------------------------- the guard

T = TypeVar("T")


def prog_name() -> str:
    """The program name argparse uses by default: the basename of ``sys.argv[0]``."""
    return os.path.basename(sys.argv[0]) or "hra-diffusion"


def close_progress_bars() -> None:
    """End the open tqdm bars (each with its newline), so the error line starts a line."""
    from tqdm.std import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def refuse(message: str, status: int) -> NoReturn:
    """Print ``<prog>: error: <message>`` on stderr and stop with ``status``."""
    close_progress_bars()
    line = " ".join(message.split())  # one line, whatever the message held
    if ": error: " not in line:
        line = f"{prog_name()}: error: {line.removeprefix('error: ')}"
    print(line, file=sys.stderr)
    raise Refused(line, status, printed=True)


def out_of_memory(error: BaseException) -> bool:
    """True for an allocation that failed (GPU or CPU)."""
    import torch

    return isinstance(error, MemoryError | torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


def run_failure(error: BaseException, sizes: str) -> str | None:
    """The one line for an expected failure at run time (out of memory, a full disk), or None."""
    if out_of_memory(error):
        return f"out of memory: lower {sizes}, or use a machine with more memory."
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full writing {error.filename or 'the output'}; free space and rerun."
    return None


def cli_main(
    sizes: str = "--resolution and --train_batch_size (or add --gradient_checkpointing)",
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a CLI's ``main(argv)``: bad input exits 2 and a run-time failure exits 1,
    each with one line on stderr; ``sizes`` names the options that lower memory use.
    ``main.console`` is the console-script entry point (``[project.scripts]``).

    Example:
        >>> @cli_main("--height, --width and --num_images")
        ... def main(argv=None): ...
    """

    def decorate(main: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(main)
        def guarded(argv: list[str] | None = None) -> T:
            try:
                return main(argv)
            except Refused as refusal:
                if refusal.printed:
                    raise
                refuse(refusal.message, refusal.code)
            except (InputError, FileNotFoundError) as error:
                refuse(str(error), 2)
            except (MemoryError, RuntimeError, OSError) as error:
                line = run_failure(error, sizes)
                if line is None:
                    raise
                refuse(line, 1)

        def console() -> int:
            """The console-script entry point: run on ``sys.argv``, exit status 0."""
            guarded(None)
            return 0

        guarded.console = console
        return guarded

    return decorate
