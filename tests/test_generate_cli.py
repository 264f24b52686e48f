"""The generation command line, end to end on the tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from hra_diffusion import HRAConfig, hra_parameters, inject_hra, save_hra_weights
from hra_diffusion.generate import main


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
    assert list(tmp_path.iterdir()) == []
