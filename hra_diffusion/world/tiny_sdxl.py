"""A small Stable Diffusion XL pipeline of the real classes, built offline from configs.

- :func:`build_tiny_sdxl_pipeline`: random weights, deterministic for a seed, for fast
  tests. Its UNet has SDXL's layout in miniature: a plain down block then cross-attention
  blocks with ``transformer_layers_per_block`` (1, 2), linear projections and the
  ``text_time`` added conditioning (pooled text embedding + six time ids).
- :func:`default_sdxl_path`: that pipeline saved once under the cache folder
  (``~/.cache/hra_diffusion``, or ``$HRA_DIFFUSION_CACHE``), the default base of
  ``train/train_dreambooth_hra_sdxl.py``.

Both tokenizers are the real CLIP BPE tokenizer (the second pads with ``!``, as SDXL's
does), rebuilt from the vocabulary clip-anytorch ships. Nothing is downloaded. Its
samples show that the code path works, not image quality.

Write it to a folder::

    from hra_diffusion.world.tiny_sdxl import save_tiny_sdxl
    save_tiny_sdxl("./tiny-sdxl")
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import diffusers
import torch
import transformers

from hra_diffusion.world.tiny_sd import clip_text_config, clip_tokenizer, tiny_vae

SDXL_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
"""SDXL base 1.0's noise schedule (Euler discrete)."""

SDXL_VAE_SCALING_FACTOR = 0.13025
"""SDXL's VAE latent scale."""

TIME_EMBED_DIM = 8
"""Width of each of the six time-id embeddings of the tiny UNet (SDXL: 256)."""

CACHE_NAME = "tiny-sdxl-v1"
"""Folder name of :func:`default_sdxl_path` inside the cache folder."""


def tiny_sdxl_tokenizers() -> tuple[transformers.CLIPTokenizer, transformers.CLIPTokenizer]:
    """The two SDXL tokenizers: CLIP BPE padded with ``<|endoftext|>`` and with ``!``."""
    return clip_tokenizer(), clip_tokenizer(pad_token="!")


def tiny_sdxl_text_encoders(
    width: int = 32,
) -> tuple[transformers.CLIPTextModel, transformers.CLIPTextModelWithProjection]:
    """``CLIPTextModel`` and ``CLIPTextModelWithProjection`` (projection ``width``), 2 layers."""
    return (
        transformers.CLIPTextModel(clip_text_config(width)),
        transformers.CLIPTextModelWithProjection(
            clip_text_config(width, pad_token_id=0, projection_dim=width)
        ),
    )


def tiny_sdxl_unet(width: int = 32) -> diffusers.UNet2DConditionModel:
    """SDXL's UNet layout with channels (width, 2·width).

    Cross-attention dimension 2·width (both encoders' hidden states side by side) and
    added conditioning of the pooled embedding (``width``) plus six time ids of
    :data:`TIME_EMBED_DIM` each. It has 6 transformer blocks, so 48 attention projections.
    """
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * width,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + width,
        norm_num_groups=8,
    )


def build_tiny_sdxl_pipeline(width: int = 32, seed: int = 0) -> diffusers.StableDiffusionXLPipeline:
    """A Stable Diffusion XL pipeline of the real classes with random weights.

    Args:
        width: base channel count of the UNet and hidden size of both text encoders.
        seed: seeds every weight, so the same arguments give the same model.

    Example:
        >>> pipe = build_tiny_sdxl_pipeline()
        >>> pipe("a photo of qwe robot", height=64, width=64, num_inference_steps=2).images
        ... # doctest: +SKIP
    """
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = tiny_sdxl_text_encoders(width)
    tokenizer, tokenizer_2 = tiny_sdxl_tokenizers()
    return diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(SDXL_VAE_SCALING_FACTOR),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(width),
        scheduler=diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER),
        add_watermarker=False,
    )


def save_tiny_sdxl(folder: str | os.PathLike, width: int = 32) -> Path:
    """Write :func:`build_tiny_sdxl_pipeline` (seed 0) as a diffusers folder, atomically.

    The pipeline is saved into a temporary sibling folder and renamed into place, so a
    kill never leaves half a model. An existing pipeline folder is left as it is.
    """
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build_tiny_sdxl_pipeline(width).save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def default_sdxl_path() -> Path:
    """The tiny SDXL pipeline folder in the cache, built on first use.

    ``StableDiffusionXLPipeline.from_pretrained(default_sdxl_path())`` loads it.
    """
    cache = Path(os.environ.get("HRA_DIFFUSION_CACHE", Path.home() / ".cache" / "hra_diffusion"))
    return save_tiny_sdxl(cache / CACHE_NAME)
