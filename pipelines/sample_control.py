"""Sample one image per control condition of a folder, for evaluation.

    python -m hra_diffusion.pipelines.sample_control --model PATH \\
        --weights out/hra_control_weights.safetensors --condition_type segmentation \\
        --conditions_dir ade20k/annotations/validation --prompts prompts.jsonl --out samples/

``--prompts`` is a JSON-lines file with one ``{"condition": "<file in conditions_dir>",
"text": "<prompt>"}`` per line (the training ``metadata.jsonl`` works: other keys are
ignored). The image of line i uses seed ``seed + i`` and is written as
``<out>/<condition file stem>.png``, the names the evaluation pairs with ground truth;
``<out>/metadata.jsonl`` records file, condition, prompt and seed of each image; an
output folder that holds one (a finished run) is refused without ``--overwrite``. The
HRA adapters are merged after loading, so sampling costs the base model plus the
condition encoder.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from hra_diffusion import cli
from hra_diffusion.checks import check_no_finished_run, image_error, warn_truncated_prompts
from hra_diffusion.conditions import CONDITION_TYPES, make_condition, resize_condition
from hra_diffusion.control import merge_control_adapter
from hra_diffusion.errors import InputError
from hra_diffusion.inference import DTYPES, SCHEDULERS, build_scheduler
from hra_diffusion.pipelines.generate import add_device_args, add_output_args
from hra_diffusion.world.tiny_sd import default_model_path

METADATA_NAME = "metadata.jsonl"
"""Written last: its presence marks a finished run."""


def read_prompts(prompts: Path, conditions_dir: Path) -> list[tuple[Path, str]]:
    """(condition file, prompt) per line of ``prompts``; raises InputError naming bad lines."""
    rows = []
    for number, line in enumerate(prompts.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{prompts} line {number} is not JSON: {error}.") from None
        if "condition" not in row or "text" not in row:
            raise InputError(f'{prompts} line {number} needs "condition" and "text" keys.')
        path = conditions_dir / row["condition"]
        if not path.is_file():
            raise InputError(f"{prompts} line {number}: condition file {path} does not exist.")
        rows.append((path, str(row["text"])))
    if not rows:
        raise InputError(f"{prompts} holds no prompts; add one JSON object per line.")
    bad = [f"{path.name} ({error})" for path, _ in rows if (error := image_error(path))]
    if bad:
        raise InputError(
            f"{len(bad)} condition file(s) cannot be decoded: {', '.join(bad)}; re-export or "
            "remove them."
        )
    stems = [path.stem for path, _ in rows]
    if len(set(stems)) != len(stems):
        raise InputError("Two conditions share a file stem; outputs are named by stem.")
    return rows


def load_control(
    path: Path, condition_type: str, resolution: int | None, low: int = 100, high: int = 200
) -> Image.Image:
    """The RGB control image of one file, at ``resolution`` × ``resolution`` if given.

    For ``canny`` the file is a photo: it is resized (bicubic) before its edges are taken.
    Label and colour maps are resized nearest-neighbour.
    """
    with Image.open(path) as opened:
        image = ImageOps.exif_transpose(opened)
        image.load()
    size = (resolution, resolution) if resolution else image.size
    if condition_type == "canny":
        photo = resize_condition(image.convert("RGB"), size, nearest=False)
        return make_condition("canny", image=photo, low=low, high=high)
    control = make_condition(condition_type, condition=image)
    return resize_condition(control, size, nearest=True)


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        type=cli.model_ref,
        help="Stable Diffusion pipeline folder or Hub id (default: the bundled tiny model)",
    )
    parser.add_argument(
        "--weights",
        type=cli.existing_path,
        required=True,
        help="control weights file or the folder holding it",
    )
    parser.add_argument(
        "--conditions_dir",
        type=cli.existing_dir,
        required=True,
        help="folder of the condition files the prompts name",
    )
    parser.add_argument(
        "--prompts",
        type=cli.existing_file,
        required=True,
        help='JSON lines {"condition": file, "text": prompt}',
    )
    parser.add_argument(
        "--condition_type",
        choices=CONDITION_TYPES,
        default="precomputed",
        help="canny: files are photos whose edges (thresholds --canny_low_threshold/"
        "--canny_high_threshold) are the control; segmentation: ADE20K label maps (drawn "
        "with the palette) or colour maps; precomputed: RGB control images (default)",
    )
    parser.add_argument(
        "--canny_low_threshold", type=cli.non_negative_int, default=100, help="default: 100"
    )
    parser.add_argument(
        "--canny_high_threshold", type=cli.non_negative_int, default=200, help="default: 200"
    )
    parser.add_argument(
        "--resolution",
        type=cli.image_side,
        help="square output size in pixels, a multiple of 8 (default: each condition's)",
    )
    parser.add_argument(
        "--seed", type=cli.seed, default=0, help="seed of line 1; line i: seed + i - 1"
    )
    parser.add_argument(
        "--steps", type=cli.positive_int, default=50, help="denoising steps (default: 50)"
    )
    parser.add_argument(
        "--guidance_scale",
        type=cli.non_negative_float,
        default=9.0,
        help="classifier-free guidance (default: 9)",
    )
    parser.add_argument(
        "--scheduler",
        choices=sorted(SCHEDULERS),
        default="ddim",
        help="sampler, built from the model's scheduler config (default: ddim, the paper's)",
    )
    parser.add_argument(
        "--negative_prompt", type=cli.text, default=None, help="negative prompt for every image"
    )
    add_output_args(parser, "control_samples", METADATA_NAME)
    add_device_args(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of :func:`main`, with the checks that span options."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.overwrite:
        try:
            check_no_finished_run(args.out, METADATA_NAME)
        except ValueError as error:
            parser.error(str(error))
    if args.canny_low_threshold > args.canny_high_threshold:
        parser.error("Canny thresholds need --canny_low_threshold <= --canny_high_threshold")
    return args


@cli.cli_main("--resolution")
def main(argv: list[str] | None = None) -> list[Path]:
    """Sample every line of ``--prompts``; returns the files written."""
    args = parse_args(argv)
    rows = read_prompts(Path(args.prompts), Path(args.conditions_dir))
    out = Path(args.out)
    model = args.model or default_model_path()
    from hra_diffusion.pipelines import StableDiffusionHRAControlPipeline  # a heavy import

    pipe = StableDiffusionHRAControlPipeline.from_base(
        model, args.weights, use_ddim=False, torch_dtype=DTYPES[args.dtype]
    )
    warn_truncated_prompts(pipe.tokenizer, [prompt for _, prompt in rows], "prompt")
    pipe.scheduler = build_scheduler(args.scheduler, pipe.scheduler.config)
    merge_control_adapter(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    out.mkdir(parents=True, exist_ok=True)
    written, records = [], []
    for index, (path, prompt) in enumerate(tqdm(rows, desc="Sampling", unit="image")):
        control = load_control(
            path,
            args.condition_type,
            args.resolution,
            args.canny_low_threshold,
            args.canny_high_threshold,
        )
        seed = args.seed + index
        image = pipe(
            prompt,
            image=control,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            generator=torch.Generator(args.device).manual_seed(seed),
        ).images[0]
        target = out / f"{path.stem}.png"
        tmp = out / f".{path.stem}.tmp.png"
        image.save(tmp)
        os.replace(tmp, target)
        written.append(target)
        records.append(
            {"file_name": target.name, "condition": path.name, "text": prompt, "seed": seed}
        )
    (out / METADATA_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))
    return written


if __name__ == "__main__":
    main()
