"""Do the world's DINO slot and CLIP-I tell subjects apart? Validation on the named subjects.

    python eval/validate_identity.py --out benchmarks/results/world_evaluators_identity/new.json

The 8 named subjects of :mod:`hra_diffusion.world.subjects` (never seen by the evaluators'
training) are drawn as :func:`~hra_diffusion.world.subjects.render_views` draws them: 5
backgrounds × 4 placements (view seeds 0-3), 20 views each. Features are computed exactly
as the eval driver computes them (:mod:`hra_diffusion.eval.models`: the ViT's CLS token for
the DINO slot, clip-anytorch's ``encode_image`` for CLIP-I), on the rendered views and on
their round trip through the VAE (latent mode, no perturbation), rounded to 8 bits as a
saved sample would be. Per evaluator and version (``raw``, ``vae``):

- ``pair_auc``: ROC AUC of the cosine, same-subject pairs against different-subject pairs
  (all pairs of distinct views; ``vae``: both views decoded);
- ``subject_top1``: with placement 0's views as each subject's references and placements
  1-3 as queries (``vae``: queries decoded, references rendered, as in the method table),
  whether each subject's queries score highest, in mean cosine, against its own references;
  ``view_top1`` the same per query view;
- ``cosine``: mean cosine of same subject / same background, same subject / other
  background, other subject / same background, other subject / other background;
- ``protocol``: the method table's DINO / CLIP-I score (mean cosine over every reference ×
  generated pair) when the "generated" images are a perfect copy (the subject's placements
  1-3, decoded): the ``ceiling``, and another subject on the same backgrounds (decoded):
  the ``floor``; mean ± std over subjects.

Targets: pair AUC ≥ 0.95 and subject top-1 for every subject, raw and after the round trip.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hra_diffusion import cli
from hra_diffusion.eval.images import batched
from hra_diffusion.eval.models import ClipEncoder, DinoEncoder
from hra_diffusion.eval.report import package_versions, write_json
from hra_diffusion.eval.similarity import cosine_matrix, mean_std
from hra_diffusion.world import evaluators
from hra_diffusion.world.subjects import SUBJECTS, VIEW_BACKGROUNDS, render_views
from hra_diffusion.world.tiny_sd import default_model_path

AUC_TARGET = 0.95
PLACEMENTS = 4
Embed = Callable[[list[Image.Image]], torch.Tensor]


@dataclass
class Views:
    """Pictures with their subject, placement and background indices, each (N,)."""

    images: list[Image.Image]
    subject: np.ndarray
    placement: np.ndarray
    background: np.ndarray


def render_set(names: list[str], placements: int, backgrounds: int) -> Views:
    """Views of each named subject: ``placements`` view seeds × the first ``backgrounds``."""
    images, rows = [], []
    for s, name in enumerate(names):
        for p in range(placements):
            for b, image in enumerate(render_views(SUBJECTS[name], seed=p)[:backgrounds]):
                images.append(image)
                rows.append((s, p, b))
    subject, placement, background = (np.array(c) for c in zip(*rows, strict=True))
    return Views(images, subject, placement, background)


def round_trip(views: Views, vae_dir: str, seed: int) -> Views:
    """The views through the VAE (latent mode), as 8-bit pictures."""
    pixels = torch.from_numpy(np.stack([np.asarray(im) for im in views.images]))  # (N, H, W, 3)
    x = pixels.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    y = evaluators.vae_round_trip(x, seed, noise=0.0, vae_dir=vae_dir)  # (N, 3, H, W)
    as_uint8 = (y.permute(0, 2, 3, 1) * 255).round().byte().numpy()  # (N, H, W, 3)
    images = [Image.fromarray(a) for a in as_uint8]
    return Views(images, views.subject, views.placement, views.background)


def embed_all(embed: Embed, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
    """Embeddings (N, D) of the images, in batches."""
    return torch.cat([embed(list(chunk)) for chunk in batched(images, batch_size)])


def pair_auc(features: torch.Tensor, subject: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney, ties count half) of cosine for same- vs different-subject pairs."""
    cos = cosine_matrix(features, features).numpy()  # (N, N)
    i, j = np.triu_indices(len(subject), k=1)
    scores, same = cos[i, j], subject[i] == subject[j]  # (P,)
    from scipy.stats import rankdata  # a heavy import, for this function only

    ranks = rankdata(scores)
    n_pos, n_neg = same.sum(), (~same).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("pair_auc needs at least two subjects, one with two views")
    return float((ranks[same].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def subject_scores(refs: torch.Tensor, ref_subject, queries: torch.Tensor, query_subject):
    """Mean cosine (S, S) between subject a's queries (rows) and subject b's references."""
    cos = cosine_matrix(queries, refs).numpy()  # (Q, R)
    subjects = np.unique(ref_subject)
    return np.array(
        [[cos[query_subject == a][:, ref_subject == b].mean() for b in subjects] for a in subjects]
    )  # (S, S)


def top1(refs, ref_subject, queries, query_subject) -> dict:
    """Whether each subject's queries score highest against its own references, and the
    share of query views whose highest mean cosine is their own subject's references."""
    table = subject_scores(refs, ref_subject, queries, query_subject)  # (S, S)
    subjects = np.unique(ref_subject)
    cos = cosine_matrix(queries, refs).numpy()  # (Q, R)
    per_view = np.stack([cos[:, ref_subject == b].mean(1) for b in subjects], 1)  # (Q, S)
    return {
        "subject_top1": [bool(table[k].argmax() == k) for k in range(len(subjects))],
        "view_top1": float((subjects[per_view.argmax(1)] == query_subject).mean()),
    }


def cosine_by_relation(features: torch.Tensor, subject, background) -> dict[str, float]:
    """Mean cosine over distinct pairs, by (same or other subject) × (same or other background)."""
    cos = cosine_matrix(features, features).numpy()  # (N, N)
    i, j = np.triu_indices(len(subject), k=1)
    same_s, same_b = subject[i] == subject[j], background[i] == background[j]
    out = {}
    for name, keep in {
        "same_subject_same_background": same_s & same_b,
        "same_subject_other_background": same_s & ~same_b,
        "other_subject_same_background": ~same_s & same_b,
        "other_subject_other_background": ~same_s & ~same_b,
    }.items():
        out[name] = float(cos[i[keep], j[keep]].mean()) if keep.any() else math.nan
    return out


def ceiling_floor(refs, ref_subject, copies, copy_subject) -> dict:
    """The method table's score (mean cosine, references × generated) of a perfect copy
    (``ceiling``) and of every other subject on the same backgrounds (``floor``)."""
    table = subject_scores(refs, ref_subject, copies, copy_subject)  # (S gen, S ref)
    k = len(table)
    ceiling = [float(table[s, s]) for s in range(k)]
    floor = [float(np.mean([table[t, s] for t in range(k) if t != s])) for s in range(k)]
    return {
        "ceiling": mean_std(ceiling),
        "floor": mean_std(floor),
        "ceiling_per_subject": ceiling,
        "floor_per_subject": floor,
    }


def evaluate_embedding(embed: Embed, raw: Views, decoded: Views) -> dict:
    """Every figure of one evaluator (see the module docstring), raw and after the round trip."""
    f_raw, f_vae = embed_all(embed, raw.images), embed_all(embed, decoded.images)  # (N, D)
    ref, query = raw.placement == 0, raw.placement > 0
    out: dict = {}
    for version, features in (("raw", f_raw), ("vae", f_vae)):
        picks = top1(f_raw[ref], raw.subject[ref], features[query], raw.subject[query])
        out[version] = {
            "pair_auc": pair_auc(features, raw.subject),
            **picks,
            "every_subject_top1": all(picks["subject_top1"]),
            "cosine": cosine_by_relation(features, raw.subject, raw.background),
        }
    out["protocol"] = ceiling_floor(f_raw[ref], raw.subject[ref], f_vae[query], raw.subject[query])
    out["meets_targets"] = all(
        out[v]["pair_auc"] >= AUC_TARGET and out[v]["every_subject_top1"] for v in ("raw", "vae")
    )
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dino_model",
        type=cli.existing_dir,
        default=str(evaluators.VIT_DIR),
        help="Default: the bundled ViT.",
    )
    parser.add_argument(
        "--clip_model",
        type=cli.existing_file,
        default=str(evaluators.CLIP_FILE),
        help="Default: the bundled CLIP.",
    )
    parser.add_argument(
        "--vae",
        type=cli.existing_dir,
        default=str(default_model_path() / "vae"),
        help="Default: the bundled VAE.",
    )
    parser.add_argument(
        "--subjects",
        nargs="+",
        default=list(SUBJECTS),
        choices=list(SUBJECTS),
        help="Default: all 8.",
    )
    parser.add_argument(
        "--placements", type=cli.positive_int, default=PLACEMENTS, help="View seeds. Default: 4."
    )
    parser.add_argument(
        "--backgrounds", type=cli.positive_int, default=len(VIEW_BACKGROUNDS), help="Default: 5."
    )
    parser.add_argument(
        "--seed", type=cli.seed, default=0, help="VAE seed (unused at noise 0). Default: 0."
    )
    parser.add_argument("--device", type=cli.text, default="cpu", help="Default: cpu.")
    parser.add_argument(
        "--out", type=cli.output_file, required=True, help="The JSON file to write."
    )
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors for settings that leave no pairs or references to compare."""
    if len(args.subjects) < 2:
        parser.error("--subjects needs at least two subjects.")
    if not 2 <= args.placements:
        parser.error(
            f"--placements must be at least 2 (references and queries), got {args.placements}."
        )
    if not 1 <= args.backgrounds <= len(VIEW_BACKGROUNDS):
        parser.error(
            f"--backgrounds must lie in 1..{len(VIEW_BACKGROUNDS)}, got {args.backgrounds}."
        )


def validate(args: argparse.Namespace) -> dict:
    """Both evaluators' figures on the named subjects."""
    start = time.perf_counter()
    dino = DinoEncoder(args.dino_model, args.device)
    clip = ClipEncoder(args.clip_model, args.device)
    raw = render_set(args.subjects, args.placements, args.backgrounds)
    decoded = round_trip(raw, args.vae, args.seed)
    result: dict = {"settings": vars(args), "subjects": args.subjects, "num_views": len(raw.images)}
    result["dino"] = evaluate_embedding(dino, raw, decoded)
    result["clip_i"] = evaluate_embedding(clip.encode_images, raw, decoded)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["packages"] = package_versions()
    return result


@cli.cli_main("--subjects, --placements and --backgrounds")
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    result = validate(args)
    write_json(Path(args.out), result)
    for name in ("dino", "clip_i"):
        r = result[name]
        print(
            f"{name}: AUC raw {r['raw']['pair_auc']:.3f} vae {r['vae']['pair_auc']:.3f}, "
            f"top-1 raw {sum(r['raw']['subject_top1'])}/{len(args.subjects)} "
            f"vae {sum(r['vae']['subject_top1'])}/{len(args.subjects)}, "
            f"ceiling {r['protocol']['ceiling']['mean']:.3f} "
            f"floor {r['protocol']['floor']['mean']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
