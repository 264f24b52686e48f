"""Procedural random subjects: the training data of the world's identity evaluators.

A random subject is a composite of 2-3 flat parts (:class:`~hra_diffusion.world.subjects.Part`)
in random inks, drawn like the named DreamBooth subjects of
:mod:`hra_diffusion.world.subjects`, which are never produced (they are the evaluators'
validation set). Subjects come in *families* that share colours or geometry, so that
neither the colours nor the outline alone tell them apart::

    import numpy as np
    from hra_diffusion.world.random_subjects import random_family, random_view

    rng = np.random.default_rng(0)
    family = random_family(rng)  # 3 subjects: a base, new geometry, one new ink
    image = random_view(rng, family[0])  # 64 px, random background, placement, scale, angle

Inks are drawn from :data:`SHARED_INKS` (the subject inks, the world's colours and twelve
more, so that many subjects share colours) or are any RGB, written ``"#rrggbb"``.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from hra_diffusion import world
from hra_diffusion.world.subjects import INK, SUBJECTS, Part, Subject, ink_rgb, render_subject

EXTRA_INKS = (
    (200, 200, 200), (110, 110, 110), (255, 90, 60), (60, 200, 120), (90, 40, 120), (250, 170, 200),
    (20, 60, 120), (180, 160, 90), (230, 230, 120), (100, 200, 255), (160, 20, 80), (70, 90, 30),
)  # fmt: skip
"""Twelve colours beside the subject inks and the world's six."""

SHARED_INKS: tuple[str, ...] = tuple(
    dict.fromkeys(
        [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in INK.values()]
        + [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in world.COLORS.values()]
        + [f"#{r:02x}{g:02x}{b:02x}" for r, g, b in EXTRA_INKS]
    )
)
"""The pool most inks are drawn from (25 colours, as ``"#rrggbb"``)."""

RANDOM_INK_SHARE = 0.3
"""Share of inks drawn as any RGB instead of from :data:`SHARED_INKS`."""

MIN_INK_DISTANCE = 60.0
"""Least RGB distance between touching parts' inks, and between any ink and the background."""

NAMED_PARTS = frozenset(s.parts for s in SUBJECTS.values())
"""The named subjects' parts: a random subject never has them."""


def _hex(rgb) -> str:
    r, g, b = (int(c) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _distance(a: str, b: tuple[int, int, int] | str) -> float:
    b = ink_rgb(b) if isinstance(b, str) else b
    return float(np.linalg.norm(np.subtract(ink_rgb(a), b, dtype=float)))


def random_ink(rng: np.random.Generator, avoid: tuple[str, ...] = ()) -> str:
    """An ink at least :data:`MIN_INK_DISTANCE` from every ink in ``avoid``."""
    while True:
        if rng.random() < RANDOM_INK_SHARE:
            ink = _hex(rng.integers(0, 256, size=3))
        else:
            ink = SHARED_INKS[rng.integers(len(SHARED_INKS))]
        if all(_distance(ink, other) >= MIN_INK_DISTANCE for other in avoid):
            return ink


def _polygon(rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float) -> tuple:
    """A regular 3-6-gon or a 4-6-point star in the box of half-sizes (rx, ry), turned."""
    star = rng.random() < 0.3
    n = int(rng.integers(4, 7) if star else rng.integers(3, 7))
    turn = rng.uniform(0, 2 * math.pi)
    coords: list[float] = []
    for i in range(2 * n if star else n):
        t = turn + i * math.pi / n * (1 if star else 2)
        radius = 0.45 if star and i % 2 else 1.0
        coords += [cx + rx * radius * math.cos(t), cy + ry * radius * math.sin(t)]
    return tuple(round(c, 4) for c in coords)


def random_geometry(rng: np.random.Generator, body: bool) -> tuple[str, tuple[float, ...]]:
    """A part's kind and points (subject units): a body fills most of the unit disc, a
    detail is smaller and lies anywhere on it."""
    rx, ry = rng.uniform(0.55, 1.05, size=2) if body else rng.uniform(0.15, 0.55, size=2)
    cx, cy = rng.uniform(-0.15, 0.15, size=2) if body else rng.uniform(-0.7, 0.7, size=2)
    kind = ("ellipse", "rect", "polygon")[rng.integers(3)]
    if kind == "polygon":
        return kind, _polygon(rng, cx, cy, rx, ry)
    return kind, tuple(round(float(c), 4) for c in (cx - rx, cy - ry, cx + rx, cy + ry))


def _part(rng: np.random.Generator, ink: str, body: bool) -> Part:
    kind, points = random_geometry(rng, body)
    return Part(kind, ink, points)


def random_subject(rng: np.random.Generator, name: str = "random") -> Subject:
    """A subject of 2-3 parts (a body, then details) whose inks differ from part to part."""
    while True:
        parts: list[Part] = []
        for i in range(int(rng.integers(2, 4))):
            parts.append(_part(rng, random_ink(rng, tuple(p.ink for p in parts)), body=i == 0))
        if tuple(parts) not in NAMED_PARTS:
            return Subject(name, "thing", tuple(parts))


def random_family(rng: np.random.Generator) -> list[Subject]:
    """Three subjects that are hard to tell apart: a random one, the same inks on new
    geometry, and the same geometry with one part in a new ink."""
    while True:
        base = random_subject(rng, "base")
        reshaped = tuple(_part(rng, p.ink, body=i == 0) for i, p in enumerate(base.parts))
        j = int(rng.integers(len(base.parts)))
        ink = random_ink(rng, avoid=tuple(p.ink for p in base.parts))
        recoloured = tuple(
            Part(p.kind, ink, p.points) if i == j else p for i, p in enumerate(base.parts)
        )
        if reshaped not in NAMED_PARTS and recoloured not in NAMED_PARTS:
            return [
                base,
                Subject("reshaped", "thing", reshaped),
                Subject("recoloured", "thing", recoloured),
            ]


def random_background(rng: np.random.Generator, subject: Subject) -> tuple[int, int, int]:
    """A world colour (60 %) or any RGB, at least :data:`MIN_INK_DISTANCE` from every ink."""
    while True:
        if rng.random() < 0.6:
            rgb = tuple(world.COLORS.values())[rng.integers(len(world.COLORS))]
        else:
            rgb = tuple(int(c) for c in rng.integers(0, 256, size=3))
        if all(_distance(ink, rgb) >= MIN_INK_DISTANCE for ink in subject.inks):
            return rgb


def random_view(rng: np.random.Generator, subject: Subject) -> Image.Image:
    """The subject on a random background, moved (±8 px), sized (radius 11-22 px) and
    turned (±20°): wider than the named subjects' views (±4 px, 16-20 px, upright)."""
    cx, cy = world.SIZE / 2 + rng.uniform(-8, 8, size=2)
    scale, angle = rng.uniform(11, 22), rng.uniform(-0.35, 0.35)
    return render_subject(subject, random_background(rng, subject), cx, cy, scale, angle)
