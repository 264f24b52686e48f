"""The world evaluator models: configs, loaders, readers, the LPIPS-style distance, training."""

import json
import warnings

import numpy as np
import pytest
import torch
from eval_tiny_models import single_thread
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    SegformerForSemanticSegmentation,
    SegformerImageProcessor,
    ViTForImageClassification,
    ViTImageProcessor,
)

from hra_diffusion import world
from hra_diffusion.eval.errors import EvaluationError
from hra_diffusion.eval.models import AttributeReader, ClipEncoder, DinoEncoder, Segmenter
from hra_diffusion.eval.similarity import feature_distance
from hra_diffusion.eval.world_attributes import agreement, attribute_accuracy, clip_readings
from hra_diffusion.train import train_world_evaluators
from hra_diffusion.world import evaluators

one_thread = pytest.fixture(scope="module", autouse=True)(single_thread)

SCENES = [
    world.Scene("circle", "red", "blue", 30.0, 33.0, 16.0),
    world.Scene("square", "yellow", "black", 34.0, 31.0, 18.0),
    world.Scene("triangle", "white", "green", 32.0, 32.0, 17.0),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a red circle on a blue background", ("circle", "red", "blue")),
        ("a photo of a red qwe circle on a blue background", ("circle", "red", "blue")),
        ("a blue background with a red circle", ("circle", "red", "blue")),
        ("a circle on a blue background", ("circle", None, "blue")),
        ("a red circle", ("circle", "red", None)),
        ("a qwe toy on a blue background", (None, None, "blue")),
    ],
)
def test_caption_attributes_reads_every_caption_form(text, expected):
    named = evaluators.caption_attributes(text)
    assert (named["shape"], named["color"], named["background"]) == expected


def test_consistent_and_full_captions():
    scene = SCENES[0]
    assert evaluators.consistent(evaluators.caption_attributes("a red circle"), scene)
    assert not evaluators.consistent(evaluators.caption_attributes("a red square"), scene)
    table = evaluators.all_full_captions()
    assert len(table) == 3 * 6 * 5 and len({c for _, c in table}) == 90
    assert all(evaluators.caption_attributes(c)["background"] == s.background for s, c in table)


def test_every_training_caption_is_consistent_with_its_scene():
    rng = np.random.default_rng(0)
    for _ in range(200):
        scene = world.sample_scene(rng, "all")
        text = world.sample_caption(scene, rng)
        assert evaluators.consistent(evaluators.caption_attributes(text), scene), text


def test_read_vit_attributes_takes_the_argmax_of_each_slice():
    logits = torch.zeros(2, 15)
    slices = evaluators.attribute_slices()
    logits[0, slices["shape"].start + 2] = 1  # triangle
    logits[0, slices["color"].start + 1] = 1  # yellow
    logits[0, slices["background"].start + 5] = 1  # black
    readings = evaluators.read_vit_attributes(logits)
    assert readings[0] == {"shape": "triangle", "color": "yellow", "background": "black"}
    assert readings[1] == {"shape": "circle", "color": "red", "background": "red"}
    assert evaluators.attribute_labels()[slices["background"].start] == "background:red"


def test_attribute_accuracy_and_agreement():
    readings = [{"shape": s.shape, "color": s.color, "background": s.background} for s in SCENES]
    readings[1] = {**readings[1], "shape": "circle"}
    acc = attribute_accuracy(readings, SCENES)
    assert acc == pytest.approx({"shape": 2 / 3, "color": 1, "background": 1, "all": 2 / 3})
    assert agreement(readings, readings)["shape"] == 1.0
    with pytest.raises(ValueError, match="one reading per scene"):
        attribute_accuracy(readings[:2], SCENES)


