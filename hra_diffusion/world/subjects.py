"""DreamBooth subjects for the procedural world: objects that the world never draws.

Each subject is a composite of two or three flat parts in colours outside the world's
six (:data:`~hra_diffusion.world.COLORS`), so neither a caption nor a free-form canvas
(single-colour primitives) ever produces it. :func:`render_views` draws the pictures
a user would bring: the subject at slightly different positions and sizes on five
different world backgrounds, never on :data:`RECONTEXT_BACKGROUND`, which is kept
for the recontextualisation prompt ("a qwe toy on a blue background")::

    from hra_diffusion.world.subjects import SUBJECTS, write_views
    write_views(SUBJECTS["robot"], "examples/subject")

Part geometry is in units of the subject's radius (about 18 px), centred on (0, 0),
y pointing down.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hra_diffusion import world

INK: dict[str, tuple[int, int, int]] = {
    "orange": (245, 135, 25),
    "purple": (135, 55, 185),
    "cyan": (35, 205, 215),
    "pink": (245, 115, 185),
    "lime": (165, 235, 45),
    "brown": (125, 75, 35),
    "teal": (0, 120, 120),
}
"""Subject colours; none is one of the world's six."""

VIEW_BACKGROUNDS = ("white", "yellow", "green", "black", "red")
"""Backgrounds of the five training views, one each."""

RECONTEXT_BACKGROUND = "blue"
"""A world background no view shows: the recontextualisation test asks for it."""

DREAMBOOTH_RECIPE = Path(__file__).resolve().with_name("dreambooth.args")
"""The bundled model's DreamBooth settings (an argparse @file), shared with ``make demo``."""


@dataclass(frozen=True)
class Part:
    """One flat part: ``kind`` is ``ellipse``, ``rect`` or ``polygon``; ``points`` are
    (x0, y0, x1, y1) for ellipses and rects, the outline otherwise (subject units)."""

    kind: str
    ink: str
    points: tuple[float, ...]


@dataclass(frozen=True)
class Subject:
    """A named subject, the class noun of its prompts and its parts, drawn in order."""

    name: str
    noun: str
    parts: tuple[Part, ...]

    @property
    def inks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.ink for p in self.parts))


def _star(points: int, outer: float, inner: float) -> tuple[float, ...]:
    coords: list[float] = []
    for i in range(2 * points):
        radius = outer if i % 2 == 0 else inner
        angle = -math.pi / 2 + i * math.pi / points
        coords += [radius * math.cos(angle), radius * math.sin(angle)]
    return tuple(coords)


SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        Subject(
            "robot",
            "toy",
            (
                Part("rect", "orange", (-0.75, -0.2, 0.75, 1.0)),
                Part("rect", "purple", (-0.5, -0.95, 0.5, -0.25)),
                Part("rect", "cyan", (-0.08, -1.2, 0.08, -0.95)),
                Part("rect", "cyan", (-0.35, 0.15, 0.35, 0.55)),
            ),
        ),
        Subject(
            "donut",
            "ring",
            (
                Part("ellipse", "pink", (-1.0, -1.0, 1.0, 1.0)),
                Part("ellipse", "lime", (-0.45, -0.45, 0.45, 0.45)),
            ),
        ),
        Subject(
            "plus",
            "cross",
            (
                Part("rect", "cyan", (-1.0, -0.3, 1.0, 0.3)),
                Part("rect", "cyan", (-0.3, -1.0, 0.3, 1.0)),
                Part("rect", "orange", (-0.3, -0.3, 0.3, 0.3)),
            ),
        ),
        Subject(
            "starfish",
            "star",
            (
                Part("polygon", "lime", _star(5, 1.1, 0.5)),
                Part("ellipse", "purple", (-0.3, -0.3, 0.3, 0.3)),
            ),
        ),
        Subject(
            "house",
            "house",
            (
                Part("rect", "brown", (-0.75, -0.1, 0.75, 1.0)),
                Part("polygon", "teal", (0.0, -1.0, 1.0, -0.1, -1.0, -0.1)),
                Part("rect", "orange", (-0.2, 0.4, 0.2, 1.0)),
            ),
        ),
        Subject(
            "mushroom",
            "mushroom",
            (
                Part("rect", "pink", (-0.3, 0.0, 0.3, 1.0)),
                Part("polygon", "purple", (-1.0, 0.1, -0.7, -0.6, 0.0, -0.95, 0.7, -0.6, 1.0, 0.1)),
            ),
        ),
        Subject(
            "flag",
            "flag",
            (
                Part("rect", "brown", (-0.75, -1.0, -0.55, 1.0)),
                Part("rect", "orange", (-0.55, -1.0, 0.9, -0.1)),
                Part("rect", "teal", (-0.55, -0.55, 0.9, -0.1)),
            ),
        ),
        Subject(
            "diamond",
            "gem",
            (
                Part("polygon", "teal", (0.0, -1.1, 0.9, 0.0, 0.0, 1.1, -0.9, 0.0)),
                Part("polygon", "pink", (0.0, -0.5, 0.45, 0.0, 0.0, 0.5, -0.45, 0.0)),
            ),
        ),
    )
}
"""The subjects; ``robot`` is the bundled example of ``examples/subject``."""


