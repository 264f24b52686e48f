"""Export an HRA adapter as an exact LoRA file, in diffusers' format or kohya's.

HRA is a rank-r update of each adapted weight: W H = W + B A with A = Vᵀ and
B = −W V C (see :mod:`hra_diffusion.functional`). A depends only on U, but B
depends on the base weight W, so the export needs the base model and is valid
for that base only; its metadata records a fingerprint of the base weights used.

Two key formats:

- diffusers (``pytorch_lora_weights.safetensors``): PEFT-form keys
  ``unet.<path>.lora_A.weight`` / ``unet.<path>.lora_B.weight`` and
  ``text_encoder.text_model.<path>...`` (transformers-4 names under either
  transformers), without alphas, so diffusers uses lora_alpha = r: scale 1.0
  reproduces the HRA model, and ``set_adapters(name, w)`` gives W + w·ΔW.
- kohya (``pytorch_lora_weights_kohya.safetensors``): the same tensors renamed by
  diffusers' own ``convert_state_dict_to_kohya`` (``lora_unet_<path with _>``,
  ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha`` = r so the scale
  alpha/r is exactly 1), the format kohya sd-scripts writes and ComfyUI,
  AUTOMATIC1111 and Forge read. SD 1.x's single text encoder is named
  ``lora_te_`` (kohya's name; diffusers' converter says ``lora_te1_``, SDXL's
  first encoder), SDXL's two ``lora_te1_`` / ``lora_te2_``. A FLUX.1 adapter is written in
  kohya's FLUX names, after BFL's checkpoint layout with q, k, v fused
  (:mod:`~hra_diffusion.formats.kohya_flux`); Stable Diffusion 3 has no kohya export
  (diffusers' keys are what ComfyUI and diffusers read for SD3 LoRAs).

An adapter with a magnitude (``HRAConfig.magnitude``: diag(m) W H) is written as DoRA in
diffusers' keys: the same A and B plus each layer's DoRA magnitude m ⊙ ‖W_row‖ (see
:func:`~hra_diffusion.functional.dora_magnitude`) as ``<key>.lora_magnitude_vector.weight``
(PEFT's shape: (d_out,) for a Linear, (1, out, 1, 1) for a Conv2d), which diffusers loads with
``use_dora``. Since H is orthogonal the rows of W + B A = W H keep W's norms, so DoRA's
m_dora ⊙ (W + B A) / ‖(W + B A)_row‖ is exactly diag(m) W H. A DoRA file has no linear
strength: ``set_adapters(name, w)`` scales only the direction. kohya's format is refused for
it: kohya-style DoRA (``dora_scale``) is what diffusers' Stable Diffusion loaders drop on
reading (they warn and filter those keys out), so no reader here can check such a file.

:func:`save_lora_weights` writes a LoRA trained with PEFT (``unet.add_adapter(LoraConfig(...))``,
``lora_alpha`` = r) in the same two formats.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya
from torch import nn

from hra_diffusion.errors import InputError
from hra_diffusion.families import FAMILY_NAMES
from hra_diffusion.formats.hra import (
    AdapterWeights,
    atomic_save_file,
    file_module_path,
    match_components,
    plan_load,
    read_adapter,
)
from hra_diffusion.formats.kohya_flux import kohya_flux_metadata, to_kohya_flux
from hra_diffusion.functional import dora_magnitude, lora_factors

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name, so ``pipe.load_lora_weights(folder)`` finds it."""

KOHYA_WEIGHTS_NAME = "pytorch_lora_weights_kohya.safetensors"
"""The kohya-format file's name when a folder is given (diffusers' scripts use the same)."""

MAGNITUDE_KEY = "lora_magnitude_vector.weight"
"""A DoRA magnitude in diffusers' keys: ``<component>.<module path>.lora_magnitude_vector.weight``.

PEFT's own state dicts omit the ``.weight``; diffusers reads both forms into a UNet, but
transformers 5's adapter loader (the text encoders' path) reads only this one."""

KOHYA_MAGNITUDE_REFUSAL = (
    "--hra_magnitude weights (DoRA) cannot be exported in kohya's format: diffusers' SD "
    "loaders drop its dora_scale keys, so the file could not be checked to reproduce the "
    "model; export them as LoRA (diffusers' DoRA keys) instead."
)

LORA_FORMAT = "hra-diffusion/lora-export"
"""Value of the ``format`` metadata field of exported files (both key formats)."""

FINGERPRINT_METHOD = (
    "sha256 over, for each adapted base weight in sorted key order: the key "
    "'<component>.<module path>.weight' (UTF-8), then the weight as contiguous fp32 bytes"
)


