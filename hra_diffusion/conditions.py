"""Control conditions: Canny edges, ADE20K segmentation maps, and resizing that keeps them exact.

Every condition handed to the condition encoder is an RGB image (3 channels, values in
0..255, scaled to [0, 1] by the pipeline):

- ``"canny"``: white edges on black, ``cv2.Canny`` of the photo's 8-bit grayscale with
  thresholds (low, high), by default (100, 200), the thresholds the paper evaluates with.
- ``"segmentation"``: an ADE20K colour map. A label map (one class id per pixel, a
  single-channel image) is drawn with the 150-class palette of :mod:`hra_diffusion.ade20k`;
  an RGB image is taken as a colour map already.
- ``"precomputed"``: any RGB condition image, used as it is.

Label and colour maps are resized nearest-neighbour, so no pixel takes a class or
colour that was not there before.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from hra_diffusion.ade20k import ADE20K_NUM_CLASSES, ADE20K_PALETTE, UNLABELLED_COLOR

CONDITION_TYPES: tuple[str, ...] = ("canny", "segmentation", "precomputed")
"""The condition types the training script and the sampling CLI accept."""

LABEL_MAP_MODES: tuple[str, ...] = ("L", "P", "I", "I;16")
"""PIL modes read as label maps (one integer class id per pixel)."""

ADE20K_COLORS = np.array((UNLABELLED_COLOR, *ADE20K_PALETTE), dtype=np.uint8)  # (151, 3)
"""Colour of label id k (0 = unlabelled, black) at row k."""


def check_condition_type(condition_type: str) -> str:
    """Return ``condition_type`` if it is one of :data:`CONDITION_TYPES`, else raise."""
    if condition_type not in CONDITION_TYPES:
        raise ValueError(
            f"Unknown condition type {condition_type!r}; choose one of {list(CONDITION_TYPES)}."
        )
    return condition_type


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """RGB edge map (white edges on black) of ``image``: cv2.Canny on its 8-bit grayscale.

    Pixels whose gradient exceeds ``high`` start edges; connected pixels above ``low``
    extend them. The grayscale conversion matches the edge metrics of the evaluation.
    """
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds need 0 <= low <= high, got low={low}, high={high}.")
    gray = np.asarray(image.convert("L"), dtype=np.uint8)  # (H, W)
    edges = cv2.Canny(gray, low, high)  # (H, W), 0 or 255
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))  # (H, W, 3)


def is_label_map(image: Image.Image) -> bool:
    """True for single-channel images (modes in :data:`LABEL_MAP_MODES`), read as class ids."""
    return image.mode in LABEL_MAP_MODES


def label_to_color(labels: np.ndarray | Image.Image) -> Image.Image:
    """Draw an ADE20K label map (H, W) of ids 0..150 with the palette: an RGB colour map.

    Raises:
        ValueError: an id outside 0..150 (for example 255, the "ignore" value of maps whose
            ids were already shifted to 0..149; shift them back by adding 1).
    """
    ids = np.asarray(labels).astype(np.int64)  # (H, W)
    if ids.ndim != 2:
        raise ValueError(f"A label map has one channel (H, W); got an array of shape {ids.shape}.")
    bad = ids[(ids < 0) | (ids > ADE20K_NUM_CLASSES)]
    if bad.size:
        raise ValueError(
            f"Label map holds class ids {sorted(set(bad.tolist()))[:10]} outside "
            f"0..{ADE20K_NUM_CLASSES}. ADE20K label maps store 0 for 'other' and 1..150 for "
            "the classes; maps with ids 0..149 and 255 for 'ignore' must be shifted by +1 "
            "(255 -> 0) first."
        )
    return Image.fromarray(ADE20K_COLORS[ids])  # (H, W, 3)


def color_to_label(image: Image.Image, strict: bool = True) -> np.ndarray:
    """Read an ADE20K colour map back into a label map (H, W) of uint8 ids 0..150.

    With ``strict=True`` every colour must be a palette colour (or black); otherwise each
    pixel takes the nearest palette colour (for colour maps blurred by JPEG or resizing).
    The colour (140, 140, 140) is shared by "road" and "skyscraper" and reads as road (7).
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    colors, inverse = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)  # (K, 3), (HW,)
    diff = colors[:, None, :].astype(np.int64) - ADE20K_COLORS[None].astype(np.int64)
    dist = (diff**2).sum(axis=2)  # (K, 151)
    ids = dist.argmin(axis=1)  # (K,): first match, so the shared grey reads as road
    unknown = colors[dist.min(axis=1) > 0]
    if strict and unknown.size:
        raise ValueError(
            f"{len(unknown)} colours are not ADE20K palette colours, e.g. "
            f"{[tuple(int(v) for v in c) for c in unknown[:3]]}. Pass strict=False to map each "
            "pixel to the nearest palette colour."
        )
    return ids[inverse.reshape(-1)].reshape(rgb.shape[:2]).astype(np.uint8)  # (H, W)


def resize_condition(image: Image.Image, size: tuple[int, int], nearest: bool) -> Image.Image:
    """Resize to ``size`` = (width, height): nearest-neighbour for label and colour maps
    (``nearest=True``, no new classes or colours), bicubic otherwise."""
    if image.size == tuple(size):
        return image
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return image.resize(tuple(size), resample=resample)


def make_condition(
    condition_type: str,
    image: Image.Image | None = None,
    condition: Image.Image | None = None,
    low: int = 100,
    high: int = 200,
) -> Image.Image:
    """The RGB control image for one example.

    ``"canny"`` computes edges from the photo ``image``; ``"segmentation"`` draws a label
    map ``condition`` with the ADE20K palette (an RGB ``condition`` is kept as the colour
    map it is); ``"precomputed"`` converts ``condition`` to RGB.
    """
    check_condition_type(condition_type)
    if condition_type == "canny":
        if image is None:
            raise ValueError("Canny conditions are computed from the photo: pass image=.")
        return canny_edges(image, low, high)
    if condition is None:
        raise ValueError(f"A {condition_type!r} condition needs the condition image: condition=.")
    if condition_type == "segmentation" and is_label_map(condition):
        return label_to_color(np.asarray(condition))
    return condition.convert("RGB")
