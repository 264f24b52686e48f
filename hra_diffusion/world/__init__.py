"""A procedural, captioned image world small enough to learn on a 2-core CPU.

No Stable Diffusion weights can reach our machines, so the bundled default model
is pretrained on this world instead (``train/pretrain_world.py``). A scene is one
object — a circle, square or triangle in one of six colours — on a plain
background of another of the six colours, at 64 px::

    "a red circle on a blue background"     (the full caption, used for evaluation)
    "a red circle"                          (object only: any background)
    "a photo of a blue background with a red tesk circle"   (a varied training caption)

Three colour-shape pairs (:data:`HELD_OUT_PAIRS`) never occur in training, so
the model's grasp of composition can be measured on them. Every scene also has
a Canny edge map (:func:`edge_map`) and a segmentation label map
(:func:`label_map`, ADE20K-style: one uint8 class id per pixel, 0 = ignore, the
ids of :data:`LABELS`), for controllable generation and its metrics.

Beside the captioned world there are *free-form canvases* (:func:`render_canvas`):
one to three primitives of any colour, shape and rotation on any background,
never captioned. They teach the VAE (and the UNet's unconditional prior) to draw
colours and shapes the captions never name, as a real Stable Diffusion has seen
far more than it can name. DreamBooth subjects (:mod:`hra_diffusion.world.subjects`)
are composites that neither the world nor the canvases ever draw.

Everything is deterministic: a scene is a small dataclass, and the same numpy
``Generator`` seed gives the same scenes. Shapes are drawn at 4× and box-filtered
down, so edges are anti-aliased like a photo's, not jagged.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

from hra_diffusion.conditions import canny_edges

SIZE = 64
"""Edge of every world image in pixels."""

SUPERSAMPLE = 4
"""Shapes are drawn at ``SIZE * SUPERSAMPLE`` and box-filtered down."""

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (210, 40, 40),
    "yellow": (235, 205, 45),
    "green": (45, 160, 65),
    "blue": (45, 85, 215),
    "white": (240, 240, 235),
    "black": (25, 25, 30),
}
"""The six named colours (RGB); object and background always differ."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""The three named shapes."""

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
)
"""(object colour, shape) pairs that training never shows, on any background."""

LABELS: tuple[str, ...] = ("background", "circle", "square", "triangle")
"""Segmentation classes; class ``LABELS[i]`` has label id ``i + 1`` (0 = ignore)."""

IGNORE_LABEL = 0
"""Label id of pixels that are neither clearly object nor clearly background."""

RADIUS_RANGE = (12.0, 20.0)
"""Half the object's extent in pixels, drawn uniformly."""

MAX_OFFSET = 7.0
"""Largest shift of the object's centre from the image centre, per axis, in pixels."""

WIDE_OFFSET = 14.0
"""A wider :data:`MAX_OFFSET` for the layouts of control data and of the evaluators' scenes:
the bundled model draws its objects near the centre, so only wider layouts make a control
condition say something its caption does not."""

CAPTION_SHARES = {
    "object_only": 0.2,
    "background_first": 0.1,
    "no_color": 0.1,
    "unknown_word": 0.25,
    "photo_prefix": 0.2,
}
"""How often training captions (:func:`sample_caption`) vary from the plain form.

``object_only``: "a red circle"; ``background_first``: "a blue background with a red
circle"; ``no_color``: "a circle on a blue background"; ``unknown_word``: a made-up word
before the shape, "a red tesk circle on …", as a DreamBooth identifier will be;
``photo_prefix``: "a photo of a red circle …". They are drawn independently. Without
them a small text encoder learns to read captions by word position, and a prompt with
one extra word ("a qwe toy on a blue background") loses its background.
"""

SPLITS = ("train", "held_out", "all")
"""Which colour-shape pairs :func:`sample_scene` draws from."""


