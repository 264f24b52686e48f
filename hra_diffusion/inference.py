"""Load a Stable Diffusion (1.x or XL) pipeline with HRA adapters merged, and sample from it.

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


def _load_folder(model: str | os.PathLike, dtype: torch.dtype) -> diffusers.DiffusionPipeline:
    """The pipeline of a diffusers folder or hub id (SDXL if it has ``text_encoder_2``)."""
    check_model_path(str(model))
    path = Path(model)
    try:
        sdxl = "text_encoder_2" in diffusers.DiffusionPipeline.load_config(model)
        if sdxl:
            pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype)
        else:
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
    except OSError as error:
        if path.exists():
            first = str(error).splitlines()[0]
            raise InputError(f"{model} is not a diffusers pipeline folder: {first}") from error
        raise InputError(
            f"{str(model)!r} is neither a local folder nor on the Hugging Face Hub (offline?); "
            "pass a local diffusers folder (huggingface-cli download <id> --local-dir DIR)."
        ) from error
    return pipe


def load_pipeline(
    model: str | os.PathLike,
    weights: str | os.PathLike | list[str | os.PathLike] | None = None,
    scheduler: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    base_config: str | os.PathLike | None = None,
) -> diffusers.DiffusionPipeline:
    """A Stable Diffusion pipeline with the HRA adapter(s) loaded and merged.

    Several ``weights`` stack in the order given (W H_1 H_2 ⋯, see
    :func:`hra_diffusion.set_hra_adapters`), loaded as adapters ``adapter0``, ``adapter1``...

    An SDXL pipeline (one with ``text_encoder_2``) loads as ``StableDiffusionXLPipeline``,
    any other as ``StableDiffusionPipeline`` (without its safety checker). ``model`` is a
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
