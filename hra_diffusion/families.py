"""Base families: Stable Diffusion 1.x/2.x (``"sd"``) and Stable Diffusion XL (``"sdxl"``).

Adapters, training scripts and pipelines are specific to one family: an SDXL UNet has
other layers and widths than an SD 1.x one. These helpers name the family of a pipeline
folder, a UNet or a loaded pipeline, so that a mismatch is refused with one line naming
both bases.
"""

from __future__ import annotations

from torch import nn

FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "Stable Diffusion XL"}
"""Base families, as :func:`base_family` and :func:`model_family` name them."""


def base_family(model_path: str, revision: str | None = None) -> str:
    """``"sdxl"`` for a pipeline folder (or hub id) with a second text encoder, else ``"sd"``.

    Reads only the pipeline's ``model_index.json``.

    Example:
        >>> base_family("./stable-diffusion-xl-base-1.0")  # doctest: +SKIP
        'sdxl'
    """
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(model_path, revision=revision)
    return "sdxl" if "text_encoder_2" in config else "sd"


def unet_family(unet: nn.Module) -> str | None:
    """``"sdxl"`` for a UNet with SDXL's ``text_time`` added conditioning, ``"sd"`` for
    another diffusers UNet, None for a module without a UNet config."""
    config = getattr(unet, "config", None)
    if config is None or not hasattr(config, "cross_attention_dim"):
        return None
    return "sdxl" if getattr(config, "addition_embed_type", None) == "text_time" else "sd"


def model_family(target: object) -> str | None:
    """The family of a pipeline (from its UNet, else from whether it has a second text
    encoder) or of a UNet; None where it cannot be told (a text encoder on its own)."""
    unet = getattr(target, "unet", None)
    if isinstance(unet, nn.Module):
        return unet_family(unet)
    if isinstance(getattr(target, "components", None), dict):
        return "sdxl" if getattr(target, "text_encoder_2", None) is not None else "sd"
    return unet_family(target) if isinstance(target, nn.Module) else None
