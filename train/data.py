"""Image folders, aspect-ratio buckets, loss masks and the DreamBooth dataset.

Reusable pieces: :func:`scan_image_folder` checks a folder of training images
(skipping non-images with a warning, failing on files that do not decode);
:func:`load_training_image` resizes, crops and flips one image deterministically
from a seed, so resumed runs see the same pixels. With aspect-ratio buckets
(:func:`check_bucket_args`, :class:`BucketSet`, :class:`BucketSampler`) every image
trains at the bucket nearest to its aspect ratio and every batch holds one bucket;
loss masks come from the images' alpha channel or a mask folder
(:func:`check_masks`, :func:`load_mask`).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

from hra_diffusion.checks import IMAGE_SUFFIXES, image_error
from hra_diffusion.errors import fail
from hra_diffusion.train.checkpoints import SeededEpochSampler, mix_seed, step_generator

ORIENTATION_TAG = 0x0112
"""EXIF orientation; values 5-8 swap width and height."""

Size = tuple[int, int]
"""(width, height) in pixels."""


def scan_image_folder(
    folder: str | os.PathLike, option: str, companion_suffixes: Sequence[str] = ()
) -> list[Path]:
    """The decodable images directly inside ``folder``, sorted by name.

    Non-image files (by suffix) are skipped, with a warning unless their suffix is one of
    ``companion_suffixes`` (caption files, say); image files that fail
    to decode, a missing folder and a folder without images are errors naming
    ``option`` (the command-line flag that gave the folder).
    """
    path = Path(folder)
    if not path.is_dir():
        fail(f"{option} {path} does not exist or is not a folder; pass a folder of images.")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    expected = {*IMAGE_SUFFIXES, *(suffix.lower() for suffix in companion_suffixes)}
    skipped = [p.name for p in files if p.suffix.lower() not in expected]
    if skipped:
        warnings.warn(
            f"{option} {path}: skipping {len(skipped)} non-image file(s): {', '.join(skipped)} "
            f"(image suffixes: {' '.join(IMAGE_SUFFIXES)}).",
            stacklevel=2,
        )
    if not images:
        fail(
            f"{option} {path} contains no images ({' '.join(IMAGE_SUFFIXES)}); "
            "put the training pictures in it."
        )
    broken = [p.name for p in images if image_error(p) is not None]
    if broken:
        fail(
            f"{option} {path}: {len(broken)} image file(s) cannot be decoded: "
            f"{', '.join(broken)}. Re-export or remove them."
        )
    return images


def image_size(path: str | os.PathLike | BinaryIO) -> Size:
    """(width, height) from the file header, after EXIF rotation; fails on unreadable files."""
    try:
        with Image.open(path) as opened:
            w, h = opened.size
            rotated = opened.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
    except (OSError, ValueError) as error:
        fail(f"{path} cannot be read as an image ({error}); re-export or remove it.")
    return (h, w) if rotated else (w, h)


def open_image(path: Path) -> Image.Image:
    """The image at ``path``, EXIF-rotated and fully read (its file is closed); a file that
    does not decode stops the run with :func:`fail` naming it."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        fail(f"{path} cannot be decoded as an image ({error}); re-export or remove it.")
    return image


Geometry = tuple[Size, tuple[int, int, int, int], bool]
"""How an image becomes a training picture: resize to (w, h), crop box, horizontal flip."""


def crop_geometry(
    image: Image.Image,
    size: int | Size,
    rng: random.Random,
    center_crop: bool,
    random_flip: bool,
) -> Geometry:
    """Resize to cover ``size`` (width, height; an int is a square) keeping the aspect ratio,
    then crop to ``size`` (centre, or a position drawn from ``rng``) and flip with
    probability 0.5 when ``random_flip`` (drawn from ``rng`` after the crop position)."""
    width, height = (size, size) if isinstance(size, int) else size
    w, h = image.size
    scale = max(width / w, height / h)
    resized = (max(width, round(w * scale)), max(height, round(h * scale)))
    if center_crop:
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    else:
        left, top = rng.randint(0, resized[0] - width), rng.randint(0, resized[1] - height)
    flip = random_flip and rng.random() < 0.5
    return resized, (left, top, left + width, top + height), flip


