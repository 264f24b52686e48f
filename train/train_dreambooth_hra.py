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
load it with ``load_hra_weights(pipe, "out/")``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
)
from torch import nn
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_TARGETS,
    HRAConfig,
    export_lora,
    hra_parameters,
    inject_hra,
    orthogonality_loss,
    save_hra_weights,
)
from hra_diffusion.lora_export import KOHYA_WEIGHTS_NAME, LORA_WEIGHTS_NAME
from hra_diffusion.serialization import WEIGHTS_NAME
from hra_diffusion.train.common import (
    EMA,
    EMA_STATE_NAME,
    TrainingCurves,
    add_bucket_args,
    add_checkpoint_args,
    add_ema_args,
    add_hra_args,
    add_image_args,
    add_loss_args,
    add_model_args,
    add_optimization_args,
    add_output_args,
    add_validation_args,
    check_common_args,
    check_output_dir,
    count_parameters,
    diffusion_loss,
    ema_weights_name,
    fail,
    find_resume_checkpoint,
    format_args_table,
    format_duration,
    format_training_features,
    load_checkpoint,
    load_models,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    mix_seed,
    noisy_latents,
    non_negative_float,
    positive_int,
    print_summary,
    progress_bar,
    register_trainable_state_hooks,
    remove_stale_temp_dirs,
    resolve_model_path,
    save_checkpoint,
    save_validation_images,
    set_prediction_type,
    step_generator,
    tokenize,
    tracker_config,
    weight_dtype,
)
from hra_diffusion.train.data import (
    IMAGE_EXTENSIONS,
    BucketSet,
    DreamBoothDataset,
    check_bucket_args,
    check_masks,
    class_bucket_quota,
    collate_dreambooth,
    epoch_sampler,
    image_size,
    read_captions,
    scan_image_folder,
    select_class_images,
)

logger = get_logger(__name__)

