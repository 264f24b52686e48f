"""Command-line options shared by the training scripts, as ``add_*_args`` groups.

A training script builds its ``argparse.ArgumentParser`` from these groups plus its own
options; :mod:`hra_diffusion.train.arg_checks` then refuses combinations that cannot work.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Sequence

from diffusers.optimization import SchedulerType

from hra_diffusion import cli
from hra_diffusion.config import INITS

OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_8bit", "prodigy", "adafactor")
"""Values of ``--optimizer``."""


OPTIMIZER_PACKAGES = {"adamw_8bit": "bitsandbytes", "prodigy": "prodigyopt"}
"""The optional package each optimizer needs (pip name; the import name is the same)."""


PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction")
"""Values of ``--prediction_type``."""

WEIGHTING_SCHEMES: tuple[str, ...] = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")
"""Values of ``--weighting_scheme`` (flow matching: SD3, FLUX.1), diffusers' names."""


SD1_MODEL_HELP = (
    "Stable Diffusion 1.x pipeline: a local diffusers folder (with model_index.json) "
    "or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5 (needs network or a "
    "filled hub cache), or a single-file .safetensors checkpoint (A1111/ComfyUI layout) with "
    "--base_config. Default: the bundled tiny model (random weights, runs anywhere)."
)

BASE_CONFIG_HELP = (
    "With a single-file checkpoint as the model: a local diffusers pipeline folder of the same "
    "family (SD 1.x or SDXL) whose configs, tokenizers and scheduler are used; the weights "
    "come from the file, loaded offline."
)


def add_model_args(parser: argparse.ArgumentParser, model_help: str = SD1_MODEL_HELP) -> None:
    """``--pretrained_model_name_or_path`` (default: the bundled tiny model; a single-file
    checkpoint with ``--base_config``), ``--base_config`` and ``--revision``.

    ``model_help`` describes the base the script expects (default: Stable Diffusion 1.x).
    """
    group = parser.add_argument_group("base model")
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=cli.model_or_checkpoint,
        default=None,
        help=model_help,
    )
    group.add_argument("--base_config", type=cli.pipeline_dir, default=None, help=BASE_CONFIG_HELP)
    group.add_argument(
        "--revision",
        type=cli.text,
        default=None,
        help="Hub revision (branch, tag or commit) of --pretrained_model_name_or_path.",
    )


def add_hra_args(parser: argparse.ArgumentParser, default_targets: Sequence[str]) -> None:
    """``--hra_r``, ``--hra_init``, ``--hra_magnitude``, ``--hra_apply_gs``, ``--hra_lambda``,
    ``--hra_target_modules`` (UNet)."""
    group = parser.add_argument_group("HRA adapter")
    group.add_argument(
        "--hra_r",
        type=cli.positive_int,
        default=8,
        help="Householder reflections per adapted layer. Even r starts exactly at the base "
        "model; odd r (the paper's subject-driven r=7) does not. Default: 8.",
    )
    group.add_argument(
        "--hra_init",
        choices=INITS,
        default="paper",
        help="How the reflection vectors start. paper (default): the paper's kaiming-uniform "
        "columns, whose norm grows with the layer width d, so with Adam wide layers move "
        "slower (about 1/sqrt(d)) at the same learning rate. scaled: the same directions, "
        "every column of norm sqrt(r), so the first step moves every layer by about the same "
        "relative amount. Both start exactly at the base model for even r.",
    )
    group.add_argument(
        "--hra_magnitude",
        action="store_true",
        help="Also train a magnitude m per output feature of every adapted layer (hra_m, "
        "ones at the start), so the layer computes diag(m) W H: it can change the norms of "
        "W's rows, which W H keeps (DoRA-like). Exports: LoRA as DoRA keys; kohya, GLoRA and "
        "PEFT formats are refused.",
    )
    group.add_argument(
        "--hra_apply_gs",
        action="store_true",
        help="Orthonormalise the reflections with Gram-Schmidt (the paper's lambda=inf). "
        "Note: this does NOT start at the base model.",
    )
    group.add_argument(
        "--hra_lambda",
        type=cli.non_negative_float,
        default=0.0,
        help="Weight of the orthogonality regulariser: loss += lambda * sum ||I - U^T U||^2. "
        "The paper uses 0 (default) or 1e-3.",
    )
    group.add_argument(
        "--hra_target_modules",
        type=cli.text,
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
        type=cli.positive_int,
        default=4,
        help="LoRA rank with --adapter lora (alpha = rank, scale 1). The default 4 gives "
        "about the parameters of HRA r=8 on square layers: LoRA has two factors, "
        "r (d_in + d_out) against HRA's r d_in. Default: 4.",
    )