def apply_geometry(
    image: Image.Image, geometry: Geometry, resample: Image.Resampling
) -> Image.Image:
    """Resize, crop and flip ``image`` as :func:`crop_geometry` decided."""
    size, box, flip = geometry
    image = image.resize(size, resample).crop(box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image


def time_ids(original: Size, geometry: Geometry) -> torch.Tensor:
    """SDXL's micro-conditioning of a training picture: (orig h, orig w, top, left, h, w).

    The crop's top-left corner is measured in the resized (and, when flipped, mirrored)
    image, as diffusers' SDXL scripts do.
    """
    (resized_w, _), (left, top, right, bottom), flip = geometry
    corner_left = resized_w - right if flip else left
    return torch.tensor([original[1], original[0], top, corner_left, bottom - top, right - left])


def _pixels(image: Image.Image) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3)
    return pixels.permute(2, 0, 1).contiguous()  # (3, H, W) in [-1, 1]


def _weights(mask: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]  # (1, H, W)


def load_training_image(
    path: Path, size: int | Size, center_crop: bool, random_flip: bool, seed: int
) -> torch.Tensor:
    """One image as a (3, height, width) tensor in [-1, 1] (``size`` as in :func:`crop_geometry`).

    Resized (bilinear), cropped and flipped by :func:`crop_geometry` with a
    ``random.Random(seed)``.
    """
    return load_training_example(path, size, center_crop, random_flip, seed)["pixels"]


def load_training_example(
    path: Path,
    size: int | Size,
    center_crop: bool,
    random_flip: bool,
    seed: int,
    mask: Path | None = None,
    alpha_mask: bool = False,
) -> dict[str, torch.Tensor]:
    """``{"pixels": (3, h, w) in [-1, 1], "time_ids": (6,)[, "mask": (1, h, w) in [0, 1]]}``.

    Like :func:`load_training_image`; with ``mask`` (a mask file, or the image itself
    with ``alpha_mask``) the mask gets the same resize, crop and flip (see :func:`load_mask`).
    """
    opened = open_image(path)
    image = opened.convert("RGB")
    geometry = crop_geometry(image, size, random.Random(seed), center_crop, random_flip)
    pixels = _pixels(apply_geometry(image, geometry, Image.Resampling.BILINEAR))
    example = {"pixels": pixels, "time_ids": time_ids(image.size, geometry)}
    if mask is not None:
        weights = load_mask(opened if alpha_mask else open_image(mask), alpha_mask)
        example["mask"] = _weights(apply_geometry(weights, geometry, Image.Resampling.BILINEAR))
    return example


# --------------------------------------------------------------------------- buckets


