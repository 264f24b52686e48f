"""DreamBooth with HRA: teach Stable Diffusion a subject from a few pictures.

Same arguments as diffusers' ``train_dreambooth_lora.py``, plus the HRA options.
Run it on a GPU with ``accelerate launch``, on several GPUs with a multi-GPU
accelerate config, or on CPU (``python`` or ``torchrun --nproc_per_node 2``)::

    accelerate launch train/train_dreambooth_hra.py \\
        --pretrained_model_name_or_path ./stable-diffusion-v1-5 \\
        --instance_data_dir ./my_dog --instance_prompt "a photo of qwe dog" \\
        --with_prior_preservation --class_data_dir ./class_dog \\
        --class_prompt "a photo of dog" --output_dir out/

Without ``--pretrained_model_name_or_path`` the bundled tiny model is used (random
weights, runs anywhere). The result is ``<output_dir>/hra_weights.safetensors``;
load it with ``load_hra_weights(pipe, "out/")``. ``--adapter lora`` trains diffusers-style
LoRA instead (PEFT, ``pytorch_lora_weights.safetensors``, ``pipe.load_lora_weights("out/")``),
to compare the two methods. What it shares with the SDXL script
(``train_dreambooth_hra_sdxl.py``) lives in :mod:`hra_diffusion.train.dreambooth`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_TARGETS,
    HRAConfig,
    cli,
    hra_parameters,
    inject_hra,
    orthogonality_loss,
)
from hra_diffusion.errors import fail
from hra_diffusion.formats.lora import LORA_WEIGHTS_NAME
from hra_diffusion.injection import hra_magnitudes
from hra_diffusion.single_file import load_single_file
from hra_diffusion.train.arg_checks import check_adapter_options, check_cache_args, single_file_of
from hra_diffusion.train.args import (
    add_adapter_args,
    add_bucket_args,
    add_cache_args,
    add_checkpoint_args,
    add_ema_args,
    add_hra_args,
    add_image_args,
    add_loss_args,
    add_model_args,
    add_optimization_args,
    add_validation_args,
)
from hra_diffusion.train.cache import latent_cache, text_embedding_cache
from hra_diffusion.train.checkpoints import register_trainable_state_hooks, remove_stale_temp_dirs
from hra_diffusion.train.dreambooth import (
    HRA_FILES,
    LORA_FILES,
    Models,
    RunInfo,
    finish_run,
    generate_class_images,
    make_dataloader,
    resume_training,
    training_loop,
)
from hra_diffusion.train.dreambooth_args import (
    Inputs,
    add_dreambooth_args,
    add_dreambooth_output_args,
    check_dreambooth_args,
    warn_long_prompts,
)
from hra_diffusion.train.ema import EMA
from hra_diffusion.train.loss import (
    diffusion_loss,
    noisy_latents,
    set_prediction_type,
    timestep_upper_bound,
)
from hra_diffusion.train.reporting import save_validation_images, tracker_config
from hra_diffusion.train.setup import (
    add_lora,
    count_parameters,
    hra_options,
    load_models,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    tokenize,
    weight_dtype,
)

# --------------------------------------------------------------------------- arguments

HRA_ONLY_OPTIONS = (
    "hra_r",
    "hra_init",
    "hra_magnitude",
    "hra_apply_gs",
    "hra_lambda",
    "export_lora",
)
"""Options that do nothing with ``--adapter lora`` (refused with it)."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: diffusers' DreamBooth-LoRA options plus the HRA ones."""
    parser = cli.ArgumentParser(
        description="DreamBooth fine-tuning of Stable Diffusion with HRA adapters. The defaults "
        "are the paper's Stable Diffusion 1.5 recipe (lr 1e-4, r 8, attention projections); "
        "the bundled default model, a tiny SD, learns with the settings in "
        "hra_diffusion/world/dreambooth.args (lr 3e-3, r 16, 1600 steps at 64 px; attention, "
        "feed-forward and ResNet convolutions, but not the cross-attention's text-side "
        "attn2.to_k/to_v, so that prompt words such as a background keep their meaning). "
        "Options can also be read from a file, one per "
        "line: @FILE (e.g. @hra_diffusion/world/dreambooth.args).",
        fromfile_prefix_chars="@",
    )
    add_model_args(parser)
    add_dreambooth_args(parser)
    add_image_args(parser, default_resolution=512)
    add_cache_args(parser)
    add_bucket_args(parser)
    add_adapter_args(
        parser,
        f"(and --hra_text_encoder_target_modules), saved as {LORA_WEIGHTS_NAME} for "
        "pipe.load_lora_weights",
    )
    add_hra_args(parser, UNET_ATTENTION_TARGETS)
    group = parser.add_argument_group("text encoder")
    group.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Adapt the CLIP text encoder too (--hra_text_encoder_target_modules).",
    )
    group.add_argument(
        "--hra_text_encoder_target_modules",
        type=cli.text,
        nargs="+",
        default=list(TEXT_ENCODER_ATTENTION_TARGETS),
        help="Text-encoder modules adapted with --train_text_encoder. "
        f"Default: {' '.join(TEXT_ENCODER_ATTENTION_TARGETS)}.",
    )
    add_optimization_args(parser, learning_rate=1e-4)
    add_loss_args(parser)
    add_ema_args(parser)
    add_checkpoint_args(parser)
    add_validation_args(parser, several_prompts=True)
    add_dreambooth_output_args(parser, default_output_dir="hra-dreambooth-model")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``); refuse the options
    of the adapter not chosen (:func:`check_adapter_options`)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    check_adapter_options(build_parser, args, argv, HRA_ONLY_OPTIONS)
    return args


