"""Canny-edge agreement between a generated image and its control edge map.

With G = edge pixels of the generated image and T = edge pixels of the control map:

    IoU = |G ∩ T| / |G ∪ T|
    F1  = 2 |G ∩ T| / (|G| + |T|)      (= 2 precision recall / (precision + recall))

Scores are computed per image and averaged over images.  An image pair with no edge pixel
in either map has 0/0: both scores are NaN there and the averages skip it (reported count).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def canny_edges(image: Image.Image, low: int = 100, high: int = 200) -> np.ndarray:
    """Boolean edge map (H, W) of ``image``: cv2.Canny on its 8-bit grayscale version."""
    gray = np.asarray(image.convert("L"), dtype=np.uint8)  # (H, W)
    return cv2.Canny(gray, low, high) > 0


def binary_edges(image: Image.Image) -> np.ndarray:
    """Boolean edge map (H, W) of an edge image (white edges on black): grayscale > 127."""
    return np.asarray(image.convert("L"), dtype=np.uint8) > 127


def edge_iou_f1(generated: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """IoU and F1 of two boolean edge maps of the same shape (NaN, NaN when both are empty)."""
    if generated.shape != target.shape:
        raise ValueError(f"edge maps differ in shape: {generated.shape} vs {target.shape}")
    g = generated.astype(bool)
    t = target.astype(bool)
    intersection = float(np.logical_and(g, t).sum())
    union = float(np.logical_or(g, t).sum())
    total = float(g.sum() + t.sum())
    if union == 0:
        return float("nan"), float("nan")
    return intersection / union, 2.0 * intersection / total
