"""Small Stable Diffusion 1.x models of the real classes, built offline from configs.

- :func:`default_model_path`: the bundled default model, a tiny SD pretrained on the
  procedural world of :mod:`hra_diffusion.world` by ``train/pretrain_world.py`` from
  the :func:`world_vae`, :func:`world_unet` and :func:`world_text_encoder` configs.
- :func:`build_tiny_pipeline`: random weights from smaller configs, deterministic for a
  seed, for fast tests: its samples show that the code path works, not image quality.

The tokenizer is the real CLIP BPE tokenizer of Stable Diffusion 1.x, rebuilt from the
vocabulary that clip-anytorch ships. Nothing is downloaded.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
"""Stable Diffusion 1.5's noise schedule."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("clip-anytorch is not installed: pip install clip-anytorch")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer_files(folder: str | os.PathLike) -> None:
    """Write ``vocab.json`` and ``merges.txt`` of the SD 1.x CLIP tokenizer (49,408 tokens)."""
    lines = gzip.open(_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The Stable Diffusion 1.x tokenizer, built offline (SDXL's second one pads with ``!``)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        return CLIPTokenizer(
            f"{tmp}/vocab.json",
            f"{tmp}/merges.txt",
            pad_token=pad_token,
            model_max_length=77,
        )


def tiny_unet(width: int = 32) -> UNet2DConditionModel:
    """SD 1.x UNet layout with channels (width, 2·width) and cross-attention in every block.

    It has 7 transformer blocks, so 56 attention projections (``to_q/k/v/out.0``).
    """
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(width, 2 * width),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def clip_text_config(
    width: int, pad_token_id: int = 49407, projection_dim: int | None = None
) -> CLIPTextConfig:
    """A 2-layer CLIP text config with SD's vocabulary and hidden size ``width``."""
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        **extra,
    )


def tiny_text_encoder(width: int = 32) -> CLIPTextModel:
    """A 2-layer CLIP text encoder with SD 1.x's vocabulary and hidden size ``width``."""
    return CLIPTextModel(clip_text_config(width))


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    """A 4-level VAE (8× downsampling, 4 latent channels) with few channels.

    ``scaling_factor`` is the latent scale: SD 1.x's by default (SDXL's is 0.13025).
    """
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def world_vae() -> AutoencoderKL:
    """The world model's VAE: channels (16, 32, 64), 4× down to 4 latent channels, 4 norm groups.

    Few norm groups matter: with one group per channel (instance norm) flat colour is lost.
    """
    return AutoencoderKL(
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=64,
    )


def world_unet() -> UNet2DConditionModel:
    """The world model's UNet: channels (64, 128, 128), cross-attention at every level, 4 heads."""
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=4,
    )


def world_text_encoder() -> CLIPTextModel:
    """The world model's text encoder: 2 CLIP layers of width 64 over SD 1.x's vocabulary."""
    config = CLIPTextConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=49408,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_tiny_pipeline(width: int = 32, seed: int = 0) -> StableDiffusionPipeline:
    """A Stable Diffusion 1.x pipeline of the real classes with random weights.

    Args:
        width: base channel count of the UNet (see :func:`tiny_unet`) and hidden
            size of the text encoder.
        seed: seeds every weight, so the same arguments give the same model.
    """
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(width),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet(width),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


BUNDLED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "tiny-sd-world"
"""The bundled default model: a tiny SD 1.x pretrained on :mod:`hra_diffusion.world`."""


def default_model_path() -> Path:
    """The bundled default model's pipeline folder (made by ``train/pretrain_world.py``).

    ``StableDiffusionPipeline.from_pretrained(default_model_path())`` loads it.
    """
    if not (BUNDLED_MODEL / "model_index.json").is_file():
        raise FileNotFoundError(
            f"The bundled default model is missing from {BUNDLED_MODEL}. Reinstall the "
            "package, or rebuild it with: python train/pretrain_world.py --output_dir "
            f"{BUNDLED_MODEL}"
        )
    return BUNDLED_MODEL
