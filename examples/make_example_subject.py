"""Draw the bundled example DreamBooth subject: a small toy robot, five views.

Deterministic (no randomness, PIL only): running it again rewrites identical
PNGs into ``examples/subject/``. Usage::

    python examples/make_example_subject.py [--out examples/subject]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 96
"""Edge of every image in pixels (small: the demo trains at 64 px)."""

VIEWS = [
    # (background RGB, robot centre x, robot centre y, scale, body tilt in px)
    ((225, 232, 240), 48, 50, 1.00, 0),
    ((240, 228, 214), 40, 52, 0.85, 3),
    ((214, 236, 220), 56, 46, 0.90, -3),
    ((236, 222, 236), 48, 54, 0.75, 2),
    ((226, 226, 210), 52, 48, 1.10, -2),
]
"""One entry per image: background, position, size and a slight lean."""

BODY, HEAD, EYE, ANTENNA = (214, 64, 52), (238, 178, 40), (30, 30, 40), (60, 90, 200)


def draw_robot(
    background: tuple[int, int, int], cx: int, cy: int, s: float, tilt: int
) -> Image.Image:
    """One view of the toy: red body, yellow head, blue antenna, dark eyes and wheels."""
    image = Image.new("RGB", (SIZE, SIZE), background)
    d = ImageDraw.Draw(image)

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [cx + x0 * s, cy + y0 * s, cx + x1 * s, cy + y1 * s]

    d.ellipse(box(-26, 30, 26, 38), fill=tuple(c - 40 for c in background))  # shadow
    d.rounded_rectangle(box(-20, -4, 20, 28), radius=int(5 * s), fill=BODY)  # body
    d.rectangle(box(-8, 4, 8, 14), fill=(250, 250, 250))  # chest panel
    head = box(-14 + tilt, -28, 14 + tilt, -4)
    d.rounded_rectangle(head, radius=int(4 * s), fill=HEAD)  # head
    d.line(box(tilt, -28, tilt, -38), fill=ANTENNA, width=max(1, int(3 * s)))  # antenna
    d.ellipse(box(-4 + tilt, -42, 4 + tilt, -34), fill=ANTENNA)
    for ex in (-7, 7):  # eyes
        d.ellipse(box(ex - 3 + tilt, -20, ex + 3 + tilt, -14), fill=EYE)
    for wx in (-14, 14):  # wheels
        d.ellipse(box(wx - 6, 24, wx + 6, 36), fill=EYE)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "subject"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    for i, view in enumerate(VIEWS):
        draw_robot(*view).save(out / f"toy_{i}.png", optimize=True)
    print(f"wrote {len(VIEWS)} images to {out}")


if __name__ == "__main__":
    main()
