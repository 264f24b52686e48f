"""Does DreamBooth-HRA learn a subject? Measured in the procedural world, per subject.

For each subject of :mod:`hra_diffusion.world.subjects` (objects the world never draws):

1. its five training views are written to a folder (five world backgrounds, never blue);
2. ``train/train_dreambooth_hra.py`` runs on them with the bundled default model and the
   settings of ``hra_diffusion/world/dreambooth.args`` (plus any extra options given after
   ``--``), instance prompt ``"a qwe <noun>"``;
3. the base model and the tuned one each generate ``--num_images`` images (seeds 0, 1, …)
   for ``"a qwe <noun>"`` and for ``"a qwe <noun> on a blue background"``.

Scores (:mod:`hra_diffusion.world.scorer`), base vs tuned:

- **object distance**: total-variation distance between the colour histogram of the
  generated objects' pixels and that of the subject in its views (0 = same colours,
  1 = disjoint), and the **share closed**, (base − tuned) / base;
- **image distance**: the same over whole images (backgrounds included);
- **VAE floor**: the object distance of the views themselves after a round trip through the
  base's VAE, which decodes every sample: about as close as a generation can come;
- **recontextualisation rate**: the share of "… on a blue background" images whose
  background reads blue, and their object distance (is the subject still there?).

Writes ``results.json``, ``results.md`` and ``before_after.png`` (per subject: views,
base samples, tuned samples, tuned on blue)::

    python benchmarks/dreambooth_world.py --subjects robot donut plus \\
        --output_dir benchmarks/results/dreambooth_world
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hra_diffusion import cli
from hra_diffusion.eval.report import (
    contact_sheet,
    markdown_table,
    package_versions,
    split_passthrough,
    write_json,
)
from hra_diffusion.eval.world_dreambooth import (
    GUIDANCE_SCALE,
    STEPS,
    distances,
    generate,
    prompts,
    recontext_rate,
    vae_round_trip,
)
from hra_diffusion.inference import load_pipeline
from hra_diffusion.train import train_dreambooth_hra
from hra_diffusion.world.subjects import DREAMBOOTH_RECIPE, SUBJECTS, Subject, write_views
from hra_diffusion.world.tiny_sd import default_model_path


def score(pipe, subject: Subject, views: list[Image.Image], count: int) -> tuple[dict, dict]:
    """Scores of one pipeline for a subject, and the images they were computed on."""
    p = prompts(subject)
    images = {name: generate(pipe, prompt, count) for name, prompt in p.items()}
    scores = {
        "instance": distances(images["instance"], views),
        "recontext": {
            **distances(images["recontext"], views),
            "background_rate": recontext_rate(images["recontext"]),
        },
    }
    return scores, images


def closed(base: float, tuned: float) -> float:
    """Share of the base's distance that tuning closed."""
    return (base - tuned) / base if base > 0 else 0.0


