"""Does a model draw what its captions say? Caption accuracy in the procedural world.

For fixed seeds, scenes are drawn from the world's training pairs ("seen") and from its
held-out colour-shape pairs, each caption ("a red circle on a blue background") is
generated once, and the pixel scorer of :mod:`hra_diffusion.world.scorer` reads back the
background colour, object colour and shape. Reported per split: the share of images
whose background, colour, shape, and all three, match their caption::

    python eval/evaluate_world.py --output_dir benchmarks/results/world_base

Without ``--model`` the bundled default model is evaluated; ``--weights`` adds an HRA
adapter (e.g. to see whether DreamBooth made the model forget its world). Writes
``results.json``, ``results.md`` and ``samples.png`` (captioned samples with what the
scorer read).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from hra_diffusion import cli, world
from hra_diffusion.eval.errors import EvaluationError
from hra_diffusion.eval.images import batched
from hra_diffusion.eval.report import contact_sheet, markdown_table, package_versions, write_json
from hra_diffusion.inference import load_pipeline
from hra_diffusion.world import scorer
from hra_diffusion.world.tiny_sd import default_model_path

SPLITS = {"seen": "train", "held_out": "held_out"}
"""Report name → :func:`hra_diffusion.world.sample_scene` split."""

SHEET_COLUMNS = 8


def add_world_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The options of the world scripts that sample the base: model, weights, output folder,
    scene counts, steps, guidance, seed and batch size."""
    parser.add_argument(
        "--model", type=cli.model_ref, default=None, help="Pipeline folder (the bundled default)."
    )
    parser.add_argument(
        "--weights", type=cli.existing_path, default=None, help="HRA weights file or run folder."
    )
    parser.add_argument(
        "--output_dir", type=cli.output_dir, required=True, help="Where the results go."
    )
    parser.add_argument("--num_seen", type=cli.positive_int, default=96, help="Default: 96.")
    parser.add_argument("--num_held_out", type=cli.positive_int, default=48, help="Default: 48.")
    parser.add_argument("--steps", type=cli.positive_int, default=25, help="Default: 25.")
    parser.add_argument(
        "--guidance_scale",
        type=cli.non_negative_float,
        default=10.0,
        help="Default: 10, the bundled model's best of 5, 7.5, 10 and 14.",
    )
    parser.add_argument(
        "--seed", type=cli.seed, default=0, help="Seeds the scenes and image i's noise (seed + i)."
    )
    parser.add_argument("--batch_size", type=cli.positive_int, default=16, help="Default: 16.")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    add_world_sampling_args(parser)
    return parser


def scenes_for(split: str, count: int, seed: int) -> list[world.Scene]:
    """The evaluated scenes: the same for the same split, count and seed."""
    rng = np.random.default_rng([seed, list(SPLITS).index(split)])
    return [world.sample_scene(rng, SPLITS[split]) for _ in range(count)]


def generate(pipe, prompts: list[str], args: argparse.Namespace, first_seed: int) -> list:
    """One image per prompt; prompt i uses noise seed ``first_seed + i``."""
    images: list[Image.Image] = []
    progress = tqdm(total=len(prompts), desc="Generating", unit="image")
    for batch in batched(list(enumerate(prompts)), args.batch_size):
        generators = [torch.Generator().manual_seed(first_seed + i) for i, _ in batch]
        images += pipe(
            [p for _, p in batch],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=generators,
        ).images
        progress.update(len(batch))
    progress.close()
    return images


def evaluate(args: argparse.Namespace) -> tuple[dict, list]:
    """Generate and score every split; returns the result dict and the contact-sheet rows."""
    model = args.model or str(default_model_path())
    try:
        pipe = load_pipeline(model, weights=args.weights)
    except ValueError as error:
        raise EvaluationError(str(error)) from error
    counts = {"seen": args.num_seen, "held_out": args.num_held_out}
    result: dict = {"model": model, "weights": args.weights, "settings": vars(args)}
    rows: list = []
    for split, count in counts.items():
        scenes = scenes_for(split, count, args.seed)
        images = generate(pipe, [world.caption(s) for s in scenes], args, args.seed)
        readings = [scorer.read_scene(im) for im in images]
        result[split] = scorer.attribute_accuracy(readings, scenes)
        cells = [
            (im, f"{world.caption(s)} | read: {r.color} {r.shape} on {r.background}")
            for im, s, r in list(zip(images, scenes, readings, strict=True))[: SHEET_COLUMNS * 2]
        ]
        rows += [cells[i : i + SHEET_COLUMNS] for i in range(0, len(cells), SHEET_COLUMNS)]
    result["packages"] = package_versions()
    return result, rows


def markdown_report(result: dict) -> str:
    header = ["split", "images", "background", "object colour", "shape", "all three"]
    body = [
        [split, str(result["settings"][f"num_{split}"])]
        + [f"{100 * result[split][k]:.0f} %" for k in ("background", "color", "shape", "all")]
        for split in SPLITS
    ]
    return markdown_table(header, body)


@cli.cli_main("--batch_size")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    result, rows = evaluate(args)
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown_report(result))
    contact_sheet(rows, out / "samples.png", "Caption | what the scorer read", tile=128)
    for name in ("results.json", "results.md", "samples.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
