"""Controllable generation with HRA: train Stable Diffusion to follow edge or segmentation maps.

The paper's recipe: the UNet is frozen apart from HRA adapters (r=8) on every attention
projection and the GEGLU input projection ``ff.net.0.proj``; a small condition encoder
(zero-initialised output) adds its features of the control image after the UNet's input
conv. Loss: the usual noise-prediction MSE given caption and control image,

    L = || ε − ε_θ(z_t, t, text, c) ||²   (+ λ Σ ||I − ÛᵀÛ||²_F with --hra_lambda)

Run it with ``accelerate launch`` (one or several GPUs) or ``python`` / ``torchrun`` on CPU::

    accelerate launch train/train_control_hra.py \\
        --pretrained_model_name_or_path ./stable-diffusion-v1-5 \\
        --train_data_dir ./ade20k_train --condition_type segmentation \\
        --validation_image ./val/label.png --validation_prompt "a bedroom" \\
        --mixed_precision fp16 --output_dir out/

The result is ``<output_dir>/hra_control_weights.safetensors`` (HRA and encoder weights,
configs in its metadata). Sample with
``StableDiffusionHRAControlPipeline.from_base(base, "out/hra_control_weights.safetensors")``.
``--adapter lora --lora_rank K`` trains a PEFT LoRA on the same modules instead of HRA, to
compare the two methods; its file (same name) loads the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from hra_diffusion import (
    UNET_ATTENTION_FF_TARGETS,
    HRAConfig,
    cli,
    inject_hra,
    orthogonality_loss,
)
from hra_diffusion.checks import warn_truncated_prompts
from hra_diffusion.conditions import CONDITION_TYPES
from hra_diffusion.control import (
    CONTROL_WEIGHTS_NAME,
    DEFAULT_ENCODER_CHANNELS,
    attach_condition_encoder,
    build_condition_encoder,
    control_parameter_groups,
    control_parameters,
    default_encoder_channels,
    save_control_weights,
)
from hra_diffusion.errors import fail
from hra_diffusion.injection import hra_magnitudes
from hra_diffusion.train.arg_checks import (
    check_adapter_options,
    check_base_family,
    check_cache_args,
    check_common_args,
    check_output_dir,
    resolve_model_path,
    single_file_of,
)
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
    add_output_args,
    add_validation_args,
)
from hra_diffusion.train.cache import InputCache, latent_cache, text_embedding_cache
from hra_diffusion.train.checkpoints import (
    EMA_STATE_NAME,
    check_resume_settings,
    find_resume_checkpoint,
    load_checkpoint,
    register_trainable_state_hooks,
    remove_stale_temp_dirs,
    save_checkpoint,
    shape_settings,
    step_generator,
)
from hra_diffusion.train.control_data import (
    DATA_FORMATS,
    ControlDataset,
    collate_control,
    load_control_source,
    validation_condition,
)
from hra_diffusion.train.data import BucketSet, check_bucket_args, epoch_sampler
from hra_diffusion.train.ema import EMA, ema_weights_name
from hra_diffusion.train.loss import (
    diffusion_loss,
    noisy_latents,
    set_prediction_type,
    timestep_upper_bound,
)
from hra_diffusion.train.reporting import (
    TrainingCurves,
    format_args_table,
    format_duration,
    format_training_features,
    print_summary,
    progress_bar,
    save_validation_images,
    tracker_config,
)
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

logger = get_logger(__name__)

PAPER_DEFAULTS = {"learning_rate": 9e-4, "train_batch_size": 8, "num_train_epochs": 20}
"""The paper's controllable recipe (ADE20K): lr 9e-4, batch 8, 20 epochs."""