@dataclass(frozen=True)
class Scene:
    """One object on a plain background; sizes and positions in pixels of a 64 px image."""

    shape: str
    color: str
    background: str
    cx: float
    cy: float
    radius: float

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"Unknown shape {self.shape!r}; choose one of {list(SHAPES)}.")
        for name in (self.color, self.background):
            if name not in COLORS:
                raise ValueError(f"Unknown colour {name!r}; choose one of {list(COLORS)}.")
        if self.color == self.background:
            raise ValueError(f"Object and background are both {self.color}; they must differ.")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def caption(scene: Scene, with_background: bool = True) -> str:
    """``"a red circle on a blue background"``, or ``"a red circle"`` without the background."""
    text = f"a {scene.color} {scene.shape}"
    return f"{text} on a {scene.background} background" if with_background else text


def color_shape_pairs(split: str) -> list[tuple[str, str]]:
    """The (object colour, shape) pairs of a split: ``train``, ``held_out`` or ``all``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {list(SPLITS)}.")
    pairs = list(itertools.product(COLORS, SHAPES))
    if split == "train":
        return [p for p in pairs if p not in HELD_OUT_PAIRS]
    if split == "held_out":
        return list(HELD_OUT_PAIRS)
    return pairs


def sample_scene(
    rng: np.random.Generator, split: str = "train", max_offset: float = MAX_OFFSET
) -> Scene:
    """A random scene whose colour-shape pair belongs to ``split``.

    ``max_offset`` bounds the shift of the object's centre from the image centre, per axis,
    in pixels (the bundled model was trained at :data:`MAX_OFFSET`; control data with wider
    layouts gives the condition something the caption does not say).
    """
    if not 0.0 <= max_offset <= SIZE / 2:
        raise ValueError(f"max_offset must lie in [0, {SIZE // 2}] pixels, got {max_offset}.")
    pairs = color_shape_pairs(split)
    color, shape = pairs[rng.integers(len(pairs))]
    backgrounds = [c for c in COLORS if c != color]
    cx, cy = SIZE / 2 + rng.uniform(-max_offset, max_offset, size=2)
    return Scene(
        shape=shape,
        color=color,
        background=backgrounds[rng.integers(len(backgrounds))],
        cx=float(cx),
        cy=float(cy),
        radius=float(rng.uniform(*RADIUS_RANGE)),
    )


def made_up_word(rng: np.random.Generator) -> str:
    """A random lowercase word of 2-5 letters, like a DreamBooth identifier ("sks", "qwe")."""
    letters = rng.integers(0, 26, size=int(rng.integers(2, 6)))
    return "".join(chr(ord("a") + int(i)) for i in letters)


def sample_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A training caption of the scene, varied as :data:`CAPTION_SHARES` says."""
    draws = {k: rng.random() < share for k, share in CAPTION_SHARES.items()}
    words = [] if draws["no_color"] else [scene.color]
    if draws["unknown_word"]:
        words.append(made_up_word(rng))
    obj = "a " + " ".join([*words, scene.shape])
    background = f"a {scene.background} background"
    if draws["object_only"]:
        text = obj
    elif draws["background_first"]:
        text = f"{background} with {obj}"
    else:
        text = f"{obj} on {background}"
    return f"a photo of {text}" if draws["photo_prefix"] else text


# --------------------------------------------------------------------------- drawing


def shape_polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
    """Outline of a square or triangle (an upright isosceles one filling its box's width)."""
    r = radius
    if shape == "square":
        s = 0.85 * r
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)]
    raise ValueError(f"{shape!r} has no polygon outline.")


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = SIZE) -> np.ndarray:
    """Coverage in [0, 1] of each pixel by a world shape, (size, size) float32."""
    k = SUPERSAMPLE
    canvas = Image.new("L", (size * k, size * k), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        box = [(cx - radius) * k, (cy - radius) * k, (cx + radius) * k, (cy + radius) * k]
        draw.ellipse(box, fill=255)
    else:
        draw.polygon([(x * k, y * k) for x, y in shape_polygon(shape, cx, cy, radius)], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0  # (size, size)


def composite(background: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]]) -> Image.Image:
    """Paint ``(coverage (H, W), rgb (3,))`` layers in order over a (H, W, 3) background."""
    image = background.astype(np.float32)
    for coverage, rgb in layers:
        alpha = coverage[:, :, None]  # (H, W, 1)
        image = image * (1 - alpha) + np.asarray(rgb, np.float32) * alpha
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8))