def check_args(args: argparse.Namespace) -> Inputs:
    """Every check that needs no model; an SDXL base is refused (use the SDXL script)."""
    check_cache_args(args)
    files = LORA_FILES if args.adapter == "lora" else HRA_FILES
    return check_dreambooth_args(args, "sd", weights_name=files.weights_name)


def load_base_pipeline(
    args: argparse.Namespace, model_path: str
) -> diffusers.StableDiffusionPipeline:
    """The base pipeline (class images, LoRA export), without a safety checker."""
    single_file = single_file_of(args)
    if single_file is not None:
        return load_single_file(single_file, model_path)
    return diffusers.StableDiffusionPipeline.from_pretrained(
        model_path, revision=args.revision, safety_checker=None, requires_safety_checker=False
    )


# --------------------------------------------------------------------------- models


def inject_adapters(
    args: argparse.Namespace, unet: nn.Module, text_encoder: nn.Module
) -> list[nn.Parameter]:
    """Inject HRA (``--adapter lora``: LoRA) into the UNet (and the text encoder); return
    the trainable tensors.

    Call after casting the frozen weights: the new adapters are created in fp32.
    """
    text_encoder.requires_grad_(False)
    if args.adapter == "lora":
        params = add_lora(unet, args.lora_rank, args.hra_target_modules)
        if args.train_text_encoder:
            targets = args.hra_text_encoder_target_modules
            params += add_lora(text_encoder, args.lora_rank, targets)
        return params
    common = hra_options(args)
    try:
        inject_hra(unet, HRAConfig(target_modules=tuple(args.hra_target_modules), **common))
        if args.train_text_encoder:
            targets = tuple(args.hra_text_encoder_target_modules)
            inject_hra(text_encoder, HRAConfig(target_modules=targets, **common))
    except (ValueError, TypeError) as error:
        fail(f"cannot adapt the model: {error}")
    params = hra_parameters(unet)
    if args.train_text_encoder:
        params += hra_parameters(text_encoder)
    return params


# --------------------------------------------------------------------------- training


