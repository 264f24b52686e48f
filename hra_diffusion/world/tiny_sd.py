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

import diffusers
import torch
import transformers

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


def clip_tokenizer(pad_token: str = "<|endoftext|>") -> transformers.CLIPTokenizer:
    """The Stable Diffusion 1.x tokenizer, built offline (SDXL's second one pads with ``!``)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(tmp)
        return transformers.CLIPTokenizer(
            f"{tmp}/vocab.json",
            f"{tmp}/merges.txt",
            pad_token=pad_token,
            model_max_length=77,
        )


def tiny_unet(width: int = 32) -> diffusers.UNet2DConditionModel:
    """SD 1.x UNet layout with channels (width, 2·width) and cross-attention in every block.

    It has 7 transformer blocks, so 56 attention projections (``to_q/k/v/out.0``).
    """
    return diffusers.UNet2DConditionModel(
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
) -> transformers.CLIPTextConfig:
    """A 2-layer CLIP text config with SD's vocabulary and hidden size ``width``."""
    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return transformers.CLIPTextConfig(
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


def tiny_text_encoder(width: int = 32) -> transformers.CLIPTextModel:
    """A 2-layer CLIP text encoder with SD 1.x's vocabulary and hidden size ``width``."""
    return transformers.CLIPTextModel(clip_text_config(width))


def tiny_vae(scaling_factor: float = 0.18215) -> diffusers.AutoencoderKL:
    """A 4-level VAE (8× downsampling, 4 latent channels) with few channels.

    ``scaling_factor`` is the latent scale: SD 1.x's by default (SDXL's is 0.13025).
    """
    return diffusers.AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


def world_vae(
    channels: tuple[int, int, int] = (16, 32, 64),
    layers_per_block: int = 1,
    latent_channels: int = 4,
) -> diffusers.AutoencoderKL:
    """The world model's VAE: 3 levels of ``channels``, 4× down to ``latent_channels``, 4 norm
    groups. The bundled one has the defaults, (16, 32, 64) with 1 layer per block and 4 latent
    channels.

    Few norm groups matter: with one group per channel (instance norm) flat colour is lost.
    """
    if len(channels) != 3 or any(c % 4 for c in channels):
        raise ValueError(f"world_vae needs 3 channel counts divisible by 4, got {channels}.")
    return diffusers.AutoencoderKL(
        block_out_channels=tuple(channels),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=latent_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=4,
        sample_size=64,
    )


def widen_vae_latents(
    vae: diffusers.AutoencoderKL, latent_channels: int
) -> diffusers.AutoencoderKL:
    """A copy of ``vae`` with more latent channels that computes exactly the same pictures.

    Latent channel ``i`` of ``vae`` stays channel ``i`` (mean and log-variance alike);
    ``quant_conv`` and ``post_quant_conv`` pass the new channels through unchanged, the
    decoder's input weights on them are zero, and the encoder's new output rows keep their
    fresh initialisation. Training then teaches the decoder to use them (the net2net idea,
    Chen et al. 2016, applied to the bottleneck).
    """
    old = vae.config.latent_channels
    if latent_channels <= old:
        raise ValueError(f"widen_vae_latents adds channels: {old} -> {latent_channels}.")
    wide = diffusers.AutoencoderKL.from_config({**vae.config, "latent_channels": latent_channels})
    mean_logvar = torch.cat([torch.arange(old), latent_channels + torch.arange(old)])  # (2·old,)
    state = vae.state_dict()
    widened = wide.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            target = widened[name]
            if target.shape == tensor.shape:
                target.copy_(tensor)
            elif name.startswith("encoder.conv_out."):
                target[mean_logvar] = tensor  # new rows: fresh init
            elif name.startswith(("quant_conv.", "post_quant_conv.")):
                index = mean_logvar if name.startswith("quant_conv.") else torch.arange(old)
                if name.endswith("bias"):
                    target.zero_()
                    target[index] = tensor
                else:
                    target.copy_(torch.eye(target.shape[0]).view(target.shape))  # pass through
                    target[index.unsqueeze(1), index] = tensor
            elif name == "decoder.conv_in.weight":
                target.zero_()
                target[:, :old] = tensor  # the new channels are unused until trained
            else:
                raise ValueError(f"widen_vae_latents does not know {name} {tuple(tensor.shape)}.")
    wide.load_state_dict(widened)
    return wide


@torch.no_grad()
def latent_signal_to_noise(vae: diffusers.AutoencoderKL, pixels: torch.Tensor) -> torch.Tensor:
    """Per latent channel, the spread of the posterior means over ``pixels`` divided by the
    mean posterior standard deviation, (latent_channels,): about 0 for a channel that stayed
    at the prior (it carries nothing), 10-100 for the channels a trained VAE uses."""
    posterior = vae.encode(pixels).latent_dist
    return posterior.mean.std(dim=(0, 2, 3)) / posterior.std.mean(dim=(0, 2, 3))


def narrow_vae_latents(
    vae: diffusers.AutoencoderKL, keep: list[int], fill: torch.Tensor
) -> diffusers.AutoencoderKL:
    """A copy of ``vae`` with only the latent channels ``keep`` (in that order); the dropped
    ones are decoded at the constant ``fill`` (latent_channels,), e.g. their mean.

    ``quant_conv``'s kept rows fold into the encoder's last conv (a 1×1 after a 3×3 conv is a
    3×3 conv), so the kept latents are exactly the old ones. ``post_quant_conv`` folds into
    the decoder's first conv likewise, the dropped channels' constant into its bias. That is
    exact when the constant (``post_quant_conv`` of ``fill`` on the dropped channels, plus its
    bias) is zero; otherwise the first conv's zero padding sees it in one layout and not the
    other, and the decoder (its attention too) spreads the difference: 48 dB between the two
    decodings of the 16-channel world VAE, which a decoder fine-tune absorbs.
    """
    old = vae.config.latent_channels
    if not keep or len(set(keep)) != len(keep) or not all(0 <= c < old for c in keep):
        raise ValueError(f"narrow_vae_latents keeps distinct channels of 0..{old - 1}: {keep}.")
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("narrow_vae_latents folds quant_conv; this VAE has none.")
    narrow = diffusers.AutoencoderKL.from_config({**vae.config, "latent_channels": len(keep)})
    state = {k: v for k, v in vae.state_dict().items() if k in narrow.state_dict()}
    rows = torch.tensor([*keep, *(old + c for c in keep)])  # (2K,) mean then log-variance
    drop = [c for c in range(old) if c not in keep]
    with torch.no_grad():
        quant = vae.quant_conv.weight[rows, :, 0, 0]  # (2K, 2L)
        conv_out = vae.encoder.conv_out
        state["encoder.conv_out.weight"] = torch.einsum("oc,cixy->oixy", quant, conv_out.weight)
        state["encoder.conv_out.bias"] = quant @ conv_out.bias + vae.quant_conv.bias[rows]
        post, conv_in = vae.post_quant_conv, vae.decoder.conv_in
        post_keep = post.weight[:, keep, 0, 0]  # (L, K)
        constant = post.weight[:, drop, 0, 0] @ fill[drop] + post.bias  # (L,)
        state["decoder.conv_in.weight"] = torch.einsum("olxy,lk->okxy", conv_in.weight, post_keep)
        state["decoder.conv_in.bias"] = conv_in.bias + conv_in.weight.sum(dim=(2, 3)) @ constant
        for name, size in (("quant_conv", 2 * len(keep)), ("post_quant_conv", len(keep))):
            state[f"{name}.weight"] = torch.eye(size).view(size, size, 1, 1)
            state[f"{name}.bias"] = torch.zeros(size)
    narrow.load_state_dict(state)
    return narrow


@torch.no_grad()
def sampled_latent_statistics(
    vae: diffusers.AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of posterior samples of ``pixels``, the
    latents a UNet trains on: both of shape (latent_channels,)."""
    latents = vae.encode(pixels).latent_dist.sample(generator=generator)  # (B, L, h, w)
    return latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))


def normalize_vae_latents(
    vae: diffusers.AutoencoderKL, shift: torch.Tensor, scale: torch.Tensor
) -> diffusers.AutoencoderKL:
    """A copy of ``vae`` whose latents are ``z' = (z - shift) / scale`` per channel and which
    decodes ``z'`` to the same pictures as ``vae`` decodes ``z``; its scaling factor is 1.

    One global scaling factor (all ``StableDiffusionPipeline`` applies) leaves channels of
    unequal spread at unequal signal-to-noise ratios under the noise schedule. Folding the
    per-channel affine map into the VAE gives unit latents per channel with no change to the
    pipeline: ``quant_conv``'s mean rows become ``(W z + b - shift) / scale`` and its
    log-variance rows drop ``2 log scale``; ``post_quant_conv`` reads ``scale · z' + shift``.
    """
    channels = vae.config.latent_channels
    if shift.shape != (channels,) or scale.shape != (channels,) or not bool((scale > 0).all()):
        raise ValueError(
            f"normalize_vae_latents needs shift and scale of shape ({channels},), scale > 0."
        )
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("normalize_vae_latents folds into quant_conv; this VAE has none.")
    normalized = diffusers.AutoencoderKL.from_config(vae.config)
    normalized.register_to_config(scaling_factor=1.0)  # from_config drops defaulted keys
    normalized.load_state_dict(vae.state_dict())
    quant, post = normalized.quant_conv, normalized.post_quant_conv
    with torch.no_grad():
        quant.weight[:channels] /= scale.view(-1, 1, 1, 1)  # (L, 2L, 1, 1) mean rows
        quant.bias[:channels] = (quant.bias[:channels] - shift) / scale
        quant.bias[channels:] -= 2 * scale.log()  # log-variance rows
        post.bias += (post.weight[..., 0, 0] @ shift).view(-1)  # (L,)
        post.weight *= scale.view(1, -1, 1, 1)  # (L, L, 1, 1) input columns
    return normalized


def world_unet(latent_channels: int = 4) -> diffusers.UNet2DConditionModel:
    """The world model's UNet: channels (64, 128, 128), cross-attention at every level, 4 heads,
    on latents of ``latent_channels`` (the VAE's)."""
    return diffusers.UNet2DConditionModel(
        sample_size=16,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=64,
        attention_head_dim=4,
    )


def world_text_encoder() -> transformers.CLIPTextModel:
    """The world model's text encoder: 2 CLIP layers of width 64 over SD 1.x's vocabulary."""
    config = transformers.CLIPTextConfig(
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
    return transformers.CLIPTextModel(config)


def build_tiny_pipeline(width: int = 32, seed: int = 0) -> diffusers.StableDiffusionPipeline:
    """A Stable Diffusion 1.x pipeline of the real classes with random weights.

    Args:
        width: base channel count of the UNet (see :func:`tiny_unet`) and hidden
            size of the text encoder.
        seed: seeds every weight, so the same arguments give the same model.
    """
    torch.manual_seed(seed)
    return diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(width),
        tokenizer=clip_tokenizer(),
        unet=tiny_unet(width),
        scheduler=diffusers.DDIMScheduler(**SD15_SCHEDULER),
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