def test_feature_distance_matches_a_naive_loop():
    generator = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 4, generator=generator) for _ in range(2)]
    ys = [torch.randn(3, 5, 4, generator=generator) for _ in range(2)]
    expected = torch.zeros(3, dtype=torch.float64)
    for b in range(3):
        for x, y in zip(xs, ys, strict=True):
            for t in range(5):
                u, v = x[b, t].double(), y[b, t].double()
                expected[b] += ((u / u.norm() - v / v.norm()) ** 2).sum() / (5 * 2)
    assert torch.allclose(feature_distance(xs, ys), expected)
    assert torch.allclose(feature_distance(xs, xs), torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(feature_distance(xs, ys), feature_distance(ys, xs))
    with pytest.raises(ValueError, match="number of layers"):
        feature_distance(xs, ys[:1])


# --------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_world_models(tmp_path_factory):
    """Tiny evaluator models of the shipped classes and configs, saved as training saves them."""
    root = tmp_path_factory.mktemp("world_evaluators")
    torch.manual_seed(0)
    size = evaluators.ClipSize(vision_layers=1, vision_width=64, transformer_layers=1)
    clip_model = evaluators.build_clip(size)
    save_file({k: v.half().contiguous() for k, v in clip_model.state_dict().items()},
              str(root / "clip.safetensors"))  # fmt: skip
    vit = ViTForImageClassification(evaluators.vit_config(hidden_size=32, layers=1, heads=2))
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "vit")
    config = evaluators.segformer_config(hidden_sizes=(8, 8, 16, 16), decoder_hidden_size=16)
    SegformerForSemanticSegmentation(config).save_pretrained(root / "segformer")
    SegformerImageProcessor(size={"height": 64, "width": 64}).save_pretrained(root / "segformer")
    return root


def test_tiny_clip_loads_through_the_metric_loader_and_reads_captions(tiny_world_models):
    clip = ClipEncoder(str(tiny_world_models / "clip.safetensors"), "cpu")
    assert clip.resolution == world.SIZE and clip.model.context_length == 32
    images = [world.render_scene(s) for s in SCENES]
    readings = clip_readings(clip, images, batch_size=2)
    assert len(readings) == 3
    for r in readings:
        assert r["shape"] in world.SHAPES and r["color"] != r["background"]


def test_attribute_vit_serves_the_dino_slot_and_the_reader(tiny_world_models):
    folder = str(tiny_world_models / "vit")
    images = [world.render_scene(s) for s in SCENES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dino = DinoEncoder(folder, "cpu")
    reader = AttributeReader(folder, "cpu")
    cls = dino(images)  # (3, 32)
    pixels = reader.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = reader.model(pixel_values=pixels, output_hidden_states=True)
        expected = reader.model.vit.layernorm(hidden.hidden_states[-1])[:, 0]
    assert torch.allclose(cls, expected, atol=1e-5)  # the same CLS token the heads read
    features = dino.token_features(images)
    assert len(features) == 1 and features[0].shape == (3, 64, 32)  # 8 × 8 patches
    readings = reader(images)
    assert set(readings[0]) == {"shape", "color", "background"}


def test_attribute_reader_refuses_a_plain_classifier(tmp_path):
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, image_size=64, patch_size=8, num_labels=3)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(EvaluationError, match="not an attribute ViT"):
        AttributeReader(str(tmp_path), "cpu")


def test_world_segformer_loads_with_four_classes(tiny_world_models):
    segmenter = Segmenter(str(tiny_world_models / "segformer"), "cpu")
    assert segmenter.num_classes == len(world.LABELS)
    (prediction,) = segmenter([world.render_scene(SCENES[0])], [(64, 64)])
    assert prediction.shape == (64, 64) and prediction.max() < 4


# --------------------------------------------------------------------------- the training script


