"""DreamBooth with HRA on Stable Diffusion 3 / 3.5: teach SD3 a subject from a few pictures.

Same arguments as diffusers' ``train_dreambooth_lora_sd3.py`` where they apply (the
flow-matching loss with ``--weighting_scheme``, ``--precondition_outputs``, prior
preservation, checkpoints with exact resume), plus the HRA options. HRA adapts the joint
attention of every MMDiT block (:data:`~hra_diffusion.config.SD3_TARGETS`, diffusers'
default LoRA targets); the three text encoders stay frozen and every prompt is encoded
once, before training, after which they are dropped from memory. Run it with
``accelerate launch`` on GPUs, or with ``python`` on CPU::

    accelerate launch train/train_dreambooth_hra_sd3.py \\
        --pretrained_model_name_or_path ./stable-diffusion-3.5-medium \\
        --instance_data_dir ./my_dog --instance_prompt "a photo of qwe dog" \\
        --resolution 1024 --mixed_precision bf16 --output_dir out-sd3/

The shared DreamBooth driver of the transformer bases is
:mod:`hra_diffusion.train.dreambooth_flow`; this file holds what is SD3's own: how prompts
are encoded (both CLIP encoders' hidden states side by side, zero-padded to T5's width and
followed by T5's, and both pooled projections) and how the transformer is called. Without
``--pretrained_model_name_or_path`` a tiny random SD3
(:mod:`hra_diffusion.world.tiny_transformers`) is used. The result is
``<output_dir>/hra_weights.safetensors``; load it with
``load_hra_weights(pipe, "out-sd3/")`` into a ``StableDiffusion3Pipeline``, or pass
``--export_lora`` and use ``pipe.load_lora_weights("out-sd3/")``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import diffusers
import torch

from hra_diffusion import SD3_TARGETS, cli
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
from hra_diffusion.world.tiny_transformers import default_sd3_path

SD3_MODEL_HELP = (
    "Stable Diffusion 3 or 3.5 pipeline: a local diffusers folder (with model_index.json) or a "
    "hub id such as stabilityai/stable-diffusion-3.5-medium (needs network or a filled hub "
    "cache). Default: the tiny random SD3 of hra_diffusion.world.tiny_transformers (runs "
    "anywhere)."
)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: diffusers' SD3 DreamBooth-LoRA options plus the HRA ones."""
    parser = cli.ArgumentParser(
        description="DreamBooth fine-tuning of Stable Diffusion 3/3.5 with HRA adapters on the "
        "transformer. Options can also be read from a file, one per line: @FILE.",
        fromfile_prefix_chars="@",
    )
    add_model_args(parser, SD3_MODEL_HELP)
    add_dreambooth_args(parser)
    add_image_args(parser, default_resolution=512)
    add_cache_args(parser, text=False)
    add_bucket_args(parser)
    add_hra_args(parser, SD3_TARGETS)
    add_optimization_args(parser, learning_rate=1e-4)
    add_flow_matching_args(parser, precondition=True)
    add_ema_args(parser)
    add_checkpoint_args(parser)
    add_validation_args(
        parser, guidance_scale=7.0, several_prompts=True, sampler="Flow-matching Euler"
    )
    add_dreambooth_output_args(parser, default_output_dir="hra-dreambooth-sd3-model")
    return parser


def encode_prompts(
    pipe: diffusers.StableDiffusion3Pipeline, prompts: list[str], args: argparse.Namespace
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's text conditioning, by the pipeline's own ``encode_prompt``: (P, 77 + T5 tokens,
    D) hidden states and (P, pooled width) pooled projections."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompts,
        None,
        None,
        device=pipe.text_encoder.device,
        do_classifier_free_guidance=False,
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
    """The transformer's velocity for the noised latents (B, C, h, w) at timesteps 1000 σ."""
    return models.unet(
        hidden_states=sample.noisy,
        timestep=sample.timesteps,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]


SD3 = FlowFamily(
    "sd3", diffusers.StableDiffusion3Pipeline, encode_prompts, predict, True, default_sd3_path
)
"""What is Stable Diffusion 3's own in :func:`~hra_diffusion.train.dreambooth_flow.train`."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


@cli.cli_main()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns a summary: ``global_step``, ``loss`` (last step, main process),
    ``losses`` (its parts), ``trainable_parameters``, ``elapsed_s`` and ``files``."""
    return train(parse_args(argv), SD3)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    main()
