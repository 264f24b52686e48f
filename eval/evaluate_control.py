"""Controllable-generation evaluation: segmentation→image (ADE20K) and Canny→image.

segmentation: a SegFormer segments each generated image; its prediction (logits upsampled
    to the ground-truth size) is compared with the ADE20K annotation map.  One confusion
    matrix is accumulated over the whole set (pixels with annotation 0, "other", ignored;
    annotation k in 1..150 is class k-1), then

        IoU_k = TP_k / (TP_k + FP_k + FN_k),  Acc_k = TP_k / (TP_k + FN_k)
        mIoU = nan-mean_k IoU_k,  mAcc = nan-mean_k Acc_k,  aAcc = sum_k TP_k / #pixels

    where classes absent from both ground truth and predictions are left out of the means.

canny: Canny edges (cv2.Canny, thresholds --low_threshold/--high_threshold) of each generated
    image, resized to the control's size, against the control edges:

        IoU = |G ∩ T| / |G ∪ T|,   F1 = 2 |G ∩ T| / (|G| + |T|)

    computed per image, reported as mean ± std over images (pairs with no edge at all in
    either map are undefined and skipped; their count is reported).

Generated images and ground-truth files are paired by file name without extension, e.g.
images/ADE_val_00000001.png with labels/ADE_val_00000001.png.

Without --segformer_model the bundled world SegFormer (hra_diffusion.world.evaluators) is used:
the label maps of train/make_world_dataset.py follow the same convention (0 ignored,
id k is class k-1), so world control runs are scored with no model flag.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from hra_diffusion import cli
from hra_diffusion.eval.edge_metrics import binary_edges, canny_edges, edge_iou_f1
from hra_diffusion.eval.errors import EvaluationError
from hra_diffusion.eval.images import batched, check_decodable, list_images, open_image
from hra_diffusion.eval.models import Segmenter, default_device
from hra_diffusion.eval.report import (
    add_overwrite_arg,
    check_output_dir,
    contact_sheet,
    fmt,
    fmt_stat,
    markdown_table,
    package_versions,
    write_json,
)
from hra_diffusion.eval.segmentation_metrics import (
    ade20k_labels,
    confusion_matrix,
    segmentation_scores,
)
from hra_diffusion.eval.similarity import mean_std
from hra_diffusion.world.evaluators import SEGFORMER_DIR

SHEET_ROWS = 4
LABEL_MODES = ("L", "P", "I", "I;16")


def paired_files(images_dir: str, other_dir: str, what: str) -> list[tuple[Path, Path]]:
    """(generated image, ground-truth file) pairs matched by stem; any mismatch is an error."""
    images = {p.stem: p for p in list_images(images_dir, "generated image")}
    others = {p.stem: p for p in list_images(other_dir, what)}
    if images.keys() != others.keys():
        no_other = sorted(images.keys() - others.keys())
        no_image = sorted(others.keys() - images.keys())
        raise EvaluationError(
            f"{len(images)} generated images in {images_dir} but {len(others)} {what}s in "
            f"{other_dir}, paired by file name without extension; "
            f"without a {what}: {no_other[:10] or 'none'}; without an image: "
            f"{no_image[:10] or 'none'}"
        )
    return [(images[stem], others[stem]) for stem in sorted(images)]


def load_label_map(path: Path, num_classes: int) -> np.ndarray:
    """ADE20K annotation file → (H, W) int64 labels 0..num_classes-1, ignored pixels 255."""
    image = open_image(path, mode="")
    if image.mode not in LABEL_MODES:
        raise EvaluationError(
            f"label map {path} has mode {image.mode}: expected a single-channel annotation "
            "(ADE20K annotations/*.png, values 0..150), not a colour image"
        )
    try:
        return ade20k_labels(np.asarray(image), num_classes)
    except ValueError as error:
        raise EvaluationError(f"label map {path}: {error}") from error


def colorize(labels: np.ndarray, ignore: int = 255) -> Image.Image:
    """RGB picture of a label map: a fixed random colour per class, black where ignored."""
    palette = np.random.default_rng(0).integers(40, 256, size=(256, 3), dtype=np.uint8)
    palette[ignore] = 0
    return Image.fromarray(palette[labels.clip(0, 255)])  # (H, W, 3)


def evaluate_segmentation(args: argparse.Namespace) -> tuple[dict, list]:
    """Accumulated confusion matrix and mIoU/mAcc/aAcc, plus contact-sheet rows."""
    pairs = paired_files(args.images, args.labels, "label map")
    check_decodable([p for pair in pairs for p in pair])
    segmenter = Segmenter(args.segformer_model, args.device)
    k = segmenter.num_classes
    confusion = np.zeros((k, k), dtype=np.int64)  # (K, K)
    rows = []
    with tqdm(total=len(pairs), desc="segment", unit="img") as progress:
        for chunk in batched(pairs, args.batch_size):
            images = [open_image(image_path) for image_path, _ in chunk]
            labels = [load_label_map(label_path, k) for _, label_path in chunk]
            predictions = segmenter(images, [label.shape for label in labels])
            for (image_path, _), image, label, pred in zip(
                chunk, images, labels, predictions, strict=True
            ):
                confusion += confusion_matrix(label, pred, k)
                if len(rows) < SHEET_ROWS:
                    rows.append(
                        [
                            (colorize(label), f"{image_path.stem} ground truth"),
                            (image, "generated"),
                            (colorize(pred), "predicted segmentation"),
                        ]
                    )
            progress.update(len(chunk))
    scores = segmentation_scores(confusion)
    result = {
        "task": "segmentation",
        "config": {
            "images": str(args.images),
            "labels": str(args.labels),
            "label_convention": "ADE20K: 0 ignored, value k -> class k-1",
            "accumulation": "one confusion matrix over the whole set",
            "mean_over": "classes present in ground truth or prediction (nan-mean)",
            "batch_size": args.batch_size,
            "device": args.device,
        },
        "models": {"segmenter": args.segformer_model},
        "versions": package_versions(),
        "num_images": len(pairs),
        "num_classes": k,
        "metrics": {m: scores[m] for m in ("mIoU", "mAcc", "aAcc", "classes_scored")},
        "per_class_iou": scores["per_class_iou"],
        "per_class_acc": scores["per_class_acc"],
        "confusion_matrix": confusion.tolist(),
    }
    return result, rows


def evaluate_canny(args: argparse.Namespace) -> tuple[dict, list]:
    """Per-image Canny IoU/F1 against the control edges, plus contact-sheet rows."""
    pairs = paired_files(args.images, args.control, "control")
    check_decodable([p for pair in pairs for p in pair])
    per_image, rows = {}, []
    for image_path, control_path in tqdm(pairs, desc="canny", unit="img"):
        control = open_image(control_path)
        if args.control_kind == "edges":
            target = binary_edges(control)  # (H, W)
        else:
            target = canny_edges(control, args.low_threshold, args.high_threshold)  # (H, W)
        image = open_image(image_path)
        if image.size != control.size:
            image = image.resize(control.size, Image.Resampling.BICUBIC)
        edges = canny_edges(image, args.low_threshold, args.high_threshold)  # (H, W)
        iou, f1 = edge_iou_f1(edges, target)
        per_image[image_path.stem] = {"iou": iou, "f1": f1}
        if len(rows) < SHEET_ROWS:
            rows.append(
                [
                    (Image.fromarray(target), f"{image_path.stem} control edges"),
                    (image, "generated"),
                    (Image.fromarray(edges), f"Canny of generated: IoU {fmt(iou)}, F1 {fmt(f1)}"),
                ]
            )
    scored = [v for v in per_image.values() if not np.isnan(v["iou"])]
    result = {
        "task": "canny",
        "config": {
            "images": str(args.images),
            "control": str(args.control),
            "control_kind": args.control_kind,
            "low_threshold": args.low_threshold,
            "high_threshold": args.high_threshold,
            "resize": "generated image resized (bicubic) to the control size before Canny",
            "mean_over": "images with at least one edge pixel in either map",
        },
        "models": {"edges": f"cv2.Canny({args.low_threshold}, {args.high_threshold})"},
        "versions": package_versions(),
        "num_images": len(pairs),
        "num_scored": len(scored),
        "metrics": {
            "iou": mean_std([v["iou"] for v in scored]),
            "f1": mean_std([v["f1"] for v in scored]),
        },
        "per_image": per_image,
    }
    return result, rows


def markdown_report(result: dict) -> str:
    """A one-row Markdown table of the headline metrics."""
    m = result["metrics"]
    if result["task"] == "segmentation":
        text = (
            f"# Segmentation→image ({result['num_images']} images)\n\n"
            f"Segmenter: `{result['models']['segmenter']}`. Confusion matrix accumulated over "
            f"the set; means over the {m['classes_scored']} classes present in ground truth or "
            "prediction.\n\n"
        )
        row = [fmt(100 * m[k], 2) for k in ("mIoU", "mAcc", "aAcc")]
        return text + markdown_table(["mIoU (%)", "mAcc (%)", "aAcc (%)"], [row])
    cfg = result["config"]
    text = (
        f"# Canny→image ({result['num_images']} images, {result['num_scored']} scored)\n\n"
        f"cv2.Canny thresholds {cfg['low_threshold']}/{cfg['high_threshold']}; control given "
        f"as {cfg['control_kind']}. Mean ± std over images.\n\n"
    )
    return text + markdown_table(["IoU", "F1"], [[fmt_stat(m["iou"]), fmt_stat(m["f1"])]])


def build_parser() -> argparse.ArgumentParser:
    """Command-line options: one sub-command per task (each documented in --help)."""
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    tasks = parser.add_subparsers(dest="task", required=True)
    seg = tasks.add_parser("segmentation", help="ADE20K mIoU / mAcc / aAcc with SegFormer")
    seg.add_argument(
        "--images", type=cli.existing_dir, required=True, help="folder of generated images"
    )
    seg.add_argument(
        "--labels",
        type=cli.existing_dir,
        required=True,
        help="folder of ground-truth ADE20K annotation maps (single-channel PNG, 0 = ignored)",
    )
    seg.add_argument(
        "--segformer_model",
        type=cli.component_ref,
        default=str(SEGFORMER_DIR),
        help="semantic-segmentation model: hub id or local save_pretrained folder, e.g. "
        "nvidia/segformer-b4-finetuned-ade-512-512 for ADE20K (default: the bundled world "
        "SegFormer, classes background/circle/square/triangle with label ids 1..4)",
    )
    seg.add_argument(
        "--batch_size", type=cli.positive_int, default=8, help="images per batch (default 8)"
    )
    seg.add_argument(
        "--device",
        type=cli.text,
        default=default_device(),
        help="torch device (default cuda if available)",
    )
    canny = tasks.add_parser("canny", help="Canny edge IoU / F1 against the control edges")
    canny.add_argument(
        "--images", type=cli.existing_dir, required=True, help="folder of generated images"
    )
    canny.add_argument(
        "--control",
        type=cli.existing_dir,
        required=True,
        help="folder of control files, same names",
    )
    canny.add_argument(
        "--control_kind",
        choices=("edges", "image"),
        default="edges",
        help="'edges': control files are edge maps (white on black, > 127 is an edge; "
        "default); 'image': source photos, their Canny edges are the target",
    )
    canny.add_argument(
        "--low_threshold",
        type=cli.non_negative_int,
        default=100,
        help="Canny low threshold (default 100)",
    )
    canny.add_argument(
        "--high_threshold",
        type=cli.non_negative_int,
        default=200,
        help="Canny high threshold (default 200)",
    )
    for sub in (seg, canny):
        sub.add_argument(
            "--output_dir",
            type=cli.output_dir,
            required=True,
            help="where results.json, results.md and contact_sheet.png are written",
        )
        add_overwrite_arg(sub)
    return parser


@cli.cli_main("--batch_size")
def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, evaluate, write the outputs; errors exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    check_output_dir(out, args.overwrite_output_dir)
    if args.task == "segmentation":
        result, rows = evaluate_segmentation(args)
        title = "Segmentation to image: ground truth, generated, predicted"
    else:
        result, rows = evaluate_canny(args)
        title = "Canny to image: control edges, generated, its Canny edges"
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown_report(result))
    contact_sheet(rows, out / "contact_sheet.png", title)
    for name in ("results.json", "results.md", "contact_sheet.png"):
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
