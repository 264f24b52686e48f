"""The generation command line, end to end on the tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from hra_diffusion import HRAConfig, hra_parameters, inject_hra, save_hra_weights
from hra_diffusion.functional import merged_weight
from hra_diffusion.inference import load_pipeline
from hra_diffusion.pipelines.generate import main


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