def training_loss(
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    models: Models,
    args: argparse.Namespace,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DreamBooth loss of one batch: instance loss + prior loss + λ · orthogonality loss.

    The instance loss is masked with ``--masked_loss``; both are min-SNR weighted with
    ``--snr_gamma``. Every random draw (VAE sample, noise, timesteps) comes from ``generator``.
    Returns the loss and its parts as floats, for logging.
    """
    pixels = batch["pixel_values"]  # (B, 3, H, W); instance images, then class images
    scheduler = models.noise_scheduler
    timestep_range = (args.min_timestep, args.max_timestep)
    noisy, timesteps, target = noisy_latents(
        pixels, models.vae, scheduler, generator, args.noise_offset, models.latents, timestep_range
    )
    if models.text is not None:
        encoder_hidden_states = models.text(batch["input_ids"])  # (B, 77, D)
    else:
        with torch.set_grad_enabled(args.train_text_encoder):
            encoder_hidden_states = models.text_encoders[0](batch["input_ids"])[0]  # (B, 77, D)
    prediction = models.unet(noisy, timesteps, encoder_hidden_states).sample
    parts: dict[str, torch.Tensor] = {}
    if args.with_prior_preservation:
        prediction, prior_prediction = prediction.chunk(2)
        target, prior_target = target.chunk(2)
        timesteps, prior_timesteps = timesteps.chunk(2)
        parts["prior_loss"] = diffusion_loss(
            prior_prediction, prior_target, prior_timesteps, scheduler, args.snr_gamma,
            debiased=args.debiased_estimation_loss,
        )  # fmt: skip
    parts["instance_loss"] = diffusion_loss(
        prediction, target, timesteps, scheduler, args.snr_gamma, batch.get("masks"),
        args.debiased_estimation_loss,
    )  # fmt: skip
    loss = parts["instance_loss"]
    if args.with_prior_preservation:
        loss = loss + args.prior_loss_weight * parts["prior_loss"]
    if args.hra_lambda > 0:
        parts["orth_loss"] = sum(orthogonality_loss(m) for m in models.adapted.values())
        loss = loss + args.hra_lambda * parts["orth_loss"]
    return loss, {name: value.detach().item() for name, value in parts.items()}


# --------------------------------------------------------------------------- validation and output


def run_validation(
    args: argparse.Namespace,
    accelerator: Accelerator,
    models: Models,
    tokenizer: transformers.CLIPTokenizer,
    dtype: torch.dtype,
    global_step: int,
) -> Path:
    """Sample ``--num_validation_images`` for each ``--validation_prompt`` (seed ``--seed``).

    Main process only; with ``--use_ema`` the EMA weights draw them. Images and a grid (a
    row per prompt) go to ``<output_dir>/validation/step-<step>/``; returns the grid's path.
    """
    pipe = diffusers.StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=accelerator.unwrap_model(models.text_encoders[0]),
        tokenizer=tokenizer,
        unet=accelerator.unwrap_model(models.unet),
        scheduler=diffusers.DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32)
    images = []
    for prompt in args.validation_prompt:
        generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
        with torch.no_grad(), autocast, models.validation_weights():
            images += pipe(
                [prompt] * args.num_validation_images,
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.num_validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                generator=generator,
            ).images
    folder = Path(args.output_dir) / "validation" / f"step-{global_step:06d}"
    return save_validation_images(
        accelerator, images, folder, global_step, captions=args.validation_prompt
    )


# --------------------------------------------------------------------------- main


@cli.cli_main()
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns a summary: ``global_step``, ``loss`` (last step, main process),
    ``losses`` (its parts), ``trainable_parameters``, ``elapsed_s`` and ``files``."""
    args = parse_args(argv)
    inputs = check_args(args)
    model_path, resume = inputs.model_path, inputs.resume
    started = time.perf_counter()
    accelerator = make_accelerator(args)
    out = Path(args.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)
    accelerator.wait_for_everyone()
    set_seed(args.seed)

    class_images = None
    if args.with_prior_preservation:
        class_images = generate_class_images(
            args, accelerator, inputs, lambda: load_base_pipeline(args, model_path)
        )

    # Models: frozen weights in the training dtype, then fp32 HRA adapters.
    dtype = weight_dtype(accelerator)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(
        model_path, args.revision, single_file_of(args)
    )
    if accelerator.is_main_process:
        warn_long_prompts(args, inputs, tokenizer)
    args.prediction_type = set_prediction_type(noise_scheduler, args.prediction_type)
    args.max_timestep = timestep_upper_bound(noise_scheduler, args.min_timestep, args.max_timestep)
    for model in (vae, text_encoder, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
        if dtype != torch.float32:
            model.to(dtype=dtype)
    set_seed(args.seed)  # identical adapter initialisation on every rank and every run
    params = inject_adapters(args, unet, text_encoder)
    trainable = count_parameters(params)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            (enable or text_encoder.gradient_checkpointing_enable)()
    if args.torch_compile:
        unet.compile(fullgraph=True)  # in place: module names and weights files unchanged

    # Data: the order and augmentation of every epoch are fixed by (seed, epoch).
    dataloader, updates_per_epoch = make_dataloader(
        args,
        accelerator,
        inputs,
        tokenize(tokenizer, inputs.instance_prompts),  # (N, 77): a row per picture
        class_images,
        tokenize(tokenizer, [args.class_prompt])[0] if class_images else None,
    )

    optimizer = make_optimizer(params, args, no_decay=hra_magnitudes(unet, text_encoder))
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator.num_processes)
    if args.train_text_encoder:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, lr_scheduler
        )
        trained = [unet, text_encoder]
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained = [unet]
    register_trainable_state_hooks(accelerator)
    names = ["unet", "text_encoder"][: len(trained)]
    adapted = dict(zip(names, map(accelerator.unwrap_model, trained), strict=True))
    ema = EMA.of(adapted, args.ema_decay) if args.use_ema else None
    files = LORA_FILES if args.adapter == "lora" else HRA_FILES
    models = Models(unet, [text_encoder], vae, noise_scheduler, adapted, ema, files=files)
    if args.cache_latents:
        models.latents = latent_cache(vae)
    if args.pre_compute_text_embeddings:
        models.text = text_embedding_cache(text_encoder)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-hra", config=tracker_config(args))

    def validate(step: int) -> Path:
        return run_validation(args, accelerator, models, tokenizer, dtype, step)

    global_step = resume_training(accelerator, resume, ema, args.seed)
    result = training_loop(
        accelerator,
        args,
        models,
        trained,
        params,
        optimizer,
        lr_scheduler,
        dataloader,
        updates_per_epoch,
        global_step,
        training_loss,
        validate,
    )

    run = RunInfo(
        model_path,
        lambda: load_base_pipeline(args, model_path),
        trainable,
        started,
        "StableDiffusionPipeline",
        "UNet and CLIP text encoder" if args.train_text_encoder else "UNet",
        f"DreamBooth {files.method} training finished",
    )
    return finish_run(accelerator, args, models, result, validate, run)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    main()
