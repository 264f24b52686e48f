"""Small Stable Diffusion 3 and FLUX.1 pipelines of the real classes, built offline from configs.

- :func:`build_tiny_sd3_pipeline`: a ``StableDiffusion3Pipeline`` with a one-block
  ``SD3Transformer2DModel`` (MMDiT), two ``CLIPTextModelWithProjection`` encoders and a
  ``T5EncoderModel``; its VAE makes 4-channel latents (real SD3: 16), 8× smaller.
- :func:`build_tiny_flux_pipeline`: a ``FluxPipeline`` with a ``FluxTransformer2DModel`` of
  one double and one single block, guidance-distilled like FLUX.1 [dev]
  (``guidance_embeds``), a ``CLIPTextModel`` (pooled embedding) and a ``T5EncoderModel``.
  FLUX packs 2×2 latent patches into one token, so the transformer's ``in_channels`` is 4 ×
  the VAE's ``latent_channels``: 4 and 1 here (real FLUX: 64 and 16).
- :func:`save_tiny_transformer_pipeline` writes either as a diffusers folder (atomically);
  :func:`default_sd3_path` / :func:`default_flux_path` cache them, the default bases of
  ``train/train_dreambooth_hra_sd3.py`` and ``train/train_dreambooth_hra_flux.py``.

The CLIP tokenizers are the real CLIP BPE tokenizer
(:func:`~hra_diffusion.world.tiny_sd.clip_tokenizer`); the T5 tokenizer is T5's Unigram
tokenizer over a small vocabulary written here (:func:`tiny_t5_tokenizer`). Nothing is
downloaded; samples show that the code path works, not image quality.
"""

from __future__ import annotations

import os
import shutil
import string
import tempfile
from pathlib import Path

import diffusers
import torch
import transformers

from hra_diffusion.world.tiny_sd import clip_text_config, clip_tokenizer

T5_WIDTH = 32
"""d_model of the tiny T5 encoder: the transformers' ``joint_attention_dim``."""

T5_MAX_LENGTH = 32
"""``model_max_length`` of the tiny T5 tokenizer (real SD3: 256 tokens, FLUX.1: 512)."""

T5_WORDS = (
    "a an the of on in at with and photo picture drawing painting image toy robot dog cat "
    "red green blue yellow white black small big background table beach qwe sks"
).split()
"""Whole words of the tiny T5 vocabulary; anything else is spelled letter by letter."""

SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
"""Stable Diffusion 3's flow-matching schedule (``FlowMatchEulerDiscreteScheduler``)."""

FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1 [dev]'s schedule: the shift grows with the image's token count (``mu``)."""

SD3_VAE = {"scaling_factor": 1.5305, "shift_factor": 0.0609}
FLUX_VAE = {"scaling_factor": 0.3611, "shift_factor": 0.1159}
"""Latent scale and shift of the real VAEs: the transformer sees ``(z − shift) · scale``."""

CACHE_NAMES = {"sd3": "tiny-sd3-v1", "flux": "tiny-flux-v1"}
"""Folder names of :func:`default_sd3_path` / :func:`default_flux_path` in the cache folder."""


def tiny_t5_tokenizer() -> transformers.T5Tokenizer:
    """T5's tokenizer (Unigram, ``</s>`` appended, ``<pad>`` = 0) over :data:`T5_WORDS`,
    the letters and the digits, with :data:`T5_MAX_LENGTH` tokens; built offline."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -1.0) for word in T5_WORDS]
    symbols = string.ascii_lowercase + string.digits + ".,!?'-"
    pieces += [(c, -5.0) for c in symbols] + [("▁" + c, -4.0) for c in symbols]
    return transformers.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def tiny_t5_encoder(vocab_size: int) -> transformers.T5EncoderModel:
    """A 2-layer ``T5EncoderModel`` of width :data:`T5_WIDTH`."""
    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=2 * T5_WIDTH,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
    )
    return transformers.T5EncoderModel(config)


def tiny_flow_vae(latent_channels: int, scaling_factor: float, shift_factor: float):
    """A 4-level VAE (8× downsampling) with ``latent_channels`` channels and a latent shift."""
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def tiny_sd3_transformer() -> diffusers.SD3Transformer2DModel:
    """One MMDiT block: 4 heads of 8, text width 32, pooled width 64, 4 latent channels."""
    return diffusers.SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )


def tiny_flux_transformer() -> diffusers.FluxTransformer2DModel:
    """One double and one single block, 2 heads of 16 (RoPE axes 4 + 4 + 8), text width 32,
    pooled width 32, 4 input channels (one 1-channel latent's 2×2 patch), guidance embedding."""
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=[4, 4, 8],
    )


def build_tiny_sd3_pipeline(seed: int = 0) -> diffusers.StableDiffusion3Pipeline:
    """A Stable Diffusion 3 pipeline of the real classes with random weights.

    The CLIP encoders have width 16 and projection 32: their hidden states side by side are
    32 wide (T5's width, so the pipeline's zero padding is empty) and their pooled
    projections 64 (the transformer's ``pooled_projection_dim``).

    Example:
        >>> pipe = build_tiny_sd3_pipeline()
        >>> pipe("a photo of qwe toy", height=32, width=32, num_inference_steps=2).images
        ... # doctest: +SKIP
    """
    torch.manual_seed(seed)
    tokenizer_3 = tiny_t5_tokenizer()
    return diffusers.StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=tiny_flow_vae(4, **SD3_VAE),
        text_encoder=transformers.CLIPTextModelWithProjection(
            clip_text_config(16, projection_dim=32)
        ),
        tokenizer=clip_tokenizer(),
        text_encoder_2=transformers.CLIPTextModelWithProjection(
            clip_text_config(16, pad_token_id=0, projection_dim=32)
        ),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=tiny_t5_encoder(len(tokenizer_3)),
        tokenizer_3=tokenizer_3,
    )


def build_tiny_flux_pipeline(seed: int = 0) -> diffusers.FluxPipeline:
    """A FLUX.1 pipeline of the real classes with random weights (sample at multiples of 16 px).

    Example:
        >>> pipe = build_tiny_flux_pipeline()
        >>> pipe("a photo of qwe toy", height=32, width=32, num_inference_steps=2).images
        ... # doctest: +SKIP
    """
    torch.manual_seed(seed)
    tokenizer_2 = tiny_t5_tokenizer()
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=tiny_flow_vae(1, **FLUX_VAE),
        text_encoder=transformers.CLIPTextModel(clip_text_config(32)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=tiny_t5_encoder(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=tiny_flux_transformer(),
    )


BUILDERS = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}
"""The tiny pipeline of each transformer family."""


def save_tiny_transformer_pipeline(folder: str | os.PathLike, family: str) -> Path:
    """Write the tiny ``family`` (``"sd3"`` or ``"flux"``) pipeline (seed 0) as a diffusers
    folder, atomically: saved into a temporary sibling and renamed into place. An existing
    pipeline folder is left as it is. ``from_pretrained(folder)`` loads it offline."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        BUILDERS[family]().save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _cache_folder() -> Path:
    return Path(os.environ.get("HRA_DIFFUSION_CACHE", Path.home() / ".cache" / "hra_diffusion"))


def default_sd3_path() -> Path:
    """The tiny SD3 pipeline folder in the cache, built on first use."""
    return save_tiny_transformer_pipeline(_cache_folder() / CACHE_NAMES["sd3"], "sd3")


def default_flux_path() -> Path:
    """The tiny FLUX.1 pipeline folder in the cache, built on first use."""
    return save_tiny_transformer_pipeline(_cache_folder() / CACHE_NAMES["flux"], "flux")
