"""Base families: Stable Diffusion 1.x/2.x (``"sd"``), Stable Diffusion XL (``"sdxl"``),
Stable Diffusion 3/3.5 (``"sd3"``) and FLUX.1 (``"flux"``).

Adapters, training scripts and pipelines are specific to one family: an SDXL UNet has
other layers and widths than an SD 1.x one, and SD3 and FLUX denoise with a transformer
(``pipe.transformer``) instead of a UNet. These helpers name the family of a pipeline
folder, a denoiser or a loaded pipeline, so that a mismatch is refused with one line naming
both bases.
"""

from __future__ import annotations

from torch import nn

FAMILY_NAMES = {
    "sd": "Stable Diffusion 1.x/2.x",
    "sdxl": "Stable Diffusion XL",
    "sd3": "Stable Diffusion 3",
    "flux": "FLUX.1",
}
"""Base families, as :func:`base_family` and :func:`model_family` name them."""

TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
"""The family of each diffusers transformer class (``pipe.transformer``)."""

PIPELINE_FAMILIES = {"StableDiffusion3": "sd3", "Flux": "flux"}
"""Pipeline class-name prefixes of the transformer families (``StableDiffusion3Pipeline``,
``StableDiffusion3Img2ImgPipeline``, ``FluxPipeline``, …); the longest prefix wins."""


def pipeline_class_family(class_name: str) -> str | None:
    """``"sd3"``/``"flux"`` for a diffusers pipeline class name of those families, else None
    (``"Flux2Pipeline"`` is FLUX.2, another architecture: None)."""
    for prefix, family in PIPELINE_FAMILIES.items():
        rest = class_name.removeprefix(prefix)
        if rest != class_name and not rest[:1].isdigit():
            return family
    return None


def base_family(model_path: str, revision: str | None = None) -> str:
    """The family of a pipeline folder (or hub id): SD3 or FLUX.1 from the pipeline class,
    ``"sdxl"`` with a second text encoder, else ``"sd"``.

    Reads only the pipeline's ``model_index.json``.

    Example:
        >>> base_family("./stable-diffusion-xl-base-1.0")  # doctest: +SKIP
        'sdxl'
    """
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model_path, revision=revision)
    transformer = config.get("transformer") or (None, None)
    family = pipeline_class_family(config.get("_class_name", "")) or TRANSFORMER_FAMILIES.get(
        transformer[1]
    )
    if family is not None:
        return family
    return "sdxl" if "text_encoder_2" in config else "sd"


def unet_family(unet: nn.Module) -> str | None:
    """``"sdxl"`` for a UNet with SDXL's ``text_time`` added conditioning, ``"sd"`` for
    another diffusers UNet, ``"sd3"``/``"flux"`` for those transformers, None for a module
    without such a config (a text encoder)."""
    family = TRANSFORMER_FAMILIES.get(type(unet).__name__)
    if family is not None:
        return family
    config = getattr(unet, "config", None)
    if config is None or not hasattr(config, "cross_attention_dim"):
        return None
    return "sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd"


def model_family(target: object) -> str | None:
    """The family of a pipeline (from its denoiser, the UNet or the transformer, else from
    whether it has a second text encoder) or of a denoiser; None where it cannot be told
    (a text encoder on its own)."""
    for name in ("unet", "transformer"):
        denoiser = getattr(target, name, None)
        if isinstance(denoiser, nn.Module):
            return unet_family(denoiser)
    if isinstance(getattr(target, "components", None), dict):
        family = pipeline_class_family(type(target).__name__)
        if family is not None:
            return family
        return "sdxl" if getattr(target, "text_encoder_2", None) is not None else "sd"
    return unet_family(target) if isinstance(target, nn.Module) else None
