"""Broad procedural pictures, and the round-trip metrics of a VAE on them.

The world (:mod:`hra_diffusion.world`) draws six colours and three shapes; its free-form
canvases add any colour but only flat fills at radii of 5-20 px. A VAE trained on those
alone decodes any other picture towards them (issue 32: a disc and square in colours the
world never uses came back grey-blue). This module draws what a bundled VAE must keep:

- any RGB colour, for backgrounds and objects alike;
- shapes at every scale, radius 2-32 px (4 px across up to the whole picture): ellipses,
  rectangles down to 1 px lines, triangles, rings and stars, rotated, up to six per
  picture, overlapping and partly off the edge;
- fills that are flat, linear or radial gradients, stripes or checkers (periods of
  :data:`PERIODS`, down to 4 px, at any angle)::

    rng = np.random.default_rng(0)
    picture = render_broad(rng)            # a 64 px PIL image
    held_out = evaluation_set()            # EVAL_COUNT pictures from EVAL_SEED

Everything is a pure function of a numpy ``Generator``: the same seed gives the same
pixels. Pictures are drawn at 4x and box-filtered down (anti-aliased edges and textures).
Training draws its generators from ``[seed, 1]`` (``train/pretrain_world.py``);
:data:`EVAL_SEED` is a plain integer seed no training stream uses.

Metrics of a picture ``a`` and its round trip ``b`` (both uint8 RGB):

- :func:`psnr`: ``10 · log10(2² / MSE)`` with pixels mapped to [-1, 1] (peak-to-peak 2),
  as ``pretrain_world.psnr``; over a set, MSE is pooled over all its pixels.
- :func:`histogram_l1`: ``Σ |h(a) − h(b)|`` of joint RGB histograms with :data:`LEVELS`
  levels per channel, in [0, 2] (0: same colours in the same amounts, 2: no colour in
  common). Each channel value is shared linearly between its two nearest levels (the
  joint weight is the product of the three), so a colour shifted by δ moves at most
  ``2 · Σ_c |δ_c| / spacing`` of its pixels' mass: small errors cost little wherever a
  colour falls, unlike hard bins, where 127 → 128 can flip a whole flat picture to L1 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from hra_diffusion import world

SIZE = world.SIZE
"""Edge of every picture in pixels (64)."""

K = world.SUPERSAMPLE
"""Pictures are drawn at ``SIZE * K`` and box-filtered down."""

SHAPE_KINDS = ("ellipse", "rectangle", "triangle", "ring", "star")
"""The primitives of a broad picture."""

RADIUS_RANGE = (2.0, 32.0)
"""Half the extent of a shape in pixels, drawn log-uniformly (4 px across up to 64)."""

MAX_OBJECTS = 6
"""A picture holds 1 to this many shapes."""

PERIODS = (4, 5, 6, 8, 11, 16)
"""Periods of stripes and checkers in pixels (4: two pixels of each colour)."""

BACKGROUND_FILLS = {"flat": 0.5, "linear": 0.15, "radial": 0.1, "stripes": 0.15, "checker": 0.1}
"""Fill kinds of the background and their shares."""

OBJECT_FILLS = {"flat": 0.7, "linear": 0.1, "radial": 0.05, "stripes": 0.1, "checker": 0.05}
"""Fill kinds of a shape and their shares."""

EVAL_SEED = 32_032
"""Seed of the held-out evaluation set (training streams are seeded ``[seed, 1]``)."""

EVAL_COUNT = 256
"""Pictures in the held-out evaluation set."""

PROBE_COLORS = {"background": (120, 200, 150), "disc": (200, 90, 170), "square": (110, 190, 240)}
"""The issue-32 probe's colours: mint, mauve and sky blue, none of the world's six nor the
subjects' inks (the issue did not record its own three)."""

LEVELS = 8
"""Levels per channel of :func:`color_histogram` (8³ = 512 joint bins, 36.4 apart)."""


# --------------------------------------------------------------------------- fills


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates of the supersampled grid's cell centres, in 64 px units, (S, S) each."""
    axis = (np.arange(SIZE * K, dtype=np.float32) + 0.5) / K
    return np.meshgrid(axis, axis)  # x varies along columns, y along rows


def random_color(rng: np.random.Generator) -> np.ndarray:
    """Any RGB colour, uniform over the cube, as (3,) float32 in [0, 255]."""
    return rng.integers(0, 256, size=3).astype(np.float32)