CLASS_GENERATION_STEPS = 25
"""DPM-Solver steps per generated class image (guidance 7.5)."""


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: diffusers' DreamBooth-LoRA options plus the HRA ones."""
    parser = argparse.ArgumentParser(
        description="DreamBooth fine-tuning of Stable Diffusion with HRA adapters. The defaults "
        "are the paper's Stable Diffusion 1.5 recipe (lr 1e-4, r 8, attention projections); "
        "the bundled default model, a tiny SD, learns with the settings in "
        "examples/world_dreambooth.args (lr 3e-3, r 16, attention, feed-forward and ResNet "
        "convolutions, 800 steps at 64 px). Options can also be read from a file, one per "
        "line: @FILE (e.g. @examples/world_dreambooth.args).",
        fromfile_prefix_chars="@",
    )
    add_model_args(parser)
    group = parser.add_argument_group("subject and prior preservation")
    group.add_argument(
        "--instance_data_dir",
        required=True,
        help="Folder with the subject's pictures (3-5 are typical); non-images are skipped.",
    )
    group.add_argument(
        "--instance_prompt",
        required=True,
        help='Prompt naming the subject with a rare identifier, e.g. "a photo of qwe dog".',
    )
    group.add_argument(
        "--caption_extension",
        default=None,
        help="Read each picture's prompt from the file beside it with this extension "
        '(kohya\'s convention: dog1.png -> dog1.txt for ".txt"), e.g. "a photo of qwe dog on '
        'a beach"; naming what is not the subject helps it move to new scenes. Every picture '
        "needs one. Default: --instance_prompt for every picture.",
    )
    group.add_argument(
        "--with_prior_preservation",
        action="store_true",
        help="Also train on class images (generated by the base model when missing) so the "
        "model keeps its idea of the class.",
    )
    group.add_argument(
        "--class_prompt",
        default=None,
        help='Prompt of the subject\'s class, e.g. "a photo of dog" (prior preservation).',
    )
    group.add_argument(
        "--class_data_dir",
        default=None,
        help="Folder of class images; missing ones are generated into it and reused by later "
        "runs. Required with --with_prior_preservation.",
    )
    group.add_argument(
        "--prior_loss_weight",
        type=non_negative_float,
        default=1.0,
        help="Weight of the class-image loss. Default: 1.0.",
    )
    group.add_argument(
        "--num_class_images",
        type=positive_int,
        default=100,
        help="Class images to train with; missing ones are generated. The paper uses 200. "
        "Default: 100.",
    )
    group.add_argument(
        "--sample_batch_size",
        type=positive_int,
        default=4,
        help="Batch size when generating class images. Default: 4.",
    )
    add_image_args(parser, default_resolution=512)
    add_bucket_args(parser)
    group = parser.add_argument_group("masked loss")
    group.add_argument(
        "--masked_loss",
        action="store_true",
        help="Weight the instance loss per pixel by a mask (white: train, black: ignore), "
        "from --alpha_mask or --mask_data_dir; the prior-preservation loss stays unmasked.",
    )
    group.add_argument(
        "--alpha_mask",
        action="store_true",
        help="Masks are the instance images' alpha channels (kohya's name); images without "
        "alpha train everywhere. Needs --masked_loss.",
    )
    group.add_argument(
        "--mask_data_dir",
        default=None,
        help="Folder with one mask per instance image, of its size and file stem "
        "(dog1.jpg -> dog1.png), read as grey levels. Needs --masked_loss.",
    )
    add_hra_args(parser, UNET_ATTENTION_TARGETS)
    group = parser.add_argument_group("text encoder")
    group.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Adapt the CLIP text encoder with HRA too (--hra_text_encoder_target_modules).",
    )
    group.add_argument(
        "--hra_text_encoder_target_modules",
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
    add_output_args(parser, default_output_dir="hra-dreambooth-model")
    parser.add_argument(
        "--export_lora",
        action="store_true",
        help=f"Also write the exactly equivalent LoRA file {LORA_WEIGHTS_NAME} "
        "(pipe.load_lora_weights(output_dir) loads it in plain diffusers).",
    )
    parser.add_argument(
        "--output_kohya_format",
        action="store_true",
        help=f"Also write the exact LoRA in kohya's keys, {KOHYA_WEIGHTS_NAME}, for ComfyUI, "
        "AUTOMATIC1111, Forge and kohya sd-scripts (diffusers' flag name).",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


@dataclass
class Inputs:
    """What :func:`check_args` found: everything needed before any model loads."""

    model_path: str
    instance_images: list[Path]
    instance_prompts: list[str]
    resume: Path | None
    buckets: BucketSet
    masks: list[Path] | None


def check_args(args: argparse.Namespace) -> Inputs:
    """Every check that needs no model: fail early with a message naming problem and fix."""
    check_common_args(args)
    buckets = check_bucket_args(args)
    if args.with_prior_preservation:
        if not args.class_prompt:
            fail(
                "--with_prior_preservation needs --class_prompt, e.g. "
                '--class_prompt "a photo of dog" (the instance prompt without the identifier).'
            )
        if not args.class_data_dir:
            fail(
                "--with_prior_preservation needs --class_data_dir, a folder to keep the class "
                "images in (created and filled if empty)."
            )
    captions = (args.caption_extension,) if args.caption_extension else ()
    instance_images = scan_image_folder(args.instance_data_dir, "--instance_data_dir", captions)
    instance_prompts = read_captions(instance_images, args.caption_extension, args.instance_prompt)
    masks = check_masks(instance_images, args.masked_loss, args.alpha_mask, args.mask_data_dir)
    if args.with_prior_preservation:
        existing_class_images(Path(args.class_data_dir))  # fails on broken images now
    resume = find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    check_output_dir(args.output_dir, WEIGHTS_NAME, args.overwrite_output_dir, resume is not None)
    model_path = resolve_model_path(args.pretrained_model_name_or_path, args.revision)
    return Inputs(model_path, instance_images, instance_prompts, resume, buckets, masks)


def existing_class_images(folder: Path) -> list[Path]:
    """Decodable images already in the class folder (none if it is missing or empty)."""
    if not folder.is_dir():
        return []
    if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir()):
        return []
    return scan_image_folder(folder, "--class_data_dir")


# --------------------------------------------------------------------------- class images


def generate_class_images(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model_path: str,
    instance_images: list[Path],
    buckets: BucketSet,
) -> list[Path]:
    """Fill ``--class_data_dir`` up to ``--num_class_images`` with base-model samples.

    Class images follow the instance images' buckets (:func:`class_bucket_quota`); the
    ones a bucket lacks are generated at its size. The main process generates (batched,
    seeded per image, each file written atomically); the others wait. Returns the class
    images to train on.
    """
    folder = Path(args.class_data_dir)
    quota = class_bucket_quota(
        [buckets.nearest(image_size(p)) for p in instance_images], args.num_class_images
    )
    _, missing = select_class_images(existing_class_images(folder), buckets, quota)
    if missing and accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        on_gpu = accelerator.device.type == "cuda"
        pipe = StableDiffusionPipeline.from_pretrained(
            model_path, revision=args.revision, safety_checker=None, requires_safety_checker=False
        ).to(accelerator.device, weight_dtype(accelerator) if on_gpu else torch.float32)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        free = (i for i in itertools.count() if not (folder / f"generated-{i:05d}.png").exists())
        total = sum(missing.values())
        accelerator.print(f"Generating {total} class images into {folder}")
        with tqdm(total=total, desc="Class images") as bar:
            for (width, height), count in missing.items():
                numbers = list(itertools.islice(free, count))
                for start in range(0, count, args.sample_batch_size):
                    batch = numbers[start : start + args.sample_batch_size]
                    seeds = [mix_seed(args.seed, i) for i in batch]
                    images = pipe(
                        [args.class_prompt] * len(batch),
                        height=height,
                        width=width,
                        num_inference_steps=CLASS_GENERATION_STEPS,
                        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                    ).images
                    for i, image in zip(batch, images, strict=True):
                        tmp = folder / f".generated-{i:05d}.tmp.png"
                        image.save(tmp)
                        os.replace(tmp, folder / f"generated-{i:05d}.png")
                    bar.update(len(batch))
        del pipe
        if on_gpu:
            torch.cuda.empty_cache()
    accelerator.wait_for_everyone()
    return select_class_images(existing_class_images(folder), buckets, quota)[0]


# --------------------------------------------------------------------------- models


def inject_adapters(
    args: argparse.Namespace, unet: nn.Module, text_encoder: nn.Module
) -> list[nn.Parameter]:
    """Inject HRA into the UNet (and the text encoder); return the trainable tensors.

    Call after casting the frozen weights: the new adapters are created in fp32.
    """
    common = {"r": args.hra_r, "apply_gs": args.hra_apply_gs, "lambda_orth": args.hra_lambda}
    try:
        inject_hra(unet, HRAConfig(target_modules=tuple(args.hra_target_modules), **common))
        text_encoder.requires_grad_(False)
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


@dataclass
class Models:
    """What a training step needs. ``unet``/``text_encoder`` may be accelerate-wrapped;
    ``adapted`` are the unwrapped modules holding HRA layers (for the regulariser)."""

    unet: nn.Module
    text_encoder: nn.Module
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    adapted: list[nn.Module]
    ema: EMA | None = None

    def save_weights(self, folder: Path) -> Path:
        """``<folder>/hra_weights.safetensors`` with the UNet (and text-encoder) adapters,
        and with ``--use_ema`` their averages as ``hra_weights_ema.safetensors``."""
        if self.ema is not None:
            with self.ema.applied():
                save_hra_weights(folder / ema_weights_name(WEIGHTS_NAME), *self.adapted)
        return save_hra_weights(folder, *self.adapted)  # (unet, [text_encoder])

    def save_checkpoint_files(self, folder: Path) -> None:
        """What a checkpoint holds beyond accelerate's state: the loadable weights and,
        with ``--use_ema``, the averages to resume from."""
        self.save_weights(folder)
        if self.ema is not None:
            self.ema.save(folder / EMA_STATE_NAME)

    def validation_weights(self) -> contextlib.AbstractContextManager:
        """The block runs with the EMA weights under ``--use_ema``, else with the trained ones."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()


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
    noisy, timesteps, target = noisy_latents(
        pixels, models.vae, scheduler, generator, args.noise_offset
    )
    with torch.set_grad_enabled(args.train_text_encoder):
        encoder_hidden_states = models.text_encoder(batch["input_ids"])[0]  # (B, 77, D)
    prediction = models.unet(noisy, timesteps, encoder_hidden_states).sample
    parts: dict[str, torch.Tensor] = {}
    if args.with_prior_preservation:
        prediction, prior_prediction = prediction.chunk(2)
        target, prior_target = target.chunk(2)
        timesteps, prior_timesteps = timesteps.chunk(2)
        parts["prior_loss"] = diffusion_loss(
            prior_prediction, prior_target, prior_timesteps, scheduler, args.snr_gamma
        )
    parts["instance_loss"] = diffusion_loss(
        prediction, target, timesteps, scheduler, args.snr_gamma, batch.get("masks")
    )
    loss = parts["instance_loss"]
    if args.with_prior_preservation:
        loss = loss + args.prior_loss_weight * parts["prior_loss"]
    if args.hra_lambda > 0:
        parts["orth_loss"] = sum(orthogonality_loss(m) for m in models.adapted)
        loss = loss + args.hra_lambda * parts["orth_loss"]
    return loss, {name: value.detach().item() for name, value in parts.items()}


# --------------------------------------------------------------------------- validation and output


def run_validation(
    args: argparse.Namespace,
    accelerator: Accelerator,
    models: Models,
    tokenizer: CLIPTokenizer,
    dtype: torch.dtype,
    global_step: int,
) -> Path:
    """Sample ``--num_validation_images`` for each ``--validation_prompt`` (seed ``--seed``).

    Main process only; with ``--use_ema`` the EMA weights draw them. Images and a grid (a
    row per prompt) go to ``<output_dir>/validation/step-<step>/``; returns the grid's path.
    """
    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=accelerator.unwrap_model(models.text_encoder),
        tokenizer=tokenizer,
        unet=accelerator.unwrap_model(models.unet),
        scheduler=DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config),
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


def export_lora_files(args: argparse.Namespace, model_path: str) -> dict[str, Path]:
    """Write the exact LoRA files asked for next to the HRA weights (main process)."""
    base = StableDiffusionPipeline.from_pretrained(
        model_path, revision=args.revision, safety_checker=None, requires_safety_checker=False
    )
    files = {}
    if args.export_lora:
        files["LoRA export"] = export_lora(args.output_dir, base, args.output_dir)
    if args.output_kohya_format:
        files["kohya LoRA export"] = export_lora(args.output_dir, base, args.output_dir, kohya=True)
    return files


def write_model_card(
    args: argparse.Namespace, model_path: str, trainable: int, files: dict[str, Path]
) -> Path:
    """``<output_dir>/README.md``: base model, prompts, how to load, every argument."""
    out = Path(args.output_dir)
    base = args.pretrained_model_name_or_path or f"the bundled tiny model ({model_path})"
    components = "UNet and CLIP text encoder" if args.train_text_encoder else "UNet"
    lines = [
        "# HRA DreamBooth adapter",
        "",
        f"Householder Reflection Adaptation (HRA) of **{base}** on the {components}, trained "
        f"with DreamBooth on `{args.instance_data_dir}`.",
        "",
        f"- instance prompt: `{args.instance_prompt}`"
        + (f" (per picture: `*{args.caption_extension}` files)" if args.caption_extension else ""),
        f"- class prompt: `{args.class_prompt}` (prior preservation: "
        f"{'on' if args.with_prior_preservation else 'off'})",
        f"- HRA: r={args.hra_r}, apply_gs={args.hra_apply_gs}, lambda={args.hra_lambda:g}, "
        f"targets `{' '.join(args.hra_target_modules)}`",
        f"- trainable parameters: {trainable:,}",
        f"- steps: {args.max_train_steps}, resolution {args.resolution}, "
        f"learning rate {args.learning_rate:g}",
        "",
        "## Training features",
        "",
        *format_training_features(args),
        "",
        "## Use it",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "from hra_diffusion import load_hra_weights, merge_hra",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{model_path}")',
        *(
            ['pipe.scheduler.register_to_config(prediction_type="v_prediction")']
            if args.prediction_type == "v_prediction"
            else []
        ),
        f'load_hra_weights(pipe, "{out}")'
        + (f'  # or "{out}/{ema_weights_name(WEIGHTS_NAME)}": the EMA' if args.use_ema else ""),
        "merge_hra(pipe)  # optional: no extra cost per step afterwards",
        f'image = pipe("{args.instance_prompt}").images[0]',
        "```",
    ]
    if "LoRA export" in files:
        lines += [
            "",
            f'Plain diffusers, without hra-diffusion: `pipe.load_lora_weights("{out}")` '
            f"loads `{LORA_WEIGHTS_NAME}`, the exactly equivalent LoRA.",
        ]
    if "kohya LoRA export" in files:
        lines += [
            "",
            f"ComfyUI, AUTOMATIC1111, Forge: `{KOHYA_WEIGHTS_NAME}` is the same LoRA in kohya's "
            "keys (exact on this base only; for HRA on any base export GLoRA with "
            f"`python -m hra_diffusion.export --format glora --weights {out} "
            f"--output {out}/hra_glora.safetensors`).",
        ]
    lines += ["", "## Training curves", ""]
    lines += [f"![{name}]({files[name].name})" for name in ("loss curve", "learning-rate curve")]
    if "validation grid" in files:
        lines += ["", "## Last validation", "", f"![validation]({files['validation grid'].name})"]
    lines += ["", "## Files", ""] + [f"- `{p.name}`: {k}" for k, p in files.items()]
    lines += ["", "## Training arguments", "", format_args_table(args), ""]
    card = out / "README.md"
    tmp = out / ".README.md.tmp"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, card)
    return card


# --------------------------------------------------------------------------- main


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
            args, accelerator, model_path, inputs.instance_images, inputs.buckets
        )

    # Models: frozen weights in the training dtype, then fp32 HRA adapters.
    dtype = weight_dtype(accelerator)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_models(model_path, args.revision)
    args.prediction_type = set_prediction_type(noise_scheduler, args.prediction_type)
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

    # Data: the order and augmentation of every epoch are fixed by (seed, epoch).
    dataset = DreamBoothDataset(
        inputs.instance_images,
        tokenize(tokenizer, inputs.instance_prompts),
        args.resolution,
        args.center_crop,
        args.random_flip,
        class_images,
        tokenize(tokenizer, [args.class_prompt])[0] if class_images else None,
        inputs.buckets,
        inputs.masks,
        args.alpha_mask,
    )
    sampler = epoch_sampler(
        dataset.item_buckets, args.train_batch_size, args.seed, args.aspect_ratio_buckets
    )
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        collate_fn=collate_dreambooth,
        num_workers=args.dataloader_num_workers,
    )
    dataloader = accelerator.prepare(dataloader)
    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / updates_per_epoch)

    optimizer = make_optimizer(params, args)
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
    adapted = list(map(accelerator.unwrap_model, trained))
    components = dict(zip(["unet", "text_encoder"], adapted, strict=False))
    ema = EMA.of(components, args.ema_decay) if args.use_ema else None
    models = Models(unet, text_encoder, vae, noise_scheduler, adapted, ema)
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-hra", config=tracker_config(args))

    global_step = 0
    if resume is not None:
        state = load_checkpoint(accelerator, resume)
        global_step = state["global_step"]
        if ema is not None:
            ema.load(Path(resume) / EMA_STATE_NAME)
        if state["seed"] != args.seed:
            logger.warning(
                f"{resume} was trained with --seed {state['seed']}, this run uses {args.seed}: "
                "the continuation will not repeat the interrupted run exactly."
            )
        accelerator.print(f"Resumed from {resume} at step {global_step}.")
    first_epoch = global_step // updates_per_epoch
    skip_batches = (global_step % updates_per_epoch) * args.gradient_accumulation_steps
    curves = TrainingCurves(out, global_step) if accelerator.is_main_process else None

    bar = progress_bar(accelerator, args.max_train_steps, global_step)
    loss_value, parts, last_grid, validated_at = float("nan"), {}, None, -1
    for epoch in range(first_epoch, args.num_train_epochs):
        if global_step >= args.max_train_steps:
            break
        for model in trained:
            model.train()
        offset = skip_batches if epoch == first_epoch else 0
        loader = accelerator.skip_first_batches(dataloader, offset) if offset else dataloader
        loader.set_epoch(epoch)
        for index, batch in enumerate(loader, start=offset):
            with accelerator.accumulate(*trained):
                generator = step_generator(args.seed, epoch, index, accelerator.process_index)
                loss, parts = training_loss(batch, generator, models, args)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if ema is not None:
                ema.update()
            loss_value, lr = loss.item(), lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": loss_value, "lr": lr, **parts}, step=global_step)
            if curves is not None:
                curves.log(global_step, loss_value, lr)
            if global_step % args.checkpointing_steps == 0:
                save_checkpoint(
                    accelerator,
                    out,
                    global_step,
                    args.seed,
                    args.checkpoints_total_limit,
                    models.save_checkpoint_files,
                )
            if args.validation_prompt and global_step % args.validation_steps == 0:
                if accelerator.is_main_process:
                    last_grid = run_validation(
                        args, accelerator, models, tokenizer, dtype, global_step
                    )
                    validated_at = global_step
                accelerator.wait_for_everyone()
            if global_step >= args.max_train_steps:
                break
    bar.close()

    # Final files, written by the main process only.
    accelerator.wait_for_everyone()
    files: dict[str, Path] = {}
    if accelerator.is_main_process:
        files["HRA weights"] = models.save_weights(out)
        if args.use_ema:
            files["EMA of the HRA weights"] = out / ema_weights_name(WEIGHTS_NAME)
        files.update(curves.draw())
        if args.validation_prompt and validated_at != global_step:
            last_grid = run_validation(args, accelerator, models, tokenizer, dtype, global_step)
        if last_grid is not None:
            files["validation grid"] = out / "validation_grid.png"
            shutil.copyfile(last_grid, files["validation grid"])
        if args.export_lora or args.output_kohya_format:
            files.update(export_lora_files(args, model_path))
        files["model card"] = write_model_card(args, model_path, trainable, files)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    elapsed = time.perf_counter() - started
    checkpoints = sorted(out.glob("checkpoint-*"))
    print_summary(
        accelerator,
        "DreamBooth HRA training finished",
        {
            "steps": f"{global_step} / {args.max_train_steps}",
            "time": format_duration(elapsed),
            "trainable parameters": f"{trainable:,}",
            "final loss": f"{loss_value:.4f}",
            **{name: str(path) for name, path in files.items()},
            "checkpoints": ", ".join(p.name for p in checkpoints) or "none",
            "logs": str(out / args.logging_dir) if args.report_to != "none" else "off",
        },
    )
    return {
        "global_step": global_step,
        "loss": loss_value,
        "losses": parts,
        "trainable_parameters": trainable,
        "elapsed_s": elapsed,
        "files": files,
    }


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    main()
