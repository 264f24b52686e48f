"""train/train_control_hra.py end to end on a tiny model and 8 synthetic (image, condition, text)
triples at 32 px: data layouts, bad input, loss, save/load/sample round trip (seeding and exact
resume: test_training_features.py)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from original_layout import save_original_checkpoint
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hra_diffusion import hra_layers
from hra_diffusion.ade20k import ADE20K_PALETTE
from hra_diffusion.conditions import canny_edges, make_condition
from hra_diffusion.control import (
    control_parameter_groups,
    load_control_weights,
    save_control_weights,
)
from hra_diffusion.pipelines.pipeline_hra_control import StableDiffusionHRAControlPipeline
from hra_diffusion.train import train_control_hra
from hra_diffusion.train.control_data import ControlDataset, collate_control, load_control_source
from hra_diffusion.world.tiny_sd import default_model_path

SIZE = 32
FAST = ["--resolution", str(SIZE), "--condition_encoder_channels", "4", "8", "8", "16"]


def triples(n: int = 8) -> list[tuple[Image.Image, Image.Image, str]]:
    """Photos of a coloured square and its ADE20K label map (mode L), with captions."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        label = int(rng.integers(1, 151))
        x, y = (int(v) for v in rng.integers(2, 16, 2))
        photo = np.full((SIZE, SIZE, 3), 40, np.uint8)
        photo[y : y + 12, x : x + 12] = ADE20K_PALETTE[label - 1]
        ids = np.zeros((SIZE, SIZE), np.uint8)
        ids[y : y + 12, x : x + 12] = label
        out.append((Image.fromarray(photo), Image.fromarray(ids), f"a square number {i}"))
    return out


def write_folder(root: Path, rows=None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "conditions").mkdir()
    lines = []
    for i, (photo, ids, text) in enumerate(rows or triples()):
        photo.save(root / "images" / f"{i}.png")
        ids.save(root / "conditions" / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "condition": f"{i}.png", "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_saved(root: Path) -> Path:
    photos, ids, texts = zip(*triples(), strict=True)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "conditioning_image": datasets.Image(),
            "text": datasets.Value("string"),
        }
    )
    data = {"image": list(photos), "conditioning_image": list(ids), "text": list(texts)}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(root))
    return root


def write_imagefolder(root: Path) -> Path:
    write_folder(root)
    lines = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows = [
        {
            "file_name": f"images/{r['image']}",
            "conditioning_image_file_name": f"conditions/{r['condition']}",
            "text": r["text"],
        }
        for r in lines
    ]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {
        "folder": write_folder(tmp_path_factory.mktemp("folder")),
        "saved": write_saved(tmp_path_factory.mktemp("saved")),
    }


def train(*argv: str) -> Path:
    return train_control_hra.main([*FAST, *argv])


def fixed_losses(model_dir: Path, weights: Path, folder: Path) -> tuple[float, float]:
    """Mean training loss over every example (2 fixed noise draws, no caption dropout),
    at initialisation and with ``weights``."""
    args = train_control_hra.parse_args(
        ["--train_data_dir", str(folder), "--condition_type", "segmentation", *FAST]
    )
    source = load_control_source(str(folder), "auto", "segmentation", "", "", "")
    batch = collate_control(
        [ControlDataset(source, "segmentation", SIZE)[(i, 0)] for i in range(8)]
    )
    tokenizer, text_encoder, vae, initial, scheduler = train_control_hra.load_models(
        model_dir, None
    )
    train_control_hra.add_control(args, initial, vae)
    trained = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    load_control_weights(trained, weights)
    means = []
    for unet in (initial, trained):
        with torch.no_grad():
            losses = [
                train_control_hra.training_loss(
                    batch,
                    torch.Generator().manual_seed(k),
                    unet,
                    text_encoder,
                    tokenizer,
                    vae,
                    scheduler,
                    args,
                    unet,
                )[0].item()
                for k in range(2)
            ]
        means.append(float(np.mean(losses)))
    return means[0], means[1]