@dataclass(frozen=True)
class BucketSet:
    """The training sizes (width, height); without buckets a single square."""

    sizes: tuple[Size, ...]

    def nearest(self, size: Size) -> Size:
        """The bucket nearest to ``size``'s aspect ratio (in log ratio; ties: larger area)."""
        ratio = math.log(size[0] / size[1])
        return min(self.sizes, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def make_buckets(resolution: int, min_side: int, max_side: int, step: int) -> tuple[Size, ...]:
    """Every (w, h) with sides multiples of ``step`` in [min_side, max_side] that, for its
    width, is the tallest with ``w·h <= resolution²`` (kohya's rule), plus the transposes."""
    area = resolution * resolution
    sizes = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height >= min_side:
            sizes |= {(width, height), (height, width)}
    return tuple(sorted(sizes))


def check_bucket_args(args: argparse.Namespace) -> BucketSet:
    """The buckets of ``--aspect_ratio_buckets`` (one square without it); fails on bad bounds.

    Fills in the defaults of ``--bucket_reso_steps`` (64; 8 below 256 px),
    ``--min_bucket_reso`` (half the resolution, rounded up to a step) and
    ``--max_bucket_reso`` (twice the resolution, rounded down), so the model card shows them.
    """
    resolution = args.resolution
    if not args.aspect_ratio_buckets:
        return BucketSet(((resolution, resolution),))
    step = args.bucket_reso_steps or (64 if resolution >= 256 else 8)
    if step % 8:
        fail(
            f"--bucket_reso_steps {step} is not a multiple of 8 (the VAE downsamples 8x); "
            f"use {max(8, step // 8 * 8)} or {step // 8 * 8 + 8}."
        )
    min_side = args.min_bucket_reso or math.ceil(resolution / 2 / step) * step
    max_side = args.max_bucket_reso or max(step, 2 * resolution // step * step)
    for flag, value in (("--min_bucket_reso", min_side), ("--max_bucket_reso", max_side)):
        if value % step:
            fail(
                f"{flag} {value} is not a multiple of --bucket_reso_steps {step}; use "
                f"{max(step, value // step * step)} or {value // step * step + step}."
            )
    sizes = make_buckets(resolution, min_side, max_side, step) if min_side <= max_side else ()
    if not sizes:
        fail(
            f"no bucket of at most {resolution}x{resolution} pixels has both sides in "
            f"[--min_bucket_reso {min_side}, --max_bucket_reso {max_side}]; use a "
            f"--min_bucket_reso of at most {resolution // step * step} and a --max_bucket_reso "
            "at least as large."
        )
    args.bucket_reso_steps, args.min_bucket_reso, args.max_bucket_reso = step, min_side, max_side
    return BucketSet(sizes)


class BucketSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` such that each run of ``batch_size`` items is one bucket.

    Per epoch, fixed by ``(seed, epoch)``: the items of every bucket are shuffled and cut
    into batches, a bucket's last batch is filled up with items of the same bucket (so every
    batch is full and accelerate shards batches without mixing buckets), and the batches
    are shuffled. Sample seeds are drawn per position, so a repeated item gets its own crop
    and flip. Use it as ``DataLoader(..., batch_size=batch_size, sampler=...)``; like
    :class:`~hra_diffusion.train.checkpoints.SeededEpochSampler` it has :meth:`set_epoch`.
    """

    def __init__(self, item_buckets: Sequence[Size], batch_size: int, seed: int) -> None:
        self.groups: dict[Size, list[int]] = defaultdict(list)
        for index, bucket in enumerate(item_buckets):
            self.groups[bucket].append(index)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.num_batches = sum(math.ceil(len(g) / batch_size) for g in self.groups.values())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and sample seeds are produced next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self):
        generator = step_generator(self.seed, self.epoch)
        batches = []
        for bucket in sorted(self.groups):
            items = self.groups[bucket]
            order = [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
            filled = math.ceil(len(order) / self.batch_size) * self.batch_size
            order = [order[i % len(order)] for i in range(filled)]
            batches += [order[i : i + self.batch_size] for i in range(0, filled, self.batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        flat = [index for b in shuffled for index in batches[b]]
        for position, index in enumerate(flat):
            yield index, mix_seed(self.seed, self.epoch, position)


def epoch_sampler(
    item_buckets: Sequence[Size], batch_size: int, seed: int, bucketed: bool
) -> torch.utils.data.Sampler:
    """A :class:`BucketSampler` with ``--aspect_ratio_buckets``, else a SeededEpochSampler."""
    if bucketed:
        return BucketSampler(item_buckets, batch_size, seed)
    return SeededEpochSampler(len(item_buckets), seed)


# --------------------------------------------------------------------------- masks


def load_mask(image: Image.Image, alpha_mask: bool) -> Image.Image:
    """The loss weight of an image as a mode-``L`` picture (255 = full weight).

    With ``alpha_mask`` it is the image's alpha channel (no alpha: full weight
    everywhere); otherwise ``image`` is the mask itself, as grey levels.
    """
    if not alpha_mask:
        return image.convert("L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return Image.new("L", image.size, 255)


def find_masks(images: list[Path], mask_dir: Path) -> list[Path]:
    """The mask of each image: the file in ``mask_dir`` with the image's stem; fails if any
    is missing (listing them)."""
    if not mask_dir.is_dir():
        fail(f"--mask_data_dir {mask_dir} does not exist or is not a folder.")
    by_stem: dict[str, Path] = {}
    for path in sorted(mask_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            by_stem.setdefault(path.stem, path)
    missing = [p.name for p in images if p.stem not in by_stem]
    if missing:
        fail(
            f"--mask_data_dir {mask_dir} has no mask for {len(missing)} image(s): "
            f"{', '.join(missing)}. Add <name>.png masks (white = train, black = ignore)."
        )
    return [by_stem[p.stem] for p in images]


def check_masks(
    images: list[Path], masked_loss: bool, alpha_mask: bool, mask_data_dir: str | None
) -> list[Path] | None:
    """The file each image's mask is read from (the image itself with ``alpha_mask``), or
    ``None`` without ``masked_loss``. Fails on a missing mask, a mask of another size than
    its image, and an image whose mask is zero everywhere (naming them)."""
    if not masked_loss:
        if alpha_mask or mask_data_dir:
            flag = "--alpha_mask" if alpha_mask else "--mask_data_dir"
            fail(f"{flag} chooses the masks of --masked_loss; add --masked_loss.")
        return None
    if alpha_mask == bool(mask_data_dir):
        fail(
            "--masked_loss needs one mask source: --alpha_mask (the images' alpha channel) "
            "or --mask_data_dir DIR (a mask per image, same file name)."
        )
    masks = images if alpha_mask else find_masks(images, Path(mask_data_dir))
    for image, mask in zip(images, masks, strict=True):
        if not alpha_mask and image_size(mask) != image_size(image):
            (mw, mh), (iw, ih) = image_size(mask), image_size(image)
            fail(
                f"mask {mask} is {mw}x{mh} but its image {image.name} is {iw}x{ih}; a mask "
                "must have its image's size."
            )
        if load_mask(open_image(mask), alpha_mask).getextrema()[1] == 0:
            what = "is fully transparent" if alpha_mask else f"has an all-black mask {mask}"
            fail(f"{image} {what}: nothing of it would train. Fix the mask or remove the image.")
    return masks


def read_captions(images: list[Path], caption_extension: str | None, fallback: str) -> list[str]:
    """The prompt of each image: the text of its caption file (``dog1.png`` ->
    ``dog1.txt`` for ``caption_extension=".txt"``, kohya's convention) or, without
    ``caption_extension``, ``fallback`` for every image. Fails on a missing or empty
    caption file, naming it."""
    if caption_extension is None:
        return [fallback] * len(images)
    if not caption_extension.startswith("."):
        fail(f"--caption_extension {caption_extension!r} must start with a dot, e.g. .txt.")
    captions = []
    for image in images:
        path = image.with_suffix(caption_extension)
        if not path.is_file():
            fail(
                f"{image.name} has no caption file {path}; write one (one line naming the "
                'identifier, e.g. "a photo of qwe dog on a beach") or drop --caption_extension.'
            )
        text = " ".join(path.read_text(encoding="utf-8").split())
        if not text:
            fail(f"caption file {path} is empty; write the image's prompt in it.")
        captions.append(text)
    return captions


# --------------------------------------------------------------------------- DreamBooth


def class_bucket_quota(instance_buckets: Sequence[Size], num_class_images: int) -> dict[Size, int]:
    """How many class images each bucket needs: class image k follows instance image
    k mod n, and every bucket of the instance images gets at least one."""
    n = len(instance_buckets)
    quota = Counter(instance_buckets[k % n] for k in range(num_class_images))
    for bucket in instance_buckets:
        quota[bucket] = max(quota[bucket], 1)
    return dict(sorted(quota.items()))


def select_class_images(
    class_images: list[Path], buckets: BucketSet, quota: dict[Size, int]
) -> tuple[list[Path], dict[Size, int]]:
    """The class images to train on (per bucket, the first by name, up to its quota) and
    how many each bucket still lacks (to be generated at that size)."""
    by_bucket: dict[Size, list[Path]] = defaultdict(list)
    for path in class_images:
        by_bucket[buckets.nearest(image_size(path))].append(path)
    selected, missing = [], {}
    for bucket, count in quota.items():
        have = by_bucket[bucket][:count]
        selected += have
        if len(have) < count:
            missing[bucket] = count - len(have)
    return selected, missing


def pair_by_bucket(
    instance_buckets: Sequence[Size], class_buckets: Sequence[Size] | None
) -> list[tuple[int, int | None, Size]]:
    """Dataset items ``(instance index, class index or None, bucket)``.

    Per bucket, ``max(#instance, #class)`` items, both lists wrapping around; with one
    bucket this is item i = (instance i mod n, class i mod m).
    """
    items = []
    for bucket in sorted(set(instance_buckets)):
        instances = [i for i, b in enumerate(instance_buckets) if b == bucket]
        classes = [j for j, b in enumerate(class_buckets or []) if b == bucket]
        if class_buckets is not None and not classes:
            raise ValueError(f"no class image for bucket {bucket[0]}x{bucket[1]}")
        for k in range(max(len(instances), len(classes))):
            items.append(
                (
                    instances[k % len(instances)],
                    classes[k % len(classes)] if classes else None,
                    bucket,
                )
            )
    return items


class DreamBoothDataset(torch.utils.data.Dataset):
    """Instance images (and, with prior preservation, class images) with their prompt ids.

    ``instance_prompt_ids`` holds one row of ids per instance image, (N, 77).

    Indexed by ``(index, sample_seed)`` pairs from
    :class:`~hra_diffusion.train.checkpoints.SeededEpochSampler` or :class:`BucketSampler`
    (whose buckets are :attr:`item_buckets`). Every image trains at the bucket of
    ``buckets`` nearest to its aspect ratio (the default: one ``resolution`` square); an
    item pairs an instance and a class image of one bucket, and the shorter list of a
    bucket wraps around. ``masks`` are the files :func:`check_masks` returned.
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
        buckets: BucketSet | None = None,
        masks: list[Path] | None = None,
        alpha_mask: bool = False,
    ) -> None:
        self.instance_images = instance_images
        self.instance_prompt_ids = instance_prompt_ids
        self.class_images = class_images or []
        self.class_prompt_ids = class_prompt_ids
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.masks = masks
        self.alpha_mask = alpha_mask
        buckets = buckets or BucketSet(((resolution, resolution),))
        instance_buckets = [buckets.nearest(image_size(p)) for p in instance_images]
        class_buckets = [buckets.nearest(image_size(p)) for p in self.class_images]
        self.items = pair_by_bucket(instance_buckets, class_buckets if class_images else None)
        self.item_buckets = [bucket for _, _, bucket in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        instance, class_index, bucket = self.items[index]
        mask = None if self.masks is None else self.masks[instance]
        loaded = load_training_example(
            self.instance_images[instance],
            bucket,
            self.center_crop,
            self.random_flip,
            seed,
            mask,
            self.alpha_mask,
        )
        example = {
            "instance_pixels": loaded["pixels"],
            "instance_time_ids": loaded["time_ids"],
            "instance_prompt_ids": self.instance_prompt_ids[instance],
        }
        if mask is not None:
            example["instance_mask"] = loaded["mask"]
        if class_index is not None:
            path = self.class_images[class_index]
            loaded = load_training_example(
                path, bucket, self.center_crop, self.random_flip, seed + 1
            )
            example["class_pixels"] = loaded["pixels"]
            example["class_time_ids"] = loaded["time_ids"]
            example["class_prompt_ids"] = self.class_prompt_ids
        return example


def collate_dreambooth(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch; with class images they follow the instance images (loss splits in half).

    ``pixel_values`` (B or 2B, 3, h, w), ``input_ids`` (B or 2B, 77), ``time_ids``
    (B or 2B, 6: SDXL's micro-conditioning) and, with masks, ``masks`` (B, 1, h, w) of the
    instance images.
    """
    keys = ["instance"] + (["class"] if "class_pixels" in examples[0] else [])
    batch = {
        name: torch.stack([e[f"{kind}_{field}"] for kind in keys for e in examples])
        for name, field in (
            ("pixel_values", "pixels"),
            ("input_ids", "prompt_ids"),
            ("time_ids", "time_ids"),
        )
    }
    if "instance_mask" in examples[0]:
        batch["masks"] = torch.stack([e["instance_mask"] for e in examples])
    return batch
