"""benchmarks/control_world.py's condition-use check on the bundled model."""

from __future__ import annotations

from pathlib import Path

import torch
from benchmark_scripts import load_benchmark
from diffusers import UNet2DConditionModel

from hra_diffusion import UNET_ATTENTION_FF_TARGETS, HRAConfig, hra_parameters, inject_hra
from hra_diffusion.control import (
    attach_condition_encoder,
    build_condition_encoder,
    save_control_weights,
)
from hra_diffusion.train.make_world_dataset import main as make_world_dataset
from hra_diffusion.world.tiny_sd import default_model_path


def control_weights(folder: Path, random_output: bool) -> Path:
    """Control weights for the bundled UNet: HRA at the identity, the encoder's output conv
    zero (as trained runs start) or random (an encoder whose output depends on the map)."""
    unet = UNet2DConditionModel.from_pretrained(default_model_path(), subfolder="unet")
    inject_hra(unet, HRAConfig(r=8, target_modules=UNET_ATTENTION_FF_TARGETS))
    torch.manual_seed(0)  # the encoder's random layers: the gap below varies 3e-7 to 6e-6 with them
    encoder = build_condition_encoder(unet, (16, 32, 64))
    if random_output:
        torch.nn.init.normal_(
            encoder.conv_out.weight, std=0.1, generator=torch.Generator().manual_seed(0)
        )
    attach_condition_encoder(unet, encoder)
    return save_control_weights(folder, unet).parent


def test_condition_use_is_exact_for_an_ignored_condition(tmp_path: Path) -> None:
    """A zero encoder output gives equal losses; a random one that depends on the map does
    not, though it carries no information, so it moves them only slightly (6e-6 here:
    the scale a trained run's gap has to beat)."""
    bench = load_benchmark("control_world")
    data = tmp_path / "eval"
    make_world_dataset(["--output_dir", str(data), "--num_scenes", "4", "--max_offset", "14"])
    zero = bench.condition_use(control_weights(tmp_path / "zero", False), data, "segmentation", 0)
    assert zero["own_condition"] == zero["other_scene_condition"]
    rand = bench.condition_use(control_weights(tmp_path / "rand", True), data, "segmentation", 0)
    assert rand["own_condition"] != rand["other_scene_condition"]
    gap = abs(rand["own_condition"] - rand["other_scene_condition"])
    assert 0 < gap < 2e-5, rand  # measured 6.1e-6; the encoder itself moves the loss by 3e-4
    assert rand["own_condition"] != zero["own_condition"]


def test_adapter_options_pick_the_lora_rank_nearest_hra() -> None:
    bench = load_benchmark("control_world")
    hra_options, counts = bench.adapter_options("hra", [])
    lora_options, same = bench.adapter_options("lora", [])
    assert hra_options == [] and same == counts
    assert lora_options == ["--adapter", "lora", "--lora_rank", str(counts["lora_rank"])]
    unet = UNet2DConditionModel.from_pretrained(default_model_path(), subfolder="unet")
    inject_hra(unet, HRAConfig(r=8, target_modules=UNET_ATTENTION_FF_TARGETS))
    assert counts["hra"] == sum(p.numel() for p in hra_parameters(unet))
    per_rank = counts["lora"] // counts["lora_rank"]
    assert abs(counts["lora"] - counts["hra"]) <= per_rank / 2
    _, fewer = bench.adapter_options("lora", ["--hra_target_modules", "to_q", "--hra_r", "4"])
    assert fewer["hra_r"] == 4 and fewer["hra"] < counts["hra"] / 2