def test_layouts_yield_the_same_examples(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    roots = {**data, "imagefolder": write_imagefolder(tmp_path / "imagefolder")}
    examples = {}
    for layout, root in roots.items():
        source = load_control_source(
            str(root), "auto", "segmentation", "image", "conditioning_image", "text"
        )
        dataset = ControlDataset(source, "segmentation", SIZE, center_crop=True)
        examples[layout] = collate_control([dataset[(i, 7)] for i in range(len(dataset))])
    for layout in ("saved", "imagefolder"):
        for key in ("pixel_values", "conditioning_pixel_values"):
            torch.testing.assert_close(examples[layout][key], examples["folder"][key])
        assert examples[layout]["text"] == examples["folder"]["text"]
    cond = examples["folder"]["conditioning_pixel_values"][0]  # (3, 32, 32): palette colours
    assert cond.shape == (3, SIZE, SIZE) and cond.max() > 0

    source = load_control_source(str(data["saved"]), "auto", "canny", "image", "missing", "text")
    canny = ControlDataset(source, "canny", SIZE, canny_low_threshold=50)[(0, 0)]
    photo = Image.fromarray(
        ((canny["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    )
    expected = np.asarray(canny_edges(photo, 50, 200), np.float32) / 255.0  # (32, 32, 3)
    np.testing.assert_array_equal(canny["conditioning_pixel_values"].permute(1, 2, 0), expected)
    assert expected.any()


@pytest.mark.parametrize(
    ("adapter", "config_key"),
    [((), "unet.hra_config"), (("--adapter", "lora", "--lora_rank", "2"), "unet.lora_config")],
)
def test_training_lowers_loss_round_trips_and_the_output_depends_on_the_condition(
    data: dict[str, Path],
    tiny_model_dir: Path,
    tmp_path: Path,
    adapter: tuple[str, ...],
    config_key: str,
) -> None:
    out = tmp_path / "run"
    weights = train(
        *adapter,
        "--pretrained_model_name_or_path", str(tiny_model_dir),
        "--train_data_dir", str(data["folder"]),
        "--condition_type", "segmentation",
        "--max_train_steps", "8",
        "--checkpointing_steps", "8",
        "--validation_image", str(data["folder"] / "conditions" / "0.png"),
        "--validation_prompt", "a square",
        "--num_validation_images", "1",
        "--num_validation_inference_steps", "2",
        "--validation_steps", "8",
        "--report_to", "tensorboard",
        "--output_dir", str(out),
    )  # fmt: skip
    assert weights == out / "hra_control_weights.safetensors"
    assert (out / "checkpoint-8" / "hra_control_weights.safetensors").is_file()
    row = Image.open(out / "validation" / "step-8" / "00.png")
    assert row.size == (SIZE * 3, SIZE)  # control | sample | prompt
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    with safe_open(weights, "pt") as file:
        assert config_key in file.metadata()

    before, after = fixed_losses(tiny_model_dir, weights, data["folder"])
    assert after < before - 1e-3

    def pipe_from(path: Path) -> StableDiffusionHRAControlPipeline:
        pipe = StableDiffusionHRAControlPipeline.from_base(tiny_model_dir, path)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(pipe, condition: Image.Image, output_type: str = "np") -> np.ndarray:
        return np.asarray(
            pipe(
                "a square",
                image=condition,
                num_inference_steps=3,
                generator=torch.Generator().manual_seed(0),
                output_type=output_type,
            ).images
        )

    first = pipe_from(weights)
    resaved = save_control_weights(tmp_path / "again", first.unet)
    cond_a, cond_b = (
        make_condition("segmentation", condition=Image.open(data["folder"] / "conditions" / f))
        for f in ("0.png", "1.png")
    )
    image_a = sample(first, cond_a)
    np.testing.assert_array_equal(image_a, sample(pipe_from(resaved), cond_a))
    np.testing.assert_array_equal(image_a, sample(first, cond_a))
    latents_a, latents_b = (sample(first, c, "latent") for c in (cond_a, cond_b))  # (1, 4, 4, 4)
    assert np.abs(latents_a - latents_b).max() > 1e-5  # exactly 0 at initialisation


def test_condition_encoder_lr_sets_the_encoders_rate_alone(
    data: dict[str, Path], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Adam's first step moves every weight by about its rate: the zero-initialised output
    conv moves by 1e-12 at ``--condition_encoder_lr`` 1e-12 and by 9e-4 without it, while the
    adapter's step is the same in both (its first step sees a zero encoder output)."""

    def trained(*options: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"run{len(options)}"
        weights = train(
            "--pretrained_model_name_or_path", str(tiny_model_dir),
            "--train_data_dir", str(data["folder"]),
            "--condition_type", "segmentation",
            "--max_train_steps", "1",
            "--learning_rate", "9e-4",
            "--report_to", "none",
            "--output_dir", str(out),
            *options,
        )  # fmt: skip
        return load_file(weights)

    same_rate = trained()
    slow_encoder = trained("--condition_encoder_lr", "1e-12")
    conv_out = "condition_encoder.conv_out.weight"
    ratio = slow_encoder[conv_out].abs().max() / same_rate[conv_out].abs().max()
    assert ratio.item() == pytest.approx(1e-12 / 9e-4, rel=1e-3)  # Adam's first step: ~lr
    adapter = [k for k in same_rate if k.endswith(".hra_u")]
    assert adapter
    for key in adapter:
        torch.testing.assert_close(slow_encoder[key], same_rate[key], rtol=0, atol=0)


def test_a_single_file_base_trains_as_its_folder(
    data: dict[str, Path], model_dir: Path, tmp_path: Path
) -> None:
    """An original-layout single file with --base_config (its folder) trains the same control
    weights as the folder, at the same seed."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    single = save_original_checkpoint(pipe, tmp_path / "tiny.safetensors")

    def trained(name: str, *model: str) -> dict[str, torch.Tensor]:
        weights = train(
            "--pretrained_model_name_or_path", *model,
            "--train_data_dir", str(data["folder"]),
            "--condition_type", "segmentation",
            "--max_train_steps", "2",
            "--seed", "0",
            "--report_to", "none",
            "--output_dir", str(tmp_path / name),
        )  # fmt: skip
        return load_file(weights)

    folder = trained("folder", str(model_dir))
    file = trained("file", str(single), "--base_config", str(model_dir))
    assert file.keys() == folder.keys()
    assert any(k.endswith(".hra_u") for k in file)
    assert all(torch.equal(file[k], folder[k]) for k in file)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--adapter", "lora", "--hra_r", "8"), "--hra_r has no effect with --adapter lora"),
        (("--adapter", "lora", "--hra_init", "paper"), "--hra_init has no effect"),
        (("--adapter", "lora", "--hra_magnitude"), "--hra_magnitude has no effect"),
        (("--lora_rank", "4"), "--lora_rank has no effect with --adapter hra"),
    ],
)
def test_options_of_the_other_adapter_are_refused(
    data: dict[str, Path], options: tuple[str, ...], message: str
) -> None:
    folder = str(data["folder"])
    with pytest.raises(SystemExit, match=message):
        train("--train_data_dir", folder, "--condition_type", "segmentation", *options)


def test_bundled_model_trains_with_the_default_encoder(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """Without --condition_encoder_channels the encoder follows the loaded VAE: the bundled
    model's VAE downsamples 4x, so three widths (16 32 96), and 2 steps train."""
    weights = train_control_hra.main(
        [
            "--train_data_dir", str(data["folder"]), "--condition_type", "segmentation",
            "--resolution", str(SIZE), "--max_train_steps", "2", "--report_to", "none",
            "--output_dir", str(tmp_path / "out"),
        ]
    )  # fmt: skip
    with safe_open(str(weights), "pt") as f:
        encoder = json.loads(f.metadata()["condition_encoder.config"])
    assert encoder["block_out_channels"] == [16, 32, 96]


def test_a_run_with_default_widths_resumes_with_them_written_out(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """The checkpoint records the widths the encoder got (16 32 96 for the bundled VAE), so a
    resume may leave them out or write them; other widths are refused by name."""
    run = [
        "--train_data_dir", str(data["folder"]), "--condition_type", "segmentation",
        "--resolution", str(SIZE), "--report_to", "none", "--output_dir", str(tmp_path / "out"),
        "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest",
    ]  # fmt: skip
    train_control_hra.main([*run, "--max_train_steps", "1"])
    with pytest.raises(SystemExit, match="written with --condition_encoder_channels 16 32 96, "):
        train_control_hra.main(
            [*run, "--max_train_steps", "2", "--condition_encoder_channels", "16", "32", "64"]
        )
    train_control_hra.main(
        [*run, "--max_train_steps", "2", "--condition_encoder_channels", "16", "32", "96"]
    )
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


def test_encoder_widths_of_another_factor_name_the_fitting_ones(
    data: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit, match=r"pass 3 widths \(e\.g\. 16 32 96\) or leave it out"):
        train_control_hra.main(
            [
                "--train_data_dir", str(data["folder"]), "--condition_type", "segmentation",
                "--resolution", str(SIZE), "--condition_encoder_channels", "16", "32", "96", "256",
                "--max_train_steps", "1", "--report_to", "none",
                "--output_dir", str(tmp_path / "out"),
            ]
        )  # fmt: skip


def bad_folder(root: Path, problem: str) -> Path:
    rows = triples(2)
    if problem == "empty":
        root.mkdir()
        (root / "metadata.jsonl").write_text("")
        return root
    if problem == "labels":
        rows[0] = (rows[0][0], Image.fromarray(np.full((SIZE, SIZE), 200, np.uint8)), rows[0][2])
    write_folder(root, rows)
    if problem == "missing":
        (root / "conditions" / "1.png").unlink()
    return root


@pytest.mark.parametrize(
    ("problem", "message"),
    [
        ("missing", r"condition file .*1\.png for image 1\.png is missing"),
        ("empty", r"holds no examples"),
    ],
)
def test_bad_data_is_refused_before_training(tmp_path: Path, problem: str, message: str) -> None:
    root = bad_folder(tmp_path / "data", problem)
    with pytest.raises(SystemExit, match=message):
        train("--train_data_dir", str(root), "--condition_type", "segmentation")


def test_condition_of_another_size_gets_the_images_resize_and_crop(tmp_path: Path) -> None:
    rows = triples(2)
    nearest = Image.Resampling.NEAREST
    small = rows[1][1].resize((16, 16), nearest)
    examples = []
    for name, condition in (("small", small), ("resized", small.resize((SIZE, SIZE), nearest))):
        root = write_folder(tmp_path / name, [rows[0], (rows[1][0], condition, rows[1][2])])
        source = load_control_source(str(root), "auto", "segmentation", "", "", "")
        examples.append(ControlDataset(source, "segmentation", SIZE)[(1, 0)])
    assert examples[0]["conditioning_pixel_values"].shape == (3, SIZE, SIZE)
    torch.testing.assert_close(
        examples[0]["conditioning_pixel_values"], examples[1]["conditioning_pixel_values"]
    )


def test_bad_options_are_refused(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        train("--train_data_dir", str(data["folder"]), "--condition_type", "depth")
    assert "invalid choice: 'depth'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no column 'caption'.*--caption_column"):
        train(
            "--train_data_dir", str(data["saved"]),
            "--condition_type", "segmentation",
            "--caption_column", "caption",
        )  # fmt: skip
    empty = tmp_path / "empty_saved"
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    datasets.Dataset.from_dict({"image": [], "text": []}, features=features).save_to_disk(empty)
    with pytest.raises(SystemExit, match="holds no examples"):
        train("--train_data_dir", str(empty), "--condition_type", "canny")


def test_sdxl_base_is_refused_in_one_line(
    data: dict[str, Path], tmp_path: Path, sdxl_dir: Path
) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        train(
            "--pretrained_model_name_or_path", str(sdxl_dir),
            "--train_data_dir", str(data["folder"]), "--condition_type", "segmentation",
            "--output_dir", str(out),
        )  # fmt: skip
    message = str(info.value)
    assert info.value.code == 2, message
    assert "\n" not in message
    assert "is a Stable Diffusion XL pipeline" in message
    assert "this script does not support Stable Diffusion XL yet" in message
    assert not out.exists()


def test_out_of_range_label_names_the_file(tmp_path: Path) -> None:
    root = bad_folder(tmp_path / "data", "labels")
    source = load_control_source(str(root), "auto", "segmentation", "", "", "")
    dataset = ControlDataset(source, "segmentation", SIZE)
    with pytest.raises(ValueError, match=r"images/0\.png: Label map holds class ids \[200\]"):
        dataset[(0, 0)]


def test_hra_magnitude_reaches_every_adapter(data: dict[str, Path]) -> None:
    args = train_control_hra.parse_args(
        ["--train_data_dir", str(data["folder"]), "--condition_type", "segmentation",
         "--hra_r", "4", "--hra_magnitude"]
    )  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(default_model_path(), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(default_model_path(), subfolder="vae")
    train_control_hra.add_control(args, unet, vae)
    assert unet.hra_config.magnitude
    layers = [layer for _, layer in hra_layers(unet)]
    assert layers and all(torch.equal(lay.hra_m, torch.ones_like(lay.hra_m)) for lay in layers)
    adapter, _ = control_parameter_groups(unet)
    assert {id(lay.hra_m) for lay in layers} <= {id(p) for p in adapter}


def test_hra_init_scaled_reaches_every_adapter(data: dict[str, Path]) -> None:
    args = train_control_hra.parse_args(
        ["--train_data_dir", str(data["folder"]), "--condition_type", "segmentation",
         "--hra_r", "4", "--hra_init", "scaled"]
    )  # fmt: skip
    unet = UNet2DConditionModel.from_pretrained(default_model_path(), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(default_model_path(), subfolder="vae")
    train_control_hra.add_control(args, unet, vae)
    assert unet.hra_config.init == "scaled"
    layers = list(hra_layers(unet))
    assert layers
    for _, layer in layers:
        norms = layer.hra_u.norm(dim=0)  # (4,)
        torch.testing.assert_close(norms, torch.full((4,), 2.0), atol=1e-6, rtol=0)
