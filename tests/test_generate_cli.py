"""The generation command line, end to end on the tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image

from hra_diffusion import (
    FLUX_TARGETS,
    SD3_TARGETS,
    HRAConfig,
    hra_parameters,
    inject_hra,
    load_hra_weights,
    save_hra_weights,
)
from hra_diffusion.functional import merged_weight
from hra_diffusion.inference import load_pipeline
from hra_diffusion.pipelines.generate import main
from hra_diffusion.world.tiny_transformers import save_tiny_transformer_pipeline


@pytest.fixture
def weights(tiny_pipeline: StableDiffusionPipeline, tmp_path: Path) -> Path:
    inject_hra(tiny_pipeline.unet, HRAConfig(r=4))
    with torch.no_grad():
        for p in hra_parameters(tiny_pipeline.unet):
            p.normal_()
    return save_hra_weights(tmp_path / "hra", unet=tiny_pipeline.unet)


def run(out: Path, *args: str) -> None:
    common = ["--num_images", "2", "--steps", "1", "--height", "64", "--width", "64"]
    main([*common, *args, "--out", str(out)])  # later options win


def test_cli_writes_images_grid_and_settings(
    tiny_model_dir: Path, weights: Path, tmp_path: Path
) -> None:
    out = tmp_path / "samples"
    prompts = ["--prompt", "a photo of qwe dog", "--prompt", "a red cube"]
    run(out, "--model", str(tiny_model_dir), "--weights", str(weights.parent), *prompts,
        "--scheduler", "dpm", "--seed", "3")  # fmt: skip
    names = sorted(p.name for p in out.glob("prompt*.png"))
    assert names == [f"prompt{p:02d}_seed{s}.png" for p in (0, 1) for s in (3, 4)]
    assert Image.open(out / "grid.png").size == (2 * 64, 2 * 64)
    settings = json.loads((out / "generation.json").read_text())
    assert settings["scheduler"] == "dpm" and len(settings["images"]) == 4

    one = [
        "--prompt",
        "a photo of qwe dog",
        "--num_images",
        "1",
        "--scheduler",
        "dpm",
        "--seed",
        "3",
    ]
    again = tmp_path / "again"
    run(again, "--model", str(tiny_model_dir), "--weights", str(weights.parent), *one)
    assert (again / names[0]).read_bytes() == (out / names[0]).read_bytes()
    base = tmp_path / "base"
    run(base, "--model", str(tiny_model_dir), *one)
    assert (base / names[0]).read_bytes() != (out / names[0]).read_bytes()


def test_cli_default_model(tmp_path: Path) -> None:
    run(tmp_path, "--prompt", "a dog", "--num_images", "1")
    assert Image.open(tmp_path / "grid.png").size == (64, 64)


def test_cli_clear_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="Hugging Face Hub"):
        run(tmp_path, "--model", "someorg/not-a-model", "--prompt", "x")
    with pytest.raises(SystemExit, match="does not exist"):
        run(tmp_path, "--model", str(tiny_model_dir), "--weights", str(tmp_path / "nope"),
            "--prompt", "x")  # fmt: skip
    with pytest.raises(SystemExit, match="--model: /nonexistent does not exist: give a diffusers"):
        run(tmp_path, "--model", "/nonexistent", "--prompt", "x")
    assert list(tmp_path.iterdir()) == []


def test_height_not_a_multiple_of_8_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--prompt", "x", "--height", "60"])
    assert "--height: 60 is not a multiple of 8" in capsys.readouterr().err


def test_finished_run_needs_overwrite_and_long_prompt_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    long_prompt = " ".join(["red"] * 100)
    with pytest.warns(UserWarning, match="1 --prompt.* 25 tokens are dropped"):
        run(tmp_path, "--prompt", long_prompt, "--num_images", "1")
    before = (tmp_path / "grid.png").read_bytes()
    with pytest.raises(SystemExit):
        run(tmp_path, "--prompt", "a dog", "--num_images", "1")
    assert "holds a finished run (generation.json); pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "grid.png").read_bytes() == before
    run(tmp_path, "--prompt", "a dog", "--num_images", "1", "--overwrite")


def test_repeated_weights_stack_in_order(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``--weights A --weights B`` samples with W H_A H_B (merged)."""
    files = []
    for seed in (1, 2):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
        inject_hra(pipe.unet, HRAConfig(r=2))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in hra_parameters(pipe.unet):
                p.copy_(torch.randn(p.shape, generator=generator))
        files.append((save_hra_weights(tmp_path / str(seed), unet=pipe.unet), pipe))
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    w = StableDiffusionPipeline.from_pretrained(tiny_model_dir).unet.get_submodule(layer).weight
    (_, first), (_, second) = files
    expected = merged_weight(
        merged_weight(w, first.unet.get_submodule(layer).hra_u),
        second.unet.get_submodule(layer).hra_u,
    )
    stacked = load_pipeline(tiny_model_dir, [str(f) for f, _ in files])
    torch.testing.assert_close(
        stacked.unet.get_submodule(layer).base_layer.weight, expected, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cli_samples_sd3_and_flux_with_the_weights_applied(family: str, tmp_path: Path) -> None:
    """hra-generate picks the family's pipeline class and gives, image for image, what that
    pipeline gives with the same HRA weights loaded by load_hra_weights."""
    pipeline_class = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    base = save_tiny_transformer_pipeline(tmp_path / family, family)
    pipe = pipeline_class.from_pretrained(base)
    targets = {"sd3": SD3_TARGETS, "flux": FLUX_TARGETS}[family]
    inject_hra(pipe.transformer, HRAConfig(r=4, target_modules=targets))
    with torch.no_grad():
        for p in hra_parameters(pipe.transformer):
            p.normal_()
    weights = save_hra_weights(tmp_path / "hra", transformer=pipe.transformer)
    out = tmp_path / "samples"
    main(["--model", str(base), "--weights", str(weights), "--prompt", "a photo of qwe toy",
          "--num_images", "1", "--steps", "2", "--height", "32", "--width", "32", "--seed", "5",
          "--out", str(out)])  # fmt: skip
    guidance = {"sd3": 7.0, "flux": 3.5}[family]
    assert json.loads((out / "generation.json").read_text())["guidance_scale"] == guidance
    expected = pipeline_class.from_pretrained(base)
    load_hra_weights(expected, weights)
    image = expected(
        "a photo of qwe toy",
        num_inference_steps=2,
        guidance_scale=guidance,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    written = Image.open(out / "prompt00_seed5.png")
    difference = np.abs(np.asarray(written, np.int16) - np.asarray(image, np.int16))
    assert difference.max() <= 1  # merged vs unmerged weights: at most one 8-bit level
    plain = pipeline_class.from_pretrained(base)(
        "a photo of qwe toy",
        num_inference_steps=2,
        guidance_scale=guidance,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(5),
    ).images[0]
    assert np.abs(np.asarray(written, np.int16) - np.asarray(plain, np.int16)).max() > 8


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--scheduler", "dpm"), "--scheduler is for the UNet bases; FLUX.1 samples with its own"),
        (("--height", "40"), "--height 40 is not a multiple of 16 (FLUX.1"),
    ],
)
def test_cli_refuses_what_flux_does_not_take_in_one_line(
    extra: tuple[str, ...], fragment: str, tmp_path: Path
) -> None:
    base = save_tiny_transformer_pipeline(tmp_path / "flux", "flux")
    with pytest.raises(SystemExit) as info:
        main(["--model", str(base), "--prompt", "x", "--out", str(tmp_path / "o"), *extra])
    assert info.value.code == 2 and fragment in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "o").exists()
