"""Training infrastructure shared by the HRA training scripts.

Import it as ``hra_diffusion.train.common``. Everything here is small and
stable; a training script is expected to:

1. build an ``argparse.ArgumentParser`` from the ``add_*_args`` groups below
   (:func:`check_common_args` needs the optimisation, loss and EMA groups)
   plus its own options, then call :func:`check_common_args`,
   :func:`resolve_model_path` (and :func:`check_base_family`, which refuses an SDXL
   base in an SD 1.x script and vice versa) and :func:`check_output_dir` before loading
   anything heavy (each failure is a :class:`SystemExit` naming problem and fix);
2. build the :class:`~accelerate.Accelerator` with :func:`make_accelerator`,
   cast frozen weights to :func:`weight_dtype` *before* injecting HRA (so the
   adapters stay fp32), call :func:`register_trainable_state_hooks`, and build
   :func:`make_optimizer` / :func:`make_lr_scheduler`;
3. feed data through a :class:`SeededEpochSampler` (or the data module's
   ``BucketSampler``) and draw noise from :func:`step_generator` so that a resumed
   run repeats exactly what an uninterrupted one does; train for
   :func:`set_prediction_type`, noise with :func:`noisy_latents` and score with
   :func:`diffusion_loss` (masks, min-SNR); update an :class:`EMA` after each step;
4. save with :func:`save_checkpoint` and resume with
   :func:`find_resume_checkpoint` + :func:`load_checkpoint` (and :meth:`EMA.load`);
5. log validation images with :func:`save_validation_images` (captioned grids), the
   loss and learning rate with :class:`TrainingCurves` (PNG curves), and finish with
   :func:`print_summary`, :func:`format_training_features` and
   :func:`format_args_table` for the model card.

Only the main process writes files, except inside ``accelerator.save_state``,
which writes one RNG file per process into the (shared) checkpoint folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from hra_diffusion.checks import check_model_path, check_multiple_of_8, positive_int
from hra_diffusion.families import FAMILY_NAMES, base_family
from hra_diffusion.plots import line_chart

CHECKPOINT_PREFIX = "checkpoint-"
"""Checkpoints are folders ``<output_dir>/checkpoint-<global step>``."""

TRAINER_STATE_NAME = "trainer_state.json"
"""File in every checkpoint recording the global step and the seed."""

TRAINABLE_STATE_NAME = "trainable_model_{index}.safetensors"
"""Per prepared model: its trainable tensors only (frozen weights are never copied)."""

EMA_STATE_NAME = "ema_state.safetensors"
"""File in every checkpoint of a ``--use_ema`` run: the :class:`EMA` averages, by name."""

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_8bit", "prodigy", "adafactor")
"""Values of ``--optimizer``."""

OPTIMIZER_PACKAGES = {"adamw_8bit": "bitsandbytes", "prodigy": "prodigyopt"}
"""The optional package each optimizer needs (pip name; the import name is the same)."""

PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
"""Values of ``--prediction_type``."""


# --------------------------------------------------------------------------- errors


def fail(message: str) -> NoReturn:
    """Stop with ``error: <message>`` on stderr and exit status 1.

    Messages should name the problem and the fix, e.g.
    ``fail("--resolution 100 is not a multiple of 8; use 96 or 104.")``.
    """
    raise SystemExit(f"error: {message}")


# --------------------------------------------------------------------------- arguments


def non_negative_float(text: str) -> float:
    """argparse ``type`` for floats >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def str_to_bool(text: str) -> bool:
    """argparse ``type`` for true/false, yes/no, 1/0 (any case)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false, got {text}")


SD1_MODEL_HELP = (
    "Stable Diffusion 1.x pipeline: a local diffusers folder (with model_index.json) "
    "or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (needs network or a "
    "filled hub cache). Default: the bundled tiny model (random weights, runs anywhere)."
)


def add_model_args(parser: argparse.ArgumentParser, model_help: str = SD1_MODEL_HELP) -> None:
    """``--pretrained_model_name_or_path`` (default: the bundled tiny model) and ``--revision``.

    ``model_help`` describes the base the script expects (default: Stable Diffusion 1.x).
    """
    group = parser.add_argument_group("base model")
    group.add_argument("--pretrained_model_name_or_path", default=None, help=model_help)
    group.add_argument(
        "--revision",
        default=None,
        help="Hub revision (branch, tag or commit) of --pretrained_model_name_or_path.",
    )


def add_hra_args(parser: argparse.ArgumentParser, default_targets: Sequence[str]) -> None:
    """``--hra_r``, ``--hra_apply_gs``, ``--hra_lambda``, ``--hra_target_modules`` (UNet)."""
    group = parser.add_argument_group("HRA adapter")
    group.add_argument(
        "--hra_r",
        type=positive_int,
        default=8,
        help="Householder reflections per adapted layer. Even r starts exactly at the base "
        "model; odd r (the paper's subject-driven r=7) does not. Default: 8.",
    )
    group.add_argument(
        "--hra_apply_gs",
        action="store_true",
        help="Orthonormalise the reflections with Gram-Schmidt (the paper's lambda=inf). "
        "Note: this does NOT start at the base model.",
    )
    group.add_argument(
        "--hra_lambda",
        type=non_negative_float,
        default=0.0,
        help="Weight of the orthogonality regulariser: loss += lambda * sum ||I - U^T U||^2. "
        "The paper uses 0 (default) or 1e-3.",
    )
    group.add_argument(
        "--hra_target_modules",
        nargs="+",
        default=list(default_targets),
        help="UNet module-name suffixes (or regexes) to adapt. "
        f"Default: {' '.join(default_targets)}.",
    )


def add_adapter_args(parser: argparse.ArgumentParser, lora_saved_as: str) -> None:
    """``--adapter`` (hra or lora) and ``--lora_rank``; ``lora_saved_as`` says where a LoRA
    run's weights go. Refuse the other adapter's options with :func:`check_adapter_options`."""
    group = parser.add_argument_group("adapter")
    group.add_argument(
        "--adapter",
        choices=("hra", "lora"),
        default="hra",
        help="hra (default), or lora: diffusers-style LoRA through PEFT on the same "
        f"--hra_target_modules {lora_saved_as}, to compare the two methods. The HRA-only "
        "options are refused with it.",
    )
    group.add_argument(
        "--lora_rank",
        type=positive_int,
        default=4,
        help="LoRA rank with --adapter lora (alpha = rank, scale 1). The default 4 gives "
        "about the parameters of HRA r=8 on square layers: LoRA has two factors, "
        "r (d_in + d_out) against HRA's r d_in. Default: 4.",
    )


LORA_ONLY_OPTIONS = ("lora_rank",)
"""Options that do nothing with ``--adapter hra`` (refused with it)."""


def check_adapter_options(
    build_parser: Callable[[], argparse.ArgumentParser],
    args: argparse.Namespace,
    argv: list[str],
    hra_only: tuple[str, ...],
) -> None:
    """Refuse options that would do nothing with the chosen ``--adapter``: ``hra_only`` with
    lora, ``--lora_rank`` with hra. ``build_parser`` makes the script's parser, to tell the
    options ``argv`` (or an @file in it) sets from their defaults."""
    other, fix = (
        (hra_only, "LoRA's size is --lora_rank")
        if args.adapter == "lora"
        else (LORA_ONLY_OPTIONS, "pass --adapter lora to train LoRA")
    )
    parser = build_parser()
    parser.set_defaults(**dict.fromkeys(other))
    given_values = vars(parser.parse_args(argv))
    given = [dest for dest in other if given_values[dest] is not None]
    if given:
        names = ", ".join(f"--{dest}" for dest in given)
        verb, pronoun = ("has", "it") if len(given) == 1 else ("have", "them")
        fail(f"{names} {verb} no effect with --adapter {args.adapter}; drop {pronoun} ({fix}).")


def add_lora(model: nn.Module, rank: int, targets: list[str]) -> list[nn.Parameter]:
    """Add a PEFT LoRA adapter to a frozen UNet or text encoder; return its fp32 tensors.

    diffusers' DreamBooth-LoRA recipe: ``lora_alpha`` = ``rank`` (scale 1), Gaussian
    ``lora_A`` and zero ``lora_B``, so training starts at the base model. ``targets`` are
    module-name suffixes, as for HRA (PEFT takes no regular expressions in a list).
    """
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)
    )
    try:
        model.add_adapter(config)
    except ValueError as error:
        fail(f"cannot add LoRA to {type(model).__name__}: {error}")
    cast_training_params(model, torch.float32)
    return [p for p in model.parameters() if p.requires_grad]


def add_image_args(parser: argparse.ArgumentParser, default_resolution: int = 512) -> None:
    """``--resolution``, ``--center_crop``, ``--random_flip``."""
    group = parser.add_argument_group("images")
    group.add_argument(
        "--resolution",
        type=positive_int,
        default=default_resolution,
        help=f"Training resolution in pixels, a multiple of 8. Default: {default_resolution}.",
    )
    group.add_argument(
        "--center_crop",
        action="store_true",
        help="Crop the centre square after resizing (default: a random crop).",
    )
    group.add_argument(
        "--random_flip",
        action="store_true",
        help="Flip training images horizontally with probability 0.5.",
    )


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    """``--cache_latents`` and ``--pre_compute_text_embeddings`` (see :class:`InputCache`)."""
    group = parser.add_argument_group("cached inputs")
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode each training image with the VAE once (once per flip with --random_flip) "
        "and reuse its latent distribution; the per-step sample is drawn as before, so losses "
        "are unchanged. Needs --center_crop (random crops give new pixels every epoch).",
    )
    group.add_argument(
        "--pre_compute_text_embeddings",
        action="store_true",
        help="Encode each distinct prompt with the frozen text encoder(s) once and reuse the "
        "embeddings (SDXL: both encoders' and the pooled one; losses unchanged). Not with "
        "--train_text_encoder.",
    )


def check_cache_args(args: argparse.Namespace) -> None:
    """:func:`fail` if a cache option cannot give the uncached run's losses."""
    if args.cache_latents and not args.center_crop:
        fail(
            "--cache_latents needs --center_crop: random crops change the pixels every epoch, "
            "so there is nothing to reuse. Add --center_crop or drop --cache_latents."
        )
    if args.pre_compute_text_embeddings and getattr(args, "train_text_encoder", False):
        fail(
            "--pre_compute_text_embeddings needs a frozen text encoder, but "
            "--train_text_encoder trains it; drop one of them."
        )


