"""Subject-driven evaluation on the DreamBooth benchmark: DINO, CLIP-I, CLIP-T and LPIPS.

Metrics per subject (embeddings L2-normalised, cos = cosine similarity):

    DINO               = mean over (real r, generated g) pairs of cos(DINO(r), DINO(g))
    CLIP-I             = mean over (real r, generated g) pairs of cos(CLIP(r), CLIP(g))
    CLIP-T             = mean over generated g of cos(CLIP(g), CLIP_text(prompt of g))
    lpips_to_reference = mean over (real r, generated g) pairs of LPIPS(r, g)
    lpips_diversity    = mean over prompts, over pairs g != g' generated for that prompt,
                         of LPIPS(g, g')
    dino_feature_diversity = the same pairs as lpips_diversity, scored by an LPIPS-style
                         distance on the DINO model's token features (unit-normalised per
                         token, every layer and channel weighted equally: not LPIPS, whose
                         heads are calibrated on human judgements; see feature_distance)

LPIPS needs torchvision's ImageNet backbone file, which offline machines cannot fetch:
without it the LPIPS metrics are reported as unavailable (with the reason and the file to
supply) and every other metric is still computed.

Without --dino_model and --clip_model the bundled world evaluators are used
(hra_diffusion.world.evaluators: an attribute-supervised tiny ViT and a tiny CLIP trained on the
procedural world); pass DINO ViT-S/16 and CLIP ViT-B/32 by path for real photographs.

Each subject reports mean ± std over its pairs (images for CLIP-T); the overall row is the
mean ± std over subjects of the per-subject means (every subject weighs the same).

Inputs:

    <dataset-dir>/<subject>/*.jpg          real images (google/dreambooth's dataset/ folder)
    <generated-dir>/<subject>/<p>_<s>.png  sample s of prompt p, p = 0..24 indexing the
                                           subject's own prompt list (object or live)
    <generated-dir>/<subject>/prompts.json optional JSON list of the 25 prompts used; when
                                           present it must equal the benchmark's list

or, instead of --generated_dir, one trained HRA weights file per subject (--weights): the
images are then generated into <output-dir>/generated/ with the layout above and scored.
A --checkpoints sweep scores every listed checkpoint and reports all of them; no checkpoint
is ever selected by these test metrics.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from hra_diffusion import cli
from hra_diffusion.eval.dreambooth_benchmark import (
    Subject,
    strip_identifier,
    subject_prompts,
    subjects,
)
from hra_diffusion.eval.errors import EvaluationError
from hra_diffusion.eval.images import batched, check_decodable, list_images, open_image
from hra_diffusion.eval.models import (
    ClipEncoder,
    DinoEncoder,
    LpipsScorer,
    LpipsUnavailable,
    default_device,
)
from hra_diffusion.eval.report import (
    add_overwrite_arg,
    bar_chart,
    check_output_dir,
    contact_sheet,
    fmt_stat,
    markdown_table,
    package_versions,
    write_json,
)
from hra_diffusion.eval.similarity import (
    cosine_matrix,
    distinct_pairs,
    feature_distance,
    mean_std,
    paired_cosine,
)
from hra_diffusion.inference import load_pipeline
from hra_diffusion.world.evaluators import CLIP_FILE, VIT_DIR

METRICS = (
    "dino",
    "clip_i",
    "clip_t",
    "lpips_to_reference",
    "lpips_diversity",
    "dino_feature_diversity",
)
LPIPS_METRICS = ("lpips_to_reference", "lpips_diversity")
GENERATED_NAME = re.compile(r"^(\d+)_(\d+)$")
SHEET_SUBJECTS, SHEET_PROMPTS = 4, 5


def generated_groups(folder: Path, num_prompts: int) -> dict[int, list[Path]]:
    """Generated images of one subject grouped by prompt index, checking the file names."""
    files = list_images(folder, "generated image")
    groups: dict[int, list[Path]] = {p: [] for p in range(num_prompts)}
    bad_names = []
    for path in files:
        match = GENERATED_NAME.match(path.stem)
        if match is None or int(match.group(1)) >= num_prompts:
            bad_names.append(path.name)
        else:
            groups[int(match.group(1))].append(path)
    if bad_names:
        raise EvaluationError(
            f"{folder}: file names must be <prompt index 0..{num_prompts - 1}>_<sample>.png; "
            f"unexpected: {', '.join(bad_names)}"
        )
    missing = [str(p) for p, paths in groups.items() if not paths]
    if missing:
        raise EvaluationError(f"{folder}: no images for prompt index(es) {', '.join(missing)}")
    return groups


def check_prompts_file(folder: Path, expected: list[str]) -> None:
    """If ``folder/prompts.json`` exists it must list exactly the benchmark prompts."""
    path = folder / "prompts.json"
    if not path.exists():
        return
    try:
        used = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EvaluationError(f"{path} is not valid JSON: {error}") from error
    if used != expected:
        diff = next(
            (i for i, (a, b) in enumerate(zip(used, expected, strict=False)) if a != b),
            min(len(used), len(expected)),
        )
        raise EvaluationError(
            f"{path} does not match the benchmark's prompt list for this subject at index "
            f"{diff}: expected {expected[diff] if diff < len(expected) else '<end>'!r}, got "
            f"{used[diff] if diff < len(used) else '<end>'!r} (check --identifier and that "
            "objects use the object list, live subjects the live list)"
        )


def prompt_blocks(
    groups: dict[int, list[Path]], batch_size: int
) -> Iterator[list[tuple[int, list[Path]]]]:
    """Consecutive prompt groups packed into blocks of at most ``batch_size`` images.

    A block never splits a prompt's images (diversity pairs need them together), so a
    prompt with more than ``batch_size`` images forms a block of its own.
    """
    block: list[tuple[int, list[Path]]] = []
    for prompt_index, paths in groups.items():
        if block and sum(len(g) for _, g in block) + len(paths) > batch_size:
            yield block
            block = []
        block.append((prompt_index, paths))
    if block:
        yield block


class SubjectScorer:
    """Holds the networks and scores one subject's generated images.

    ``lpips`` is ``None`` when LPIPS cannot be computed; ``lpips_unavailable`` then says why.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.dino = DinoEncoder(args.dino_model, args.device)
        self.clip = ClipEncoder(args.clip_model, args.device)
        self.lpips: LpipsScorer | None = None
        self.lpips_unavailable: str | None = None
        try:
            self.lpips = LpipsScorer(args.lpips_net, args.device, args.lpips_size)
        except LpipsUnavailable as error:
            self.lpips_unavailable = str(error)
        self.batch_size = args.batch_size

    def _lpips_pairs(self, xs: torch.Tensor, ys: torch.Tensor, pairs: list) -> list[float]:
        """LPIPS(xs[i], ys[j]) for every (i, j) in ``pairs``, in batches."""
        out: list[float] = []
        for chunk in batched(pairs, self.batch_size):
            i, j = zip(*chunk, strict=True)
            out += self.lpips(xs[list(i)], ys[list(j)]).tolist()  # (b,)
        return out

    def _feature_pairs(self, images: list, pairs: list) -> list[float]:
        """:func:`feature_distance` on the DINO model's token features for each (i, j) pair."""
        if not pairs:
            return []
        features = [self.dino.token_features(list(b)) for b in batched(images, self.batch_size)]
        layers = [torch.cat(per_layer) for per_layer in zip(*features, strict=True)]  # (G, T, D)
        i, j = (list(k) for k in zip(*pairs, strict=True))
        return feature_distance([f[i] for f in layers], [f[j] for f in layers]).tolist()

    def score(
        self,
        references: list[Path],
        groups: dict[int, list[Path]],
        clip_t_prompts: list[str],
        progress: tqdm,
    ) -> dict[str, dict]:
        """Per-metric mean/std/n for one subject (see the module docstring for formulas)."""
        refs = [open_image(p) for p in references]  # a handful of real photos
        ref_dino = torch.cat([self.dino(b) for b in batched(refs, self.batch_size)])  # (R, D)
        ref_clip = torch.cat([self.clip.encode_images(b) for b in batched(refs, self.batch_size)])
        text = self.clip.encode_texts(clip_t_prompts)  # (P, E)
        dino, clip_i, clip_t, to_ref, diversity, feature_div = [], [], [], [], [], []
        for block in prompt_blocks(groups, self.batch_size):
            paths = [path for _, group in block for path in group]
            images = [open_image(p) for p in paths]  # at most one block in memory
            g_dino = torch.cat([self.dino(b) for b in batched(images, self.batch_size)])
            g_clip = torch.cat(
                [self.clip.encode_images(b) for b in batched(images, self.batch_size)]
            )
            dino += cosine_matrix(ref_dino, g_dino).flatten().tolist()  # R·G pairs
            clip_i += cosine_matrix(ref_clip, g_clip).flatten().tolist()  # R·G pairs
            prompt_ids = [p for p, group in block for _ in group]
            clip_t += paired_cosine(g_clip, text[prompt_ids]).tolist()  # G values
            same_prompt, offset = [], 0
            for _, group in block:
                same_prompt += [(offset + i, offset + j) for i, j in distinct_pairs(len(group))]
                offset += len(group)
            feature_div += self._feature_pairs(images, same_prompt)
            if self.lpips is not None:
                ref_lp = torch.stack([self.lpips.to_tensor(r) for r in refs])  # (R, 3, S, S)
                g_lp = torch.stack([self.lpips.to_tensor(im) for im in images])  # (G, 3, S, S)
                ref_pairs = [(r, g) for r in range(len(refs)) for g in range(len(paths))]
                to_ref += self._lpips_pairs(ref_lp, g_lp, ref_pairs)
                diversity += self._lpips_pairs(g_lp, g_lp, same_prompt)
            progress.update(len(paths))
        scores = (dino, clip_i, clip_t, to_ref, diversity, feature_div)
        values = dict(zip(METRICS, scores, strict=True))
        return {name: mean_std(v) for name, v in values.items()}


