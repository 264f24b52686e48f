"""Export an HRA adapter as a LyCORIS GLoRA file: HRA itself, on any base, in the UIs.

AUTOMATIC1111 (``extensions-builtin/Lora/network_glora.py``), ComfyUI
(``comfy/weight_adapter/glora.py``) and Forge (``backend/patcher/lora.py``) apply
LyCORIS's GLoRA update in its "old" convention to whatever base weight W is loaded:

    ΔW = b2 · b1 + (W · a2) · a1        (scaled by alpha / rank)

HRA is W ↦ W H with H = I − V C Vᵀ (see :mod:`hra_diffusion.functional`). With

    a1 = Vᵀ (r, d_in),  a2 = −V C (d_in, r),  b1 = 0 (r, d_in),  b2 = 0 (d_out, r),  alpha = r

that update is exactly W H − W, for every base: no base weight enters the file, so
the adapter stays multiplicative (base-relative) where a LoRA export (B = −W V C) is
exact on its training base only. The only thing taken from a base is each layer's
output size d_out (b2's shape), which HRA files record since format version 2.

For a Conv2d, H acts on the flattened in·kh·kw input, the flattening the old
convention uses too (ComfyUI and Forge: ``W.flatten(1) @ a2 @ a1``). AUTOMATIC1111
multiplies the unflattened weight, so it applies GLoRA to Linear layers only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hra_diffusion.errors import InputError
from hra_diffusion.formats.hra import (
    CLIP_TEXT_MODEL_PREFIX,
    atomic_save_file,
    model_module_path,
    read_adapter,
)
from hra_diffusion.functional import reflection_factors

GLORA_FORMAT = "lycoris-glora"
"""Value of the ``format`` metadata field of GLoRA files."""

GLORA_WEIGHTS_NAME = "hra_glora.safetensors"
"""The file's name when a folder is given."""

GLORA_PARTS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha")
"""The tensors of each module, after ``<kohya module name>.``."""


def kohya_module_name(component: str, path: str, two_text_encoders: bool = False) -> str:
    """kohya/LyCORIS name of a module: prefix + the module path with ``.`` -> ``_``.

    The prefix is ``lora_unet`` for the UNet, ``lora_te`` for SD 1.x's text encoder
    (``lora_te1`` when ``two_text_encoders``, SDXL) and ``lora_te2`` for SDXL's second
    one. Text-encoder paths are taken in transformers 4's form (``text_model.``
    first), the names CLIP has in the consumers.

    Example:
        >>> kohya_module_name("text_encoder", "encoder.layers.0.self_attn.q_proj")
        'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
    """
    prefixes = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1" if two_text_encoders else "lora_te",
        "text_encoder_2": "lora_te2",
    }
    if component not in prefixes:
        raise ValueError(f"Unknown component {component!r}; expected one of {sorted(prefixes)}.")
    if component != "unet" and not path.startswith(CLIP_TEXT_MODEL_PREFIX):
        path = CLIP_TEXT_MODEL_PREFIX + path
    return f"{prefixes[component]}_{path.replace('.', '_')}"


def glora_factors(u: torch.Tensor, d_out: int, apply_gs: bool = False) -> dict[str, torch.Tensor]:
    """GLoRA tensors (fp32) whose old-convention update is W H − W for any W (d_out, d_in).

    Example:
        >>> glora_factors(torch.randn(64, 8), d_out=32)["a2.weight"].shape
        torch.Size([64, 8])
    """
    v, c = reflection_factors(u, apply_gs)  # (d_in, r), (r, r)
    d_in, r = v.shape
    return {
        "a1.weight": v.T.contiguous(),  # (r, d_in)
        "a2.weight": -(v @ c),  # (d_in, r)
        "b1.weight": torch.zeros(r, d_in, dtype=v.dtype),  # (r, d_in)
        "b2.weight": torch.zeros(d_out, r, dtype=v.dtype),  # (d_out, r)
        "alpha": torch.tensor(float(r)),  # alpha / rank = 1
    }


def _out_features(adapter, group: str, component: str, pipeline: object | None) -> dict[str, int]:
    """``{file path: d_out}`` from the file, or from ``pipeline`` for older files."""
    sizes = dict(adapter.out_features.get(group, {}))
    missing = [path for path in adapter.groups[group] if path not in sizes]
    if not missing:
        return sizes
    model = getattr(pipeline, component, None) if pipeline is not None else None
    if model is None:
        raise InputError(
            f"{adapter.source} does not record the output size of {component}.{missing[0]} "
            "(files written before format version 2 do not): pass the base model it was "
            "trained on (--model BASE) to take the sizes from it."
        )
    for path in missing:
        name = model_module_path(model, path)
        if name is None:
            raise InputError(
                f"{adapter.source}: {component}.{path} names a layer the model lacks. "
                "Was the adapter trained on a different model?"
            )
        sizes[path] = model.get_submodule(name).weight.shape[0]
    return sizes


def export_glora(
    weights: str | os.PathLike,
    output: str | os.PathLike,
    pipeline: object | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write an HRA adapter as a LyCORIS GLoRA file (see the module docstring).

    Args:
        weights: our HRA file or its folder, or a PEFT HRA adapter folder (UNet).
        output: a ``.safetensors`` path, or a folder (``<output>/hra_glora.safetensors``).
        pipeline: optional diffusers pipeline: gives the output sizes for files that do
            not record them, and says whether the text encoder is SDXL's first
            (``lora_te1_``, when the pipeline has a ``text_encoder_2``) or SD 1.x's
            only one (``lora_te_``). No base weight enters the file.
        dtype: storage dtype of the tensors; they are computed in fp32.

    Raises:
        ValueError: the adapter has a magnitude (``HRAConfig.magnitude``): GLoRA has no
            place for it; the LoRA export writes it as DoRA.

    Returns:
        The file written (atomically). Keys ``<kohya name>.a1.weight``, ``.a2.weight``,
        ``.b1.weight``, ``.b2.weight``, ``.alpha``; metadata ``format`` =
        ``"lycoris-glora"`` and the HRA configs.

    Example:
        >>> export_glora("out/", "out/hra_glora.safetensors")  # doctest: +SKIP
    """
    adapter = read_adapter(weights)
    if adapter.has_magnitude():
        raise InputError(
            f"{adapter.source}: --hra_magnitude weights (hra_m) cannot be exported as GLoRA, "
            "whose update has no row scale; export them as LoRA (DoRA keys) instead."
        )
    groups = {group or "unet": group for group in adapter.groups}
    two = "text_encoder_2" in groups or getattr(pipeline, "text_encoder_2", None) is not None
    tensors: dict[str, torch.Tensor] = {}
    metadata = {
        "format": GLORA_FORMAT,
        "hra_format_version": "1",
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": '{"algo": "glora"}',
        "dtype": str(dtype),
    }
    for component, group in groups.items():
        sizes = _out_features(adapter, group, component, pipeline)
        apply_gs = adapter.apply_gs(group)
        for path, u in adapter.groups[group].items():
            name = kohya_module_name(component, path, two)
            for part, tensor in glora_factors(u, sizes[path], apply_gs).items():
                tensors[f"{name}.{part}"] = tensor.to(dtype).contiguous()
        if group in adapter.configs:
            metadata[f"{component}.hra_config"] = adapter.configs[group].to_json()
    output = Path(output)
    target = output if output.suffix == ".safetensors" else output / GLORA_WEIGHTS_NAME
    return atomic_save_file(tensors, target, metadata)
