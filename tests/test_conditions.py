"""Condition tools: Canny edges, ADE20K label ↔ colour maps, resizing that keeps labels exact."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hra_diffusion.ade20k import ADE20K_CLASSES, ADE20K_PALETTE
from hra_diffusion.conditions import (
    canny_edges,
    check_condition_type,
    color_to_label,
    label_to_color,
    make_condition,
    resize_condition,
)


def square_photo(size: int = 32) -> Image.Image:
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[8:24, 8:24] = 255
    return Image.fromarray(pixels)


def test_palette_has_150_classes() -> None:
    assert len(ADE20K_PALETTE) == len(ADE20K_CLASSES) == 150
    assert ADE20K_CLASSES[0] == "wall" and ADE20K_PALETTE[0] == (120, 120, 120)


def test_canny_finds_the_square_outline() -> None:
    edges = np.asarray(canny_edges(square_photo()))  # (32, 32, 3)
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[8:24, 8:24].any() and not edges[:5].any() and not edges[14:18, 14:18].any()
    assert (edges[..., 0] == edges[..., 2]).all()


def test_canny_rejects_bad_thresholds() -> None:
    with pytest.raises(ValueError, match="low <= high"):
        canny_edges(square_photo(), 200, 100)


def test_label_color_round_trip() -> None:
    ids = np.arange(151, dtype=np.uint8).reshape(1, 151).repeat(2, axis=0)  # (2, 151)
    colour = label_to_color(ids)
    assert colour.mode == "RGB" and np.asarray(colour)[0, 0].tolist() == [0, 0, 0]
    assert np.asarray(colour)[0, 1].tolist() == [120, 120, 120]
    back = color_to_label(colour).astype(int)
    expected = ids.astype(int)
    expected[expected == 49] = 7  # "skyscraper" shares road's grey
    np.testing.assert_array_equal(back, expected)


def test_label_map_out_of_range_is_refused() -> None:
    ids = np.full((4, 4), 255, np.uint8)
    with pytest.raises(ValueError, match=r"class ids \[255\] outside 0..150"):
        label_to_color(ids)


def test_color_to_label_strict_and_nearest() -> None:
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (121, 119, 120)  # near "wall"
    with pytest.raises(ValueError, match="not ADE20K palette colours"):
        color_to_label(Image.fromarray(colour))
    assert color_to_label(Image.fromarray(colour), strict=False)[0, 0] == 1


def test_resize_keeps_labels_nearest() -> None:
    ids = np.zeros((8, 8), np.uint8)
    ids[:, 4:] = 150
    labels = resize_condition(Image.fromarray(ids), (13, 13), nearest=True)
    assert set(np.unique(np.asarray(labels))) == {0, 150}
    blurred = resize_condition(Image.fromarray(ids), (13, 13), nearest=False)
    assert len(np.unique(np.asarray(blurred))) > 2


def test_make_condition_per_type() -> None:
    labels = Image.fromarray(np.full((4, 4), 3, np.uint8))  # mode L: a label map
    assert np.asarray(make_condition("segmentation", condition=labels))[0, 0].tolist() == [
        6,
        230,
        230,
    ]
    colour = Image.new("RGB", (4, 4), (1, 2, 3))  # RGB: already a colour map
    assert make_condition("segmentation", condition=colour).getpixel((0, 0)) == (1, 2, 3)
    assert make_condition("precomputed", condition=labels).mode == "RGB"
    assert make_condition("canny", image=square_photo()).size == (32, 32)
    with pytest.raises(ValueError, match="Unknown condition type 'depth'"):
        check_condition_type("depth")
    with pytest.raises(ValueError, match="needs the condition image"):
        make_condition("segmentation")