def generate_subject_images(
    args: argparse.Namespace, weights: Path, prompts: list[str], folder: Path
) -> None:
    """Generate ``--num_images`` images per prompt with the HRA weights into ``folder``.

    Each prompt uses a generator seeded with ``--seed``, so a prompt's images do not depend
    on which prompts ran before it.  Writes ``prompts.json`` and ``<p>_<s>.png``.
    """
    if not weights.exists():
        raise EvaluationError(f"HRA weights not found: {weights} (from --weights)")
    if folder.is_dir() and any(folder.iterdir()):
        raise EvaluationError(
            f"{folder} already holds files: remove it to generate again, or score it with "
            f"--generated_dir {folder.parent}"
        )
    dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    pipe = load_pipeline(args.base_model, weights, "dpm", args.device, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    for p, prompt in enumerate(tqdm(prompts, desc=f"generate {folder.name}", unit="prompt")):
        generator = torch.Generator(args.device).manual_seed(args.seed)
        images = pipe(
            prompt,
            num_images_per_prompt=args.num_images,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
        ).images
        for s, image in enumerate(images):
            image.save(folder / f"{p:02d}_{s:02d}.png")


def _selected_subjects(names: list[str] | None) -> list[Subject]:
    table = subjects()
    unknown = sorted(set(names or []) - set(table))
    if unknown:
        raise EvaluationError(f"unknown subject(s) {unknown}; known: {', '.join(table)}")
    return [table[n] for n in names] if names else list(table.values())


def _checkpoint_folder(args: argparse.Namespace, checkpoint: str | None) -> Path:
    """Root folder of one checkpoint's generated images (given, or where they are generated)."""
    if args.generated_dir is not None:
        return Path(args.generated_dir.format(checkpoint=checkpoint))
    return Path(args.output_dir) / "generated" / (checkpoint or "")


def evaluate(args: argparse.Namespace) -> dict:
    """Score every selected subject (and checkpoint); returns the JSON-ready result."""
    chosen = _selected_subjects(args.subjects)
    references = {s.name: list_images(Path(args.dataset_dir) / s.name, "reference") for s in chosen}
    check_decodable([p for paths in references.values() for p in paths])
    scorer = SubjectScorer(args)  # fail on a missing model before any generation
    checkpoints: list[str | None] = list(args.checkpoints) if args.checkpoints else [None]
    folders = {}
    for checkpoint in checkpoints:
        root = _checkpoint_folder(args, checkpoint)
        for s in chosen:
            if args.weights is not None:
                weights = Path(args.weights.format(subject=s.name, checkpoint=checkpoint))
                prompts = subject_prompts(s, args.identifier)
                generate_subject_images(args, weights, prompts, root / s.name)
            folders[checkpoint, s.name] = root / s.name
    groups = {}
    for (checkpoint, name), folder in folders.items():
        expected = subject_prompts(subjects()[name], args.identifier)
        groups[checkpoint, name] = generated_groups(folder, len(expected))
        check_prompts_file(folder, expected)
    check_decodable([p for g in groups.values() for paths in g.values() for p in paths])
    runs = []
    for checkpoint in checkpoints:
        total = sum(len(v) for s in chosen for v in groups[checkpoint, s.name].values())
        progress = tqdm(total=total, desc=f"score {checkpoint or 'images'}", unit="img")
        per_subject = {}
        for s in chosen:
            prompts = subject_prompts(s, args.identifier)
            if args.clip_t_prompt == "class":
                prompts = [strip_identifier(p, args.identifier) for p in prompts]
            group = groups[checkpoint, s.name]
            per_subject[s.name] = {
                "class_noun": s.class_noun,
                "live": s.live,
                "prompt_list": s.prompt_list,
                "num_reference": len(references[s.name]),
                "num_generated": sum(len(v) for v in group.values()),
                "generated_dir": str(folders[checkpoint, s.name]),
                "metrics": scorer.score(references[s.name], group, prompts, progress),
            }
        progress.close()
        overall = {
            m: mean_std([r["metrics"][m]["mean"] for r in per_subject.values()]) for m in METRICS
        }
        runs.append({"checkpoint": checkpoint, "overall": overall, "subjects": per_subject})
    return {
        "task": "dreambooth",
        "config": {
            "dataset_dir": str(args.dataset_dir),
            "generated_dir": args.generated_dir,
            "weights": args.weights,
            "base_model": args.base_model if args.weights else None,
            "generation": (
                {
                    "num_images_per_prompt": args.num_images,
                    "seed": args.seed,
                    "steps": args.steps,
                    "scheduler": "DPMSolverMultistepScheduler",
                    "guidance_scale": args.guidance_scale,
                }
                if args.weights
                else None
            ),
            "identifier": args.identifier,
            "clip_t_prompt": args.clip_t_prompt,
            "lpips_size": args.lpips_size,
            "batch_size": args.batch_size,
            "device": args.device,
            "overall": "mean ± std over subjects of the per-subject means",
            "per_subject_std": "over (reference, generated) pairs; over images for clip_t",
        },
        "models": {"dino": args.dino_model, "clip": args.clip_model, "lpips": args.lpips_net},
        "lpips": (
            {"available": True}
            if scorer.lpips is not None
            else {"available": False, "reason": scorer.lpips_unavailable}
        ),
        "versions": package_versions(),
        "checkpoints": runs,
    }


def _cell(result: dict, metrics: dict, name: str) -> str:
    """``mean ± std``, or "unavailable" for an LPIPS metric that could not be computed."""
    if name in LPIPS_METRICS and not result["lpips"]["available"]:
        return "unavailable"
    return fmt_stat(metrics[name])


def markdown_report(result: dict) -> str:
    """Overall table (one row per checkpoint) followed by one per-subject table each."""
    cfg, models = result["config"], result["models"]
    prompt_mode = (
        "identifier replaced by the class noun"
        if cfg["clip_t_prompt"] == "class"
        else f"with the identifier '{cfg['identifier']}'"
    )
    text = (
        "# DreamBooth evaluation\n\n"
        f"DINO: `{models['dino']}` (CLS token); CLIP-I/CLIP-T: `{models['clip']}`; "
        f"LPIPS: `{models['lpips']}` at {cfg['lpips_size']} px. CLIP-T prompts: {prompt_mode}. "
        "Overall: mean ± std over subjects of the per-subject means. "
        "dino_feature_diversity: LPIPS-style distance on the DINO model's features "
        "(uncalibrated, not LPIPS).\n\n"
    )
    if not result["lpips"]["available"]:
        text += f"**LPIPS unavailable**: {result['lpips']['reason']}\n\n"
    header = ["checkpoint", "subjects", *METRICS]
    rows = [
        [str(r["checkpoint"] or "–"), str(len(r["subjects"]))]
        + [_cell(result, r["overall"], m) for m in METRICS]
        for r in result["checkpoints"]
    ]
    text += markdown_table(header, rows)
    for run in result["checkpoints"]:
        text += f"\n## Per subject (checkpoint {run['checkpoint'] or '–'})\n\n"
        rows = [
            [name, info["class_noun"], info["prompt_list"], str(info["num_generated"])]
            + [_cell(result, info["metrics"], m) for m in METRICS]
            for name, info in run["subjects"].items()
        ]
        text += markdown_table(["subject", "class", "prompts", "images", *METRICS], rows)
    return text


def write_contact_sheet(args: argparse.Namespace, run: dict, path: Path) -> None:
    """One row per subject (first few): a real image, then sample 0 of the first prompts."""
    rows = []
    for name in list(run["subjects"])[:SHEET_SUBJECTS]:
        info = run["subjects"][name]
        reference = list_images(Path(args.dataset_dir) / name, "reference")[0]
        prompts = subject_prompts(subjects()[name], args.identifier)
        groups = generated_groups(Path(info["generated_dir"]), len(prompts))
        row = [(open_image(reference), f"{name} (real)")]
        row += [(open_image(groups[p][0]), prompts[p]) for p in range(SHEET_PROMPTS)]
        rows.append(row)
    label = f" - checkpoint {run['checkpoint']}" if run["checkpoint"] else ""
    contact_sheet(rows, path, f"DreamBooth samples{label}: real image, then generated")


def write_outputs(result: dict, args: argparse.Namespace) -> list[Path]:
    """results.json, results.md, contact sheet(s) and, for a sweep, checkpoints.png."""
    out = Path(args.output_dir)
    write_json(out / "results.json", result)
    (out / "results.md").write_text(markdown_report(result))
    written = [out / "results.json", out / "results.md"]
    for run in result["checkpoints"]:
        suffix = f"_{run['checkpoint']}" if run["checkpoint"] else ""
        path = out / f"contact_sheet{suffix}.png"
        write_contact_sheet(args, run, path)
        written.append(path)
    if len(result["checkpoints"]) > 1:
        series = {
            f"checkpoint {r['checkpoint']}": {m: r["overall"][m]["mean"] for m in METRICS}
            for r in result["checkpoints"]
        }
        bar_chart(
            series, list(METRICS), out / "checkpoints.png", "DreamBooth metrics per checkpoint"
        )
        written.append(out / "checkpoints.png")
    return written


def build_parser() -> argparse.ArgumentParser:
    """Command-line options (each documented in --help)."""
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset_dir",
        type=cli.existing_dir,
        required=True,
        help="DreamBooth dataset root holding <subject>/ folders of real images",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--generated_dir",
        type=cli.text,
        help="root of already generated images: <root>/<subject>/<prompt>_<sample>.png; may "
        "contain '{checkpoint}', replaced by each --checkpoints label",
    )
    source.add_argument(
        "--weights",
        type=cli.text,
        help="HRA weights per subject (a .safetensors file or a folder holding "
        "hra_weights.safetensors), a path template with '{subject}' (and "
        "'{checkpoint}' with --checkpoints), e.g. runs/{subject}/hra_weights.safetensors; "
        "images are generated into <output-dir>/generated/ and then scored",
    )
    parser.add_argument(
        "--checkpoints",
        type=cli.text,
        nargs="+",
        metavar="LABEL",
        help="checkpoint labels substituted for '{checkpoint}'; every one is scored and "
        "reported (none is selected)",
    )
    parser.add_argument(
        "--base_model",
        type=cli.model_ref,
        help="Stable Diffusion diffusers folder or hub id used with --weights",
    )
    parser.add_argument(
        "--num_images",
        type=cli.positive_int,
        default=4,
        help="images per prompt with --weights (default 4)",
    )
    parser.add_argument("--seed", type=cli.seed, default=0, help="generation seed (default 0)")
    parser.add_argument(
        "--steps",
        type=cli.positive_int,
        default=25,
        help="DPM-Solver steps with --weights (default 25)",
    )
    parser.add_argument(
        "--guidance_scale",
        type=cli.non_negative_float,
        default=7.5,
        help="classifier-free guidance (default 7.5)",
    )
    parser.add_argument(
        "--subjects",
        type=cli.text,
        nargs="+",
        metavar="NAME",
        help="subset of the 30 subjects (default all)",
    )
    parser.add_argument(
        "--identifier",
        type=cli.text,
        default="qwe",
        help="unique identifier token in the prompts (default qwe)",
    )
    parser.add_argument(
        "--clip_t_prompt",
        choices=("class", "identifier"),
        default="class",
        help="CLIP-T text: 'class' drops the identifier ('a dog in the jungle', default); "
        "'identifier' keeps it ('a qwe dog in the jungle', as the HRA code)",
    )
    parser.add_argument(
        "--dino_model",
        type=cli.component_ref,
        default=str(VIT_DIR),
        help="DINO ViT: hub id or local save_pretrained folder, e.g. facebook/dino-vits16 "
        "(default: the bundled attribute-supervised world ViT)",
    )
    parser.add_argument(
        "--clip_model",
        type=cli.component_ref,
        default=str(CLIP_FILE),
        help="CLIP for CLIP-I/CLIP-T: clip-anytorch name (ViT-B/32 as DreamBooth, ViT-L/14 "
        "as the HRA code) or a local .safetensors state dict (default: the bundled tiny "
        "world CLIP)",
    )
    parser.add_argument(
        "--lpips_net",
        choices=("vgg", "alex"),
        default="vgg",
        help="LPIPS backbone (default vgg); its torchvision weights must be in "
        "$TORCH_HOME/hub/checkpoints/, else LPIPS is reported unavailable",
    )
    parser.add_argument(
        "--lpips_size",
        type=cli.positive_int,
        default=512,
        help="LPIPS input size: shorter side resized, centre-cropped square (default 512)",
    )
    parser.add_argument(
        "--batch_size", type=cli.positive_int, default=16, help="images per batch (default 16)"
    )
    parser.add_argument(
        "--device",
        type=cli.text,
        default=default_device(),
        help="torch device (default cuda if available)",
    )
    parser.add_argument(
        "--output_dir",
        type=cli.output_dir,
        required=True,
        help="where results.json, results.md and contact_sheet*.png are written",
    )
    add_overwrite_arg(parser)
    return parser


@cli.cli_main("--batch_size, --num_images and --lpips_size")
def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, evaluate, write the outputs; errors exit with status 2 and a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.weights is not None and args.base_model is None:
        parser.error("--weights needs --base_model")
    for option in ("generated_dir", "weights"):
        template = getattr(args, option)
        if template is not None and ("{checkpoint}" in template) != bool(args.checkpoints):
            parser.error(
                f"--{option} must contain '{{checkpoint}}' exactly when --checkpoints is given"
            )
    if args.weights is not None and "{subject}" not in args.weights:
        parser.error("--weights must contain '{subject}'")
    check_output_dir(args.output_dir, args.overwrite_output_dir)
    result = evaluate(args)
    written = write_outputs(result, args)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