class InputCache:
    """A frozen encoder's outputs, keyed by the exact bytes of each input row.

    ``cache(inputs)`` (B, ...) encodes only the rows it has not seen (in one batch) and
    returns every row's output, stacked: a tensor (B, ...), or a tuple of them when the
    encoder returns a tuple (SDXL's hidden states and pooled embedding). Used for the VAE's
    latent distribution (``--cache_latents``) and the text encoders' embeddings
    (``--pre_compute_text_embeddings``); outputs stay on the encoder's device.

    Example:
        >>> text = InputCache(lambda ids: text_encoder(ids)[0])  # doctest: +SKIP
        >>> embeddings = text(batch["input_ids"])  # (B, 77, D); each prompt encoded once
    """

    def __init__(
        self, encode: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]]
    ) -> None:
        self.encode = encode
        self.outputs: dict[bytes, tuple[torch.Tensor, ...]] = {}
        self.returns_tuple = False

    def __len__(self) -> int:
        return len(self.outputs)

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        rows = inputs.detach().cpu().contiguous()
        keys = [_row_key(row) for row in rows]
        missing: dict[bytes, int] = {}  # first row of each input not seen yet
        for i, key in enumerate(keys):
            if key not in self.outputs and key not in missing:
                missing[key] = i
        if missing:
            encoded = self.encode(inputs[list(missing.values())])
            self.returns_tuple = isinstance(encoded, tuple)
            parts = encoded if self.returns_tuple else (encoded,)
            for j, key in enumerate(missing):
                self.outputs[key] = tuple(part[j] for part in parts)
        columns = zip(*(self.outputs[key] for key in keys), strict=True)  # one per output
        stacked = tuple(torch.stack(column) for column in columns)
        return stacked if self.returns_tuple else stacked[0]


def _row_key(row: torch.Tensor) -> bytes:
    header = f"{row.dtype}{tuple(row.shape)}".encode()
    return header + hashlib.sha256(row.numpy().tobytes()).digest()


def latent_cache(vae: AutoencoderKL) -> InputCache:
    """:class:`InputCache` of the VAE's latent-distribution parameters (B, 2·4, h, w)."""
    return InputCache(lambda pixels: vae.encode(pixels.to(vae.dtype)).latent_dist.parameters)


def text_embedding_cache(text_encoder: nn.Module) -> InputCache:
    """:class:`InputCache` of the text encoder's last hidden states (B, 77, D)."""
    return InputCache(lambda ids: text_encoder(ids)[0])