def _blend(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a`` where t = 0, ``b`` where t = 1: (S, S) weights to (S, S, 3) colours."""
    return a * (1 - t[:, :, None]) + b * t[:, :, None]


def sample_fill(rng: np.random.Generator, shares: dict[str, float]) -> np.ndarray:
    """A fill of the kind drawn from ``shares``, (S, S, 3) float32 in [0, 255], S = 4 · 64."""
    kinds = list(shares)
    kind = kinds[rng.choice(len(kinds), p=np.array(list(shares.values())))]
    a = random_color(rng)
    if kind == "flat":
        return np.broadcast_to(a, (SIZE * K, SIZE * K, 3)).copy()
    b = random_color(rng)
    x, y = _grid()
    angle = rng.uniform(0, 2 * math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)  # (S, S) distance along the fill's axis
    if kind == "linear":
        start, length = rng.uniform(-16, 48), rng.uniform(16, 96)
        return _blend(np.clip((u - start) / length, 0, 1), a, b)
    if kind == "radial":
        cx, cy = rng.uniform(0, SIZE, size=2)
        radius = rng.uniform(8, 64)
        return _blend(np.clip(np.hypot(x - cx, y - cy) / radius, 0, 1), a, b)
    period = float(PERIODS[rng.integers(len(PERIODS))])
    phase = rng.uniform(0, 1)
    on = np.floor(u / period + phase)
    if kind == "checker":
        v = -x * math.sin(angle) + y * math.cos(angle)
        on = on + np.floor(v / period + phase)
    return _blend((on % 2).astype(np.float32), a, b)


# --------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """One primitive, in pixels of a 64 px picture: centre, radius, aspect (minor / major
    extent), rotation in radians, and for rings the band's width as a share of the radius."""

    kind: str
    cx: float
    cy: float
    radius: float
    aspect: float
    angle: float
    band: float

    def __post_init__(self) -> None:
        if self.kind not in SHAPE_KINDS:
            raise ValueError(f"Unknown shape {self.kind!r}; choose one of {list(SHAPE_KINDS)}.")
        if self.radius <= 0:
            raise ValueError(f"Shape radius must be > 0 px, got {self.radius}.")


def sample_shape(rng: np.random.Generator) -> Shape:
    """A random primitive anywhere in the picture, radius log-uniform in :data:`RADIUS_RANGE`."""
    kind = SHAPE_KINDS[rng.integers(len(SHAPE_KINDS))]
    low, high = (math.log(r) for r in RADIUS_RANGE)
    cx, cy = rng.uniform(0, SIZE, size=2)
    aspect = rng.uniform(0.05, 1.0) if kind == "rectangle" else rng.uniform(0.4, 1.0)
    return Shape(
        kind=kind,
        cx=float(cx),
        cy=float(cy),
        radius=float(math.exp(rng.uniform(low, high))),
        aspect=float(aspect),
        angle=float(rng.uniform(0, math.pi)),
        band=float(rng.uniform(0.2, 0.5)),
    )


def _outline(shape: Shape, radius: float) -> list[tuple[float, float]]:
    """Rotated outline of a shape at ``radius`` (pixels of a 64 px picture)."""
    if shape.kind == "rectangle":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points = [(radius * x, radius * shape.aspect * y) for x, y in corners]
    elif shape.kind == "triangle":
        points = [(radius * math.cos(t), radius * math.sin(t)) for t in (-1.571, 0.524, 2.618)]
    elif shape.kind == "star":
        ts = np.linspace(0, 2 * math.pi, 10, endpoint=False)
        rs = [radius if i % 2 == 0 else radius * shape.aspect * 0.6 for i in range(10)]
        points = [(r * math.cos(t), r * math.sin(t)) for r, t in zip(rs, ts, strict=True)]
    else:  # ellipse and ring
        ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        points = [(radius * math.cos(t), radius * shape.aspect * math.sin(t)) for t in ts]
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    return [(shape.cx + x * c - y * s, shape.cy + x * s + y * c) for x, y in points]


def shape_coverage(shape: Shape) -> np.ndarray:
    """Where the shape lies on the supersampled grid, (S, S) float32 in {0, 1}."""
    canvas = Image.new("L", (SIZE * K, SIZE * K), 0)
    draw = ImageDraw.Draw(canvas)
    draw.polygon([(x * K, y * K) for x, y in _outline(shape, shape.radius)], fill=255)
    if shape.kind == "ring":
        inner = _outline(shape, shape.radius * (1 - shape.band))
        draw.polygon([(x * K, y * K) for x, y in inner], fill=0)
    return np.asarray(canvas, dtype=np.float32) / 255.0  # (S, S)


# --------------------------------------------------------------------------- pictures


def _downsample(image: np.ndarray) -> Image.Image:
    """Box-filter a (S, S, 3) float picture to 64 px uint8."""
    small = image.reshape(SIZE, K, SIZE, K, 3).mean(axis=(1, 3))  # (64, 64, 3)
    return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8))