def test_training_script_writes_loadable_models_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "evaluators"
    args = ["--output_dir", str(out), "--num_scenes", "8", "--vae_share", "0.5",
            "--clip_steps", "2", "--vit_steps", "2", "--segformer_steps", "2",
            "--batch_size", "4", "--segformer_batch_size", "2", "--warmup_steps", "1"]  # fmt: skip
    train_world_evaluators.main(args)
    recipe = {m: json.loads((out / f"recipe_{m}.json").read_text()) for m in ("clip", "vit")}
    assert recipe["vit"]["steps"] == 2 and recipe["clip"]["wall_seconds"] > 0
    assert recipe["clip"]["command_args"]["seed"] == 0 and recipe["clip"]["parameters"] > 0
    ClipEncoder(str(out / "clip.safetensors"), "cpu")
    AttributeReader(str(out / "vit"), "cpu")
    Segmenter(str(out / "segformer"), "cpu")
    before = (out / "clip.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="--overwrite_output_dir"):
        train_world_evaluators.main(args)
    assert (out / "clip.safetensors").read_bytes() == before
    train_world_evaluators.main([*args, "--models", "vit", "--overwrite_output_dir"])
    assert (out / "clip.safetensors").read_bytes() == before  # only the ViT was retrained


def test_training_script_fine_tunes_with_the_identity_loss(tmp_path, tiny_world_models):
    out = tmp_path / "tuned"
    args = ["--output_dir", str(out), "--num_scenes", "8", "--vae_share", "0",
            "--clip_steps", "2", "--vit_steps", "2", "--batch_size", "4", "--warmup_steps", "1",
            "--init_dir", str(tiny_world_models), "--models", "clip", "vit",
            "--identity_families", "2", "--identity_views", "2",
            "--identity_batch", "2"]  # fmt: skip
    train_world_evaluators.main(args)
    recipe = json.loads((out / "recipe_vit.json").read_text())
    assert recipe["command_args"]["init_dir"] == str(tiny_world_models)
    assert recipe["command_args"]["identity_families"] == 2 and recipe["steps"] == 2
    clip = ClipEncoder(str(out / "clip.safetensors"), "cpu")
    assert clip.model.visual.transformer.layers == 1  # the architecture of --init_dir's CLIP
    assert AttributeReader(str(out / "vit"), "cpu").model.config.hidden_size == 32


def test_identity_pool_draws_two_views_of_each_subject_and_the_loss_rewards_identity():
    pool = train_world_evaluators.IdentityPool(families=2, views=4, seed=0)
    assert pool.images.shape == (2, 3, 4, 3, 64, 64) and pool.images.dtype == torch.uint8
    views, labels = pool.batch(3, torch.Generator().manual_seed(0))
    assert views.shape == (18, 3, 64, 64) and 0 <= views.min() and views.max() <= 1
    assert labels.tolist() == [k for k in range(9) for _ in range(2)]
    assert all(not torch.equal(views[2 * k], views[2 * k + 1]) for k in range(9))
    loss = train_world_evaluators.identity_loss
    ideal = torch.nn.functional.one_hot(labels).float()  # (18, 9): one direction per subject
    noise = torch.randn(18, 9, generator=torch.Generator().manual_seed(0))
    assert loss(ideal, labels, 0.1) < 0.01 < loss(noise, labels, 0.1)


# --------------------------------------------------------------------------- the shipped weights


def test_shipped_evaluators_load_and_read_rendered_scenes():
    images = [world.render_scene(s) for s in SCENES]
    truth = [{"shape": s.shape, "color": s.color, "background": s.background} for s in SCENES]
    clip_read = clip_readings(ClipEncoder(str(evaluators.CLIP_FILE), "cpu"), images, 8)
    for reading, expected in zip(clip_read, truth, strict=True):  # CLIP's shapes are weak
        assert (reading["color"], reading["background"]) == (
            expected["color"],
            expected["background"],
        )
    assert AttributeReader(str(evaluators.VIT_DIR), "cpu")(images) == truth
    segmenter = Segmenter(str(evaluators.SEGFORMER_DIR), "cpu")
    labels = np.asarray(world.label_map(SCENES[0])).astype(np.int64) - 1  # (64, 64)
    (prediction,) = segmenter(images[:1], [(64, 64)])
    keep = labels >= 0
    is_object = labels[keep] > 0  # background is class 0: the SegFormer finds the object
    assert ((prediction[keep] > 0) == is_object).mean() > 0.95
    size = sum(p.stat().st_size for p in evaluators.ASSETS.rglob("*.safetensors"))
    assert size <= 20 * 2**20


def test_vae_round_trip_keeps_a_scene_recognisable():
    image = torch.from_numpy(np.asarray(world.render_scene(SCENES[0]))).permute(2, 0, 1)
    x = image[None].float() / 255  # (1, 3, 64, 64)
    y = evaluators.vae_round_trip(x, seed=0)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert (y - x).abs().mean() < 0.1
    assert Image.fromarray((y[0].permute(1, 2, 0) * 255).byte().numpy()).size == (64, 64)


def test_evaluate_control_scores_world_label_maps_with_no_model_flag(tmp_path):
    from hra_diffusion.eval import evaluate_control

    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for i, scene in enumerate(SCENES):
        world.render_scene(scene).save(images / f"{i}.png")
        world.label_map(scene).save(labels / f"{i}.png")
    args = ["segmentation", "--images", str(images), "--labels", str(labels),
            "--device", "cpu", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    assert evaluate_control.main(args) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["num_classes"] == 4 and result["per_class_iou"][0] > 0.9  # background
