"""How good are the world's evaluator models? Their quality on held-out scenes.

    python eval/evaluate_world_evaluators.py --output_dir benchmarks/results/world_evaluators

Fresh scenes of every colour-shape pair (a seed the training never used) are scored twice:
as rendered, and passed through the bundled VAE with perturbed latents (what generated
images look like). Each model is loaded by the same loader the metrics use
(:mod:`hra_diffusion.eval.models`); without flags, the bundled ones:

- CLIP: caption retrieval top-1 among the 90 full captions, and the attribute accuracy
  of the retrieved caption;
- attribute ViT (the DINO slot): attribute accuracy of its heads;
- SegFormer: mIoU, mAcc, aAcc against the label maps (rim pixels ignored).

Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hra_diffusion import cli, world
from hra_diffusion.eval.images import batched
from hra_diffusion.eval.models import AttributeReader, ClipEncoder, Segmenter, default_device
from hra_diffusion.eval.report import markdown_table, package_versions, write_json
from hra_diffusion.eval.segmentation_metrics import (
    ade20k_labels,
    confusion_matrix,
    segmentation_scores,
)
from hra_diffusion.eval.world_attributes import attribute_accuracy, clip_readings
from hra_diffusion.world import evaluators

VERSIONS = ("rendered", "vae")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        "--segformer_model",
        type=cli.component_ref,
        default=str(evaluators.SEGFORMER_DIR),
        help="Default: the bundled SegFormer.",
    )
    parser.add_argument("--num_scenes", type=cli.positive_int, default=300, help="Default: 300.")
    parser.add_argument("--seed", type=cli.seed, default=1000, help="Scene seed. Default: 1000.")
    parser.add_argument("--batch_size", type=cli.positive_int, default=64, help="Default: 64.")
    parser.add_argument(
        "--device", type=cli.text, default=default_device(), help="Default: cuda if available."
    )
    parser.add_argument(
        "--output_dir", type=cli.output_dir, required=True, help="Where the results go."
    )
    return parser


def held_out_images(count: int, seed: int) -> tuple[list[world.Scene], dict[str, list]]:
    """Scenes of every pair and their pictures, rendered and through the VAE."""
    rng = np.random.default_rng([seed, 99])
    scenes = [world.sample_scene(rng, "all", world.WIDE_OFFSET) for _ in range(count)]
    rendered = [world.render_scene(s) for s in scenes]
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in rendered]))  # (N, H, W, 3)
    decoded = evaluators.vae_round_trip(pixels.permute(0, 3, 1, 2).float() / 255.0, seed)
    as_uint8 = (decoded.permute(0, 2, 3, 1) * 255).round().byte().numpy()  # (N, H, W, 3)
    from PIL import Image

    vae = [Image.fromarray(a) for a in as_uint8]
    return scenes, {"rendered": rendered, "vae": vae}


def segmentation_quality(segmenter: Segmenter, images, scenes, batch_size: int) -> dict:
    k = segmenter.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)  # (K, K)
    pairs = list(zip(images, scenes, strict=True))
    for chunk in batched(pairs, batch_size):
        labels = [ade20k_labels(np.asarray(world.label_map(s)), k) for _, s in chunk]
        predictions = segmenter([im for im, _ in chunk], [label.shape for label in labels])
        for label, prediction in zip(labels, predictions, strict=True):
            confusion += confusion_matrix(label, prediction, k)
    scores = segmentation_scores(confusion)
    return {m: scores[m] for m in ("mIoU", "mAcc", "aAcc", "per_class_iou")}


def evaluate(args: argparse.Namespace) -> dict:
    clip = ClipEncoder(args.clip_model, args.device)
    reader = AttributeReader(args.vit_model, args.device)
    segmenter = Segmenter(args.segformer_model, args.device)
    scenes, images = held_out_images(args.num_scenes, args.seed)
    result: dict = {"settings": vars(args), "num_scenes": len(scenes)}
    for version in tqdm(VERSIONS, desc="versions"):
        ims = images[version]
        clip_acc = attribute_accuracy(clip_readings(clip, ims, args.batch_size), scenes)
        vit = [r for b in batched(ims, args.batch_size) for r in reader(list(b))]
        result[version] = {
            "clip_caption_top1": clip_acc.pop("all"),
            "clip_attributes": clip_acc,
            "vit_attributes": attribute_accuracy(vit, scenes),
            "segformer": segmentation_quality(segmenter, ims, scenes, args.batch_size),
        }
    result["packages"] = package_versions()
    return result


def markdown_report(result: dict) -> str:
    header = ["images", "CLIP caption top-1", "ViT shape", "ViT colour", "ViT background"]
    header += ["SegFormer mIoU", "mAcc", "aAcc"]
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    rows = []
    for version in VERSIONS:
        r = result[version]
        vit, seg = r["vit_attributes"], r["segformer"]
        rows.append(
            [version, pct(r["clip_caption_top1"])]
            + [pct(vit[k]) for k in ("shape", "color", "background")]
            + [pct(seg[k]) for k in ("mIoU", "mAcc", "aAcc")]
        )
    return markdown_table(header, rows)


@cli.cli_main("--batch_size")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    result = evaluate(args)
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown_report(result))
    print(markdown_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
