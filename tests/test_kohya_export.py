"""Kohya-format LoRA export: consumers' key rules, and diffusers' loader reproduces HRA.

The key rules are written down from the consumers' code:

- kohya sd-scripts ``networks/lora.py``: module names ``lora_unet_<module path>`` and
  ``lora_te_<module path>`` (SD 1.x; ``lora_te1_``/``lora_te2_`` for SDXL) with every
  ``.`` replaced by ``_``, each with ``.lora_down.weight``, ``.lora_up.weight`` and
  ``.alpha`` (scale alpha / rank).
- ComfyUI ``comfy/lora.py`` (``model_lora_keys_unet``): ``"lora_unet_" +
  <diffusers weight key without .weight>.replace(".", "_")``; ``model_lora_keys_clip``:
  ``lora_te_text_model_encoder_layers_{b}_{c}`` with c one of LORA_CLIP_MAP's
  ``self_attn_{q,k,v,out}_proj``, ``mlp_fc1``, ``mlp_fc2`` (``lora_te1_`` too for SDXL).
- AUTOMATIC1111/Forge ``extensions-builtin/Lora/networks.py``: a key is split at its
  first dot into the network module name and the weight part.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    HRAConfig,
    export_lora,
    hra_layers,
    hra_parameters,
    inject_hra,
    save_hra_weights,
)

KOHYA_PARTS = {"lora_down.weight", "lora_up.weight", "alpha"}
COMFY_CLIP = re.compile(
    r"lora_te_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc1|mlp_fc2)"
)


def load(model_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(model_dir)


def outputs(pipe: StableDiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet noise prediction, text-encoder hidden states) for fixed random inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, H, W)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)  # (B, tokens)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]  # (B, tokens, width)
        return pipe.unet(latents, 10, encoder_hidden_states=hidden).sample, hidden


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An HRA pipeline (UNet attention + convs, text encoder), its HRA file and kohya export."""
    folder = tmp_path_factory.mktemp("kohya")
    hra = load(tiny_model_dir)
    inject_hra(
        hra.unet, HRAConfig(r=4, target_modules=("to_q", "to_k", "to_v", "to_out.0", "conv1"))
    )
    inject_hra(hra.text_encoder, HRAConfig(r=2, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hra_parameters(hra.unet) + hra_parameters(hra.text_encoder):
            p.copy_(torch.randn(p.shape, generator=generator))
    save_hra_weights(folder, unet=hra.unet, text_encoder=hra.text_encoder)
    kohya_file = export_lora(folder, load(tiny_model_dir), folder, kohya=True)
    return hra, outputs(hra), kohya_file


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_every_key_follows_the_consumers_rules(exported, tiny_model_dir: Path) -> None:
    hra, _, kohya_file = exported
    assert kohya_file.name == "pytorch_lora_weights_kohya.safetensors"
    tensors, metadata = read(kohya_file)
    base = load(tiny_model_dir)
    unet_names = {
        "lora_unet_" + name.replace(".", "_")
        for name, module in base.unet.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }
    modules: dict[str, set[str]] = {}
    for key in tensors:
        name, _, part = key.partition(".")  # A1111/Forge: split at the first dot
        assert part in KOHYA_PARTS, key
        modules.setdefault(name, set()).add(part)
    for name, parts in modules.items():
        assert parts == KOHYA_PARTS, name
        assert name in unet_names or COMFY_CLIP.fullmatch(name), name
        rank = tensors[f"{name}.lora_down.weight"].shape[0]
        assert tensors[f"{name}.alpha"].item() == rank  # scale alpha / rank = 1: exact
    adapted = {"lora_unet_" + name.replace(".", "_") for name, _ in hra_layers(hra.unet)}
    assert len(adapted) == 7 * 2 * 4 + 8  # 7 blocks x 2 attentions x q, k, v, out; 8 conv1
    assert {n for n in modules if n.startswith("lora_unet_")} == adapted
    assert sum(n.startswith("lora_te_") for n in modules) == 4 * 2  # 2 layers × q, k, v, out
    assert metadata["ss_network_module"] == "networks.lora"
    assert "base_fingerprint" in metadata


def test_diffusers_loads_the_kohya_file_to_the_hra_outputs(exported, tiny_model_dir: Path) -> None:
    _, (unet_out, text_out), kohya_file = exported
    pipe = load(tiny_model_dir)
    pipe.load_lora_weights(kohya_file.parent, weight_name=kohya_file.name, adapter_name="hra")
    lora_unet, lora_text = outputs(pipe)
    assert rel_error(lora_text, text_out) < 1e-4
    assert rel_error(lora_unet, unet_out) < 1e-4


def test_diffusers_loads_the_kohya_file_to_the_hra_images(exported, tiny_model_dir: Path) -> None:
    hra, _, kohya_file = exported
    pipe = load(tiny_model_dir)
    pipe.load_lora_weights(kohya_file.parent, weight_name=kohya_file.name, adapter_name="hra")
    images = []
    for p in (hra, pipe):
        p.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images.append(
            p(
                "a photo",
                num_inference_steps=2,
                height=64,
                width=64,
                generator=generator,
                output_type="np",
            ).images  # fmt: skip
        )
    assert abs(images[0] - images[1]).max() <= 1e-4
