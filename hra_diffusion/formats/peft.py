"""Write one model's HRA adapter as a PEFT adapter folder.

``PeftModel.from_pretrained(model, folder)`` then loads it and computes the same
W H. PEFT stores U exactly as we do, (d, r), and a Conv2d's U as (in·k·k, r) in
the same flattening order, but it assumes square kernels. Reading PEFT folders
is :func:`hra_diffusion.load_hra_weights`' job.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from hra_diffusion.errors import InputError
from hra_diffusion.formats.hra import (
    PEFT_CONFIG_NAME,
    PEFT_KEY_PREFIX,
    PEFT_WEIGHTS_NAME,
    AdapterWeights,
    atomic_save_file,
    atomic_write,
)
from hra_diffusion.injection import ADAPTER_SUFFIX, hra_layers


def save_peft_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Save ``model``'s HRA layers as a PEFT HRA adapter folder.

    Writes ``adapter_config.json`` (``peft_type`` ``"HRA"``, ``r``, ``apply_GS``,
    ``target_modules`` = the exact adapted module paths) and
    ``adapter_model.safetensors`` (keys ``base_model.model.<path>.hra_u``), each
    atomically. Returns the folder.

    Raises:
        ValueError: the model has no HRA layers, has a magnitude (PEFT's HRA has none),
            or adapts a Conv2d with a non-square kernel (PEFT's HRA cannot represent it).

    Example:
        >>> save_peft_adapter(pipe.unet, "peft_adapter/")  # doctest: +SKIP
        >>> unet = PeftModel.from_pretrained(base_unet, "peft_adapter/")  # doctest: +SKIP
    """
    layers = list(hra_layers(model))
    if not layers:
        raise ValueError("The model has no HRA layers: call inject_hra or load_hra_weights first.")
    if any(layer.hra_m is not None for _, layer in layers):
        raise InputError(MAGNITUDE_REFUSAL)
    for name, layer in layers:
        kernel = getattr(layer.base_layer, "kernel_size", (1, 1))
        if kernel[0] != kernel[1]:
            raise ValueError(
                f"{name} is a Conv2d with kernel {tuple(kernel)}; PEFT's HRA supports square "
                "kernels only. Save it with save_hra_weights instead."
            )
    tensors = {name: layer.hra_u.detach().cpu().contiguous() for name, layer in layers}
    return _write_peft_folder(tensors, layers[0][1].apply_gs, directory)


MAGNITUDE_REFUSAL = (
    "--hra_magnitude weights (hra_m) cannot be exported as a PEFT HRA adapter, which has no "
    "magnitude; export them as LoRA (DoRA keys) instead, or keep our HRA file."
)


def _write_peft_folder(
    tensors: dict[str, torch.Tensor], apply_gs: bool, directory: str | os.PathLike
) -> Path:
    """Write ``{module path: U (d, r)}`` as a PEFT HRA folder (config + safetensors)."""
    r = next(iter(tensors.values())).shape[1]
    import peft

    config = peft.HRAConfig(
        r=r, apply_GS=apply_gs, target_modules=list(tensors), init_weights=True
    ).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    weights = {f"{PEFT_KEY_PREFIX}{name}.{ADAPTER_SUFFIX}": u for name, u in tensors.items()}
    directory = Path(directory)
    atomic_save_file(weights, directory / PEFT_WEIGHTS_NAME, {"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True)
    atomic_write(directory / PEFT_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return directory


def write_peft_adapter(
    adapter: AdapterWeights, directory: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Path:
    """Write the UNet part of a parsed HRA file (:func:`read_adapter`) as a PEFT folder,
    its tensors stored in ``dtype``.

    PEFT adapter folders hold one model, so only the UNet is written; a warning names
    the text-encoder components left out (load them with ``load_hra_weights``).

    Example:
        >>> write_peft_adapter(read_adapter("out/"), "peft_adapter/")  # doctest: +SKIP
    """
    if adapter.has_magnitude():
        raise InputError(f"{adapter.source}: {MAGNITUDE_REFUSAL}")
    group = "" if "" in adapter.groups else "unet"
    if group not in adapter.groups:
        raise InputError(
            f"{adapter.source} holds no UNet weights ({sorted(adapter.groups)}); a PEFT "
            "export writes the UNet's adapter."
        )
    skipped = sorted(set(adapter.groups) - {group})
    if skipped:
        warnings.warn(
            f"PEFT adapter folders hold one model: {', '.join(skipped)} left out of the "
            f"export (they stay in {adapter.source}).",
            stacklevel=2,
        )
    tensors = {path: u.to(dtype).contiguous() for path, u in adapter.groups[group].items()}
    return _write_peft_folder(tensors, adapter.apply_gs(group), directory)
