"""Image folders and the DreamBooth dataset.

Reusable pieces: :func:`scan_image_folder` checks a folder of training images
(skipping non-images with a warning, failing on files that do not decode) and
:func:`load_training_image` resizes, crops and flips one image deterministically
from a seed, so resumed runs see the same pixels.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from hra_diffusion.train.common import fail

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File suffixes treated as images (case-insensitive)."""


def _decodes(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.convert("RGB").load()
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    return True


def scan_image_folder(folder: str | os.PathLike, option: str) -> list[Path]:
    """The decodable images directly inside ``folder``, sorted by name.

    Non-image files (by suffix) are skipped with a warning; image files that fail
    to decode, a missing folder and a folder without images are errors naming
    ``option`` (the command-line flag that gave the folder).
    """
    path = Path(folder)
    if not path.is_dir():
        fail(f"{option} {path} does not exist or is not a folder; pass a folder of images.")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    skipped = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    if skipped:
        warnings.warn(
            f"{option} {path}: skipping {len(skipped)} non-image file(s): {', '.join(skipped)} "
            f"(image suffixes: {' '.join(IMAGE_EXTENSIONS)}).",
            stacklevel=2,
        )
    if not images:
        fail(
            f"{option} {path} contains no images ({' '.join(IMAGE_EXTENSIONS)}); "
            "put the training pictures in it."
        )
    broken = [p.name for p in images if not _decodes(p)]
    if broken:
        fail(
            f"{option} {path}: {len(broken)} image file(s) cannot be decoded: "
            f"{', '.join(broken)}. Re-export or remove them."
        )
    return images


Geometry = tuple[tuple[int, int], tuple[int, int, int, int], bool]
"""How an image becomes a training square: resize to (w, h), crop box, horizontal flip."""


def crop_geometry(
    image: Image.Image, resolution: int, rng: random.Random, center_crop: bool, random_flip: bool
) -> Geometry:
    """Resize the short side to ``resolution``, then crop a square (centre, or a position
    drawn from ``rng``) and flip with probability 0.5 when ``random_flip`` (drawn from
    ``rng`` after the crop position)."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    flip = random_flip and rng.random() < 0.5
    return size, (left, top, left + resolution, top + resolution), flip


def apply_geometry(
    image: Image.Image, geometry: Geometry, resample: Image.Resampling
) -> Image.Image:
    """Resize, crop and flip ``image`` as :func:`crop_geometry` decided."""
    size, box, flip = geometry
    image = image.resize(size, resample).crop(box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def load_training_image(
    path: Path, resolution: int, center_crop: bool, random_flip: bool, seed: int
) -> torch.Tensor:
    """One image as a (3, resolution, resolution) tensor in [-1, 1].

    Resized (bilinear), cropped and flipped by :func:`crop_geometry` with a
    ``random.Random(seed)``.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened).convert("RGB")
    geometry = crop_geometry(image, resolution, random.Random(seed), center_crop, random_flip)
    image = apply_geometry(image, geometry, Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return pixels.permute(2, 0, 1).contiguous()  # (3, H, W)


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (and, with prior preservation, class images) with their prompt ids.

    Indexed by ``(index, sample_seed)`` pairs from
    :class:`~hra_diffusion.train.common.SeededEpochSampler`. Its length is the
    larger of the two image counts; the shorter list wraps around.
    """

    def __init__(
        self,
        instance_images: list[Path],
        instance_prompt_ids: torch.Tensor,
        resolution: int,
        center_crop: bool,
        random_flip: bool,
        class_images: list[Path] | None = None,
        class_prompt_ids: torch.Tensor | None = None,
    ) -> None:
        self.instance_images = instance_images
        self.instance_prompt_ids = instance_prompt_ids
        self.class_images = class_images or []
        self.class_prompt_ids = class_prompt_ids
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    def __len__(self) -> int:
        return max(len(self.instance_images), len(self.class_images))

    def _load(self, path: Path, seed: int) -> torch.Tensor:
        return load_training_image(path, self.resolution, self.center_crop, self.random_flip, seed)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        example = {
            "instance_pixels": self._load(
                self.instance_images[index % len(self.instance_images)], seed
            ),
            "instance_prompt_ids": self.instance_prompt_ids,
        }
        if self.class_images:
            path = self.class_images[index % len(self.class_images)]
            example["class_pixels"] = self._load(path, seed + 1)
            example["class_prompt_ids"] = self.class_prompt_ids
        return example


def collate_dreambooth(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch; with class images they follow the instance images (loss splits in half)."""
    pixels = [e["instance_pixels"] for e in examples]
    ids = [e["instance_prompt_ids"] for e in examples]
    if "class_pixels" in examples[0]:
        pixels += [e["class_pixels"] for e in examples]
        ids += [e["class_prompt_ids"] for e in examples]
    return {"pixel_values": torch.stack(pixels), "input_ids": torch.stack(ids)}