LORA_ONLY_OPTIONS = ("lora_rank",)
"""Options that do nothing with ``--adapter hra`` (refused with it)."""


def add_image_args(parser: argparse.ArgumentParser, default_resolution: int = 512) -> None:
    """``--resolution``, ``--center_crop``, ``--random_flip``."""
    group = parser.add_argument_group("images")
    group.add_argument(
        "--resolution",
        type=cli.image_side,
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


def add_cache_args(parser: argparse.ArgumentParser, text: bool = True) -> None:
    """``--cache_latents`` and (with ``text``) ``--pre_compute_text_embeddings`` (see
    :class:`InputCache`). Scripts that always encode each prompt once (SD3, FLUX.1) pass
    ``text=False``."""
    group = parser.add_argument_group("cached inputs")
    group.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode each training image with the VAE once (once per flip with --random_flip) "
        "and reuse its latent distribution; the per-step sample is drawn as before, so losses "
        "are unchanged. Needs --center_crop (random crops give new pixels every epoch).",
    )
    if not text:
        return
    group.add_argument(
        "--pre_compute_text_embeddings",
        action="store_true",
        help="Encode each distinct prompt with the frozen text encoder(s) once and reuse the "
        "embeddings (SDXL: both encoders' and the pooled one; losses unchanged). Not with "
        "--train_text_encoder.",
    )


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
    group.add_argument("--seed", type=cli.seed, default=0, help="Seed for everything. Default: 0.")
    group.add_argument(
        "--train_batch_size",
        type=cli.positive_int,
        default=train_batch_size,
        help="Batch size per device (DreamBooth's prior preservation doubles it). "
        f"Default: {train_batch_size}.",
    )
    group.add_argument(
        "--num_train_epochs",
        type=cli.positive_int,
        default=num_train_epochs,
        help="Epochs to train; ignored when --max_train_steps is given. "
        f"Default: {num_train_epochs}.",
    )
    group.add_argument(
        "--max_train_steps",
        type=cli.positive_int,
        default=None,
        help="Total optimisation steps; overrides --num_train_epochs.",
    )
    group.add_argument(
        "--gradient_accumulation_steps",
        type=cli.positive_int,
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
        type=cli.positive_float,
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
        type=cli.non_negative_int,
        default=0,
        help="Linear warmup steps of the schedule. Default: 0.",
    )
    group.add_argument(
        "--max_grad_norm",
        type=cli.non_negative_float,
        default=1.0,
        help="Clip the gradient norm to this value (0 disables clipping). Default: 1.0.",
    )
    group.add_argument(
        "--adam_beta1", type=cli.below_one, default=0.9, help="AdamW beta1. Default: 0.9."
    )
    group.add_argument(
        "--adam_beta2", type=cli.below_one, default=0.999, help="AdamW beta2. Default: 0.999."
    )
    group.add_argument(
        "--adam_weight_decay",
        type=cli.non_negative_float,
        default=1e-2,
        help="AdamW weight decay. Default: 1e-2.",
    )
    group.add_argument(
        "--adam_epsilon",
        type=cli.positive_float,
        default=1e-8,
        help="AdamW epsilon. Default: 1e-8.",
    )
    group.add_argument(
        "--optimizer",
        "--optimizer_type",
        type=cli.text,
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
        type=cli.below_one,
        default=None,
        help="Prodigy's coefficient for its step-size estimate (default: sqrt(--adam_beta2)).",
    )
    group.add_argument(
        "--prodigy_decouple",
        type=cli.str_to_bool,
        default=True,
        help="Prodigy: AdamW-style decoupled weight decay (true/false). Default: true.",
    )
    group.add_argument(
        "--prodigy_use_bias_correction",
        type=cli.str_to_bool,
        default=True,
        help="Prodigy: Adam's bias correction (true/false). Default: true.",
    )
    group.add_argument(
        "--prodigy_safeguard_warmup",
        type=cli.str_to_bool,
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
        type=cli.non_negative_int,
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
        type=cli.positive_float,
        default=None,
        help="Min-SNR-gamma loss weighting (Hang et al. 2023): each example's MSE is weighted "
        "by min(SNR(t), gamma) / SNR(t) (epsilon) or / (SNR(t) + 1) (v_prediction). 5.0 is the "
        "recommended value; --min_snr_gamma is kohya's name. Default: off (plain MSE).",
    )
    group.add_argument(
        "--noise_offset",
        type=cli.non_negative_float,
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
        type=cli.non_negative_int,
        default=0,
        help="Train only on timesteps t >= this (kohya's name). Default: 0.",
    )
    group.add_argument(
        "--max_timestep",
        type=cli.positive_int,
        default=None,
        help="Train only on timesteps t < this (kohya's name), e.g. --min_timestep 700 to "
        "train the noisiest 30%% of a 1000-step schedule. Default: the scheduler's "
        "num_train_timesteps (1000 for Stable Diffusion).",
    )