def ink_rgb(ink: str) -> tuple[int, int, int]:
    """RGB of an ink: a name of :data:`INK` or ``"#rrggbb"`` (random subjects' inks)."""
    if ink in INK:
        return INK[ink]
    if len(ink) == 7 and ink.startswith("#"):
        return int(ink[1:3], 16), int(ink[3:5], 16), int(ink[5:7], 16)
    raise ValueError(f"Unknown ink {ink!r}; use one of {sorted(INK)} or '#rrggbb'.")


def _outline(part: Part) -> list[tuple[float, float]]:
    """A part's outline in subject units (an ellipse as a 32-gon)."""
    if part.kind == "ellipse":
        x0, y0, x1, y1 = part.points
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        angles = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in angles]
    if part.kind == "rect":
        x0, y0, x1, y1 = part.points
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return list(zip(part.points[0::2], part.points[1::2], strict=True))


def _draw_part(
    draw: ImageDraw.ImageDraw, part: Part, cx: float, cy: float, scale: float, angle: float
) -> None:
    k = world.SUPERSAMPLE
    if part.kind not in ("ellipse", "rect", "polygon"):
        raise ValueError(f"Unknown part kind {part.kind!r}; use ellipse, rect or polygon.")
    if angle == 0.0 and part.kind != "polygon":
        xy = [
            ((cx + x * scale) * k, (cy + y * scale) * k)
            for x, y in zip(part.points[0::2], part.points[1::2], strict=True)
        ]
        (draw.ellipse if part.kind == "ellipse" else draw.rectangle)(xy, fill=255)
        return
    c, s = math.cos(angle), math.sin(angle)
    xy = [((cx + (x * c - y * s) * scale) * k, (cy + (x * s + y * c) * scale) * k)
          for x, y in _outline(part)]  # fmt: skip
    draw.polygon(xy, fill=255)


def render_subject(
    subject: Subject,
    background: str | tuple[int, int, int],
    cx: float,
    cy: float,
    scale: float,
    angle: float = 0.0,
) -> Image.Image:
    """The subject centred at (cx, cy) with radius ``scale`` px, turned by ``angle`` radians,
    on a world background (a name of :data:`~hra_diffusion.world.COLORS`) or any RGB."""
    size, k = world.SIZE, world.SUPERSAMPLE
    layers = []
    for part in subject.parts:
        canvas = Image.new("L", (size * k, size * k), 0)
        _draw_part(ImageDraw.Draw(canvas), part, cx, cy, scale, angle)
        coverage = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), np.float32) / 255
        layers.append((coverage, np.asarray(ink_rgb(part.ink))))
    rgb = world.COLORS[background] if isinstance(background, str) else background
    return world.composite(world.plain_background(rgb), layers)


def render_views(
    subject: Subject, seed: int = 0, backgrounds: tuple[str, ...] = VIEW_BACKGROUNDS
) -> list[Image.Image]:
    """One picture per background (by default the five :data:`VIEW_BACKGROUNDS`), the
    subject slightly moved and resized."""
    rng = np.random.default_rng(seed)
    views = []
    for background in backgrounds:
        cx, cy = world.SIZE / 2 + rng.uniform(-4, 4, size=2)
        views.append(render_subject(subject, background, cx, cy, rng.uniform(16, 20)))
    return views


def write_views(
    subject: Subject, folder: str | os.PathLike, seed: int = 0, caption: str | None = None
) -> list[Path]:
    """Write :func:`render_views` as ``<name>_<i>.png`` into ``folder`` and return the paths.

    With ``caption`` (e.g. ``"a qwe toy"``) each view also gets a caption file
    ``<name>_<i>.txt`` naming its background, ``"a qwe toy on a white background"``, for
    the training scripts' ``--caption_extension .txt``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (image, background) in enumerate(
        zip(render_views(subject, seed), VIEW_BACKGROUNDS, strict=True)
    ):
        paths.append(folder / f"{subject.name}_{i}.png")
        image.save(paths[-1])
        if caption is not None:
            text = f"{caption} on a {background} background\n"
            paths[-1].with_suffix(".txt").write_text(text)
    return paths
