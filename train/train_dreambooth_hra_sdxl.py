"""DreamBooth with HRA on Stable Diffusion XL: teach SDXL a subject from a few pictures.

Same arguments as diffusers' ``train_dreambooth_lora_sdxl.py`` where they apply, plus the
HRA options and everything ``train_dreambooth_hra.py`` (SD 1.x) has; the two share their
code in :mod:`hra_diffusion.train.dreambooth`. Run it with ``accelerate launch`` on GPUs,
or with ``python`` on CPU::

    accelerate launch train/train_dreambooth_hra_sdxl.py \\
        --pretrained_model_name_or_path ./stable-diffusion-xl-base-1.0 \\
        --instance_data_dir ./my_dog --instance_prompt "a photo of qwe dog" \\
        --resolution 1024 --mixed_precision bf16 --output_dir out-sdxl/

SDXL conditions the UNet on both text encoders (penultimate hidden states side by side),
the pooled embedding of the second, and six time ids per image: its original size, the
top-left corner of the training crop and the target size, recorded by the dataset for
every picture (crops and flips included). The VAE stays in fp32. Without
``--pretrained_model_name_or_path`` a tiny random SDXL (:mod:`hra_diffusion.world.tiny_sdxl`)
is used. The result is ``<output_dir>/hra_weights.safetensors``; load it with
``load_hra_weights(pipe, "out-sdxl/")`` into a ``StableDiffusionXLPipeline``.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from dataclasses import dataclass
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
from hra_diffusion.injection import hra_magnitudes
from hra_diffusion.single_file import load_single_file
from hra_diffusion.train.arg_checks import check_cache_args, single_file_of
from hra_diffusion.train.args import (
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
from hra_diffusion.train.cache import InputCache, latent_cache
from hra_diffusion.train.checkpoints import register_trainable_state_hooks, remove_stale_temp_dirs
from hra_diffusion.train.dreambooth import (
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
    count_parameters,
    hra_options,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    tokenize,
    weight_dtype,
)
from hra_diffusion.world.tiny_sdxl import default_sdxl_path

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
"""SDXL's text-encoder components, in the order their hidden states are concatenated."""