def add_flow_matching_args(
    parser: argparse.ArgumentParser, precondition: bool = False, guidance: bool = False
) -> None:
    """The flow-matching loss options of diffusers' SD3 and FLUX.1 LoRA scripts (same names):
    ``--weighting_scheme``, ``--logit_mean``, ``--logit_std``, ``--mode_scale``,
    ``--max_sequence_length``, and ``--precondition_outputs`` (SD3) or ``--guidance_scale``
    (FLUX.1) where asked for."""
    group = parser.add_argument_group("flow-matching loss")
    group.add_argument(
        "--weighting_scheme",
        default="none",
        choices=WEIGHTING_SCHEMES,
        help="How training times sigma are drawn and weighted (SD3 paper, arXiv 2403.03206): "
        "logit_normal draws sigma = sigmoid(N(--logit_mean, --logit_std)), mode draws with "
        "--mode_scale, the others uniformly; sigma_sqrt weights each example's error by "
        "sigma^-2, cosmap by 2 / (pi (1 - 2 sigma + 2 sigma^2)), the others by 1. Default: none.",
    )
    group.add_argument(
        "--logit_mean",
        type=cli.between(-10.0, 10.0),
        default=0.0,
        help="Mean of the normal behind --weighting_scheme logit_normal. Default: 0.0.",
    )
    group.add_argument(
        "--logit_std",
        type=cli.positive_float,
        default=1.0,
        help="Standard deviation of --weighting_scheme logit_normal's normal. Default: 1.0.",
    )
    group.add_argument(
        "--mode_scale",
        type=cli.between(-1.0, 1.75),
        default=1.29,
        help="Scale s of --weighting_scheme mode, u -> 1 - u - s (cos^2(pi u / 2) - 1 + u), "
        "in [-1, 1.75] where that map stays monotone. Default: 1.29.",
    )
    group.add_argument(
        "--max_sequence_length",
        type=cli.positive_int,
        default=77 if precondition else 512,
        help="T5 tokens per prompt (longer prompts are cut). Default: "
        f"{77 if precondition else 512}, as diffusers' script.",
    )
    if precondition:
        group.add_argument(
            "--precondition_outputs",
            type=cli.str_to_bool,
            default=True,
            help="Train on the preconditioned output x_t - sigma v against the latents "
            "instead of the velocity v against noise - latents (the same minimiser, weighted "
            "by sigma^2), as diffusers' SD3 script. 1/0. Default: 1.",
        )
    if guidance:
        group.add_argument(
            "--guidance_scale",
            type=cli.non_negative_float,
            default=1.0,
            help="The guidance value given to a guidance-distilled transformer (FLUX.1 "
            "[dev]: guidance_embeds) while training; ignored by bases without guidance "
            "embedding (FLUX.1 [schnell]). Default: 1.0, as diffusers' script.",
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
        type=cli.open_unit,
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
        type=cli.image_side,
        default=None,
        help="Smallest bucket side in pixels, a multiple of --bucket_reso_steps. "
        "Default: --resolution / 2, rounded up to a step.",
    )
    group.add_argument(
        "--max_bucket_reso",
        type=cli.image_side,
        default=None,
        help="Largest bucket side in pixels, a multiple of --bucket_reso_steps. "
        "Default: 2 x --resolution, rounded down to a step.",
    )
    group.add_argument(
        "--bucket_reso_steps",
        type=cli.image_side,
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
        type=cli.positive_int,
        default=500,
        help="Save the full training state to <output_dir>/checkpoint-<step> every N steps. "
        "Default: 500.",
    )
    group.add_argument(
        "--checkpoints_total_limit",
        type=cli.positive_int,
        default=None,
        help="Keep at most this many checkpoints, deleting the oldest. Default: keep all.",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        type=cli.checkpoint_ref,
        default=None,
        help='Continue from a checkpoint folder, or "latest" for the newest one in '
        "--output_dir (starts fresh if there is none).",
    )


