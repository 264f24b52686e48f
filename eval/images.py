"""Listing and decoding image files, with errors that name every bad file.

Images are opened one batch at a time (never the whole set) so that thousands of files can
be scored with constant memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from hra_diffusion.checks import IMAGE_SUFFIXES, image_error
from hra_diffusion.eval.errors import EvaluationError


def list_images(folder: str | Path, what: str = "image") -> list[Path]:
    """Sorted image files (by suffix, case-insensitive) directly inside ``folder``.

    Raises EvaluationError if the folder is missing or holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EvaluationError(
            f"{what} folder {folder} is empty: expected files ending in {', '.join(IMAGE_SUFFIXES)}"
        )
    return files


def check_decodable(paths: Iterable[Path]) -> None:
    """Decode every file and raise one EvaluationError listing all that fail."""
    bad = [f"{path} ({error})" for path in paths if (error := image_error(path)) is not None]
    if bad:
        raise EvaluationError(
            f"{len(bad)} image(s) could not be decoded: {'; '.join(bad)}; re-export or remove them."
        )


def open_image(path: Path, mode: str = "RGB") -> Image.Image:
    """Decode ``path`` fully and convert it to ``mode``; a decode failure names the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode else image.copy()
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise EvaluationError(f"image could not be decoded: {path}: {error}") from error


def batched(items: Sequence, batch_size: int) -> Iterator[Sequence]:
    """Consecutive slices of ``items`` of at most ``batch_size`` elements."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]
