"""FLUX.1 LoRA export in kohya's names: the key rules, diffusers' kohya loader and ComfyUI's
way of applying such a file reproduce the HRA model's images.

The rules are written down from the consumers' code:

- kohya sd-scripts ``networks/lora_flux.py`` and ComfyUI ``comfy/lora.py``
  (``model_lora_keys_unet`` for Flux): ``"lora_unet_" + <BFL weight key without
  .weight>.replace(".", "_")``, each with ``.lora_down.weight``, ``.lora_up.weight`` and
  ``.alpha`` (ΔW = alpha / rank · up @ down), added to BFL's own (fused) weight.
- BFL's checkpoint (diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``):
  ``img_attn.qkv`` / ``txt_attn.qkv`` stack q, k, v along the output; ``single_blocks.linear1``
  stacks q, k, v, proj_mlp (D, D, D, 4D); ``final_layer.adaLN_modulation.1`` is diffusers'
  ``norm_out.linear`` with its halves swapped (shift, scale).
"""

from __future__ import annotations

import re
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors import safe_open

from hra_diffusion import (
    FLUX_TARGETS,
    SD3_TARGETS,
    HRAConfig,
    export_lora,
    hra_parameters,
    inject_hra,
    save_hra_weights,
)
from hra_diffusion.errors import InputError
from hra_diffusion.formats.kohya_flux import to_kohya_flux
from hra_diffusion.pipelines import export
from hra_diffusion.world.tiny_transformers import save_tiny_transformer_pipeline

PROMPT = "a photo of qwe toy"
ALL_TARGETS = FLUX_TARGETS + ("proj_mlp", "proj_out", "norm_out.linear")
"""Every layer kind the blocks have a kohya name for, plus two layers outside the blocks
(``proj_out`` also matches the final projection)."""

BFL_FUSED = {
    r"double_blocks_(\d+)_img_attn_qkv": ("transformer_blocks.{}.attn.to_{}", "qkv"),
    r"double_blocks_(\d+)_txt_attn_qkv": ("transformer_blocks.{}.attn.add_{}_proj", "qkv"),
    r"single_blocks_(\d+)_linear1": ("single_transformer_blocks.{}.attn.to_{}", "qkv"),
}
"""BFL's fused layers: diffusers' layers stacked along the output in this order (the single
blocks' linear1 then has proj_mlp's rows)."""

BFL_PLAIN = {
    r"double_blocks_(\d+)_img_attn_proj": "transformer_blocks.{}.attn.to_out.0",
    r"double_blocks_(\d+)_txt_attn_proj": "transformer_blocks.{}.attn.to_add_out",
    r"double_blocks_(\d+)_img_mlp_0": "transformer_blocks.{}.ff.net.0.proj",
    r"double_blocks_(\d+)_img_mlp_2": "transformer_blocks.{}.ff.net.2",
    r"double_blocks_(\d+)_txt_mlp_0": "transformer_blocks.{}.ff_context.net.0.proj",
    r"double_blocks_(\d+)_txt_mlp_2": "transformer_blocks.{}.ff_context.net.2",
    r"single_blocks_(\d+)_linear2": "single_transformer_blocks.{}.proj_out",
    r"final_layer_linear()": "proj_out",
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_transformer_pipeline(tmp_path_factory.mktemp("flux") / "flux", "flux")


def load(base: Path) -> diffusers.FluxPipeline:
    pipe = diffusers.FluxPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: diffusers.FluxPipeline) -> torch.Tensor:
    """Two sampling steps at 32 px with a fixed seed: (1, 3, 32, 32)."""
    return pipe(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images.float()


def hra_export(base: Path, folder: Path, targets: tuple[str, ...]) -> tuple[torch.Tensor, Path]:
    """Images of the tiny FLUX.1 with random HRA (r=4) on ``targets``, and its kohya export."""
    pipe = load(base)
    inject_hra(pipe.transformer, HRAConfig(r=4, target_modules=targets))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for u in hra_parameters(pipe.transformer):
            u.copy_(torch.randn(u.shape, generator=generator))
    save_hra_weights(folder, transformer=pipe.transformer)
    return sample(pipe), export_lora(folder, load(base), folder, kohya=True)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}, f.metadata()


