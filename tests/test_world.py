"""The procedural world, its scorer and its DreamBooth subjects."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hra_diffusion import world
from hra_diffusion.world import scorer, subjects


def test_same_seed_same_scenes_and_pixels() -> None:
    a = [world.sample_scene(np.random.default_rng(3)) for _ in range(5)]
    b = [world.sample_scene(np.random.default_rng(3)) for _ in range(5)]
    assert a == b
    assert np.array_equal(
        np.asarray(world.render_scene(a[0])), np.asarray(world.render_scene(b[0]))
    )
    c1 = world.render_canvas(np.random.default_rng(9))
    c2 = world.render_canvas(np.random.default_rng(9))
    assert np.array_equal(np.asarray(c1), np.asarray(c2))


def test_training_split_never_draws_held_out_pairs() -> None:
    rng = np.random.default_rng(0)
    train = {(s.color, s.shape) for s in (world.sample_scene(rng, "train") for _ in range(2000))}
    held = {(s.color, s.shape) for s in (world.sample_scene(rng, "held_out") for _ in range(200))}
    assert train.isdisjoint(world.HELD_OUT_PAIRS)
    assert len(train) == len(world.COLORS) * len(world.SHAPES) - len(world.HELD_OUT_PAIRS)
    assert held == set(world.HELD_OUT_PAIRS)


def test_max_offset_bounds_the_layouts() -> None:
    def largest_shift(max_offset: float) -> float:
        rng = np.random.default_rng(0)
        scenes = [world.sample_scene(rng, "all", max_offset) for _ in range(500)]
        return max(max(abs(s.cx - world.SIZE / 2), abs(s.cy - world.SIZE / 2)) for s in scenes)

    assert world.MAX_OFFSET - 0.5 < largest_shift(world.MAX_OFFSET) <= world.MAX_OFFSET
    assert world.WIDE_OFFSET - 0.5 < largest_shift(world.WIDE_OFFSET) <= world.WIDE_OFFSET
    assert largest_shift(0.0) == 0.0
    with pytest.raises(ValueError, match="max_offset must lie in"):
        world.sample_scene(np.random.default_rng(0), "all", 40.0)


def test_captions() -> None:
    scene = world.Scene("circle", "red", "blue", 32, 32, 15)
    assert world.caption(scene) == "a red circle on a blue background"
    assert world.caption(scene, with_background=False) == "a red circle"
    rng = np.random.default_rng(0)
    captions = [world.sample_caption(scene, rng) for _ in range(4000)]
    plain = (1 - world.CAPTION_SHARES["photo_prefix"]) * (1 - world.CAPTION_SHARES["no_color"])
    plain *= 1 - world.CAPTION_SHARES["unknown_word"]
    object_only = np.mean([c == "a red circle" for c in captions])
    assert abs(object_only - plain * world.CAPTION_SHARES["object_only"]) < 0.02
    photo = np.mean([c.startswith("a photo of ") for c in captions])
    assert abs(photo - world.CAPTION_SHARES["photo_prefix"]) < 0.02
    assert all("circle" in c for c in captions)
    with_background = [c for c in captions if "background" in c]
    assert all("blue background" in c for c in with_background)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": "star"}, "Unknown shape"),
        ({"color": "pink"}, "Unknown colour"),
        ({"background": "red"}, "must differ"),
    ],
)
def test_scene_refuses_bad_attributes(kwargs: dict, message: str) -> None:
    fields = {"shape": "circle", "color": "red", "background": "blue", "cx": 32, "cy": 32}
    with pytest.raises(ValueError, match=message):
        world.Scene(**{**fields, **kwargs, "radius": 15})


def test_rendered_scene_has_the_named_colours() -> None:
    scene = world.Scene("square", "yellow", "black", 30, 34, 16)
    pixels = np.asarray(world.render_scene(scene))
    assert pixels.shape == (world.SIZE, world.SIZE, 3)
    assert tuple(pixels[0, 0]) == world.COLORS["black"]
    assert tuple(pixels[34, 30]) == world.COLORS["yellow"]


def test_label_map_ids_and_layout() -> None:
    scene = world.Scene("triangle", "green", "white", 32, 32, 18)
    labels = np.asarray(world.label_map(scene))
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 4}  # ignore rim, background, triangle
    assert labels[0, 0] == world.LABELS.index("background") + 1
    assert labels[36, 32] == world.LABELS.index("triangle") + 1
    assert (labels == world.IGNORE_LABEL).mean() < 0.1


def test_edge_map_traces_the_object_outline() -> None:
    scene = world.Scene("circle", "white", "black", 32, 32, 16)
    edges = np.asarray(world.edge_map(scene))[:, :, 0] > 0  # (H, W)
    ys, xs = np.nonzero(edges)
    distance = np.hypot(xs - 31.5, ys - 31.5)
    assert edges.sum() > 50
    assert np.all(np.abs(distance - 16) < 3)


def test_scorer_reads_the_worlds_own_images() -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "held_out"):
        scenes = [world.sample_scene(rng, split) for _ in range(120)]
        readings = [scorer.read_scene(world.render_scene(s)) for s in scenes]
        accuracy = scorer.attribute_accuracy(readings, scenes)
        assert accuracy["all"] >= 0.98, (split, accuracy)


def test_scorer_finds_no_object_on_a_plain_image() -> None:
    plain = Image.new("RGB", (64, 64), world.COLORS["green"])
    reading = scorer.read_scene(plain)
    assert reading.background == "green"
    assert reading.color is None and reading.shape is None


def test_histogram_distance_bounds() -> None:
    red = Image.new("RGB", (64, 64), world.COLORS["red"])
    blue = Image.new("RGB", (64, 64), world.COLORS["blue"])
    h_red, h_blue = scorer.color_histogram(red), scorer.color_histogram(blue)
    assert scorer.histogram_distance(h_red, h_red) == 0.0
    assert scorer.histogram_distance(h_red, h_blue) == pytest.approx(1.0)
    half = Image.fromarray(np.concatenate([np.asarray(red)[:32], np.asarray(blue)[32:]]))
    h_half = scorer.color_histogram(half)
    assert scorer.histogram_distance(h_half, h_red) == pytest.approx(0.5)


def test_object_histogram_ignores_the_background() -> None:
    subject = subjects.SUBJECTS["donut"]
    on_white = subjects.render_subject(subject, "white", 32, 32, 18)
    on_black = subjects.render_subject(subject, "black", 32, 32, 18)
    whole = [scorer.mean_histogram([im]) for im in (on_white, on_black)]
    objects = [scorer.mean_histogram([im], objects_only=True) for im in (on_white, on_black)]
    assert scorer.histogram_distance(*whole) > 0.5
    assert scorer.histogram_distance(*objects) < 0.15


@pytest.mark.parametrize("name", list(subjects.SUBJECTS))
def test_subjects_are_outside_the_world(name: str) -> None:
    subject = subjects.SUBJECTS[name]
    palette = np.array(list(world.COLORS.values()), dtype=float)
    for ink in subject.inks:
        assert np.linalg.norm(palette - subjects.INK[ink], axis=1).min() > 50, ink
    views = subjects.render_views(subject)
    assert len(views) == len(subjects.VIEW_BACKGROUNDS)
    for view, background in zip(views, subjects.VIEW_BACKGROUNDS, strict=True):
        assert scorer.read_scene(view).background == background
        assert scorer.object_mask(view).mean() > 0.1
    assert subjects.RECONTEXT_BACKGROUND not in subjects.VIEW_BACKGROUNDS


def test_written_views_carry_captions_naming_their_background(tmp_path) -> None:
    subject = subjects.SUBJECTS["robot"]
    paths = subjects.write_views(subject, tmp_path, caption="a qwe toy")
    assert [p.name for p in paths] == [f"robot_{i}.png" for i in range(len(paths))]
    for path, background in zip(paths, subjects.VIEW_BACKGROUNDS, strict=True):
        assert path.with_suffix(".txt").read_text() == f"a qwe toy on a {background} background\n"
        assert scorer.read_scene(Image.open(path)).background == background
    assert not list(subjects.write_views(subject, tmp_path / "bare")[0].parent.glob("*.txt"))