def add_optimization_args(
    parser: argparse.ArgumentParser,
    learning_rate: float = 1e-4,
    train_batch_size: int = 1,
    num_train_epochs: int = 1,
) -> None:
    """Batch, steps, optimiser, scheduler, precision, seed and data-loading options.

    The keyword arguments are the script's defaults (the DreamBooth recipe by default).
    """
    group = parser.add_argument_group("optimisation")
    group.add_argument("--seed", type=int, default=0, help="Seed for everything. Default: 0.")
    group.add_argument(
        "--train_batch_size",
        type=positive_int,
        default=train_batch_size,
        help="Batch size per device (DreamBooth's prior preservation doubles it). "
        f"Default: {train_batch_size}.",
    )
    group.add_argument(
        "--num_train_epochs",
        type=positive_int,
        default=num_train_epochs,
        help="Epochs to train; ignored when --max_train_steps is given. "
        f"Default: {num_train_epochs}.",
    )
    group.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=None,
        help="Total optimisation steps; overrides --num_train_epochs.",
    )
    group.add_argument(
        "--gradient_accumulation_steps",
        type=positive_int,
        default=1,
        help="Batches accumulated before each optimisation step. Default: 1.",
    )
    group.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Recompute activations in the backward pass: less memory, slower steps.",
    )
    group.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the UNet in place with torch.compile(fullgraph=True) (Inductor): the "
        "first steps compile (minutes), later ones run faster on a GPU. Names, weights files "
        "and checkpoints are unchanged.",
    )
    group.add_argument(
        "--learning_rate",
        type=float,
        default=learning_rate,
        help=f"Learning rate after warmup. Default: {learning_rate:g}.",
    )
    group.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=[s.value for s in SchedulerType],
        help="Learning-rate schedule. Default: constant.",
    )
    group.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=0,
        help="Linear warmup steps of the schedule. Default: 0.",
    )
    group.add_argument(
        "--max_grad_norm",
        type=float,
        default=1.0,
        help="Clip the gradient norm to this value (0 disables clipping). Default: 1.0.",
    )
    group.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1. Default: 0.9.")
    group.add_argument(
        "--adam_beta2", type=float, default=0.999, help="AdamW beta2. Default: 0.999."
    )
    group.add_argument(
        "--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay. Default: 1e-2."
    )
    group.add_argument(
        "--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon. Default: 1e-8."
    )
    group.add_argument(
        "--optimizer",
        "--optimizer_type",
        default=None,
        metavar="{" + ",".join(OPTIMIZERS) + "}",
        help="adamw (torch), adamw_8bit (bitsandbytes' AdamW8bit: pip install bitsandbytes), "
        "prodigy (prodigyopt's Prodigy, which sets its own step size: use --learning_rate 1.0; "
        "pip install prodigyopt) or adafactor (transformers' Adafactor with the learning rate "
        "and schedule given here: relative_step, scale_parameter and warmup_init off). The "
        "--adam_* options are their betas, weight decay and epsilon (Adafactor uses the weight "
        "decay only). kohya's --optimizer_type AdamW/AdamW8bit/Prodigy/Adafactor is accepted "
        "too. Default: adamw (adamw_8bit with --use_8bit_adam).",
    )
    group.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="diffusers' name for --optimizer adamw_8bit (pip install bitsandbytes).",
    )
    group.add_argument(
        "--prodigy_beta3",
        type=float,
        default=None,
        help="Prodigy's coefficient for its step-size estimate (default: sqrt(--adam_beta2)).",
    )
    group.add_argument(
        "--prodigy_decouple",
        type=str_to_bool,
        default=True,
        help="Prodigy: AdamW-style decoupled weight decay (true/false). Default: true.",
    )
    group.add_argument(
        "--prodigy_use_bias_correction",
        type=str_to_bool,
        default=True,
        help="Prodigy: Adam's bias correction (true/false). Default: true.",
    )
    group.add_argument(
        "--prodigy_safeguard_warmup",
        type=str_to_bool,
        default=True,
        help="Prodigy: keep the step size from growing too fast during a --lr_warmup_steps "
        "warmup (true/false). Default: true.",
    )
    group.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Compute in fp16/bf16; frozen weights are stored in that dtype, HRA weights stay "
        "fp32. Default: accelerate's config (no, without one).",
    )
    group.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=0,
        help="Data-loading worker processes (0: load in the main process). Default: 0.",
    )


def add_loss_args(parser: argparse.ArgumentParser) -> None:
    """``--prediction_type``, ``--snr_gamma``, ``--noise_offset`` (diffusers' names)."""
    group = parser.add_argument_group("loss")
    group.add_argument(
        "--prediction_type",
        default=None,
        choices=PREDICTION_TYPES,
        help="What the UNet learns to predict: the noise (epsilon) or the velocity "
        "v = sqrt(abar) noise - sqrt(1 - abar) latents (v_prediction, as SD 2.x 768 bases do). "
        "Default: the base model's scheduler's own.",
    )
    group.add_argument(
        "--v_parameterization",
        dest="prediction_type",
        action="store_const",
        const="v_prediction",
        help="kohya's name for --prediction_type v_prediction.",
    )
    group.add_argument(
        "--snr_gamma",
        "--min_snr_gamma",
        type=float,
        default=None,
        help="Min-SNR-gamma loss weighting (Hang et al. 2023): each example's MSE is weighted "
        "by min(SNR(t), gamma) / SNR(t) (epsilon) or / (SNR(t) + 1) (v_prediction). 5.0 is the "
        "recommended value; --min_snr_gamma is kohya's name. Default: off (plain MSE).",
    )
    group.add_argument(
        "--noise_offset",
        type=float,
        default=0.0,
        help="Add noise_offset * N(0, 1) per image and latent channel to the noise, so the "
        "model can learn very dark or bright images (0.05-0.1 is usual). Default: 0 (off).",
    )
    group.add_argument(
        "--debiased_estimation_loss",
        action="store_true",
        help="kohya's debiased estimation (Yu et al. 2024): weight each example's MSE by "
        "1 / sqrt(SNR(t)) (epsilon) or 1 / (SNR(t) + 1) (v_prediction), SNR clipped at 1000, "
        "which puts weight on the noisy steps where layout and composition are decided. "
        "Combines with --snr_gamma (the weights multiply). Default: off.",
    )
    group.add_argument(
        "--min_timestep",
        type=int,
        default=0,
        help="Train only on timesteps t >= this (kohya's name). Default: 0.",
    )
    group.add_argument(
        "--max_timestep",
        type=int,
        default=None,
        help="Train only on timesteps t < this (kohya's name), e.g. --min_timestep 700 to "
        "train the noisiest 30%% of a 1000-step schedule. Default: the scheduler's "
        "num_train_timesteps (1000 for Stable Diffusion).",
    )


def add_ema_args(parser: argparse.ArgumentParser) -> None:
    """``--use_ema``, ``--ema_decay``."""
    group = parser.add_argument_group("EMA")
    group.add_argument(
        "--use_ema",
        action="store_true",
        help="Keep an exponential moving average of the trained weights, s <- d s + (1 - d) w "
        "after every optimisation step. It is saved next to the weights as a second loadable "
        "file (*_ema.safetensors), in every checkpoint, and used for the validation images.",
    )
    group.add_argument(
        "--ema_decay",
        type=float,
        default=0.995,
        help="The decay d of --use_ema, in (0, 1); the average spans about 1 / (1 - d) steps, "
        "so keep that well below --max_train_steps. Default: 0.995 (about 200 steps).",
    )