def check_unet_only_format(adapter: AdapterWeights, what: str) -> None:
    """Raise ``InputError`` in one line if ``adapter`` is of a transformer base (SD3, FLUX.1):
    ``what`` (the kohya, GLoRA or PEFT export) is written for UNet bases only so far."""
    transformer = adapter.family in ("sd3", "flux") or "transformer" in adapter.groups
    if transformer:
        name = FAMILY_NAMES.get(adapter.family or "", "SD3/FLUX.1")
        raise InputError(
            f"{adapter.source}: {what} is not written for {name} adapters yet; export the "
            "LoRA in diffusers' keys instead (--format lora / --export_lora), which "
            "load_lora_weights reads."
        )


def base_fingerprint(weights: dict[str, torch.Tensor]) -> str:
    """``"sha256:<hex>"`` of base weights keyed ``<component>.<module path>.weight``.

    Example:
        >>> base_fingerprint({"unet.conv_in.weight": unet.conv_in.weight})  # doctest: +SKIP
        'sha256:3f1c...'
    """
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        w = weights[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(w.numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


def _is_pipeline(pipeline: object) -> bool:
    return isinstance(getattr(pipeline, "components", None), dict)


def to_kohya(
    tensors: dict[str, torch.Tensor], two_text_encoders: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Rename diffusers-format LoRA tensors to kohya's keys with diffusers' converter.

    ``two_text_encoders`` (SDXL) keeps ``lora_te1_``/``lora_te2_``; otherwise the
    single text encoder is ``lora_te_``, as kohya sd-scripts names SD 1.x's.
    Alphas (= r, so the scale is 1) are stored in ``dtype``. DoRA tensors
    (``lora_magnitude_vector``, from ``--hra_magnitude``) are refused with ``InputError``
    (see the module docstring).

    Example:
        >>> kohya = to_kohya(read_safetensors("out/pytorch_lora_weights.safetensors")[0],
        ...                  two_text_encoders=False, dtype=torch.float32)  # doctest: +SKIP
    """
    if any(key.endswith(f".{MAGNITUDE_KEY}") for key in tensors):
        raise InputError(KOHYA_MAGNITUDE_REFUSAL)
    converted = convert_state_dict_to_kohya(tensors)
    kohya = {}
    for key, tensor in converted.items():
        if not two_text_encoders and key.startswith("lora_te1_"):
            key = "lora_te_" + key.removeprefix("lora_te1_")
        kohya[key] = tensor.to(dtype) if key.endswith(".alpha") else tensor
    return kohya


def kohya_metadata(rank: int, two_text_encoders: bool) -> dict[str, str]:
    """The kohya ``ss_*`` fields AUTOMATIC1111 reads (network type, dim, alpha, SDXL)."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
    }
    if two_text_encoders:
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    return metadata


def export_lora(
    hra_weights: str | os.PathLike,
    pipeline: object,
    output: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    kohya: bool = False,
) -> Path:
    """Write the exact LoRA equivalent of an HRA adapter for ``pipeline``'s base weights.

    Args:
        hra_weights: our HRA file or folder, or a PEFT HRA adapter folder (UNet).
        pipeline: a diffusers pipeline holding the base weights the adapter was
            trained on. Layers may already carry the same HRA adapter (unmerged).
        output: a folder (the file is ``<output>/pytorch_lora_weights.safetensors``,
            or ``pytorch_lora_weights_kohya.safetensors`` with ``kohya``) or a
            ``.safetensors`` file path.
        dtype: storage dtype of A and B; they are always computed in fp32.
        kohya: write kohya's key format (ComfyUI, AUTOMATIC1111, Forge, kohya
            sd-scripts) instead of diffusers' (see the module docstring).

    An adapter with a magnitude is written as DoRA (``lora_magnitude_vector.weight`` keys
    beside A and B; see the module docstring); with ``kohya`` it is refused (``InputError``),
    as is an SD3 adapter. A FLUX.1 adapter with ``kohya`` is written in kohya's FLUX names
    (fused q, k, v; :func:`~hra_diffusion.formats.kohya_flux.to_kohya_flux`).

    Returns:
        The file written (atomically). Its metadata holds ``format``,
        ``base_fingerprint`` (see :func:`base_fingerprint`) and the HRA configs.

    Example:
        >>> base = StableDiffusionPipeline.from_pretrained(base_dir)  # doctest: +SKIP
        >>> export_lora("out/", base, "lora_out/")  # doctest: +SKIP
        >>> export_lora("out/", base, "lora_out/", kohya=True)  # doctest: +SKIP
        >>> pipe.load_lora_weights("lora_out/", adapter_name="hra")  # doctest: +SKIP
        >>> pipe.set_adapters("hra", 0.5)  # half strength  # doctest: +SKIP
    """
    adapter = read_adapter(hra_weights)
    flux = adapter.family == "flux"
    if kohya and not flux:
        check_unet_only_format(adapter, "the kohya LoRA format")
    if kohya and adapter.has_magnitude():
        raise InputError(f"{adapter.source}: {KOHYA_MAGNITUDE_REFUSAL}")
    if not _is_pipeline(pipeline):
        raise TypeError(
            f"export_lora needs a diffusers pipeline with the base weights, got "
            f"{type(pipeline).__name__}."
        )
    plans = [
        plan_load(prefix, model, adapter, group)
        for prefix, model, group in match_components(pipeline, adapter, None)
    ]
    tensors: dict[str, torch.Tensor] = {}
    base_weights: dict[str, torch.Tensor] = {}
    metadata = {"format": LORA_FORMAT, "format_version": "2", "dtype": str(dtype)}
    for plan in plans:
        for path, layer, u in plan.layers:
            weight = layer.base_layer.weight  # (d_out, d) or (out, in, kh, kw)
            a, b = lora_factors(weight, u.to(weight.device), layer.apply_gs)  # (r, d), (d_out, r)
            key = f"{plan.prefix}{file_module_path(plan.model, path)}"
            tensors[f"{key}.lora_A.weight"] = a.to("cpu", dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to("cpu", dtype).contiguous()
            if path in plan.magnitudes:
                m = dora_magnitude(weight, plan.magnitudes[path].to(weight.device))  # (d_out,)
                if weight.dim() == 4:
                    m = m.view(1, -1, 1, 1)  # PEFT's DoRA shape for a conv: (1, out, 1, 1)
                tensors[f"{key}.{MAGNITUDE_KEY}"] = m.to("cpu", dtype).contiguous()
            base_weights[f"{key}.weight"] = weight
        metadata[f"{plan.prefix}hra_config"] = plan.config.to_json()
    metadata["base_fingerprint"] = base_fingerprint(base_weights)
    metadata["base_fingerprint_method"] = FINGERPRINT_METHOD
    metadata["base_model"] = str(getattr(pipeline, "name_or_path", None) or "")
    if adapter.family is not None:
        metadata["base_family"] = adapter.family
    name = LORA_WEIGHTS_NAME
    if kohya and flux:
        tensors = to_kohya_flux(tensors, dtype)
        rank = max(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight"))
        metadata.update(kohya_flux_metadata(rank))
        name = KOHYA_WEIGHTS_NAME
    elif kohya:
        two = getattr(pipeline, "text_encoder_2", None) is not None
        rank = max(plan.config.r for plan in plans)
        tensors = to_kohya(tensors, two, dtype)
        metadata.update(kohya_metadata(rank, two))
        name = KOHYA_WEIGHTS_NAME
    output = Path(output)
    return atomic_save_file(
        tensors, output if output.suffix == ".safetensors" else output / name, metadata
    )


def save_lora_weights(
    path: str | os.PathLike,
    kohya: bool = False,
    unet: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
) -> Path:
    """Save PEFT LoRA adapters (``model.add_adapter(LoraConfig(r=k, lora_alpha=k))``) as one file.

    The keys are those of :func:`export_lora`: diffusers' (``unet.<path>.lora_A.weight``,
    ``text_encoder.text_model.<path>.lora_B.weight``, no alphas, so diffusers' scale
    alpha/r is 1: train with ``lora_alpha`` equal to the rank), or kohya's with ``kohya``.
    ``path`` is a folder (``<path>/pytorch_lora_weights.safetensors``, or
    ``pytorch_lora_weights_kohya.safetensors`` with ``kohya``) or a ``.safetensors`` file.
    Tensors are stored in fp32; the write is atomic. Returns the file written.

    Example:
        >>> save_lora_weights("out/", unet=pipe.unet)  # doctest: +SKIP
        >>> pipe.load_lora_weights("out/")  # doctest: +SKIP
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks = []
    for component, model in {"unet": unet, "text_encoder": text_encoder}.items():
        if model is None:
            continue
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, save_embedding_layers=False)
        if not state:
            raise ValueError(f"{component} has no LoRA layers: call add_adapter on it first.")
        for key, tensor in state.items():
            module, _, leaf = key.rpartition(".lora_")  # leaf: "A.weight" or "B.weight"
            name = f"{component}.{file_module_path(model, module)}.lora_{leaf}"
            tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
        ranks.append(model.peft_config["default"].r)
    if not tensors:
        raise ValueError("Nothing to save: pass unet= and/or text_encoder= with LoRA layers.")
    metadata = {"format": "hra-diffusion/peft-lora", "format_version": "1"}
    name = LORA_WEIGHTS_NAME
    if kohya:
        tensors = to_kohya(tensors, two_text_encoders=False, dtype=torch.float32)
        metadata.update(kohya_metadata(max(ranks), two_text_encoders=False))
        name = KOHYA_WEIGHTS_NAME
    output = Path(path)
    return atomic_save_file(
        tensors, output if output.suffix == ".safetensors" else output / name, metadata
    )