HRA_ONLY_OPTIONS = ("hra_r", "hra_init", "hra_magnitude", "hra_apply_gs", "hra_lambda")
"""Options that do nothing with ``--adapter lora`` (refused with it)."""


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = cli.ArgumentParser(
        description="Train HRA adapters and a condition encoder so that Stable Diffusion "
        "follows edge or segmentation maps."
    )
    add_model_args(parser)
    group = parser.add_argument_group("data")
    group.add_argument(
        "--train_data_dir",
        type=cli.existing_path,
        required=True,
        help="Training data, one of three layouts: (folder) images/, conditions/ and "
        'metadata.jsonl with lines {"image": "a.jpg", "condition": "a.png", "text": "..."}; '
        "(saved) a datasets Dataset/DatasetDict written by save_to_disk; (imagefolder) a "
        'datasets imagefolder whose metadata.jsonl has {"file_name": ..., '
        '"conditioning_image_file_name": ..., "text": ...}. A condition of another size '
        "than its image is resized to it (nearest-neighbour for segmentation) and cropped "
        "with the image's crop.",
    )
    group.add_argument(
        "--data_format",
        default="auto",
        choices=DATA_FORMATS,
        help="Layout of --train_data_dir. Default: auto (detected).",
    )
    group.add_argument(
        "--condition_type",
        required=True,
        choices=CONDITION_TYPES,
        help="canny: edges computed on the fly from each training image (no condition files "
        "needed); segmentation: ADE20K label maps (single-channel, ids 0..150) drawn with the "
        "ADE20K palette, or RGB colour maps used as they are; precomputed: RGB condition "
        "images used as they are.",
    )
    group.add_argument(
        "--canny_low_threshold",
        type=cli.non_negative_int,
        default=100,
        help="Lower hysteresis threshold of cv2.Canny (condition_type canny). Default: 100.",
    )
    group.add_argument(
        "--canny_high_threshold",
        type=cli.non_negative_int,
        default=200,
        help="Upper hysteresis threshold of cv2.Canny (condition_type canny). Default: 200.",
    )
    group.add_argument(
        "--image_column",
        type=cli.text,
        default="image",
        help="Target-image column of a saved/imagefolder dataset. Default: image.",
    )
    group.add_argument(
        "--conditioning_image_column",
        type=cli.text,
        default="conditioning_image",
        help="Condition column of a saved/imagefolder dataset. Default: conditioning_image.",
    )
    group.add_argument(
        "--caption_column",
        type=cli.text,
        default="text",
        help="Caption column of a saved/imagefolder dataset (a string, or a list to draw "
        "from). Default: text.",
    )
    group.add_argument(
        "--proportion_empty_prompts",
        type=cli.probability,
        default=0.0,
        help="Fraction of captions replaced by the empty prompt, so the model also learns to "
        "follow the condition alone. Default: 0.",
    )
    add_image_args(parser, default_resolution=512)
    add_cache_args(parser)
    add_bucket_args(parser)
    add_adapter_args(parser, "saved in the same control file with the encoder")
    add_hra_args(parser, UNET_ATTENTION_FF_TARGETS)
    encoder_group = parser.add_argument_group("condition encoder")
    encoder_group.add_argument(
        "--condition_encoder_channels",
        type=cli.positive_int,
        nargs="+",
        default=None,
        help="Widths of the encoder's 3x3 conv stages, with a stride-2 step between stages: "
        "N widths downsample 2^(N-1) times, which must equal the VAE's factor (8 for SD). "
        "Its zero-initialised output conv maps to the UNet's first width. Default: the first "
        f"widths of {' '.join(map(str, DEFAULT_ENCODER_CHANNELS))} that match the loaded "
        "VAE (all four for SD; 16 32 96 for the bundled model, whose VAE downsamples 4x).",
    )
    encoder_group.add_argument(
        "--condition_encoder_lr",
        type=cli.positive_float,
        default=None,
        help="Learning rate of the condition encoder (same schedule), so that the UNet's "
        "adapter can train at another --learning_rate. Default: --learning_rate (the paper "
        "trains both at one rate).",
    )
    add_optimization_args(parser, **PAPER_DEFAULTS)
    add_loss_args(parser)
    add_ema_args(parser)
    add_checkpoint_args(parser)
    add_validation_args(parser, guidance_scale=9.0, inference_steps=25)
    parser.add_argument_group("validation").add_argument(
        "--validation_image",
        type=cli.existing_file,
        nargs="+",
        default=None,
        help="Control inputs sampled with --validation_prompt every --validation_steps: "
        "photos for canny (edges are taken), label or colour maps for segmentation, "
        "condition images for precomputed. Each becomes a row: control | samples | prompt.",
    )
    add_output_args(parser, default_output_dir="hra-control-model")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``); refuse the options
    of the adapter not chosen."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    check_adapter_options(build_parser, args, argv, HRA_ONLY_OPTIONS)
    return args