def render_broad(rng: np.random.Generator) -> Image.Image:
    """A broad picture: a filled background under 1 to :data:`MAX_OBJECTS` filled shapes."""
    image = sample_fill(rng, BACKGROUND_FILLS)  # (S, S, 3)
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        coverage = shape_coverage(sample_shape(rng))[:, :, None]  # (S, S, 1)
        image = image * (1 - coverage) + sample_fill(rng, OBJECT_FILLS) * coverage
    return _downsample(image)


def evaluation_set(count: int = EVAL_COUNT, seed: int = EVAL_SEED) -> list[Image.Image]:
    """The held-out broad pictures: ``count`` draws of :func:`render_broad` from ``seed``."""
    rng = np.random.default_rng(seed)
    return [render_broad(rng) for _ in range(count)]


def probe() -> Image.Image:
    """Issue 32's probe: a flat disc holding a square, in two colours the world never uses,
    on a third (:data:`PROBE_COLORS`), 64 px."""
    x, y = _grid()
    image = np.broadcast_to(np.float32(PROBE_COLORS["background"]), (SIZE * K, SIZE * K, 3))
    disc = (np.hypot(x - 32, y - 32) <= 20).astype(np.float32)  # (S, S)
    square = ((np.abs(x - 32) <= 9) & (np.abs(y - 32) <= 9)).astype(np.float32)
    image = _blend(disc, image, np.float32(PROBE_COLORS["disc"]))
    image = _blend(square, image, np.float32(PROBE_COLORS["square"]))
    return _downsample(image)


def stripes(period: int, angle: float = 0.6) -> Image.Image:
    """Two-colour stripes of ``period`` px at ``angle`` radians (teal on sand), 64 px."""
    if period < 2:
        raise ValueError(f"Stripe period must be >= 2 px, got {period}.")
    x, y = _grid()
    on = np.floor((x * math.cos(angle) + y * math.sin(angle)) / period) % 2  # (S, S)
    a, b = np.float32([230, 210, 160]), np.float32([20, 110, 120])
    return _downsample(_blend(on.astype(np.float32), a, b))


# --------------------------------------------------------------------------- metrics


def to_unit(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB picture (PIL or uint8 (H, W, 3)) as float64 (H, W, 3) in [-1, 1]."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"Expected an RGB picture of shape (H, W, 3), got {array.shape}.")
    return array.astype(np.float64) / 127.5 - 1.0


def psnr(a: list | Image.Image, b: list | Image.Image) -> float:
    """PSNR in dB, ``10 · log10(4 / MSE)`` on [-1, 1] pixels, MSE pooled over the pictures.

    ``inf`` for identical pictures.
    """
    a_list = a if isinstance(a, list) else [a]
    b_list = b if isinstance(b, list) else [b]
    if len(a_list) != len(b_list) or not a_list:
        raise ValueError(f"psnr needs two equal non-empty sets, got {len(a_list)}, {len(b_list)}.")
    pairs = zip(a_list, b_list, strict=True)
    mse = np.mean([np.mean((to_unit(x) - to_unit(y)) ** 2) for x, y in pairs])
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def color_histogram(
    image: Image.Image | np.ndarray, levels: int = LEVELS, soft: bool = True
) -> np.ndarray:
    """Joint RGB histogram, ``levels³`` bins summing to 1.

    ``soft``: each channel value is shared linearly between its two nearest of ``levels``
    evenly spaced levels (0, 255 / (levels − 1), …, 255). Otherwise hard bins of width
    256 / ``levels`` (value // 32 at 8 levels): a colour near a bin edge flips bins on a
    one-level error, so hard L1 is given only to compare with such histograms.
    """
    if not soft:
        bins = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        bins = bins.reshape(-1, 3).astype(np.int64) * levels // 256  # (N, 3)
        index = (bins * np.array([levels**2, levels, 1])).sum(axis=1)  # (N,)
        hist = np.bincount(index, minlength=levels**3).astype(np.float64)
        return hist / hist.sum()
    values = (to_unit(image).reshape(-1, 3) + 1) / 2 * (levels - 1)  # (N, 3) in [0, levels-1]
    low = np.clip(np.floor(values), 0, levels - 2).astype(np.int64)  # (N, 3)
    frac = values - low  # (N, 3) weight of the upper level
    hist = np.zeros(levels**3)
    for corner in range(8):
        bits = np.array([(corner >> c) & 1 for c in range(3)])  # (3,)
        weight = np.prod(np.where(bits, frac, 1 - frac), axis=1)  # (N,)
        index = ((low + bits) * np.array([levels**2, levels, 1])).sum(axis=1)  # (N,)
        hist += np.bincount(index, weights=weight, minlength=levels**3)
    return hist / hist.sum()


def histogram_l1(
    a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, soft: bool = True
) -> float:
    """``Σ |h(a) − h(b)|`` of :func:`color_histogram`: 0 same colours, 2 none in common."""
    return float(np.abs(color_histogram(a, soft=soft) - color_histogram(b, soft=soft)).sum())