def add_bucket_args(parser: argparse.ArgumentParser) -> None:
    """``--aspect_ratio_buckets`` (kohya: ``--enable_bucket``) and its bounds (kohya's names)."""
    group = parser.add_argument_group("aspect-ratio buckets")
    group.add_argument(
        "--aspect_ratio_buckets",
        "--enable_bucket",
        action="store_true",
        help="Train on each image at the bucket (width x height, about --resolution^2 pixels, "
        "both sides multiples of --bucket_reso_steps) nearest to its aspect ratio, instead of "
        "a square crop. Each batch holds one bucket; an image is resized to cover its bucket "
        "and only the rounding to the bucket is cropped. --enable_bucket is kohya's name.",
    )
    group.add_argument(
        "--min_bucket_reso",
        type=positive_int,
        default=None,
        help="Smallest bucket side in pixels, a multiple of --bucket_reso_steps. "
        "Default: --resolution / 2, rounded up to a step.",
    )
    group.add_argument(
        "--max_bucket_reso",
        type=positive_int,
        default=None,
        help="Largest bucket side in pixels, a multiple of --bucket_reso_steps. "
        "Default: 2 x --resolution, rounded down to a step.",
    )
    group.add_argument(
        "--bucket_reso_steps",
        type=positive_int,
        default=None,
        help="Bucket sides are multiples of this, itself a multiple of 8 (the VAE's factor). "
        "Default: 64 (SD's UNet halves the latents three times; kohya's default), or 8 when "
        "--resolution is below 256 (small models such as the bundled default).",
    )


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """``--checkpointing_steps``, ``--checkpoints_total_limit``, ``--resume_from_checkpoint``."""
    group = parser.add_argument_group("checkpoints")
    group.add_argument(
        "--checkpointing_steps",
        type=positive_int,
        default=500,
        help="Save the full training state to <output_dir>/checkpoint-<step> every N steps. "
        "Default: 500.",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=positive_int,
        default=None,
        help="Keep at most this many checkpoints, deleting the oldest. Default: keep all.",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help='Continue from a checkpoint folder, or "latest" for the newest one in '
        "--output_dir (starts fresh if there is none).",
    )


def add_output_args(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    """``--output_dir``, ``--overwrite_output_dir``, ``--logging_dir``, ``--report_to``."""
    group = parser.add_argument_group("output and logging")
    group.add_argument(
        "--output_dir",
        default=default_output_dir,
        help=f"Where weights, checkpoints, validation images and logs go. "
        f"Default: {default_output_dir}.",
    )
    group.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Allow training into an --output_dir that already holds finished weights.",
    )
    group.add_argument(
        "--logging_dir",
        default="logs",
        help="Tracker log folder, relative to --output_dir. Default: logs.",
    )
    group.add_argument(
        "--report_to",
        default="tensorboard" if _installed("tensorboard") else "none",
        choices=["tensorboard", "wandb", "comet_ml", "all", "none"],
        help="Experiment tracker. Default: tensorboard when installed, else none.",
    )


def add_validation_args(
    parser: argparse.ArgumentParser,
    guidance_scale: float = 7.5,
    inference_steps: int = 25,
    several_prompts: bool = False,
) -> None:
    """``--validation_prompt`` and how often / how many / how validation images are sampled.

    With ``several_prompts`` the option takes one or more prompts (a list).
    """
    group = parser.add_argument_group("validation")
    if several_prompts:
        group.add_argument(
            "--validation_prompt",
            nargs="+",
            default=None,
            help="One or more prompts sampled every --validation_steps and at the end, a grid "
            'row each, e.g. "a photo of qwe dog" "a photo of qwe dog in the snow" '
            "(default: no validation).",
        )
    else:
        group.add_argument(
            "--validation_prompt",
            default=None,
            help="Prompt sampled every --validation_steps and at the end (default: no validation).",
        )
    group.add_argument(
        "--num_validation_images",
        type=positive_int,
        default=4,
        help="Images per validation (per prompt), sampled with a fixed seed (--seed). Default: 4.",
    )
    group.add_argument(
        "--validation_steps",
        type=positive_int,
        default=100,
        help="Validate every N optimisation steps. Default: 100.",
    )
    group.add_argument(
        "--num_validation_inference_steps",
        type=positive_int,
        default=inference_steps,
        help=f"DPM-Solver sampling steps per validation image. Default: {inference_steps}.",
    )
    group.add_argument(
        "--validation_guidance_scale",
        type=float,
        default=guidance_scale,
        help=f"Classifier-free guidance scale of validation images. Default: {guidance_scale}.",
    )


# --------------------------------------------------------------------------- checks


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_common_args(args: argparse.Namespace) -> None:
    """Checks of the shared options that need no file access; :func:`fail` on the first problem."""
    try:
        check_multiple_of_8(args.resolution, "--resolution")
    except ValueError as error:
        fail(str(error))
    check_optimizer_args(args)
    check_loss_args(args)
    check_ema_args(args)
    if args.report_to in ("tensorboard", "wandb", "comet_ml") and not _installed(args.report_to):
        fail(f"--report_to {args.report_to} needs it installed: pip install {args.report_to}.")
    if args.lr_warmup_steps < 0:
        fail(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps}.")
    if args.dataloader_num_workers < 0:
        fail(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}.")


def check_optimizer_args(args: argparse.Namespace) -> None:
    """Resolve ``--optimizer`` (``--use_8bit_adam`` is its alias) and check its package."""
    if args.use_8bit_adam:
        if args.optimizer not in (None, "adamw_8bit"):
            fail(
                f"--use_8bit_adam means --optimizer adamw_8bit, but --optimizer {args.optimizer} "
                "was given; drop one of them."
            )
        args.optimizer = "adamw_8bit"
    args.optimizer = (args.optimizer or "adamw").lower()
    args.optimizer = {"adamw8bit": "adamw_8bit"}.get(args.optimizer, args.optimizer)  # kohya
    if args.optimizer not in OPTIMIZERS:
        fail(f"--optimizer {args.optimizer} is unknown; choose one of {', '.join(OPTIMIZERS)}.")
    package = OPTIMIZER_PACKAGES.get(args.optimizer)
    if package is not None and not _installed(package):
        flag = "--use_8bit_adam" if args.use_8bit_adam else f"--optimizer {args.optimizer}"
        fail(f"{flag} needs {package}: pip install {package}, or choose another --optimizer.")


def check_ema_args(args: argparse.Namespace) -> None:
    """``--ema_decay`` in (0, 1) with ``--use_ema``."""
    if args.use_ema and not 0.0 < args.ema_decay < 1.0:
        fail(f"--ema_decay must lie strictly between 0 and 1, got {args.ema_decay}; try 0.995.")


def check_loss_args(args: argparse.Namespace) -> None:
    """``--snr_gamma`` > 0 when given, ``--noise_offset`` >= 0, 0 <= ``--min_timestep`` <
    ``--max_timestep`` (the scheduler's bound is checked by :func:`timestep_upper_bound`)."""
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        fail(f"--snr_gamma must be > 0, got {args.snr_gamma}; 5.0 is the usual value.")
    if not args.noise_offset >= 0:
        fail(f"--noise_offset must be >= 0, got {args.noise_offset}; 0.05 is a usual value.")
    if args.min_timestep < 0:
        fail(f"--min_timestep must be >= 0, got {args.min_timestep}.")
    if args.max_timestep is not None and args.max_timestep <= args.min_timestep:
        fail(
            f"--max_timestep {args.max_timestep} must be greater than --min_timestep "
            f"{args.min_timestep} (timesteps are drawn from min <= t < max)."
        )


