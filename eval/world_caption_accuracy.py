"""Does the bundled model draw what its captions say, as judged by the evaluator models?

    python eval/world_caption_accuracy.py --output_dir benchmarks/results/world_caption_accuracy

The scenes, captions, seeds and sampler are those of ``eval/evaluate_world.py`` (which
judges with the pixel scorer of :mod:`hra_diffusion.world.scorer`); here each generated
image is read three ways: by the tiny CLIP (nearest of the 90 full captions), by the
attribute ViT's heads, and by the pixel scorer, whose agreement with the two models is
reported too. Per split (training pairs "seen", held-out pairs) and reader: the share of
images whose shape, object colour, background colour (and all three) match the caption.
The goal is at least 80 % for each of the three attributes.

Writes ``results.json``, ``results.md`` and ``samples.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hra_diffusion import cli, world
from hra_diffusion.eval.errors import EvaluationError
from hra_diffusion.eval.evaluate_world import SPLITS, add_world_sampling_args, generate, scenes_for
from hra_diffusion.eval.images import batched
from hra_diffusion.eval.models import AttributeReader, ClipEncoder, default_device
from hra_diffusion.eval.report import contact_sheet, markdown_table, package_versions, write_json
from hra_diffusion.eval.world_attributes import agreement, attribute_accuracy, clip_readings
from hra_diffusion.inference import load_pipeline
from hra_diffusion.world import evaluators, scorer
from hra_diffusion.world.tiny_sd import default_model_path

READERS = ("clip", "vit", "pixel_scorer")
GOAL = 0.8
SHEET_COLUMNS = 8


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_world_sampling_args(parser)
    parser.add_argument(
        "--clip_model",
        type=cli.component_ref,
        default=str(evaluators.CLIP_FILE),
        help="Default: the bundled CLIP.",
    )
    parser.add_argument(
        "--vit_model",
        type=cli.component_ref,
        default=str(evaluators.VIT_DIR),
        help="Default: the bundled ViT.",
    )
    parser.add_argument(
        "--device", type=cli.text, default=default_device(), help="Default: cuda if available."
    )
    return parser


def read_all(images: list, clip: ClipEncoder, vit: AttributeReader, batch_size: int) -> dict:
    """Each reader's attribute dicts for the images."""
    pixel = []
    for image in images:
        r = scorer.read_scene(image)
        pixel.append({"shape": r.shape, "color": r.color, "background": r.background})
    return {
        "clip": clip_readings(clip, images, batch_size),
        "vit": [r for b in batched(images, batch_size) for r in vit(list(b))],
        "pixel_scorer": pixel,
    }


def evaluate(args: argparse.Namespace) -> tuple[dict, list]:
    model = args.model or str(default_model_path())
    clip = ClipEncoder(args.clip_model, args.device)
    vit = AttributeReader(args.vit_model, args.device)
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
        readings = read_all(images, clip, vit, args.batch_size)
        rendered = read_all([world.render_scene(s) for s in scenes], clip, vit, args.batch_size)
        result[split] = {
            "generated": {k: attribute_accuracy(v, scenes) for k, v in readings.items()},
            "rendered_reference": {k: attribute_accuracy(v, scenes) for k, v in rendered.items()},
            "agreement_with_pixel_scorer": {
                k: agreement(readings[k], readings["pixel_scorer"]) for k in ("clip", "vit")
            },
        }
        clip_vit = list(zip(images, scenes, readings["clip"], readings["vit"], strict=True))
        cells = [
            (im, f"{world.caption(s)} | CLIP: {c['color']} {c['shape']} on {c['background']}"
             f" | ViT: {v['color']} {v['shape']} on {v['background']}")
            for im, s, c, v in clip_vit[: SHEET_COLUMNS * 2]
        ]  # fmt: skip
        rows += [cells[i : i + SHEET_COLUMNS] for i in range(0, len(cells), SHEET_COLUMNS)]
    lowest = {
        reader: min(
            result[s]["generated"][reader][a] for s in SPLITS for a in evaluators.ATTRIBUTES
        )
        for reader in ("clip", "vit")
    }
    result["goal"] = {"each_attribute_at_least": GOAL, "lowest": lowest}
    result["goal"]["met"] = {reader: value >= GOAL for reader, value in lowest.items()}
    result["packages"] = package_versions()
    return result, rows


def markdown_report(result: dict) -> str:
    header = ["split", "reader", "shape", "object colour", "background", "all three"]
    body = []
    for split in SPLITS:
        for reader in READERS:
            acc = result[split]["generated"][reader]
            body.append(
                [split, reader]
                + [f"{100 * acc[k]:.0f} %" for k in ("shape", "color", "background", "all")]
            )
    return markdown_table(header, body)


@cli.cli_main("--batch_size")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    result, rows = evaluate(args)
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown_report(result))
    contact_sheet(rows, out / "samples.png", "Caption | what CLIP and the ViT read", tile=128)
    print(markdown_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
