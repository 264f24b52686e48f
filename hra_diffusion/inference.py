"""Load a Stable Diffusion (1.x, XL, 3) or FLUX.1 pipeline with HRA adapters merged, and sample.

The command line around these functions is ``python -m hra_diffusion.pipelines.generate``.
"""

from __future__ import annotations

import os
from pathlib import Path

import diffusers
import torch
from PIL import Image
from tqdm.auto import tqdm

from hra_diffusion.adapters import set_hra_adapters
from hra_diffusion.checks import check_model_path
from hra_diffusion.errors import InputError
from hra_diffusion.families import FAMILY_NAMES, base_family, model_family
from hra_diffusion.formats.hra import load_hra_weights
from hra_diffusion.injection import merge_hra
from hra_diffusion.single_file import check_single_file, is_checkpoint_file, load_single_file

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
}
"""``--scheduler`` names and their diffusers classes (named, so that importing this module
loads no scheduler); :func:`build_scheduler` builds one from a model's own config."""


def build_scheduler(name: str, config: dict) -> diffusers.SchedulerMixin:
    """The ``--scheduler`` ``name`` built from a pipeline's scheduler ``config``."""
    return getattr(diffusers, SCHEDULERS[name]).from_config(config)


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


PIPELINE_CLASSES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}
"""The diffusers pipeline class of each family (:func:`~hra_diffusion.families.base_family`)."""

FLOW_FAMILIES = ("sd3", "flux")
"""Families sampled by rectified flow with their own ``FlowMatchEulerDiscreteScheduler``:
``--scheduler`` (the UNet samplers) does not apply to them."""

FLOW_SCHEDULER_REFUSAL = (
    "--scheduler is for the UNet bases; {name} samples with its own flow-matching Euler "
    "scheduler: drop --scheduler."
)

GUIDANCE_SCALES = {"sd": 7.5, "sdxl": 7.5, "sd3": 7.0, "flux": 3.5}
"""Default ``guidance_scale`` of each family: classifier-free guidance, except FLUX.1 [dev]'s
distilled guidance value (its pipeline's default)."""


def folder_family(model: str | os.PathLike) -> str:
    """The family of a diffusers folder or hub id, from its ``model_index.json`` only;
    ``InputError`` with the cause and the fix when it cannot be read."""
    check_model_path(str(model))
    try:
        return base_family(str(model))
    except OSError as error:
        raise _unreadable(model, error) from error


def _unreadable(model: str | os.PathLike, error: OSError) -> InputError:
    if Path(model).exists():
        first = str(error).splitlines()[0]
        return InputError(f"{model} is not a diffusers pipeline folder: {first}")
    return InputError(
        f"{str(model)!r} is neither a local folder nor on the Hugging Face Hub (offline?); "
        "pass a local diffusers folder (huggingface-cli download <id> --local-dir DIR)."
    )


def _load_folder(model: str | os.PathLike, dtype: torch.dtype) -> diffusers.DiffusionPipeline:
    """The pipeline of a diffusers folder or hub id, of its family's class
    (:data:`PIPELINE_CLASSES`; SD 1.x/2.x without its safety checker)."""
    family = folder_family(model)
    pipeline_class = getattr(diffusers, PIPELINE_CLASSES[family])
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    try:
        return pipeline_class.from_pretrained(model, torch_dtype=dtype, **extra)
    except OSError as error:
        raise _unreadable(model, error) from error


def load_pipeline(
    model: str | os.PathLike,
    weights: str | os.PathLike | list[str | os.PathLike] | None = None,
    scheduler: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    base_config: str | os.PathLike | None = None,
) -> diffusers.DiffusionPipeline:
    """A Stable Diffusion or FLUX.1 pipeline with the HRA adapter(s) loaded and merged.

    Several ``weights`` stack in the order given (W H_1 H_2 ⋯, see
    :func:`hra_diffusion.set_hra_adapters`), loaded as adapters ``adapter0``, ``adapter1``...

    A folder loads with its family's pipeline class (:data:`PIPELINE_CLASSES`:
    ``StableDiffusionPipeline`` without its safety checker, ``StableDiffusionXLPipeline``,
    ``StableDiffusion3Pipeline`` or ``FluxPipeline``); HRA weights of another family are
    refused in one line by :func:`~hra_diffusion.formats.hra.load_hra_weights`. ``model`` is a
    local diffusers folder or a Hub id (which needs the network or the Hub cache). Raises
    ``ValueError`` with the cause and the fix when the model cannot be loaded. A single-file
    checkpoint ``model`` loads with the configs of the pipeline folder ``base_config``
    (:func:`~hra_diffusion.single_file.load_single_file`).

    Example:
        >>> pipe = load_pipeline("models/sd15", weights="out/", scheduler="dpm")  # doctest: +SKIP
    """
    if is_checkpoint_file(model) or base_config is not None:
        check_single_file(model, base_config, "--model")
        pipe = load_single_file(model, base_config, dtype)
    else:
        pipe = _load_folder(model, dtype)
    weights = [weights] if isinstance(weights, (str, os.PathLike)) else weights or []
    if len(weights) == 1:
        load_hra_weights(pipe, weights[0])
    elif weights:
        names = [f"adapter{i}" for i in range(len(weights))]
        for name, path in zip(names, weights, strict=True):
            load_hra_weights(pipe, path, adapter_name=name)
        set_hra_adapters(pipe, names)
    if weights:
        merge_hra(pipe)
    if scheduler is not None:
        if model_family(pipe) in FLOW_FAMILIES:
            raise InputError(FLOW_SCHEDULER_REFUSAL.format(name=FAMILY_NAMES[model_family(pipe)]))
        pipe.scheduler = build_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_images(
    pipe: diffusers.DiffusionPipeline,
    prompts: list[str],
    num_images: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> list[list[Image.Image]]:
    """``num_images`` images per prompt; image i of each prompt uses seed ``seed + i``.

    Example:
        >>> rows = generate_images(pipe, ["a photo of qwe dog"], num_images=4)  # doctest: +SKIP
        >>> len(rows), len(rows[0])  # doctest: +SKIP
        (1, 4)
    """
    rows = []
    with tqdm(total=len(prompts) * num_images, desc="Generating", unit="image") as progress:
        for prompt in prompts:
            row = []
            for i in range(num_images):
                generator = torch.Generator(pipe.device).manual_seed(seed + i)
                image = pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    generator=generator,
                ).images[0]
                row.append(image)
                progress.update()
            rows.append(row)
    return rows