def check_args(args: argparse.Namespace) -> tuple[str, Any, Path | None, BucketSet | None]:
    """Every check that needs no model: fail early with a message naming problem and fix.

    Returns the resolved model path, the opened training data, the checkpoint to
    resume from (or ``None``) and the aspect-ratio buckets (``None`` without them).
    """
    check_common_args(args)
    check_cache_args(args)
    buckets = check_bucket_args(args) if args.aspect_ratio_buckets else None
    if not args.canny_low_threshold <= args.canny_high_threshold:
        fail(
            "Canny thresholds need 0 <= --canny_low_threshold <= --canny_high_threshold, got "
            f"{args.canny_low_threshold} and {args.canny_high_threshold}."
        )
    if bool(args.validation_image) != bool(args.validation_prompt):
        fail("Validation needs both --validation_image and --validation_prompt (or neither).")
    source = load_control_source(
        args.train_data_dir,
        args.data_format,
        args.condition_type,
        args.image_column,
        args.conditioning_image_column,
        args.caption_column,
    )
    model_path = resolve_model_path(
        args.pretrained_model_name_or_path, args.revision, args.base_config
    )
    check_base_family(model_path, args.revision, "sd", {"sd": "train/train_control_hra.py"})
    vae_config = diffusers.AutoencoderKL.load_config(
        model_path, subfolder="vae", revision=args.revision
    )
    vae_levels = len(vae_config["block_out_channels"])
    args.condition_encoder_channels = list(
        encoder_channels(args.condition_encoder_channels, vae_levels)
    )  # resolved, so a checkpoint records the widths and a resume compares them
    resume = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    check_resume_settings(resume, args)
    check_output_dir(
        args.output_dir, CONTROL_WEIGHTS_NAME, args.overwrite_output_dir, resume is not None
    )
    return model_path, source, resume, buckets


# --------------------------------------------------------------------------- models


def encoder_channels(given: list[int] | None, vae_levels: int) -> tuple[int, ...]:
    """``--condition_encoder_channels``, or (not given) the default widths for a VAE of
    ``vae_levels`` levels (downsampling ``2^(levels-1)``); :func:`fail` when the given widths
    downsample by another factor."""
    vae_factor = 2 ** (vae_levels - 1)
    fitting = default_encoder_channels(vae_factor)
    if given is None:
        return fitting
    if len(given) != len(fitting):
        fail(
            f"--condition_encoder_channels has {len(given)} widths, downsampling "
            f"{2 ** (len(given) - 1)}x, but the VAE downsamples {vae_factor}x; pass "
            f"{len(fitting)} widths (e.g. {' '.join(map(str, fitting))}) or leave it out."
        )
    return tuple(given)


def add_control(
    args: argparse.Namespace, unet: nn.Module, vae: diffusers.AutoencoderKL
) -> list[nn.Parameter]:
    """HRA (``--adapter lora``: LoRA) into the UNet, then the fp32 condition encoder after
    its input conv.

    Call after casting the frozen weights: adapters and encoder are created in fp32.
    Returns the trainable tensors.
    """
    channels = encoder_channels(args.condition_encoder_channels, len(vae.config.block_out_channels))
    if args.adapter == "lora":
        add_lora(unet, args.lora_rank, args.hra_target_modules)
    else:
        config = HRAConfig(target_modules=tuple(args.hra_target_modules), **hra_options(args))
        try:
            inject_hra(unet, config)
        except (ValueError, TypeError) as error:
            fail(f"cannot adapt the model: {error}")
    encoder = build_condition_encoder(unet, channels)
    attach_condition_encoder(unet, encoder.to(unet.device))
    return control_parameters(unet)


def optimizer_groups(args: argparse.Namespace, unet: nn.Module) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the UNet's adapter at ``--learning_rate`` and the
    condition encoder at ``--condition_encoder_lr`` (``--learning_rate`` when not given)."""
    adapter, encoder = control_parameter_groups(unet)
    encoder_lr = args.condition_encoder_lr or args.learning_rate
    return [{"params": adapter}, {"params": encoder, "lr": encoder_lr}]


def training_loss(
    batch: dict[str, Any],
    generator: torch.Generator,
    unet: nn.Module,
    text_encoder: transformers.CLIPTextModel,
    tokenizer: transformers.CLIPTokenizer,
    vae: diffusers.AutoencoderKL,
    noise_scheduler: diffusers.DDPMScheduler,
    args: argparse.Namespace,
    adapted: nn.Module,
    latents: InputCache | None = None,
    text: InputCache | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Noise-prediction MSE given caption and control image (+ λ · orthogonality loss),
    weighted with ``--snr_gamma`` / ``--debiased_estimation_loss``, at timesteps in
    ``[--min_timestep, --max_timestep)``.

    Every random draw (VAE sample, noise, timesteps) comes from ``generator``. ``latents``
    and ``text`` are the ``--cache_latents``/``--pre_compute_text_embeddings`` caches.
    """
    pixels = batch["pixel_values"]  # (B, 3, R, R) in [-1, 1]
    timestep_range = (args.min_timestep, args.max_timestep)
    noisy, timesteps, target = noisy_latents(
        pixels, vae, noise_scheduler, generator, args.noise_offset, latents, timestep_range
    )
    with torch.no_grad():
        ids = tokenize(tokenizer, batch["text"]).to(pixels.device)  # (B, 77)
        encoder_hidden_states = text(ids) if text is not None else text_encoder(ids)[0]
    cond = batch["conditioning_pixel_values"]  # (B, 3, R, R) in [0, 1]
    prediction = unet(noisy, timesteps, encoder_hidden_states, control_cond=cond).sample
    mse = diffusion_loss(
        prediction, target, timesteps, noise_scheduler, args.snr_gamma,
        debiased=args.debiased_estimation_loss,
    )  # fmt: skip
    parts = {"mse_loss": mse}
    loss = parts["mse_loss"]
    if args.hra_lambda > 0:
        parts["orth_loss"] = orthogonality_loss(adapted)
        loss = loss + args.hra_lambda * parts["orth_loss"]
    return loss, {name: value.detach().item() for name, value in parts.items()}