def run_subject(
    subject: Subject,
    work: Path,
    model: str,
    base_pipe,
    count: int,
    captions: bool,
    extra: list[str],
) -> tuple[dict, list]:
    """Train on one subject, score base and tuned, return the record and its sheet row."""
    views_dir = work / subject.name / "views"
    shutil.rmtree(views_dir, ignore_errors=True)
    caption = prompts(subject)["instance"] if captions else None
    views = [Image.open(p).convert("RGB") for p in write_views(subject, views_dir, caption=caption)]
    if captions:
        extra = ["--caption_extension", ".txt", *extra]
    run_dir = work / subject.name / "run"
    argv = [
        f"@{DREAMBOOTH_RECIPE}",
        "--pretrained_model_name_or_path", model,
        "--instance_data_dir", str(views_dir),
        "--instance_prompt", prompts(subject)["instance"],
        "--output_dir", str(run_dir),
        "--overwrite_output_dir",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip
    started = time.perf_counter()
    summary = train_dreambooth_hra.main(argv)
    train_seconds = time.perf_counter() - started
    tuned_pipe = load_pipeline(model, weights=run_dir)
    base, base_images = score(base_pipe, subject, views, count)
    tuned, tuned_images = score(tuned_pipe, subject, views, count)
    record = {
        "prompts": prompts(subject),
        "vae_round_trip": distances(vae_round_trip(base_pipe, views), views),
        "train_seconds": round(train_seconds, 1),
        "trainable_parameters": summary["trainable_parameters"],
        "base": base,
        "tuned": tuned,
        "object_distance_closed": closed(base["instance"]["object"], tuned["instance"]["object"]),
        "image_distance_closed": closed(base["instance"]["image"], tuned["instance"]["image"]),
    }
    row = [(views[0], f"{subject.name}: a training view")]
    row += [(im, "base: " + prompts(subject)["instance"]) for im in base_images["instance"][:2]]
    row += [(im, "tuned: " + prompts(subject)["instance"]) for im in tuned_images["instance"][:3]]
    row += [(im, "tuned: " + prompts(subject)["recontext"]) for im in tuned_images["recontext"][:3]]
    return record, row


def summary_table(results: dict) -> str:
    header = [
        "subject",
        "object dist. base → tuned",
        "closed",
        "VAE floor",
        "image dist. base → tuned",
        "closed",
        "blue-background rate base → tuned",
        "blue: object dist. tuned",
    ]
    rows = []
    for name, r in results["subjects"].items():
        b, t = r["base"], r["tuned"]
        rows.append(
            [
                name,
                f"{b['instance']['object']:.2f} → {t['instance']['object']:.2f}",
                f"{100 * r['object_distance_closed']:.0f} %",
                f"{r['vae_round_trip']['object']:.2f}",
                f"{b['instance']['image']:.2f} → {t['instance']['image']:.2f}",
                f"{100 * r['image_distance_closed']:.0f} %",
                f"{100 * b['recontext']['background_rate']:.0f} % → "
                f"{100 * t['recontext']['background_rate']:.0f} %",
                f"{t['recontext']['object']:.2f}",
            ]
        )
    return markdown_table(header, rows)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's own options (the training script's follow a ``--``)."""
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", nargs="+", choices=list(SUBJECTS), default=["robot"])
    parser.add_argument(
        "--num_images", type=cli.positive_int, default=8, help="Per prompt. Default: 8."
    )
    parser.add_argument(
        "--model", type=cli.model_ref, default=None, help="Base pipeline (the bundled default)."
    )
    parser.add_argument("--output_dir", type=cli.output_dir, required=True)
    parser.add_argument(
        "--work_dir",
        type=cli.output_dir,
        default="out/dreambooth_world",
        help="Views and runs.",
    )
    parser.add_argument(
        "--captions",
        action="store_true",
        help='Train with a caption per view naming its background ("a qwe toy on a white '
        'background") instead of the bare instance prompt.',
    )
    return parser


@cli.cli_main("--num_images")
def main(argv: list[str] | None = None) -> int:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(own)
    out, work = Path(args.output_dir), Path(args.work_dir)
    model = args.model or str(default_model_path())
    base_pipe = load_pipeline(model)
    results: dict = {
        "model": model,
        "recipe": DREAMBOOTH_RECIPE.read_text().split(),
        "captions": args.captions,
        "extra_args": extra,
        "num_images": args.num_images,
        "sampling": {"steps": STEPS, "guidance_scale": GUIDANCE_SCALE},
        "subjects": {},
    }
    rows = []
    for name in args.subjects:
        record, row = run_subject(
            SUBJECTS[name], work, model, base_pipe, args.num_images, args.captions, extra
        )
        results["subjects"][name] = record
        rows.append(row)
        print(json.dumps({name: record}, indent=1), flush=True)
    object_closed = [r["object_distance_closed"] for r in results["subjects"].values()]
    results["mean_object_distance_closed"] = float(np.mean(object_closed))
    results["packages"] = package_versions()
    write_json(out / "results.json", results)
    (out / "results.md").write_text(summary_table(results))
    contact_sheet(rows, out / "before_after.png", "DreamBooth-HRA on the bundled model", tile=96)
    print(summary_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
