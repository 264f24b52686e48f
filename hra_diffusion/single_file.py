"""Single-file Stable Diffusion 1.x / XL checkpoints (the original CompVis / SGM layout that
A1111, ComfyUI and kohya load), read offline with diffusers' ``from_single_file``.

The file holds the weights; ``--base_config`` names a local diffusers pipeline folder of
the same family whose configs, tokenizers and scheduler are used. Every script loads a
single file through :func:`load_single_file`; :func:`check_single_file` refuses a bad pair
in one line before anything heavy loads.
"""

from __future__ import annotations

import os
from pathlib import Path

import diffusers
import torch

from hra_diffusion.checks import check_model_path, safetensors_problem
from hra_diffusion.errors import InputError
from hra_diffusion.families import FAMILY_NAMES, base_family

PART_PREFIXES = {
    "sd": {
        "UNet": "model.diffusion_model.",
        "VAE": "first_stage_model.",
        "text encoder": "cond_stage_model.",
    },
    "sdxl": {
        "UNet": "model.diffusion_model.",
        "VAE": "first_stage_model.",
        "text encoder": "conditioner.embedders.0.",
        "second text encoder": "conditioner.embedders.1.",
    },
}
"""The key prefix of each part of an original-layout checkpoint, per family."""


def is_checkpoint_file(model: str | os.PathLike | None) -> bool:
    """True when ``model`` names an existing file (a single-file checkpoint), not a
    pipeline folder or a hub id."""
    return model is not None and Path(model).expanduser().is_file()


def checkpoint_family(path: str | os.PathLike) -> str:
    """``"sdxl"`` or ``"sd"`` for an original-layout checkpoint (reads its header only).

    Raises :class:`~hra_diffusion.errors.InputError` for a pickle (``.ckpt``), a corrupt
    file, or a safetensors file that is not a whole SD 1.x/2.x or SDXL checkpoint.

    Example:
        >>> checkpoint_family("sd_xl_base_1.0.safetensors")  # doctest: +SKIP
        'sdxl'
    """
    problem = safetensors_problem(path)
    if problem:
        raise InputError(f"{path} {problem}; single-file checkpoints load from .safetensors only.")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        keys = list(file.keys())
    family = "sdxl" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "sd"
    missing = [
        part
        for part, prefix in PART_PREFIXES[family].items()
        if not any(k.startswith(prefix) for k in keys)
    ]
    if missing:
        raise InputError(
            f"{path} is not a Stable Diffusion 1.x/2.x or XL checkpoint in the original layout "
            f"(no {', '.join(missing)} keys, e.g. {PART_PREFIXES[family][missing[0]]}...); give "
            "a whole model file as A1111 and ComfyUI load it, or a diffusers folder."
        )
    return family


def check_single_file(
    model: str | os.PathLike | None, base_config: str | os.PathLike | None, flag: str
) -> str | None:
    """The family of the checkpoint ``model`` names with its ``--base_config``, or None when
    ``model`` is not a file (a pipeline folder, a hub id, the default).

    Refuses (:class:`~hra_diffusion.errors.InputError`, one line) a file without
    ``base_config``, ``base_config`` without a file, a file that is not an SD checkpoint
    (:func:`checkpoint_family`), a ``base_config`` that is not a local pipeline folder, and
    a file and folder of different families. Reads headers and configs only.
    """
    if not is_checkpoint_file(model):
        if base_config is not None:
            raise InputError(
                f"--base_config is for a single-file checkpoint, but {flag} is "
                f"{model or 'the default model'}; drop --base_config."
            )
        return None
    if base_config is None:
        raise InputError(
            f"{flag} {model} is a single-file checkpoint: pass --base_config DIR, a local "
            "diffusers pipeline folder of the same family (its configs are used, the weights "
            "come from the file)."
        )
    if not Path(base_config).expanduser().is_dir():
        raise InputError(f"--base_config {base_config} is not a folder; give a pipeline folder.")
    check_model_path(str(base_config), "--base_config")
    found, expected = checkpoint_family(model), base_family(str(base_config))
    if found != expected:
        raise InputError(
            f"{flag} {model} is a {FAMILY_NAMES[found]} checkpoint but --base_config "
            f"{base_config} is a {FAMILY_NAMES[expected]} pipeline; give a --base_config of "
            "the checkpoint's family."
        )
    return found


def load_single_file(
    path: str | os.PathLike,
    base_config: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    **components: object,
) -> diffusers.DiffusionPipeline:
    """The pipeline of a single-file checkpoint: weights from ``path``, configs, tokenizers
    and scheduler from the pipeline folder ``base_config``, offline.

    An SDXL file loads as ``StableDiffusionXLPipeline`` (without watermarker), any other as
    ``StableDiffusionPipeline`` (without safety checker). ``components`` replace the
    file's (e.g. ``vae=``). Raises :class:`~hra_diffusion.errors.InputError` for a bad pair
    (:func:`check_single_file`) and for a file whose weights do not fit the configs.

    Example:
        >>> pipe = load_single_file("model.safetensors", "models/sd15")  # doctest: +SKIP
    """
    if not is_checkpoint_file(path):
        raise InputError(f"{path} is not a file; give a single-file .safetensors checkpoint.")
    family = check_single_file(path, base_config, "the checkpoint")
    kwargs: dict[str, object] = {"config": str(base_config), "local_files_only": True}
    if family == "sdxl":
        cls, kwargs["add_watermarker"] = diffusers.StableDiffusionXLPipeline, False
    else:
        cls = diffusers.StableDiffusionPipeline
        kwargs |= {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(str(path), torch_dtype=dtype, **kwargs, **components)
    except (ValueError, RuntimeError, KeyError, OSError) as error:
        raise InputError(
            f"{path} does not fit --base_config {base_config}: {str(error).splitlines()[0]}"
        ) from error
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None and any(p.is_meta for p in module.parameters()):
            raise InputError(
                f"{path} does not hold every weight of the {name} that --base_config "
                f"{base_config} describes; give the checkpoint's own base config."
            )
        if module is not None:  # own memory, not views of the file's map: the same kernels
            for param in module.parameters():  # (and bits) as a folder's weights get
                param.data = param.data.clone()
    return pipe