SDXL_MODEL_HELP = (
    "Stable Diffusion XL pipeline: a local diffusers folder (with model_index.json) or a hub "
    "id such as stabilityai/stable-diffusion-xl-base-1.0 (needs network or a filled hub "
    "cache), or a single-file .safetensors checkpoint (A1111/ComfyUI layout) with "
    "--base_config. Default: the tiny random SDXL of hra_diffusion.world.tiny_sdxl (runs "
    "anywhere)."
)


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser: diffusers' SDXL DreamBooth-LoRA options plus the HRA ones."""
    parser = cli.ArgumentParser(
        description="DreamBooth fine-tuning of Stable Diffusion XL with HRA adapters. Options "
        "can also be read from a file, one per line: @FILE.",
        fromfile_prefix_chars="@",
    )
    add_model_args(parser, SDXL_MODEL_HELP)
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=cli.component_ref,
        default=None,
        help="A VAE to use instead of the pipeline's (a folder with the VAE's config.json, or "
        "a hub id such as madebyollin/sdxl-vae-fp16-fix). It is kept in fp32 either way.",
    )
    add_dreambooth_args(parser)
    add_image_args(parser, default_resolution=1024)
    add_cache_args(parser)
    add_bucket_args(parser)
    add_hra_args(parser, UNET_ATTENTION_TARGETS)
    group = parser.add_argument_group("text encoders")
    group.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Adapt both CLIP text encoders with HRA too (--hra_text_encoder_target_modules).",
    )
    group.add_argument(
        "--hra_text_encoder_target_modules",
        type=cli.text,
        nargs="+",
        default=list(TEXT_ENCODER_ATTENTION_TARGETS),
        help="Modules of both text encoders adapted with --train_text_encoder. "
        f"Default: {' '.join(TEXT_ENCODER_ATTENTION_TARGETS)}.",
    )
    group.add_argument(
        "--text_encoder_lr",
        type=cli.positive_float,
        default=None,
        help="Learning rate of the text-encoder adapters (needs --train_text_encoder). "
        "Default: --learning_rate.",
    )
    add_optimization_args(parser, learning_rate=1e-4)
    add_loss_args(parser)
    add_ema_args(parser)
    add_checkpoint_args(parser)
    add_validation_args(parser, guidance_scale=5.0, several_prompts=True)
    add_dreambooth_output_args(parser, default_output_dir="hra-dreambooth-sdxl-model")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line (``argv`` defaults to ``sys.argv[1:]``)."""
    return build_parser().parse_args(argv)


def check_args(args: argparse.Namespace) -> Inputs:
    """Every check that needs no model; an SD 1.x base is refused (use the SD 1.x script)."""
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        fail("--text_encoder_lr needs --train_text_encoder (it sets the text encoders' rate).")
    check_cache_args(args)
    vae = args.pretrained_vae_model_name_or_path
    if vae is not None and Path(vae).expanduser().is_dir():
        if not (Path(vae).expanduser() / "config.json").is_file():
            fail(
                f"--pretrained_vae_model_name_or_path {vae} has no config.json; pass the VAE's "
                "own folder (e.g. <pipeline>/vae), not the pipeline's."
            )
    inputs = check_dreambooth_args(args, "sdxl", default_sdxl_path)
    if args.resolution % 64:
        warnings.warn(
            f"--resolution {args.resolution} is not a multiple of 64: SDXL was trained on "
            "multiples of 64 (1024 is its native size); other multiples of 8 run (its UNet pads "
            "latent sides its two down-samplings do not divide) but are off that distribution.",
            stacklevel=2,
        )
    return inputs


# --------------------------------------------------------------------------- models


@dataclass
class SDXLBase:
    """The frozen parts of an SDXL pipeline that training uses."""

    tokenizers: list[transformers.CLIPTokenizer]
    text_encoders: list[nn.Module]
    vae: diffusers.AutoencoderKL
    unet: diffusers.UNet2DConditionModel
    noise_scheduler: diffusers.DDPMScheduler


def load_vae(args: argparse.Namespace, model_path: str) -> diffusers.AutoencoderKL:
    """``--pretrained_vae_model_name_or_path``, or the pipeline's own VAE."""
    if args.pretrained_vae_model_name_or_path is not None:
        return diffusers.AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path)
    return diffusers.AutoencoderKL.from_pretrained(
        model_path, subfolder="vae", revision=args.revision
    )


def load_sdxl_base(args: argparse.Namespace, model_path: str) -> SDXLBase:
    """Tokenizers, text encoders, VAE, UNet and training noise scheduler; checks that the
    VAE's latents fit the UNet. A single-file checkpoint loads through its pipeline."""
    kw: dict[str, Any] = {"revision": args.revision}
    single_file = single_file_of(args)
    pipe = None if single_file is None else load_base_pipeline(args, model_path)
    base = SDXLBase(
        [
            transformers.CLIPTokenizer.from_pretrained(model_path, subfolder=f"tokenizer{s}", **kw)
            for s in ("", "_2")
        ],
        [pipe.text_encoder, pipe.text_encoder_2]
        if pipe is not None
        else [
            transformers.CLIPTextModel.from_pretrained(model_path, subfolder="text_encoder", **kw),
            transformers.CLIPTextModelWithProjection.from_pretrained(
                model_path, subfolder="text_encoder_2", **kw
            ),
        ],
        pipe.vae if pipe is not None else load_vae(args, model_path),
        pipe.unet
        if pipe is not None
        else diffusers.UNet2DConditionModel.from_pretrained(model_path, subfolder="unet", **kw),
        diffusers.DDPMScheduler.from_pretrained(model_path, subfolder="scheduler", **kw),
    )
    latent, expected = base.vae.config.latent_channels, base.unet.config.in_channels
    if latent != expected:
        source = args.pretrained_vae_model_name_or_path or single_file or f"{model_path}/vae"
        fail(
            f"the VAE {source} makes {latent}-channel latents but the UNet takes {expected}; "
            "pass a VAE of this SDXL base to --pretrained_vae_model_name_or_path, or drop it."
        )
    return base