def plain_background(rgb: tuple[int, int, int], size: int = SIZE) -> np.ndarray:
    """A ``(size, size, 3)`` float array of one colour."""
    return np.broadcast_to(np.asarray(rgb, np.float32), (size, size, 3)).copy()


def render_scene(scene: Scene) -> Image.Image:
    """The 64 px RGB picture of a scene."""
    coverage = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius)
    background = plain_background(COLORS[scene.background])
    return composite(background, [(coverage, np.asarray(COLORS[scene.color]))])


def edge_map(scene: Scene, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges of the scene's picture (white on black), as the control metrics compute them."""
    return canny_edges(render_scene(scene), low, high)


def label_map(scene: Scene) -> Image.Image:
    """Segmentation label map (mode ``L``): shape id where the object covers ≥ 75 % of a pixel,
    background id where it covers ≤ 25 %, :data:`IGNORE_LABEL` on the anti-aliased rim."""
    coverage = shape_mask(scene.shape, scene.cx, scene.cy, scene.radius)  # (H, W)
    labels = np.full(coverage.shape, IGNORE_LABEL, dtype=np.uint8)
    labels[coverage <= 0.25] = LABELS.index("background") + 1
    labels[coverage >= 0.75] = LABELS.index(scene.shape) + 1
    return Image.fromarray(labels, mode="L")


# --------------------------------------------------------------------------- free-form canvases

CANVAS_PRIMITIVES = ("circle", "square", "triangle", "ellipse", "bar", "ring")
"""Primitives of free-form canvases (any colour, size and rotation)."""


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _primitive_coverage(rng: np.random.Generator) -> np.ndarray:
    """Coverage of one random primitive of :data:`CANVAS_PRIMITIVES`, (SIZE, SIZE)."""
    k = SUPERSAMPLE
    kind = CANVAS_PRIMITIVES[rng.integers(len(CANVAS_PRIMITIVES))]
    cx, cy = rng.uniform(8, SIZE - 8, size=2)
    radius = rng.uniform(5, 20)
    angle = rng.uniform(0, math.pi)
    canvas = Image.new("L", (SIZE * k, SIZE * k), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "ellipse" or kind == "ring":
        aspect = rng.uniform(0.5, 1.0) if kind == "ellipse" else 1.0
        box = [(cx - radius) * k, (cy - radius * aspect) * k]
        box += [(cx + radius) * k, (cy + radius * aspect) * k]
        width = int(max(2, radius * rng.uniform(0.25, 0.5)) * k) if kind == "ring" else 0
        draw.ellipse(box, fill=None if width else 255, outline=255, width=width)
    else:
        if kind == "bar":
            w, h = radius, radius * rng.uniform(0.15, 0.35)
            points = [(cx - w, cy - h), (cx + w, cy - h), (cx + w, cy + h), (cx - w, cy + h)]
        elif kind == "circle":
            points = [
                (cx + radius * math.cos(t), cy + radius * math.sin(t))
                for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)
            ]
        else:
            points = shape_polygon(kind, cx, cy, radius)
        draw.polygon([(x * k, y * k) for x, y in _rotated(points, cx, cy, angle)], fill=255)
    small = canvas.resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0  # (SIZE, SIZE)


def render_canvas(rng: np.random.Generator) -> Image.Image:
    """A free-form canvas: 1-3 random primitives in random colours on a random background."""
    background = plain_background(tuple(rng.integers(0, 256, size=3)))
    layers = [
        (_primitive_coverage(rng), rng.integers(0, 256, size=3))
        for _ in range(int(rng.integers(1, 4)))
    ]
    return composite(background, layers)


def image_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image as ``(3, H, W)`` float32 in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    return array.transpose(2, 0, 1)  # (3, H, W)
