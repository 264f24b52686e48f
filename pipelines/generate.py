"""Generate images with a Stable Diffusion (1.x, XL, 3) or FLUX.1 pipeline and HRA adapters.

    python -m hra_diffusion.pipelines.generate --model PATH --weights out/ \\
        --prompt "a photo of qwe dog" --num_images 4 --seed 0 --out samples/

Writes one PNG per image (image i of every prompt uses seed ``seed + i``, so
results do not depend on how many images are asked for), ``grid.png`` (one row
per prompt) and ``generation.json`` with the settings. The adapter is merged
into the weights after loading, so sampling costs what the base model costs.
An output folder holding ``generation.json`` (a finished run) is refused without
``--overwrite``.

The pipeline class follows the model folder's family (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``). SD3 and
FLUX.1 sample with their own flow-matching Euler scheduler (``--scheduler`` is refused for
them), need sides that are multiples of 16, and take ``--guidance_scale`` by default from
the family: 7.5 (SD 1.x, SDXL), 7.0 (SD3), 3.5 (FLUX.1 [dev]'s distilled guidance).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers.utils import make_image_grid

from hra_diffusion import cli
from hra_diffusion.checks import check_no_finished_run, warn_truncated_prompts
from hra_diffusion.families import FAMILY_NAMES, model_family
from hra_diffusion.inference import (
    DTYPES,
    FLOW_FAMILIES,
    FLOW_SCHEDULER_REFUSAL,
    GUIDANCE_SCALES,
    SCHEDULERS,
    folder_family,
    generate_images,
    load_pipeline,
)
from hra_diffusion.single_file import check_single_file
from hra_diffusion.world.tiny_sd import default_model_path

SETTINGS_NAME = "generation.json"
"""Written last: its presence marks a finished run."""


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` (cuda when available) and ``--dtype`` (float32) of the sampling CLIs."""
    parser.add_argument(
        "--device",
        type=cli.text,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (float32)"
    )


def add_output_args(parser: argparse.ArgumentParser, default: str, marker: str) -> None:
    """``--out`` (``default``) and ``--overwrite`` of the sampling CLIs; ``marker`` is the
    file a finished run writes last (see :func:`~hra_diffusion.checks.check_no_finished_run`)."""
    parser.add_argument("--out", type=cli.output_dir, default=default, help="output folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"write into an output folder that holds a finished run ({marker})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        type=cli.model_or_checkpoint,
        help="diffusers pipeline folder or Hub id, or a single-file .safetensors checkpoint "
        "(A1111/ComfyUI layout) with --base_config (default: the bundled tiny test model)",
    )
    parser.add_argument(
        "--base_config",
        type=cli.pipeline_dir,
        help="with a single-file --model: a local diffusers pipeline folder of the same family "
        "(SD 1.x or SDXL) whose configs, tokenizers and scheduler are used",
    )
    parser.add_argument(
        "--weights",
        type=cli.existing_path,
        action="append",
        help="HRA weights: hra_weights.safetensors, its folder, or a PEFT HRA adapter folder; "
        "repeat to stack several adapters (W H_1 H_2 ...)",
    )
    parser.add_argument(
        "--prompt",
        type=cli.text,
        action="append",
        required=True,
        help="a prompt; repeat for several",
    )
    parser.add_argument("--num_images", type=cli.positive_int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=cli.seed, default=0, help="seed of the first image")
    parser.add_argument("--steps", type=cli.positive_int, default=25, help="denoising steps")
    parser.add_argument(
        "--guidance_scale",
        type=cli.non_negative_float,
        help="classifier-free guidance scale (FLUX.1: the distilled guidance value); default "
        "by family: 7.5 SD 1.x/SDXL, 7.0 SD3, 3.5 FLUX.1",
    )
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's own)"
    )
    parser.add_argument(
        "--height", type=cli.image_side, help="pixels, a multiple of 8 (default: the model's size)"
    )
    parser.add_argument(
        "--width", type=cli.image_side, help="pixels, a multiple of 8 (default: the model's size)"
    )
    add_output_args(parser, "samples", SETTINGS_NAME)
    add_device_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main`, refusing a finished ``--out`` without ``--overwrite``.

    Example:
        >>> parse_args(["--prompt", "a dog"]).num_images
        4
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        family = check_single_file(args.model, args.base_config, "--model")
        family = family or (folder_family(args.model) if args.model else "sd")  # tiny SD
    except ValueError as error:
        parser.error(str(error))
    if family in FLOW_FAMILIES:
        if args.scheduler is not None:
            parser.error(FLOW_SCHEDULER_REFUSAL.format(name=FAMILY_NAMES[family]))
        for side in ("height", "width"):
            value = getattr(args, side)
            if value is not None and value % 16:
                parser.error(
                    f"--{side} {value} is not a multiple of 16 ({FAMILY_NAMES[family]} turns "
                    "2x2 latent patches into one token); use a multiple of 16."
                )
    if args.guidance_scale is None:
        args.guidance_scale = GUIDANCE_SCALES[family]
    if not args.overwrite:
        try:
            check_no_finished_run(args.out, SETTINGS_NAME)
        except ValueError as error:
            parser.error(str(error))
    return args


@cli.cli_main("--height, --width and --num_images")
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``hra-generate`` / ``python -m hra_diffusion.pipelines.generate``.

    Example:
        >>> main(["--model", "models/sd15", "--weights", "out/", "--prompt", "a dog"])
        ... # doctest: +SKIP
    """
    args = parse_args(argv)
    out = Path(args.out)
    model = args.model or default_model_path()
    pipe = load_pipeline(
        model, args.weights, args.scheduler, args.device, DTYPES[args.dtype], args.base_config
    )
    if model_family(pipe) not in FLOW_FAMILIES:  # SD3/FLUX.1 read the prompt with T5 too
        warn_truncated_prompts(pipe.tokenizer, args.prompt, "--prompt")
    rows = generate_images(
        pipe,
        args.prompt,
        args.num_images,
        args.seed,
        args.steps,
        args.guidance_scale,
        args.height,
        args.width,
    )
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for p, row in enumerate(rows):
        for i, image in enumerate(row):
            name = f"prompt{p:02d}_seed{args.seed + i}.png"
            image.save(out / name)
            files.append({"prompt": args.prompt[p], "seed": args.seed + i, "file": name})
    grid = make_image_grid([image for row in rows for image in row], len(rows), args.num_images)
    grid.save(out / "grid.png")
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"model": str(model)}
    (out / SETTINGS_NAME).write_text(json.dumps({**settings, "images": files}, indent=2))
    print(f"Wrote {len(files)} images and grid.png to {out}")


if __name__ == "__main__":
    main()