def load_base_pipeline(
    args: argparse.Namespace, model_path: str
) -> diffusers.StableDiffusionXLPipeline:
    """The base pipeline (class images, LoRA export), with ``--pretrained_vae_...`` if given."""
    extra = (
        {}
        if args.pretrained_vae_model_name_or_path is None
        else {"vae": load_vae(args, model_path)}
    )
    single_file = single_file_of(args)
    if single_file is not None:
        return load_single_file(single_file, model_path, **extra)
    return diffusers.StableDiffusionXLPipeline.from_pretrained(
        model_path, revision=args.revision, add_watermarker=False, **extra
    )


def tokenize_sdxl(tokenizers: list[transformers.CLIPTokenizer], prompts: list[str]) -> torch.Tensor:
    """Each prompt's ids for each tokenizer: (B, 2, 77)."""
    return torch.stack([tokenize(tokenizer, prompts) for tokenizer in tokenizers], dim=1)


def inject_adapters(
    args: argparse.Namespace, unet: nn.Module, text_encoders: list[nn.Module]
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Inject HRA into the UNet (and both text encoders); return the UNet's and the text
    encoders' trainable tensors. Call after casting the frozen weights (adapters stay fp32)."""
    common = hra_options(args)
    try:
        inject_hra(unet, HRAConfig(target_modules=tuple(args.hra_target_modules), **common))
        for encoder in text_encoders:
            encoder.requires_grad_(False)
            if args.train_text_encoder:
                targets = tuple(args.hra_text_encoder_target_modules)
                inject_hra(encoder, HRAConfig(target_modules=targets, **common))
    except (ValueError, TypeError) as error:
        fail(f"cannot adapt the model: {error}")
    encoder_params = [p for e in text_encoders for p in hra_parameters(e)]
    return hra_parameters(unet), encoder_params if args.train_text_encoder else []


# --------------------------------------------------------------------------- training


def encode_prompt(
    text_encoders: list[nn.Module], input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` computes it.

    ``input_ids`` is (B, 2, 77), one row per tokenizer. Returns the penultimate hidden
    states of both encoders side by side, (B, 77, D1 + D2), and the pooled, projected
    embedding of the second, (B, P).
    """
    hidden, pooled = [], None
    for index, encoder in enumerate(text_encoders):
        output = encoder(input_ids[:, index], output_hidden_states=True)
        pooled = output[0]  # the last encoder's text_embeds: (B, P)
        hidden.append(output.hidden_states[-2])  # (B, 77, D_i)
    return torch.cat(hidden, dim=-1), pooled


def training_loss(
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    models: Models,
    args: argparse.Namespace,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DreamBooth loss of one batch: instance loss + prior loss + λ · orthogonality loss.

    The UNet gets SDXL's added conditions: the pooled text embedding and each image's time
    ids (original size, crop corner, target size). Masks and min-SNR as in the SD 1.x script;
    every random draw comes from ``generator``.
    """
    pixels = batch["pixel_values"]  # (B, 3, H, W); instance images, then class images
    scheduler = models.noise_scheduler
    timestep_range = (args.min_timestep, args.max_timestep)
    noisy, timesteps, target = noisy_latents(
        pixels, models.vae, scheduler, generator, args.noise_offset, models.latents, timestep_range
    )
    if models.text is not None:
        prompt_embeds, pooled = models.text(batch["input_ids"])  # (B, 77, D1 + D2), (B, P)
    else:
        with torch.set_grad_enabled(args.train_text_encoder):
            prompt_embeds, pooled = encode_prompt(models.text_encoders, batch["input_ids"])
    added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(pooled)}  # (B, P), (B, 6)
    prediction = models.unet(noisy, timesteps, prompt_embeds, added_cond_kwargs=added).sample
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


# --------------------------------------------------------------------------- validation


def run_validation(
    args: argparse.Namespace,
    accelerator: Accelerator,
    models: Models,
    tokenizers: list[transformers.CLIPTokenizer],
    dtype: torch.dtype,
    global_step: int,
) -> Path:
    """Sample ``--num_validation_images`` for each ``--validation_prompt`` (seed ``--seed``)
    with a ``StableDiffusionXLPipeline`` of the models being trained; main process only.
    Images and a grid (a row per prompt) go to ``<output_dir>/validation/step-<step>/``;
    returns the grid's path."""
    encoders = [accelerator.unwrap_model(e) for e in models.text_encoders]
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=models.vae,
        text_encoder=encoders[0],
        text_encoder_2=encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=accelerator.unwrap_model(models.unet),
        scheduler=diffusers.DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config),
        add_watermarker=False,
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
    model_path = inputs.model_path
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

    # Models: frozen UNet and text encoders in the training dtype, the VAE in fp32,
    # then fp32 HRA adapters.
    dtype = weight_dtype(accelerator)
    base = load_sdxl_base(args, model_path)
    if accelerator.is_main_process:
        warn_long_prompts(args, inputs, base.tokenizers[0])
    unet, text_encoders, vae = base.unet, base.text_encoders, base.vae
    args.prediction_type = set_prediction_type(base.noise_scheduler, args.prediction_type)
    args.max_timestep = timestep_upper_bound(
        base.noise_scheduler, args.min_timestep, args.max_timestep
    )
    vae.requires_grad_(False)
    vae.to(accelerator.device, dtype=torch.float32)
    for model in (*text_encoders, unet):
        model.requires_grad_(False)
        model.to(accelerator.device)
        if dtype != torch.float32:
            model.to(dtype=dtype)
    set_seed(args.seed)  # identical adapter initialisation on every rank and every run
    unet_params, encoder_params = inject_adapters(args, unet, text_encoders)
    params = unet_params + encoder_params
    trainable = count_parameters(params)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for encoder in text_encoders:
                enable = getattr(encoder, "activation_checkpointing_enable", None)
                (enable or encoder.gradient_checkpointing_enable)()
    if args.torch_compile:
        unet.compile(fullgraph=True)  # in place: module names and weights files unchanged

    # Data: each item carries both tokenizers' ids and its SDXL time ids.
    dataloader, updates_per_epoch = make_dataloader(
        args,
        accelerator,
        inputs,
        tokenize_sdxl(base.tokenizers, inputs.instance_prompts),  # (N, 2, 77): a row per picture
        class_images,
        tokenize_sdxl(base.tokenizers, [args.class_prompt])[0] if class_images else None,
    )

    groups = [{"params": unet_params}]
    if args.train_text_encoder:
        lr = args.learning_rate if args.text_encoder_lr is None else args.text_encoder_lr
        groups.append({"params": encoder_params, "lr": lr})
    optimizer = make_optimizer(groups, args, no_decay=hra_magnitudes(unet, *text_encoders))
    lr_scheduler = make_lr_scheduler(optimizer, args, accelerator.num_processes)
    names = ["unet", *TEXT_ENCODERS] if args.train_text_encoder else ["unet"]
    if args.train_text_encoder:
        unet, *text_encoders, optimizer, lr_scheduler = accelerator.prepare(
            unet, *text_encoders, optimizer, lr_scheduler
        )
        trained = [unet, *text_encoders]
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
        trained = [unet]
    register_trainable_state_hooks(accelerator)
    adapted = dict(zip(names, map(accelerator.unwrap_model, trained), strict=True))
    ema = EMA.of(adapted, args.ema_decay) if args.use_ema else None
    models = Models(unet, text_encoders, vae, base.noise_scheduler, adapted, ema)
    if args.cache_latents:
        models.latents = latent_cache(vae)
    if args.pre_compute_text_embeddings:  # both encoders' hidden states and the pooled one
        models.text = InputCache(lambda ids: encode_prompt(text_encoders, ids))
    if accelerator.is_main_process:
        accelerator.init_trackers("dreambooth-hra-sdxl", config=tracker_config(args))

    def validate(step: int) -> Path:
        return run_validation(args, accelerator, models, base.tokenizers, dtype, step)

    # Train, from the checkpoint given to --resume_from_checkpoint if any.
    global_step = resume_training(accelerator, inputs.resume, ema, args.seed)
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
        "StableDiffusionXLPipeline",
        "UNet and both CLIP text encoders" if args.train_text_encoder else "UNet",
        "DreamBooth HRA SDXL training finished",
    )
    return finish_run(accelerator, args, models, result, validate, run)


if __name__ == "__main__":
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.WARNING)
    main()