# --------------------------------------------------------------------------- validation


def prompt_panel(prompt: str, size: int) -> Image.Image:
    """A white square with ``prompt`` written on it, wrapped to its width."""
    panel = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(panel)
    font = ImageFont.load_default(size=max(8, size // 16))
    lines, line = [], ""
    for word in prompt.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > size - 8:
            lines.append(line)
            trial = word
        line = trial
    draw.multiline_text((4, 4), "\n".join(lines + [line]), fill="black", font=font)
    return panel


def validation_rows(
    args: argparse.Namespace,
    accelerator: Accelerator,
    unet: nn.Module,
    text_encoder: transformers.CLIPTextModel,
    tokenizer: transformers.CLIPTokenizer,
    vae: diffusers.AutoencoderKL,
    model_path: str,
) -> list[Image.Image]:
    """One row per ``--validation_image``: control | samples | prompt (fixed seed)."""
    scheduler = diffusers.DPMSolverMultistepScheduler.from_pretrained(
        model_path, subfolder="scheduler", revision=args.revision
    )
    from hra_diffusion.pipelines import StableDiffusionHRAControlPipeline  # a heavy import

    pipe = StableDiffusionHRAControlPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for path in args.validation_image:
        control = validation_condition(
            path,
            args.condition_type,
            args.resolution,
            args.canny_low_threshold,
            args.canny_high_threshold,
        )
        with accelerator.autocast():
            samples = pipe(
                args.validation_prompt,
                image=control,
                num_inference_steps=args.num_validation_inference_steps,
                guidance_scale=args.validation_guidance_scale,
                num_images_per_prompt=args.num_validation_images,
                generator=torch.Generator().manual_seed(args.seed),
            ).images
        tiles = [control, *samples, prompt_panel(args.validation_prompt, args.resolution)]
        row = Image.new("RGB", (args.resolution * len(tiles), args.resolution))
        for i, tile in enumerate(tiles):
            row.paste(tile, (i * args.resolution, 0))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- main


@cli.cli_main()
def main(argv: list[str] | None = None) -> Path:
    """Train; returns the path of the weights file written."""
    args = parse_args(argv)
    model_path, source, resume, buckets = check_args(args)
    accelerator = make_accelerator(args)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(args.output_dir)

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(
        model_path, args.revision, single_file_of(args)
    )
    if accelerator.is_main_process:
        validation = [args.validation_prompt] if args.validation_prompt else []
        warn_truncated_prompts(tokenizer, [*source.captions(), *validation], "caption")
    args.prediction_type = set_prediction_type(noise_scheduler, args.prediction_type)
    args.max_timestep = timestep_upper_bound(noise_scheduler, args.min_timestep, args.max_timestep)
    dtype = weight_dtype(accelerator)
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
        if dtype != torch.float32:
            model.to(dtype=dtype)
    set_seed(args.seed)  # identical adapter and encoder initialisation on every run and rank
    params = add_control(args, unet, vae)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.torch_compile:
        unet.compile(fullgraph=True)  # in place: module names and weights files unchanged
    register_trainable_state_hooks(accelerator)

    dataset = ControlDataset(
        source,
        args.condition_type,
        args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        proportion_empty_prompts=args.proportion_empty_prompts,
        canny_low_threshold=args.canny_low_threshold,
        canny_high_threshold=args.canny_high_threshold,
        buckets=buckets,
    )
    sampler = epoch_sampler(
        dataset.item_buckets, args.train_batch_size, args.seed, args.aspect_ratio_buckets
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate_control,
        num_workers=args.dataloader_num_workers,
    )
    optimizer = make_optimizer(optimizer_groups(args, unet), args, no_decay=hra_magnitudes(unet))
    batches_per_epoch = -(-len(sampler) // (args.train_batch_size * accelerator.num_processes))
    steps_per_epoch = -(-batches_per_epoch // args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    num_epochs = -(-args.max_train_steps // steps_per_epoch)
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator.num_processes)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, dataloader, lr_scheduler
    )
    adapted = accelerator.unwrap_model(unet)
    ema = EMA.of({"unet": adapted}, args.ema_decay) if args.use_ema else None
    latent_store = latent_cache(vae) if args.cache_latents else None
    text_store = text_embedding_cache(text_encoder) if args.pre_compute_text_embeddings else None

    global_step = 0
    if resume is not None:
        global_step = load_checkpoint(accelerator, resume)["global_step"]
        if ema is not None:
            ema.load(Path(resume) / EMA_STATE_NAME)
        logger.info(f"Resumed from {resume} at step {global_step}", main_process_only=True)
    if accelerator.is_main_process:
        accelerator.init_trackers("hra-control", config=tracker_config(args))
        curves = TrainingCurves(args.output_dir, global_step)
    print_summary(
        accelerator,
        f"{'LoRA' if args.adapter == 'lora' else 'HRA'} controllable training",
        {
            "base model": model_path,
            "condition type": args.condition_type,
            "examples": len(dataset),
            "trainable parameters": f"{count_parameters(params):,}",
            "batch size (total)": args.train_batch_size
            * accelerator.num_processes
            * args.gradient_accumulation_steps,
            "optimisation steps": args.max_train_steps,
            "epochs": num_epochs,
            "resumed at step": global_step,
            "output": args.output_dir,
        },
    )

    def write_weights(folder: Path) -> None:
        if ema is not None:
            with ema.applied():
                save_control_weights(folder / ema_weights_name(CONTROL_WEIGHTS_NAME), adapted)
        save_control_weights(folder, adapted)

    def write_checkpoint_files(folder: Path) -> None:
        write_weights(folder)
        if ema is not None:
            ema.save(folder / EMA_STATE_NAME)

    def validate(step: int) -> None:
        if not args.validation_image or not accelerator.is_main_process:
            return
        with ema.applied() if ema is not None else contextlib.nullcontext():
            rows = validation_rows(
                args, accelerator, adapted, text_encoder, tokenizer, vae, model_path
            )
        folder = Path(args.output_dir) / "validation" / f"step-{step}"
        save_validation_images(accelerator, rows, folder, step)

    bar = progress_bar(accelerator, args.max_train_steps, initial=global_step)
    start = time.time()
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    unet.train()
    for epoch in range(first_epoch, num_epochs):
        dataloader.set_epoch(epoch)
        skip = skip_batches if epoch == first_epoch else 0
        batches = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch_index, batch in enumerate(batches, start=skip):
            generator = step_generator(args.seed, epoch, batch_index, accelerator.process_index)
            with accelerator.accumulate(unet):
                loss, parts = training_loss(
                    batch,
                    generator,
                    unet,
                    text_encoder,
                    tokenizer,
                    vae,
                    noise_scheduler,
                    args,
                    adapted,
                    latent_store,
                    text_store,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.update()
            bar.update(1)
            logs = {"loss": loss.detach().item(), **parts, "lr": lr_scheduler.get_last_lr()[0]}
            bar.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=global_step)
            if accelerator.is_main_process:
                curves.log(global_step, logs["loss"], logs["lr"])
            if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
                save_checkpoint(
                    accelerator,
                    args.output_dir,
                    global_step,
                    args.seed,
                    args.checkpoints_total_limit,
                    write_extra=write_checkpoint_files,
                    settings=shape_settings(args),
                )
            if global_step % args.validation_steps == 0:
                validate(global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    bar.close()

    accelerator.wait_for_everyone()
    weights = Path(args.output_dir) / CONTROL_WEIGHTS_NAME
    if accelerator.is_main_process:
        write_weights(Path(args.output_dir))
        pictures = [f"![{name}]({path.name})" for name, path in curves.draw().items()]
        features = "\n".join(["## Training features", "", *format_training_features(args)])
        table = "\n".join(["## Training arguments", "", format_args_table(args)])
        (Path(args.output_dir) / "training_args.md").write_text(
            "\n\n".join(["## Training curves", *pictures, features, table]) + "\n"
        )
        if global_step % args.validation_steps:
            validate(global_step)
        print_summary(
            accelerator,
            "Done",
            {
                "weights": weights,
                "steps": global_step,
                "time": format_duration(time.time() - start),
            },
        )
    accelerator.end_training()
    return weights


if __name__ == "__main__":
    main()