def apply_like_comfyui(pipe: diffusers.FluxPipeline, tensors: dict[str, torch.Tensor]) -> None:
    """Add each ΔW = alpha / rank · up @ down to BFL's weight, kept here as the diffusers
    layers it stacks (split along the output rows)."""
    names = {key.split(".")[0] for key in tensors}
    model = pipe.transformer
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        delta = tensors[f"{name}.alpha"] / down.shape[0] * up @ down  # BFL's (out, in)
        bfl = name.removeprefix("lora_unet_")
        layers = []
        for pattern, (template, parts) in BFL_FUSED.items():
            if match := re.fullmatch(pattern, bfl):
                layers = [template.format(match[1], part) for part in parts]
                if bfl.endswith("linear1"):
                    layers.append(f"single_transformer_blocks.{match[1]}.proj_mlp")
        for pattern, path in BFL_PLAIN.items():
            if match := re.fullmatch(pattern, bfl):
                layers = [path.format(match[1])]
        if bfl == "final_layer_adaLN_modulation_1":
            shift, scale = delta.chunk(2)
            delta, layers = torch.cat([scale, shift]), ["norm_out.linear"]
        assert layers, name
        weights = [model.get_submodule(path).weight for path in layers]
        assert sum(w.shape[0] for w in weights) == delta.shape[0], name
        with torch.no_grad():
            for w, d in zip(weights, delta.split([w.shape[0] for w in weights]), strict=True):
                w.add_(d)


