"""Read a world scene back from its pixels: background colour, object colour and shape.

Because :mod:`hra_diffusion.world` knows how scenes are drawn, a generated image can be
scored without any learned model:

1. **background**: the median colour of the 3-pixel frame (objects never reach it),
   named by the nearest of :data:`~hra_diffusion.world.COLORS` in RGB;
2. **object**: the largest 4-connected region of pixels farther than
   :data:`OBJECT_DISTANCE` from that median; its colour is the median of its pixels;
3. **shape**: the world shape whose silhouette, drawn in the region's bounding box,
   overlaps the region best (intersection over union).

It also measures how close images are in colour (:func:`histogram_distance` of
:func:`color_histogram`, the share of pixels nearest to each named colour), over the
whole image or over the object region only (:func:`object_mask`), which is how the
DreamBooth benchmark measures whether a subject was learned.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from hra_diffusion import world
from hra_diffusion.world import subjects

FRAME = 3
"""Width in pixels of the border read as background."""

OBJECT_DISTANCE = 60.0
"""RGB distance from the background colour above which a pixel belongs to an object."""

MIN_OBJECT_PIXELS = 20
"""Smaller regions are noise, not an object."""

PALETTE = np.array(list(world.COLORS.values()), dtype=np.float32)  # (6, 3)
PALETTE_NAMES = list(world.COLORS)


@dataclass(frozen=True)
class Reading:
    """What the scorer reads from an image; ``None`` where no object was found."""

    background: str
    color: str | None
    shape: str | None
    shape_iou: float

    def matches(self, scene: world.Scene) -> dict[str, bool]:
        """Per attribute, whether the reading agrees with the scene that was asked for."""
        return {
            "background": self.background == scene.background,
            "color": self.color == scene.color,
            "shape": self.shape == scene.shape,
        }


def nearest_color(rgb: np.ndarray) -> str:
    """Name of the world colour nearest to ``rgb`` (3,) in RGB distance."""
    return PALETTE_NAMES[int(np.argmin(np.linalg.norm(PALETTE - rgb, axis=1)))]


def to_array(image: Image.Image) -> np.ndarray:
    """An image as (H, W, 3) float32 RGB in [0, 255]."""
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def background_rgb(pixels: np.ndarray) -> np.ndarray:
    """Median colour (3,) of the :data:`FRAME`-pixel border of (H, W, 3) pixels."""
    frame = np.ones(pixels.shape[:2], dtype=bool)
    frame[FRAME:-FRAME, FRAME:-FRAME] = False
    return np.median(pixels[frame], axis=0)


def object_mask(image: Image.Image) -> np.ndarray:
    """(H, W) bool mask of the largest region that differs from the background."""
    pixels = to_array(image)
    far = np.linalg.norm(pixels - background_rgb(pixels), axis=2) > OBJECT_DISTANCE  # (H, W)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(far.astype(np.uint8), 4)
    if count < 2:
        return np.zeros_like(far)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    mask = labels == largest
    return mask if mask.sum() >= MIN_OBJECT_PIXELS else np.zeros_like(far)


def best_shape(mask: np.ndarray) -> tuple[str, float]:
    """The world shape that, fitted to the mask's bounding box, overlaps it best, and its IoU."""
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    best, best_iou = world.SHAPES[0], -1.0
    for shape in world.SHAPES:
        template = _fitted_silhouette(shape, x0, x1, y0, y1, mask.shape[0]) >= 0.5
        iou = (template & mask).sum() / max((template | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, float(iou)
    return best, best_iou


@functools.cache
def _unit_silhouette(shape: str) -> Image.Image:
    """A world shape drawn large and cropped to its bounding box, as an 8-bit coverage image."""
    size = 128
    unit = world.shape_mask(shape, 0.5 * size, 0.5 * size, 0.4 * size, size=size)  # (S, S)
    ys, xs = np.nonzero(unit >= 0.5)
    crop = unit[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return Image.fromarray((crop * 255).astype(np.uint8))


def _fitted_silhouette(shape: str, x0: int, x1: int, y0: int, y1: int, size: int) -> np.ndarray:
    """Coverage of ``shape`` drawn to fill the box [x0, x1) × [y0, y1) (its aspect stretched)."""
    fitted = _unit_silhouette(shape).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    out = np.zeros((size, size), dtype=np.float32)
    out[y0:y1, x0:x1] = np.asarray(fitted) / 255.0
    return out


def read_scene(image: Image.Image) -> Reading:
    """Background colour, object colour and shape of a 64 px world image."""
    pixels = to_array(image)
    background = nearest_color(background_rgb(pixels))
    mask = object_mask(image)
    if not mask.any():
        return Reading(background=background, color=None, shape=None, shape_iou=0.0)
    color = nearest_color(np.median(pixels[mask], axis=0))
    shape, iou = best_shape(mask)
    return Reading(background=background, color=color, shape=shape, shape_iou=iou)


def attribute_accuracy(readings: list[Reading], scenes: list[world.Scene]) -> dict[str, float]:
    """Share of images whose background, colour and shape (and all three) match their scene."""
    if len(readings) != len(scenes) or not scenes:
        raise ValueError("Need one reading per scene, and at least one of each.")
    matches = [r.matches(s) for r, s in zip(readings, scenes, strict=True)]
    result = {k: float(np.mean([m[k] for m in matches])) for k in ("background", "color", "shape")}
    result["all"] = float(np.mean([all(m.values()) for m in matches]))
    return result


# --------------------------------------------------------------------------- colour closeness

NAMED_COLORS: dict[str, tuple[int, int, int]] = {**world.COLORS, **subjects.INK}
"""The cells of :func:`color_histogram`: the world's six colours and the subjects' seven."""

_NAMED_RGB = np.array(list(NAMED_COLORS.values()), dtype=np.float32)  # (13, 3)


def color_histogram(image: Image.Image, mask: np.ndarray | None = None) -> np.ndarray:
    """Share of pixels (where ``mask`` is True) nearest to each of :data:`NAMED_COLORS`.

    Naming each pixel by its nearest colour, rather than binning RGB, keeps a slightly
    shifted or blurred orange orange, so the distance measures *which* colours are drawn.
    """
    pixels = to_array(image).reshape(-1, 3)  # (H·W, 3)
    if mask is not None:
        pixels = pixels[mask.reshape(-1)]
    distance = np.linalg.norm(pixels[:, None, :] - _NAMED_RGB[None], axis=2)  # (N, 13)
    hist = np.bincount(distance.argmin(axis=1), minlength=len(NAMED_COLORS)).astype(np.float64)
    return hist / max(hist.sum(), 1.0)


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Total-variation distance ½ Σ |a − b| of two normalised histograms: 0 same, 1 disjoint."""
    return float(0.5 * np.abs(a - b).sum())


def mean_histogram(images: list[Image.Image], objects_only: bool = False) -> np.ndarray:
    """Average colour histogram of images, over whole images or their object regions only.

    An image whose object region is empty adds nothing to an ``objects_only`` average
    (and if all are empty, the result is all zeros, at distance 1 from any histogram).
    """
    hists = []
    for image in images:
        mask = object_mask(image) if objects_only else None
        if mask is None or mask.any():
            hists.append(color_histogram(image, mask))
    return np.mean(hists, axis=0) if hists else np.zeros(len(NAMED_COLORS))
