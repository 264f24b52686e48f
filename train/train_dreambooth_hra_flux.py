"""DreamBooth with HRA on FLUX.1: teach FLUX.1 [dev] (or [schnell]) a subject from a few pictures.

Same arguments as diffusers' ``train_dreambooth_lora_flux.py`` where they apply (the
flow-matching loss with ``--weighting_scheme``, ``--guidance_scale`` for the
guidance-distilled [dev], prior preservation, checkpoints with exact resume), plus the HRA
options. HRA adapts diffusers' default LoRA targets (:data:`~hra_diffusion.config.FLUX_TARGETS`:
the attention projections of every block and the double blocks' feed-forwards); the text
encoders stay frozen and every prompt is encoded once, before training, after which they
are dropped from memory. Run it with ``accelerate launch`` on GPUs::

    accelerate launch train/train_dreambooth_hra_flux.py \\
        --pretrained_model_name_or_path ./FLUX.1-dev \\
        --instance_data_dir ./my_dog --instance_prompt "a photo of qwe dog" \\
        --resolution 512 --mixed_precision bf16 --gradient_checkpointing --output_dir out-flux/

The shared DreamBooth driver of the transformer bases is
:mod:`hra_diffusion.train.dreambooth_flow`; this file holds what is FLUX.1's own: how prompts
are encoded (T5's hidden states and CLIP's pooled output) and how the transformer is called
(2×2 latent patches packed into tokens, their position ids, the guidance value). Without
``--pretrained_model_name_or_path`` a tiny random FLUX.1
(:mod:`hra_diffusion.world.tiny_transformers`) is used. The result is
``<output_dir>/hra_weights.safetensors``; load it with
``load_hra_weights(pipe, "out-flux/")`` into a ``FluxPipeline``, or pass ``--export_lora``
and use ``pipe.load_lora_weights("out-flux/")``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import diffusers
import torch
from diffusers import FluxPipeline

from hra_diffusion import FLUX_TARGETS, cli
from hra_diffusion.train.args import (
    add_bucket_args,
    add_cache_args,
    add_checkpoint_args,
    add_ema_args,
    add_flow_matching_args,
    add_hra_args,
    add_image_args,
    add_model_args,
    add_optimization_args,
    add_validation_args,
)
from hra_diffusion.train.dreambooth import Models
from hra_diffusion.train.dreambooth_args import add_dreambooth_args, add_dreambooth_output_args
from hra_diffusion.train.dreambooth_flow import FlowFamily, train
from hra_diffusion.train.flow_matching import FlowSample
from hra_diffusion.world.tiny_transformers import default_flux_path

FLUX_MODEL_HELP = (
    "FLUX.1 pipeline: a local diffusers folder (with model_index.json) or a hub id such as "
    "black-forest-labs/FLUX.1-dev (needs network or a filled hub cache). Default: the tiny "
    "random FLUX.1 of hra_diffusion.world.tiny_transformers (runs anywhere)."
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: diffusers' FLUX.1 DreamBooth-LoRA options plus the HRA ones."""
    parser = cli.ArgumentParser(
        description="DreamBooth fine-tuning of FLUX.1 with HRA adapters on the transformer. "
        "Options can also be read from a file, one per line: @FILE.",
        fromfile_prefix_chars="@",
    )
    add_model_args(parser, FLUX_MODEL_HELP)
    add_dreambooth_args(parser)
    add_image_args(parser, default_resolution=512)
    add_cache_args(parser, text=False)
    add_bucket_args(parser)
    add_hra_args(parser, FLUX_TARGETS)
    add_optimization_args(parser, learning_rate=1e-4)
    add_flow_matching_args(parser, guidance=True)
    add_ema_args(parser)
    add_checkpoint_args(parser)
    add_validation_args(
        parser,
        guidance_scale=3.5,
        several_prompts=True,
        sampler="Flow-matching Euler",
        guidance="Distilled guidance value (FLUX.1 [dev]; [schnell] ignores it)",
    )
    add_dreambooth_output_args(parser, default_output_dir="hra-dreambooth-flux-model")
    return parser


def encode_prompts(
    pipe: FluxPipeline, prompts: list[str], args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1's text conditioning, by the pipeline's own ``encode_prompt``: T5's hidden
    states (P, T5 tokens, D) and CLIP's pooled output (P, pooled width)."""
    embeds, pooled, _ = pipe.encode_prompt(
        prompts,
        None,
        device=pipe.text_encoder.device,
        max_sequence_length=args.max_sequence_length,
    )
    return embeds, pooled


def predict(
    sample: FlowSample,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    models: Models,
    args: argparse.Namespace,
) -> torch.Tensor:
    """The transformer's velocity for the noised latents (B, C, h, w), as ``FluxPipeline``
    calls it: 2×2 patches packed into (B, h/2 · w/2, 4C) tokens with their (row, column)
    ids, text ids of zeros, timesteps σ, and ``--guidance_scale`` for a guidance-distilled
    base; the output unpacked to (B, C, h, w)."""
    noisy = sample.noisy
    b, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, b, c, h, w)  # (B, h/2 · w/2, 4C)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
    text_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = None
    if models.adapted["transformer"].config.guidance_embeds:
        guidance = torch.full((b,), args.guidance_scale, device=noisy.device)
    velocity = models.unet(
        hidden_states=packed,
        timestep=sample.timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]  # (B, h/2 · w/2, 4C)
    scale = 2 ** (len(models.vae.config.block_out_channels) - 1)  # the VAE's downsampling
    return FluxPipeline._unpack_latents(velocity, h * scale, w * scale, scale)


FLUX = FlowFamily("flux", diffusers.FluxPipeline, encode_prompts, predict, False, default_flux_path)
"""What is FLUX.1's own in :func:`~hra_diffusion.train.dreambooth_flow.train`."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


@cli.cli_main()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns a summary: ``global_step``, ``loss`` (last step, main process),
    ``losses`` (its parts), ``trainable_parameters``, ``elapsed_s`` and ``files``."""
    return train(parse_args(argv), FLUX)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    main()