def test_keys_follow_kohya_flux_names_and_fuse_qkv(base: Path, tmp_path: Path):
    _, path = hra_export(base, tmp_path, ALL_TARGETS)
    tensors, metadata = read(path)
    assert path.name == "pytorch_lora_weights_kohya.safetensors"
    assert metadata["ss_network_module"] == "networks.lora_flux"
    assert metadata["ss_base_model_version"] == "flux1" and metadata["ss_network_dim"] == "16"
    modules = {key.split(".")[0] for key in tensors}
    assert {f"{m}.{part}" for m in modules for part in ("lora_down.weight", "lora_up.weight",
            "alpha")} == set(tensors)  # fmt: skip
    double = {f"lora_unet_double_blocks_0_{s}_{p}" for s in ("img", "txt")
              for p in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")}  # fmt: skip
    single = {"lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
    final = {"lora_unet_final_layer_linear", "lora_unet_final_layer_adaLN_modulation_1"}
    assert modules == double | single | final
    d = 32  # the tiny FLUX.1's width
    for name, rank, rows in [("lora_unet_double_blocks_0_img_attn_qkv", 12, 3 * d),
                             ("lora_unet_double_blocks_0_txt_attn_qkv", 12, 3 * d),
                             ("lora_unet_single_blocks_0_linear1", 16, 7 * d),
                             ("lora_unet_double_blocks_0_img_attn_proj", 4, d)]:  # fmt: skip
        assert tensors[f"{name}.lora_down.weight"].shape == (rank, d), name
        assert tensors[f"{name}.lora_up.weight"].shape == (rows, rank), name
        assert tensors[f"{name}.alpha"].item() == rank  # scale 1
    up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]  # (3D, 3r)
    for i in range(3):
        for j in range(3):
            block = up[i * d : (i + 1) * d, j * 4 : (j + 1) * 4]
            assert (block.abs().max() > 0) == (i == j)  # block diagonal: q, k, v apart


def test_applied_by_bfl_layout_like_comfyui_gives_the_same_images(base: Path, tmp_path: Path):
    expected, path = hra_export(base, tmp_path, ALL_TARGETS)
    pipe = load(base)
    assert (sample(pipe) - expected).abs().max() > 1e-3  # the adapter changes the images
    apply_like_comfyui(pipe, read(path)[0])
    assert (sample(pipe) - expected).abs().max() <= 1e-4


def test_diffusers_kohya_loader_gives_the_same_images(base: Path, tmp_path: Path):
    """diffusers' FLUX.1 kohya converter splits single_blocks linear1 at the real model's
    widths (3072) and drops layers outside the blocks; the rest of the layers here."""
    targets = FLUX_TARGETS + (r"single_transformer_blocks\.\d+\.proj_out",)
    targets = tuple(t for t in targets if not t.startswith("attn.to_")) + (
        r"transformer_blocks\.\d+\.attn\.to_(q|k|v|out\.0)",
    )
    expected, path = hra_export(base, tmp_path, targets)
    assert any("double_blocks_0_img_attn_qkv" in key for key in read(path)[0])
    pipe = load(base)
    pipe.load_lora_weights(path)
    assert (sample(pipe) - expected).abs().max() <= 1e-4


def test_fused_layers_split_back_exactly_at_flux1_widths():
    """At FLUX.1's real widths (D = 3072), diffusers' converter splits our fused layers
    back into LoRAs of exactly the same products B A (linear1 with and without proj_mlp)."""
    d, r = 3072, 2
    generator = torch.Generator().manual_seed(0)
    layers = {
        f"transformer_blocks.0.attn.{n}": (d, d)
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0")
    }
    layers |= {f"single_transformer_blocks.0.attn.to_{n}": (d, d) for n in "qkv"}
    layers |= {f"single_transformer_blocks.1.attn.to_{n}": (d, d) for n in "qkv"}
    layers |= {"single_transformer_blocks.1.proj_mlp": (4 * d, d),
               "single_transformer_blocks.1.proj_out": (d, 5 * d),
               "norm_out.linear": (2 * d, d)}  # fmt: skip
    tensors = {}
    for path, (rows, columns) in layers.items():
        tensors[f"transformer.{path}.lora_A.weight"] = torch.randn(r, columns, generator=generator)
        tensors[f"transformer.{path}.lora_B.weight"] = torch.randn(rows, r, generator=generator)
    split = diffusers.FluxPipeline.lora_state_dict(to_kohya_flux(tensors, torch.float32))
    for path in layers:
        key = f"transformer.{path}" if "blocks" in path else path  # diffusers leaves no prefix
        b, a = split[f"{key}.lora_B.weight"], split[f"{key}.lora_A.weight"]
        ours = (
            tensors[f"transformer.{path}.lora_B.weight"]
            @ tensors[f"transformer.{path}.lora_A.weight"]
        )
        torch.testing.assert_close(b @ a, ours, rtol=0, atol=1e-5)
    mlp = "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"
    assert split[mlp].abs().max() == 0  # linear1 without proj_mlp: its rows are zero


def test_sd3_and_unnamed_layers_are_refused_in_one_line(tmp_path: Path):
    with pytest.raises(InputError, match="transformer.pos_embed.proj has no name in kohya"):
        to_kohya_flux({"transformer.pos_embed.proj.lora_A.weight": torch.zeros(1, 2),
                       "transformer.pos_embed.proj.lora_B.weight": torch.zeros(2, 1)},
                      torch.float32)  # fmt: skip
    sd3 = diffusers.StableDiffusion3Pipeline.from_pretrained(
        save_tiny_transformer_pipeline(tmp_path / "sd3", "sd3")
    )
    inject_hra(sd3.transformer, HRAConfig(r=2, target_modules=SD3_TARGETS))
    save_hra_weights(tmp_path / "hra", transformer=sd3.transformer)
    with pytest.raises(InputError) as info:
        export_lora(tmp_path / "hra", sd3, tmp_path / "k", kohya=True)
    assert "kohya LoRA format is not written for Stable Diffusion 3" in str(info.value)
    assert "\n" not in str(info.value) and not (tmp_path / "k").exists()


def test_export_cli_writes_kohya_from_weights_and_from_a_lora_export(base: Path, tmp_path: Path):
    pipe = load(base)
    inject_hra(pipe.transformer, HRAConfig(r=2, target_modules=FLUX_TARGETS))
    with torch.no_grad():
        for u in hra_parameters(pipe.transformer):
            u.normal_()
    save_hra_weights(tmp_path, transformer=pipe.transformer)
    direct = tmp_path / "direct.safetensors"
    export.main(["--format", "kohya", "--weights", str(tmp_path), "--model", str(base),
                 "--output", str(direct)])  # fmt: skip
    export.main(["--format", "lora", "--weights", str(tmp_path), "--model", str(base),
                 "--output", str(tmp_path / "pytorch_lora_weights.safetensors")])  # fmt: skip
    (tmp_path / "hra_weights.safetensors").unlink()  # the folder now names the LoRA export
    renamed = tmp_path / "renamed.safetensors"
    export.main(["--format", "kohya", "--weights", str(tmp_path), "--output", str(renamed)])
    first, second = read(direct)[0], read(renamed)[0]
    assert set(first) == set(second) and any("single_blocks_0_linear1" in k for k in first)
    for key, tensor in first.items():
        torch.testing.assert_close(second[key], tensor, rtol=0, atol=0)