def add_output_args(parser: argparse.ArgumentParser, default_output_dir: str) -> None:
    """``--output_dir``, ``--overwrite_output_dir``, ``--logging_dir``, ``--report_to``."""
    group = parser.add_argument_group("output and logging")
    group.add_argument(
        "--output_dir",
        type=cli.output_dir,
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
        type=cli.text,
        default="logs",
        help="Tracker log folder, relative to --output_dir. Default: logs.",
    )
    group.add_argument(
        "--report_to",
        default="tensorboard" if is_installed("tensorboard") else "none",
        choices=["tensorboard", "wandb", "comet_ml", "all", "none"],
        help="Experiment tracker. Default: tensorboard when installed, else none.",
    )


def add_validation_args(
    parser: argparse.ArgumentParser,
    guidance_scale: float = 7.5,
    inference_steps: int = 25,
    several_prompts: bool = False,
    sampler: str = "DPM-Solver",
    guidance: str = "Classifier-free guidance scale",
) -> None:
    """``--validation_prompt`` and how often / how many / how validation images are sampled.

    With ``several_prompts`` the option takes one or more prompts (a list); ``sampler`` and
    ``guidance`` name the sampler and the guidance in the help (FLUX.1: the base's own
    flow-matching Euler sampler and its distilled guidance).
    """
    group = parser.add_argument_group("validation")
    if several_prompts:
        group.add_argument(
            "--validation_prompt",
            type=cli.text,
            nargs="+",
            default=None,
            help="One or more prompts sampled every --validation_steps and at the end, a grid "
            'row each, e.g. "a photo of qwe dog" "a photo of qwe dog in the snow" '
            "(default: no validation).",
        )
    else:
        group.add_argument(
            "--validation_prompt",
            type=cli.text,
            default=None,
            help="Prompt sampled every --validation_steps and at the end (default: no validation).",
        )
    group.add_argument(
        "--num_validation_images",
        type=cli.positive_int,
        default=4,
        help="Images per validation (per prompt), sampled with a fixed seed (--seed). Default: 4.",
    )
    group.add_argument(
        "--validation_steps",
        type=cli.positive_int,
        default=100,
        help="Validate every N optimisation steps. Default: 100.",
    )
    group.add_argument(
        "--num_validation_inference_steps",
        type=cli.positive_int,
        default=inference_steps,
        help=f"{sampler} sampling steps per validation image. Default: {inference_steps}.",
    )
    group.add_argument(
        "--validation_guidance_scale",
        type=cli.non_negative_float,
        default=guidance_scale,
        help=f"{guidance} of validation images. Default: {guidance_scale}.",
    )


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