def resolve_model_path(name_or_path: str | None, revision: str | None = None) -> str:
    """The base pipeline to load: a local folder, a loadable hub id, or the bundled default.

    ``None`` builds (once) and returns the bundled tiny model. A local folder must
    hold ``model_index.json``. Anything else must be a hub id whose config can be
    fetched (or is cached); otherwise :func:`fail` says how to fix it.
    """
    if name_or_path is None:
        from hra_diffusion.tiny_sd import default_model_path

        return str(default_model_path())
    try:
        check_model_path(name_or_path, "--pretrained_model_name_or_path")
    except ValueError as error:
        fail(str(error))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    from diffusers import DiffusionPipeline

    try:
        DiffusionPipeline.load_config(name_or_path, revision=revision)
    except Exception as exc:  # any hub or offline failure means "cannot load"
        fail(
            f"--pretrained_model_name_or_path {name_or_path} is neither a local pipeline folder "
            f"nor loadable from the hub ({type(exc).__name__}: {str(exc).splitlines()[0]}). "
            "Download the model once (huggingface-cli download <id> --local-dir DIR) and pass "
            "DIR, or check the id and your network."
        )
    return name_or_path


DREAMBOOTH_SCRIPTS = {
    "sd": "train/train_dreambooth_hra.py",
    "sdxl": "train/train_dreambooth_hra_sdxl.py",
}
"""The DreamBooth script that trains each base family."""


def check_base_family(
    model_path: str,
    revision: str | None,
    family: str,
    scripts: Mapping[str, str] = DREAMBOOTH_SCRIPTS,
) -> None:
    """:func:`fail` unless the base is of ``family`` (``"sd"`` or ``"sdxl"``), naming the
    script of ``scripts`` that trains the base it is (or saying none does yet).

    Example:
        >>> check_base_family("./stable-diffusion-xl-base-1.0", None, "sd")  # doctest: +SKIP
        SystemExit: error: ./stable-diffusion-xl-base-1.0 is a Stable Diffusion XL pipeline ...
    """
    found = base_family(model_path, revision)
    if found == family:
        return
    use = scripts.get(found)
    fix = (
        f"train it with {use}"
        if use
        else f"this script does not support {FAMILY_NAMES[found]} yet; pass a "
        f"{FAMILY_NAMES[family]} base"
    )
    fail(
        f"{model_path} is a {FAMILY_NAMES[found]} pipeline but this script trains "
        f"{FAMILY_NAMES[family]}: {fix}."
    )


