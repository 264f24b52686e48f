"""Export an HRA adapter as an exact LoRA file that diffusers' ``load_lora_weights`` reads.

HRA is a rank-r update of each adapted weight: W H = W + B A with A = Vᵀ and
B = −W V C (see :mod:`hra_diffusion.functional`). A depends only on U, but B
depends on the base weight W, so the export needs the base model and is valid
for that base only; its metadata records a fingerprint of the base weights used.

Keys follow diffusers' PEFT format, ``unet.<path>.lora_A.weight`` /
``unet.<path>.lora_B.weight`` (and ``text_encoder.`` ones), without alphas, so
diffusers uses lora_alpha = r: scale 1.0 reproduces the HRA model, and
``set_adapters(name, w)`` gives W + w·ΔW, a linear strength control.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from hra_diffusion.functional import lora_factors
from hra_diffusion.serialization import atomic_save_file, match_components, plan_load, read_adapter

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name, so ``pipe.load_lora_weights(folder)`` finds it."""

LORA_FORMAT = "hra-diffusion/lora-export"
"""Value of the ``format`` metadata field of exported files."""

FINGERPRINT_METHOD = (
    "sha256 over, for each adapted base weight in sorted key order: the key "
    "'<component>.<module path>.weight' (UTF-8), then the weight as contiguous fp32 bytes"
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


def export_lora(
    hra_weights: str | os.PathLike,
    pipeline: object,
    output: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the exact LoRA equivalent of an HRA adapter for ``pipeline``'s base weights.

    Args:
        hra_weights: our HRA file or folder, or a PEFT HRA adapter folder (UNet).
        pipeline: a diffusers pipeline holding the base weights the adapter was
            trained on. Layers may already carry the same HRA adapter (unmerged).
        output: a folder (the file is ``<output>/pytorch_lora_weights.safetensors``)
            or a ``.safetensors`` file path.
        dtype: storage dtype of A and B; they are always computed in fp32.

    Returns:
        The file written (atomically). Its metadata holds ``format``,
        ``base_fingerprint`` (see :func:`base_fingerprint`) and the HRA configs.

    Example:
        >>> export_lora("out/", StableDiffusionPipeline.from_pretrained(base), "lora_out/")
        ... # doctest: +SKIP
        >>> pipe.load_lora_weights("lora_out/", adapter_name="hra")  # doctest: +SKIP
        >>> pipe.set_adapters("hra", 0.5)  # half strength  # doctest: +SKIP
    """
    adapter = read_adapter(hra_weights)
    if not isinstance(getattr(pipeline, "components", None), dict):
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
    metadata = {"format": LORA_FORMAT, "format_version": "1", "dtype": str(dtype)}
    for plan in plans:
        for path, layer, u in plan.layers:
            weight = layer.base_layer.weight  # (d_out, d) or (out, in, kh, kw)
            a, b = lora_factors(weight, u.to(weight.device), layer.apply_gs)  # (r, d), (d_out, r)
            key = f"{plan.prefix}{path}"
            tensors[f"{key}.lora_A.weight"] = a.to("cpu", dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to("cpu", dtype).contiguous()
            base_weights[f"{key}.weight"] = weight
        metadata[f"{plan.prefix}hra_config"] = plan.config.to_json()
    metadata["base_fingerprint"] = base_fingerprint(base_weights)
    metadata["base_fingerprint_method"] = FINGERPRINT_METHOD
    metadata["base_model"] = str(getattr(pipeline, "name_or_path", None) or "")
    output = Path(output)
    target = output if output.suffix == ".safetensors" else output / LORA_WEIGHTS_NAME
    return atomic_save_file(tensors, target, metadata)
