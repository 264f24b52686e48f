"""Write a diffusers SD 1.x or SDXL pipeline as one safetensors file in the original
(CompVis / SGM) layout, the way A1111, ComfyUI and kohya expect community checkpoints.

diffusers converts only the other way (``loaders/single_file_utils.py``); these maps invert
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``
and ``convert_open_clip_checkpoint`` for the layers a pipeline has (any block count, one
``layers_per_block``). Tests check that ``from_single_file`` gives the folder back exactly.
"""

from __future__ import annotations

import re
from pathlib import Path

import diffusers
import torch
from safetensors.torch import save_file

RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET.get(head, head)}.{tail}"


def unet_keys(unet: diffusers.UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The UNet's weights under ``model.diffusion_model.`` LDM names."""
    per = unet.config.layers_per_block
    state = unet.state_dict()
    attended = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions", k)}
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        rest = ".".join(parts[4:])
        top = next((t for t in UNET_TOP if key.startswith(t + ".")), None)
        if top:
            name = UNET_TOP[top] + key[len(top) :]
        elif parts[0] == "down_blocks":
            block, kind, index = int(parts[1]), parts[2], int(parts[3])
            if kind == "downsamplers":
                name = f"input_blocks.{(block + 1) * (per + 1)}.0.op.{'.'.join(parts[5:])}"
            else:
                layer = 1 + block * (per + 1) + index
                sub = f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
                name = f"input_blocks.{layer}.{sub}"
        elif parts[0] == "mid_block":
            index = int(parts[2])
            if parts[1] == "resnets":
                name = f"middle_block.{2 * index}.{_resnet('.'.join(parts[3:]))}"
            else:
                name = f"middle_block.1.{'.'.join(parts[3:])}"
        elif parts[0] == "up_blocks":
            block, kind, index = int(parts[1]), parts[2], int(parts[3])
            if kind == "upsamplers":
                slot = 2 if block in attended else 1
                name = f"output_blocks.{block * (per + 1) + per}.{slot}.conv.{'.'.join(parts[5:])}"
            else:
                layer = block * (per + 1) + index
                sub = f"0.{_resnet(rest)}" if kind == "resnets" else f"1.{rest}"
                name = f"output_blocks.{layer}.{sub}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out["model.diffusion_model." + name] = value
    return out


def vae_keys(vae: diffusers.AutoencoderKL) -> dict[str, torch.Tensor]:
    """The VAE's weights under ``first_stage_model.`` LDM names."""
    blocks = len(vae.config.up_block_types)
    out = {}
    for key, value in vae.state_dict().items():
        name = key.replace("conv_norm_out", "norm_out")
        name = re.sub(r"down_blocks\.(\d+)\.resnets", r"down.\1.block", name)
        name = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", name)
        up = re.match(r"decoder\.up_blocks\.(\d+)\.", name)
        if up:
            block = blocks - 1 - int(up.group(1))
            name = f"decoder.up.{block}." + name[up.end() :]
            name = name.replace(f"up.{block}.resnets", f"up.{block}.block")
            name = name.replace(f"up.{block}.upsamplers.0", f"up.{block}.upsample")
        name = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", name)
        name = name.replace("conv_shortcut", "nin_shortcut")
        if "mid_block.attentions.0." in name:
            name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in VAE_ATTENTION.items():
                name = name.replace(f"attn_1.{new}.", f"attn_1.{old}.")
            if value.dim() == 2:
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out["first_stage_model." + name] = value
    return out


def clip_keys(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP-L text encoder under ``<prefix>text_model.`` (transformers-4 names)."""
    return {
        f"{prefix}text_model.{k.removeprefix('text_model.')}": v
        for k, v in text_encoder.state_dict().items()
    }


def open_clip_keys(text_encoder: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` under OpenCLIP names (SDXL's second encoder)."""
    state = text_encoder.state_dict()
    out = {
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    for layer in range(text_encoder.config.num_hidden_layers):
        src = f"text_model.encoder.layers.{layer}."
        dst = f"{prefix}transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            out[f"{dst}attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[f"{dst}ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[f"{dst}ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[f"{dst}mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[f"{dst}mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def save_original_checkpoint(pipe: diffusers.DiffusionPipeline, path: Path) -> Path:
    """Write ``pipe`` (SD 1.x or SDXL) as one original-layout safetensors file."""
    keys = {**unet_keys(pipe.unet), **vae_keys(pipe.vae)}
    if getattr(pipe, "text_encoder_2", None) is not None:
        keys |= clip_keys(pipe.text_encoder, "conditioner.embedders.0.transformer.")
        keys |= open_clip_keys(pipe.text_encoder_2, "conditioner.embedders.1.model.")
    else:
        keys |= clip_keys(pipe.text_encoder, "cond_stage_model.transformer.")
    save_file({k: v.contiguous() for k, v in keys.items()}, str(path))
    return path
