"""PEFT HRA adapters load through load_hra_weights, and ours load through PeftModel."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from hra_diffusion import (
    HRAConfig,
    hra_layers,
    hra_parameters,
    inject_hra,
    load_hra_weights,
    save_peft_adapter,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "down_blocks.0.resnets.0.conv1"]  # + one 3×3 conv


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, H, W)
    context = torch.randn(1, 5, 32, generator=generator)  # (B, tokens, width)
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context).sample


def base_unet(model_dir: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")


@pytest.mark.parametrize("apply_gs", [False, True])
def test_peft_adapter_loads_through_load_hra_weights(
    tiny_model_dir: Path, tmp_path: Path, apply_gs: bool
) -> None:
    torch.manual_seed(0)
    config = peft.HRAConfig(r=4, apply_GS=apply_gs, target_modules=TARGETS, init_weights=False)
    peft_unet = peft.get_peft_model(base_unet(tiny_model_dir), config)
    expected = unet_output(peft_unet)
    peft_unet.save_pretrained(tmp_path)

    unet = base_unet(tiny_model_dir)
    keys = load_hra_weights(unet, tmp_path)
    assert unet.hra_config.apply_gs is apply_gs and unet.hra_config.r == 4
    assert len(keys) == len(list(hra_layers(unet))) > 0
    assert "down_blocks.0.resnets.0.conv1.hra_u" in keys
    torch.testing.assert_close(unet_output(unet), expected, rtol=1e-4, atol=1e-5)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_hra_weights(pipe, tmp_path / "adapter_model.safetensors")  # goes to the UNet by default
    torch.testing.assert_close(unet_output(pipe.unet), expected, rtol=1e-4, atol=1e-5)
    assert not any(hra_layers(pipe.text_encoder))


def test_our_adapter_loads_through_peft_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    unet = base_unet(tiny_model_dir)
    inject_hra(unet, HRAConfig(r=4, target_modules=tuple(TARGETS)))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hra_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=generator))
    expected = unet_output(unet)

    save_peft_adapter(unet, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "HRA" and config["r"] == 4 and config["apply_GS"] is False
    peft_unet = peft.PeftModel.from_pretrained(base_unet(tiny_model_dir), tmp_path)
    torch.testing.assert_close(unet_output(peft_unet), expected, rtol=1e-4, atol=1e-5)


def test_non_hra_peft_adapter_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    lora = peft.get_peft_model(base_unet(tiny_model_dir), peft.LoraConfig(target_modules=["to_q"]))
    lora.save_pretrained(tmp_path)
    unet = base_unet(tiny_model_dir)
    with pytest.raises(ValueError, match="'LORA' adapter"):
        load_hra_weights(unet, tmp_path)
    assert not any(hra_layers(unet))