def check_output_dir(
    output_dir: str | os.PathLike, weights_name: str, overwrite: bool, resuming: bool
) -> None:
    """Refuse an output folder that already holds finished weights, unless told otherwise.

    Also refuses a path that exists but is not a folder. Nothing is written.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        fail(f"--output_dir {out} exists and is not a folder; choose another path.")
    if (out / weights_name).exists() and not (overwrite or resuming):
        fail(
            f"--output_dir {out} already holds finished weights ({weights_name}). Choose a new "
            "--output_dir, pass --overwrite_output_dir to replace them, or "
            "--resume_from_checkpoint latest to continue training."
        )


# --------------------------------------------------------------------------- building


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """An Accelerator for ``args`` (mixed precision, accumulation, tracker, project dir).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) on a machine without CUDA GPUs the
    processes train on CPU over gloo; accelerate only does that when asked (``cpu=True``).
    """
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    project = ProjectConfiguration(
        project_dir=args.output_dir, logging_dir=str(Path(args.output_dir) / args.logging_dir)
    )
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project,
        cpu=multi_cpu,
    )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights are stored in: fp16/bf16 under mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )


def count_parameters(params: Iterable[torch.Tensor]) -> int:
    """Total number of elements."""
    return sum(p.numel() for p in params)


def make_optimizer(
    params: list[nn.Parameter] | list[dict[str, Any]], args: argparse.Namespace
) -> torch.optim.Optimizer:
    """The ``--optimizer`` (resolved by :func:`check_common_args`) with its options, over
    ``params``: tensors, or torch parameter groups (dicts with "params" and their own "lr").

    adamw and adamw_8bit take ``--learning_rate`` and the ``--adam_*`` options; prodigy
    also its ``--prodigy_*`` ones (diffusers' SDXL DreamBooth script's names); adafactor
    runs with the given learning rate and schedule (``relative_step``, ``scale_parameter``
    and ``warmup_init`` off, kohya's usual setting for adapters) and ``--adam_weight_decay``.
    """
    adam = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.adam_weight_decay,
        "eps": args.adam_epsilon,
    }
    if args.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **adam)
    if args.optimizer == "prodigy":
        import prodigyopt

        if args.learning_rate < 0.1:
            warnings.warn(
                f"--optimizer prodigy with --learning_rate {args.learning_rate:g}: Prodigy "
                "estimates the step size itself and the learning rate scales it; 1.0 is usual.",
                stacklevel=2,
            )
        return prodigyopt.Prodigy(
            params,
            beta3=args.prodigy_beta3,
            decouple=args.prodigy_decouple,
            use_bias_correction=args.prodigy_use_bias_correction,
            safeguard_warmup=args.prodigy_safeguard_warmup,
            **adam,
        )
    if args.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=args.learning_rate,
            weight_decay=args.adam_weight_decay,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(params, **adam)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, args: argparse.Namespace, num_processes: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """``--lr_scheduler`` with ``--lr_warmup_steps`` over ``args.max_train_steps``.

    A prepared scheduler steps once per process per optimisation step, hence
    the ``num_processes`` factor (as in diffusers' scripts).
    """
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=args.max_train_steps * num_processes,
    )


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that require grad, detached, contiguous, on CPU."""
    return {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def register_trainable_state_hooks(accelerator: Accelerator) -> None:
    """Make ``save_state``/``load_state`` store only trainable tensors of each prepared model.

    Frozen weights (gigabytes for SD 1.5) are never copied into checkpoints.
    Loading checks that exactly the same tensor names come back.
    """

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        if accelerator.is_main_process:
            for index, model in enumerate(models):
                state = trainable_state_dict(accelerator.unwrap_model(model))
                save_file(state, str(Path(output_dir) / TRAINABLE_STATE_NAME.format(index=index)))
        weights.clear()  # keep accelerate from saving full model weights

    def load_hook(models: list[nn.Module], input_dir: str) -> None:
        for index in range(len(models)):
            model = accelerator.unwrap_model(models.pop(0))
            state = load_file(str(Path(input_dir) / TRAINABLE_STATE_NAME.format(index=index)))
            expected = set(trainable_state_dict(model))
            if set(state) != expected:
                fail(
                    f"checkpoint {input_dir} does not match this model: it holds "
                    f"{len(state)} trainable tensors, the model has {len(expected)}. Resume "
                    "with the same model and HRA options as the run that wrote it."
                )
            model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------- determinism


def mix_seed(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (e.g. seed, epoch, batch index, rank)."""
    return int(np.random.SeedSequence([v & 0xFFFFFFFF for v in values]).generate_state(2)[0])


def step_generator(*values: int) -> torch.Generator:
    """A CPU generator seeded by :func:`mix_seed` of ``values``.

    Draw noise and timesteps from ``step_generator(seed, epoch, batch, rank)`` so
    that a resumed run draws exactly what an uninterrupted one did.
    """
    return torch.Generator().manual_seed(mix_seed(*values))


class SeededEpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, sample_seed)`` in an order fixed by ``(seed, epoch)``.

    The dataset's ``__getitem__`` receives the pair and seeds its augmentation
    with ``sample_seed``, so every pixel of an epoch is a function of
    ``(seed, epoch)`` alone: with ``accelerate.skip_first_batches`` a resumed run
    sees exactly the batches an uninterrupted one would. Accelerate's prepared
    dataloader calls :meth:`set_epoch`; call ``dataloader.set_epoch(epoch)``
    before iterating each epoch.
    """

    def __init__(self, num_items: int, seed: int, shuffle: bool = True) -> None:
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and sample seeds are produced next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = torch.randperm(self.num_items, generator=step_generator(self.seed, self.epoch))
        else:
            order = torch.arange(self.num_items)
        for position, index in enumerate(order.tolist()):
            yield index, mix_seed(self.seed, self.epoch, position)


# --------------------------------------------------------------------------- checkpoints


def checkpoint_step(path: str | os.PathLike) -> int:
    """The global step encoded in a ``checkpoint-<step>`` folder name."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named {CHECKPOINT_PREFIX}<step>.")
    return int(match.group(1))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoint folders in ``output_dir``, oldest (lowest step) first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [
        p for p in out.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)
    ]
    return sorted(found, key=checkpoint_step)


def find_resume_checkpoint(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names, or ``None`` to start fresh.

    ``"latest"`` picks the newest checkpoint in ``output_dir`` (``None`` if there
    is none); anything else must be an existing checkpoint folder, else :func:`fail`.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE_NAME).is_file():
        fail(
            f"--resume_from_checkpoint {resume} is not a checkpoint folder (no "
            f"{TRAINER_STATE_NAME}). Pass a {CHECKPOINT_PREFIX}<step> folder from an "
            "--output_dir, or 'latest'."
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    global_step: int,
    seed: int,
    total_limit: int | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Save the full training state to ``<output_dir>/checkpoint-<global_step>``; all ranks.

    The state (trainable weights, optimiser, scheduler, every RNG) is written
    into a hidden temporary folder and renamed into place only when complete, so
    a kill never leaves a corrupt or half-written checkpoint. ``write_extra(folder)``
    runs on the main process before the rename (e.g. to add an adapter file that
    loads on its own). Afterwards the oldest checkpoints beyond ``total_limit``
    are deleted. Must be called by every process.
    """
    out = Path(output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{global_step}"
    tmp = out / f".{final.name}.tmp"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": global_step, "seed": seed}
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        if write_extra is not None:
            write_extra(tmp)
        if final.exists():  # the same step saved before (e.g. a rerun): swap it out
            old = out / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        if total_limit is not None:
            for stale in list_checkpoints(out)[:-total_limit]:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> dict[str, Any]:
    """Restore the state saved by :func:`save_checkpoint`; returns its trainer state.

    The returned dict has ``global_step`` and ``seed``. The trainable weights are
    safetensors; the optimizer, scheduler and RNG states, which accelerate pickles with
    ``torch.save``, are read with ``weights_only=True`` (tensors, numbers and containers
    only: no code runs while loading).
    """
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    return json.loads((Path(path) / TRAINER_STATE_NAME).read_text())


def remove_stale_temp_dirs(output_dir: str | os.PathLike) -> None:
    """Delete temporary checkpoint folders left by a killed run (main process only)."""
    out = Path(output_dir)
    if out.is_dir():
        for stale in out.glob(f".{CHECKPOINT_PREFIX}*.tmp"):
            shutil.rmtree(stale)


# --------------------------------------------------------------------------- validation


def image_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Paste equally sized images into a grid (``cols`` defaults to ceil(sqrt(n)))."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def caption_image(image: Image.Image, text: str) -> Image.Image:
    """``image`` with ``text`` written in a white band under it (wrapped to its width)."""
    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(image)
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > image.width - 8:
            lines.append(line)
            candidate = word
        line = candidate
    lines.append(line)
    band = 16 * len(lines) + 6
    captioned = Image.new("RGB", (image.width, image.height + band), "white")
    captioned.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(captioned)
    for i, text_line in enumerate(lines):
        draw.text((4, image.height + 3 + 16 * i), text_line, fill="black", font=font)
    return captioned


def save_validation_images(
    accelerator: Accelerator,
    images: Sequence[Image.Image],
    folder: str | os.PathLike,
    global_step: int,
    tag: str = "validation",
    cols: int | None = None,
    captions: Sequence[str] | None = None,
) -> Path:
    """Write ``images`` as PNGs plus ``grid.png`` (``cols`` wide, see :func:`image_grid`)
    into ``folder``; log them to the trackers.

    With ``captions`` (one per row, e.g. the prompts) each row of the grid has its
    caption and the step written under it. Call on the main process only. Returns the
    grid's path.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:02d}.png")
    grid_path = folder / "grid.png"
    if captions:
        per_row = len(images) // len(captions)
        rows = [
            caption_image(image_grid(images[i * per_row : (i + 1) * per_row], per_row), text)
            for i, text in enumerate(f"{c} (step {global_step})" for c in captions)
        ]
        grid = Image.new("RGB", (rows[0].width, sum(row.height for row in rows)), "white")
        for i, row in enumerate(rows):
            grid.paste(row, (0, sum(r.height for r in rows[:i])))
    else:
        grid = image_grid(images, cols)
    grid.save(grid_path)
    stacked = np.stack([np.asarray(image.convert("RGB")) for image in images])  # (N, H, W, 3)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, stacked, global_step, dataformats="NHWC")
            tracker.writer.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image) for image in images]}, step=global_step)
    return grid_path


# --------------------------------------------------------------------------- reporting


TRAINING_LOG_NAME = "training_log.jsonl"
"""One ``{"step", "loss", "lr", "seconds"}`` line per optimisation step, in the output folder
(``seconds``: wall time since the previous line, or since the log was opened)."""


class TrainingCurves:
    """Loss and learning rate of every step, kept in ``<output_dir>/training_log.jsonl``
    and drawn as ``loss.png`` and ``learning_rate.png`` beside the checkpoints.

    A resumed run keeps the lines up to its checkpoint's step, so its pictures show
    the whole run. Main process only.

    Example:
        >>> curves = TrainingCurves("out/", resumed_step=0)  # doctest: +SKIP
        >>> curves.log(1, 0.12, 1e-4); curves.draw()  # doctest: +SKIP
    """

    def __init__(self, output_dir: str | os.PathLike, resumed_step: int) -> None:
        self.folder = Path(output_dir)
        self.path = self.folder / TRAINING_LOG_NAME
        kept = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] <= resumed_step:
                    kept.append(line)
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self.last = time.perf_counter()

    def log(self, step: int, loss: float, lr: float) -> None:
        """Append a step's line, with the wall time since the previous one."""
        now = time.perf_counter()
        row = {"step": step, "loss": loss, "lr": lr, "seconds": round(now - self.last, 4)}
        self.last = now
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def draw(self) -> dict[str, Path]:
        """Write the two PNGs; returns ``{"loss curve": path, "learning-rate curve": path}``."""
        rows = [json.loads(line) for line in self.path.read_text().splitlines()]
        loss = [(row["step"], row["loss"]) for row in rows]
        lr = [(row["step"], row["lr"]) for row in rows]
        return {
            "loss curve": line_chart({"loss": loss}, self.folder / "loss.png", "training loss"),
            "learning-rate curve": line_chart(
                {"learning rate": lr}, self.folder / "learning_rate.png", "learning rate"
            ),
        }


def progress_bar(accelerator: Accelerator, total: int, initial: int = 0) -> tqdm:
    """A ``Steps`` tqdm bar shown on the main process only."""
    return tqdm(
        total=total, initial=initial, desc="Steps", disable=not accelerator.is_local_main_process
    )


def format_args_table(args: argparse.Namespace) -> str:
    """Every argument as a two-column Markdown table, for model cards."""
    rows = ["| argument | value |", "|---|---|"]
    for key, value in sorted(vars(args).items()):
        shown = " ".join(map(str, value)) if isinstance(value, list | tuple) else value
        rows.append(f"| `--{key}` | `{shown}` |")
    return "\n".join(rows)


def format_training_features(args: argparse.Namespace) -> list[str]:
    """Markdown bullets of the training features a run used, for model cards.

    Reads the options of :func:`add_optimization_args`, :func:`add_loss_args`,
    :func:`add_ema_args` and :func:`add_bucket_args` (after :func:`check_common_args` and
    ``check_bucket_args`` resolved them), and the masked-loss options where a script has them.
    """
    lines = [f"- prediction type: `{args.prediction_type}`"]
    optimizer = f"- optimizer: `{args.optimizer}`, learning rate {args.learning_rate:g}"
    lines.append(optimizer + f", schedule `{args.lr_scheduler}`")
    weights = [f"min-SNR, gamma {args.snr_gamma:g}"] if args.snr_gamma else []
    weights += ["debiased estimation"] if args.debiased_estimation_loss else []
    weighting = " and ".join(weights) or "plain MSE"
    lines.append(f"- loss weighting: {weighting}; noise offset {args.noise_offset:g}")
    lines.append(f"- timesteps: {args.min_timestep} <= t < {args.max_timestep}")
    if args.use_ema:
        lines.append(f"- EMA of the trained weights, decay {args.ema_decay:g}")
    if args.aspect_ratio_buckets:
        lines.append(
            f"- aspect-ratio buckets: sides {args.min_bucket_reso}-{args.max_bucket_reso} px "
            f"in steps of {args.bucket_reso_steps}, about {args.resolution}² pixels"
        )
    if getattr(args, "masked_loss", False):
        source = "alpha channel" if args.alpha_mask else f"masks in `{args.mask_data_dir}`"
        lines.append(f"- masked loss: {source}")
    return lines


def print_summary(accelerator: Accelerator, title: str, items: dict[str, Any]) -> None:
    """Print an aligned ``key: value`` block on the main process."""
    if not accelerator.is_main_process:
        return
    width = max(map(len, items))
    lines = [title, "-" * len(title)] + [f"{k.ljust(width)} : {v}" for k, v in items.items()]
    print("\n".join(lines), flush=True)


def format_duration(seconds: float) -> str:
    """``1h 02m 03s`` / ``2m 03s`` / ``4.2s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def load_models(
    model_path: str, revision: str | None
) -> tuple[CLIPTokenizer, CLIPTextModel, AutoencoderKL, UNet2DConditionModel, DDPMScheduler]:
    """Tokenizer, text encoder, VAE, UNet and the training noise scheduler of a pipeline."""
    kw: dict[str, Any] = {"revision": revision}
    return (
        CLIPTokenizer.from_pretrained(model_path, subfolder="tokenizer", **kw),
        CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", **kw),
        AutoencoderKL.from_pretrained(model_path, subfolder="vae", **kw),
        UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", **kw),
        DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw),
    )


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
    """Prompt ids padded to the tokenizer's maximum length: (B, model_max_length)."""
    return tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


def set_prediction_type(noise_scheduler: DDPMScheduler, prediction_type: str | None) -> str:
    """Train for ``prediction_type`` (``None``: keep the scheduler's own); returns the type.

    The base's scheduler may predict ``sample``, which these scripts do not train:
    :func:`fail` then asks for ``--prediction_type``.
    """
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    resolved = noise_scheduler.config.prediction_type
    if resolved not in PREDICTION_TYPES:
        fail(
            f"the base model's scheduler predicts {resolved!r}; pass --prediction_type "
            f"{' or '.join(PREDICTION_TYPES)}."
        )
    return resolved


def timestep_upper_bound(
    noise_scheduler: DDPMScheduler, min_timestep: int, max_timestep: int | None
) -> int:
    """``--max_timestep`` resolved against the scheduler (``None``: its num_train_timesteps);
    :func:`fail` when the range ``min_timestep <= t < max`` leaves the schedule."""
    num_steps = noise_scheduler.config.num_train_timesteps
    upper = num_steps if max_timestep is None else max_timestep
    if upper > num_steps or min_timestep >= upper:
        fail(
            f"--min_timestep {min_timestep} / --max_timestep {upper} leave the base's "
            f"{num_steps}-step schedule; choose 0 <= min < max <= {num_steps}."
        )
    return upper


def scale_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents in the UNet's scale: ``(z − mean) · scaling_factor / std`` when the VAE
    config has ``latents_mean``/``latents_std`` (as diffusers' SDXL pipeline decodes), else
    ``z · scaling_factor``. (B, C, h, w) -> (B, C, h, w)."""
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None or std is None:
        return latents * vae.config.scaling_factor
    mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, -1, 1, 1)
    return (latents - mean) * vae.config.scaling_factor / std


def noisy_latents(
    pixels: torch.Tensor,
    vae: AutoencoderKL,
    noise_scheduler: DDPMScheduler,
    generator: torch.Generator,
    noise_offset: float = 0.0,
    latents_from: InputCache | None = None,
    timestep_range: tuple[int, int | None] = (0, None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode ``pixels`` (B, 3, H, W) and noise the latents at random timesteps, uniform
    over ``timestep_range`` = (low, high), low <= t < high (high ``None``: the schedule's
    ``num_train_timesteps``).

    With ``latents_from`` (a :func:`latent_cache`) the VAE's latent distribution comes from
    the cache, and the sample from it is drawn exactly as without.

    Every random draw (VAE sample, noise, timesteps, then the offset noise when
    ``noise_offset`` > 0, in that order) comes from ``generator``, so a resumed run repeats
    an uninterrupted one exactly. The noise offset adds ``noise_offset · N(0, 1)`` per image
    and channel to the noise (Guttenberg 2023, diffusers' ``--noise_offset``). Returns the
    noisy latents (B, 4, H/8, W/8), the timesteps (B,) and the training target: the noise,
    or the velocity ``√ᾱ_t ε − √(1−ᾱ_t) x_0`` for a ``v_prediction`` scheduler.
    """
    device = pixels.device
    with torch.no_grad():
        if latents_from is None:
            distribution = vae.encode(pixels.to(vae.dtype)).latent_dist
        else:
            distribution = DiagonalGaussianDistribution(latents_from(pixels))  # (B, 8, h, w)
        latents = distribution.sample(generator=generator)
        latents = scale_latents(vae, latents)  # (B, 4, H/8, W/8)
    noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
    low, high = timestep_range
    high = noise_scheduler.config.num_train_timesteps if high is None else high
    timesteps = torch.randint(low, high, (latents.shape[0],), generator=generator).to(device)
    if noise_offset > 0:
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator)  # (B, 4, 1, 1)
        noise = noise + noise_offset * offset.to(device, latents.dtype)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, 4, H/8, W/8)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, timesteps, noise_scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, noise


def snr(noise_scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``SNR(t) = ᾱ_t / (1 − ᾱ_t)`` of each timestep: (B,) fp32."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv 2303.09556), as in diffusers' scripts.

    The MSE of an epsilon prediction weighs ``min(SNR, γ) / SNR``, of a v prediction
    ``min(SNR, γ) / (SNR + 1)``; this is the weight ``min(SNR, γ)`` on the x_0 error
    expressed in the predicted quantity. Written as ``min(1, γ / SNR)`` for epsilon, so
    that SNR = 0 (zero-terminal-SNR schedules) gives weight 1, not 0/0. (B,) -> (B,).
    """
    if prediction_type == "epsilon":
        return torch.clamp(gamma / snr_values, max=1.0)
    if prediction_type == "v_prediction":
        return torch.clamp(snr_values, max=gamma) / (snr_values + 1.0)
    raise ValueError(f"min-SNR weights need epsilon or v_prediction, got {prediction_type!r}")


def debiased_weights(snr_values: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """kohya's debiased-estimation loss weights (Yu et al. 2024, arXiv 2310.08442):
    ``1 / sqrt(SNR)`` for epsilon, ``1 / (SNR + 1)`` for v prediction, with SNR clipped at
    1000 (t = 0 has SNR near infinity). (B,) -> (B,)."""
    clipped = torch.clamp(snr_values, max=1000.0)
    if prediction_type == "epsilon":
        return 1.0 / clipped.sqrt()
    if prediction_type == "v_prediction":
        return 1.0 / (clipped + 1.0)
    raise ValueError(f"debiased weights need epsilon or v_prediction, got {prediction_type!r}")


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler: DDPMScheduler,
    snr_gamma: float | None = None,
    mask: torch.Tensor | None = None,
    debiased: bool = False,
) -> torch.Tensor:
    """The mean squared error of a batch, optionally masked, min-SNR and debiased weighted.

    ``prediction`` and ``target`` are (B, C, h, w); ``mask`` (B, 1, H, W) is a per-pixel
    weight in [0, 1] at any resolution, area-resized to (h, w) and multiplied into the
    squared error before the per-example mean (kohya's masked loss: a masked-out pixel
    contributes zero, the mean still runs over all pixels). With ``snr_gamma`` each
    example's mean is weighted by :func:`min_snr_weights`, with ``debiased`` by
    :func:`debiased_weights` (both: the product). Returns a scalar (fp32).
    """
    error = (prediction.float() - target.float()) ** 2  # (B, C, h, w)
    if mask is not None:
        error = error * F.interpolate(mask.float(), size=error.shape[-2:], mode="area")
    per_example = error.mean(dim=(1, 2, 3))  # (B,)
    prediction_type = noise_scheduler.config.prediction_type
    if snr_gamma is not None:
        per_example = per_example * min_snr_weights(
            snr(noise_scheduler, timesteps), snr_gamma, prediction_type
        )
    if debiased:
        per_example = per_example * debiased_weights(
            snr(noise_scheduler, timesteps), prediction_type
        )
    return per_example.mean()


class EMA:
    """Exponential moving average of named parameters (fp32), updated after each step.

    ``s ← d·s + (1 − d)·p`` with constant decay ``d``, starting from ``s_0 = p_0``; after k
    updates ``s_k = d^k p_0 + (1 − d) Σ_{i=1..k} d^(k−i) p_i``. :meth:`applied` swaps the
    averages into the live parameters for validation or saving; :meth:`save` /
    :meth:`load` write and read them as safetensors, so a resumed run continues exactly.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], decay: float) -> None:
        self.params = dict(params)
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}

    @classmethod
    def of(cls, models: Mapping[str, nn.Module], decay: float) -> EMA:
        """The average of every trainable parameter of ``models``, named ``<key>.<name>``."""
        return cls(
            {
                f"{key}.{name}": p
                for key, model in models.items()
                for name, p in model.named_parameters()
                if p.requires_grad
            },
            decay,
        )

    @torch.no_grad()
    def update(self) -> None:
        """Move every average towards its parameter's current value."""
        for name, p in self.params.items():
            self.shadow[name].mul_(self.decay).add_(p.detach().float(), alpha=1.0 - self.decay)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the averages; afterwards their own values."""
        saved = {name: p.detach().clone() for name, p in self.params.items()}
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(saved[name])

    def save(self, path: str | os.PathLike) -> None:
        """Write the averages to a safetensors file (keys: the parameter names)."""
        save_file({k: v.cpu().contiguous() for k, v in self.shadow.items()}, str(path))

    def load(self, path: str | os.PathLike) -> None:
        """Read averages written by :meth:`save`; :func:`fail` if the names differ."""
        path = Path(path)
        if not path.is_file():
            fail(
                f"{path.parent} holds no EMA state ({path.name}): it was written without "
                "--use_ema. Resume without --use_ema, or start a new run."
            )
        state = load_file(str(path))
        if set(state) != set(self.shadow):
            fail(f"{path} does not match this model's trainable tensors; resume the same model.")
        for name, value in state.items():
            self.shadow[name].copy_(value)


def ema_weights_name(weights_name: str) -> str:
    """The EMA file beside a weights file: ``hra_weights.safetensors`` -> ``hra_weights_ema...``."""
    stem, dot, suffix = weights_name.rpartition(".")
    return f"{stem}_ema{dot}{suffix}"


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """``args`` with values tensorboard's hparams accept (lists and None as strings)."""
    return {
        k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in vars(args).items()
    }
