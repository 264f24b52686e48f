"""FLUX.1 LoRA tensors in kohya's names, which name layers after BFL's original checkpoint.

kohya sd-scripts (``networks/lora_flux.py``) and ComfyUI key a FLUX.1 LoRA by the layers
of Black Forest Labs' checkpoint: ``lora_unet_<BFL path with . -> _>`` with
``.lora_down.weight`` (rank × in), ``.lora_up.weight`` (out × rank) and ``.alpha``; the
delta is ``ΔW = (alpha / rank) · up @ down``. BFL fuses layers that diffusers keeps apart:

- ``double_blocks.{i}.img_attn.qkv`` = ``transformer_blocks.{i}.attn.to_q, to_k, to_v``
  stacked along the output (``txt_attn.qkv``: ``add_q_proj, add_k_proj, add_v_proj``);
- ``single_blocks.{i}.linear1`` = ``single_transformer_blocks.{i}.attn.to_q, to_k, to_v,
  proj_mlp`` (out widths D, D, D, 4D for width D); ``linear2`` = ``proj_out``, whose input
  is already [attention output, MLP output] in both layouts.

A diffusers-side LoRA ``ΔW_j = B_j A_j`` (A_j: r_j × D, B_j: d_j × r_j) of each member j
of a fused layer is exactly the fused LoRA

    down = [A_1; A_2; …]               (Σ r_j × D)
    up   = blockdiag(B_1, B_2, …)      (Σ d_j × Σ r_j)

with zero rows for members without a LoRA, and alpha = Σ r_j (scale 1). diffusers'
``FluxLoraLoaderMixin.load_lora_weights`` splits such a file back exactly (its
``_convert_kohya_flux_lora_to_diffusers``). Other layers are renamed one to one;
``final_layer.adaLN_modulation.1`` (diffusers' ``norm_out.linear``) stores (shift, scale)
where diffusers stores (scale, shift), so the two halves of its ``up`` rows are swapped.
"""

from __future__ import annotations

import re

import torch

from hra_diffusion.errors import InputError

DOUBLE_BLOCK_NAMES: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
"""kohya name (after ``lora_unet_double_blocks_{i}_``) -> the diffusers layers in
``transformer_blocks.{i}.`` it holds, fused in that order."""

SINGLE_BLOCK_NAMES: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
"""kohya name (after ``lora_unet_single_blocks_{i}_``) -> the diffusers layers in
``single_transformer_blocks.{i}.``."""

GLOBAL_NAMES: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
    "final_layer_adaLN_modulation_1": "norm_out.linear",
}
"""kohya name (after ``lora_unet_``) -> diffusers path of the layers outside the blocks."""

SWAPPED = "norm_out.linear"
"""The layer whose output halves BFL stores in the other order (shift, scale)."""

MLP_RATIO = 4
"""FLUX.1's ``proj_mlp`` width over the model width (``FluxSingleTransformerBlock``)."""


def _kohya_name(path: str) -> tuple[str, int, tuple[str, ...]]:
    """(kohya module name, index among the fused members, all members) of a diffusers path
    of ``FluxTransformer2DModel``; ``InputError`` for a layer without a kohya name."""
    for block, names, prefix in (
        ("transformer_blocks", DOUBLE_BLOCK_NAMES, "double_blocks"),
        ("single_transformer_blocks", SINGLE_BLOCK_NAMES, "single_blocks"),
    ):
        match = re.fullmatch(rf"{block}\.(\d+)\.(.+)", path)
        if match is None:
            continue
        index, rest = match.groups()
        for name, members in names.items():
            if rest in members:
                return f"lora_unet_{prefix}_{index}_{name}", members.index(rest), members
    for name, diffusers_path in GLOBAL_NAMES.items():
        if path == diffusers_path:
            return f"lora_unet_{name}", 0, (path,)
    raise InputError(
        f"transformer.{path} has no name in kohya's FLUX.1 LoRA format; export the LoRA in "
        "diffusers' keys instead (--format lora / --export_lora)."
    )


def member_widths(members: tuple[str, ...], width: int) -> list[int]:
    """Output widths of fused members for model width ``width`` (``proj_mlp``: 4 ×)."""
    return [MLP_RATIO * width if m == "proj_mlp" else width for m in members]


def to_kohya_flux(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Diffusers-format FLUX.1 LoRA tensors (``transformer.<path>.lora_A.weight`` (r, D),
    ``.lora_B.weight`` (d, r), scale 1) as kohya's fused BFL-named tensors (module docstring).

    The fused tensors are built in fp32 and stored in ``dtype``, alphas (= rank, scale 1)
    too. Keys of other components (text encoders) or of layers without a kohya name are
    refused with ``InputError``.

    Example:
        >>> kohya = to_kohya_flux(read_safetensors("out/pytorch_lora_weights.safetensors")[0],
        ...                       torch.float32)  # doctest: +SKIP
        >>> sorted(kohya)[:2]  # doctest: +SKIP
        ['lora_unet_double_blocks_0_img_attn_proj.alpha', ...]
    """
    groups: dict[str, tuple[tuple[str, ...], dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise InputError(f"{key}: only plain LoRA tensors (lora_A, lora_B) can be renamed.")
            continue
        component, path = key.removesuffix(".lora_A.weight").split(".", 1)
        if component != "transformer":
            raise InputError(
                f"{key}: kohya's FLUX.1 LoRA format is written for the transformer only; export "
                "adapted text encoders in diffusers' keys (--format lora / --export_lora)."
            )
        name, index, members = _kohya_name(path)
        a = tensors[key].float()  # (r, D)
        b = tensors[key.replace(".lora_A.", ".lora_B.")].float()  # (d, r)
        groups.setdefault(name, (members, {}))[1][index] = (a, b)
    kohya = {}
    for name, (members, parts) in groups.items():
        width = next(iter(parts.values()))[0].shape[1]  # D: every member reads the same input
        expected = member_widths(members, width)
        widths = [parts[j][1].shape[0] if j in parts else d for j, d in enumerate(expected)]
        if len(members) > 1 and widths != expected:
            raise InputError(f"{name}: LoRA shapes {widths} are not those of a FLUX.1 transformer.")
        down = torch.cat([parts[j][0] for j in sorted(parts)])  # (Σ r_j, D)
        up = torch.zeros(sum(widths), down.shape[0])  # (Σ d_j, Σ r_j)
        row, column = 0, 0
        for j, d in enumerate(widths):
            if j in parts:
                r = parts[j][0].shape[0]
                up[row : row + d, column : column + r] = parts[j][1]
                column += r
            row += d
        if members == (SWAPPED,):
            scale, shift = up.chunk(2)  # diffusers' order; BFL stores (shift, scale)
            up = torch.cat([shift, scale])
        kohya[f"{name}.lora_down.weight"] = down.to(dtype).contiguous()
        kohya[f"{name}.lora_up.weight"] = up.to(dtype).contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(down.shape[0]), dtype=dtype)
    return kohya


def kohya_flux_metadata(rank: int) -> dict[str, str]:
    """kohya's ``ss_*`` fields of a FLUX.1 LoRA (``networks.lora_flux``, ``flux1``)."""
    return {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": "flux1",
    }
