"""Generate images with a Stable Diffusion (1.x or XL) pipeline and (optionally) an HRA adapter.

    python -m hra_diffusion.generate --model PATH --weights out/ \\
        --prompt "a photo of qwe dog" --num_images 4 --seed 0 --out samples/

Writes one PNG per image (image i of every prompt uses seed ``seed + i``, so
results do not depend on how many images are asked for), ``grid.png`` (one row
per prompt) and ``generation.json`` with the settings. The adapter is merged
into the weights after loading, so sampling costs what the base model costs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from diffusers.utils import make_image_grid
from PIL import Image
from tqdm.auto import tqdm

from hra_diffusion.adapters import set_hra_adapters
from hra_diffusion.injection import merge_hra
from hra_diffusion.serialization import load_hra_weights
from hra_diffusion.tiny_sd import default_model_path

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "pndm": PNDMScheduler,
    "unipc": UniPCMultistepScheduler,
}
"""``--scheduler`` names; each is built from the model's own scheduler config."""

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(
    model: str | os.PathLike,
    weights: str | os.PathLike | list[str | os.PathLike] | None = None,
    scheduler: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """A Stable Diffusion pipeline with the HRA adapter(s) loaded and merged.

    Several ``weights`` stack in the order given (W H_1 H_2 ⋯, see
    :func:`hra_diffusion.set_hra_adapters`), loaded as adapters ``adapter0``, ``adapter1``...

    An SDXL pipeline (one with ``text_encoder_2``) loads as ``StableDiffusionXLPipeline``,
    any other as ``StableDiffusionPipeline``. ``model`` is a local diffusers folder or a
    Hub id (which needs the network or the Hub cache). Raises ``ValueError`` with the
    cause and the fix when the model cannot be loaded.

    Example:
        >>> pipe = load_pipeline("models/sd15", weights="out/", scheduler="dpm")  # doctest: +SKIP
    """
    path = Path(model)
    if path.is_file():
        raise ValueError(f"--model {model} is a file; pass a diffusers pipeline folder.")
    try:
        sdxl = "text_encoder_2" in DiffusionPipeline.load_config(model)
        pipeline_class = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipe = pipeline_class.from_pretrained(model, torch_dtype=dtype)
    except OSError as error:
        if path.exists():
            raise ValueError(f"{model} is not a diffusers pipeline folder: {error}") from error
        raise ValueError(
            f"Cannot load {str(model)!r}: it is not a local folder, and the Hugging Face Hub "
            f"could not provide it ({error}). Offline, pass a local diffusers folder, e.g. one "
            "made with `huggingface-cli download <id> --local-dir <folder>`."
        ) from error
    weights = [weights] if isinstance(weights, (str, os.PathLike)) else weights or []
    if len(weights) == 1:
        load_hra_weights(pipe, weights[0])
    elif weights:
        names = [f"adapter{i}" for i in range(len(weights))]
        for name, path in zip(names, weights, strict=True):
            load_hra_weights(pipe, path, adapter_name=name)
        set_hra_adapters(pipe, names)
    if weights:
        merge_hra(pipe)
    if scheduler is not None:
        pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate_images(
    pipe: DiffusionPipeline,
    prompts: list[str],
    num_images: int = 4,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> list[list[Image.Image]]:
    """``num_images`` images per prompt; image i of each prompt uses seed ``seed + i``.

    Example:
        >>> rows = generate_images(pipe, ["a photo of qwe dog"], num_images=4)  # doctest: +SKIP
        >>> len(rows), len(rows[0])  # doctest: +SKIP
        (1, 4)
    """
    rows = []
    with tqdm(total=len(prompts) * num_images, desc="Generating", unit="image") as progress:
        for prompt in prompts:
            row = []
            for i in range(num_images):
                generator = torch.Generator(pipe.device).manual_seed(seed + i)
                image = pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    generator=generator,
                ).images[0]
                row.append(image)
                progress.update()
            rows.append(row)
    return rows


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` (cuda when available) and ``--dtype`` (float32) of the sampling CLIs."""
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="weights dtype (float32)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main`.

    Example:
        >>> parse_args(["--prompt", "a dog"]).num_images
        4
    """
    parser = argparse.ArgumentParser(prog="hra-generate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        help="diffusers pipeline folder or Hub id (default: the bundled tiny test model)",
    )
    parser.add_argument(
        "--weights",
        action="append",
        help="HRA weights: hra_weights.safetensors, its folder, or a PEFT HRA adapter folder; "
        "repeat to stack several adapters (W H_1 H_2 ...)",
    )
    parser.add_argument(
        "--prompt", action="append", required=True, help="a prompt; repeat for several"
    )
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), help="sampler (default: the model's own)"
    )
    parser.add_argument("--height", type=int, help="pixels (default: the model's size)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's size)")
    parser.add_argument("--out", default="samples", help="output folder")
    add_device_args(parser)
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.steps < 1:
        parser.error("--num_images and --steps must be at least 1.")
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``hra-generate`` / ``python -m hra_diffusion.generate``.

    Example:
        >>> main(["--model", "models/sd15", "--weights", "out/", "--prompt", "a dog"])
        ... # doctest: +SKIP
    """
    args = parse_args(argv)
    model = args.model or default_model_path()
    try:
        pipe = load_pipeline(model, args.weights, args.scheduler, args.device, DTYPES[args.dtype])
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"hra-generate: error: {error}") from error
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
    out = Path(args.out)
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
    (out / "generation.json").write_text(json.dumps({**settings, "images": files}, indent=2))
    print(f"Wrote {len(files)} images and grid.png to {out}")


if __name__ == "__main__":
    main()
