"""Line charts drawn with Pillow (no plotting library needed): loss and learning-rate curves."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLORS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
"""Line colours, in series order."""


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [low, high]."""
    span = high - low or abs(high) or 1.0
    step = 10 ** math.floor(math.log10(span / count))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= count:
            step *= factor
            break
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def line_chart(
    series: dict[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    title: str,
    x_label: str = "step",
    log_y: bool = False,
    size: tuple[int, int] = (640, 360),
) -> Path:
    """Draw ``{label: [(x, y), ...]}`` as a PNG line chart and return its path.

    With ``log_y`` the y axis is logarithmic (base 10); non-positive y are dropped.
    """
    font = ImageFont.load_default(size=12)
    width, height = size
    left, right, top, bottom = 64, 16, 32, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black", font=ImageFont.load_default(size=15))

    def fy(y: float) -> float:
        return math.log10(y) if log_y else y

    points = {k: [(x, fy(y)) for x, y in v if not log_y or y > 0] for k, v in series.items()}
    xs = [x for pts in points.values() for x, _ in pts] or [0.0, 1.0]
    ys = [y for pts in points.values() for _, y in pts] or [0.0, 1.0]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for tick in _nice_ticks(y0, y1):
        _, y = px(x0, tick)
        draw.line((left - 4, y, left, y), fill="black")
        text = f"{10**tick:.3g}" if log_y else f"{tick:.3g}"
        draw.text(
            (left - 6 - draw.textlength(text, font=font), y - 6), text, fill="black", font=font
        )
    for tick in _nice_ticks(x0, x1):
        x, _ = px(tick, y0)
        draw.line((x, height - bottom, x, height - bottom + 4), fill="black")
        text = f"{tick:g}"
        draw.text(
            (x - draw.textlength(text, font=font) / 2, height - bottom + 6),
            text,
            fill="black",
            font=font,
        )
    label_w = draw.textlength(x_label, font=font)
    draw.text(((width - label_w) / 2, height - 16), x_label, fill="black", font=font)
    for i, (label, pts) in enumerate(points.items()):
        color = COLORS[i % len(COLORS)]
        if len(pts) > 1:
            draw.line([px(x, y) for x, y in pts], fill=color, width=2)
        draw.text((width - right - 160, top + 6 + 16 * i), label, fill=color, font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
