"""How well does a VAE keep a 64 px picture? Round-trip scores on four sets of pictures.

Each picture is encoded (latent mean), decoded, and rounded to uint8 as a pipeline's
output is; then compared with the original by :mod:`hra_diffusion.world.broad`'s metrics,
PSNR (dB, MSE pooled over a set) and the joint-RGB colour-histogram L1 (0-2):

- ``broad``: the held-out broad pictures (``broad.evaluation_set``, seed
  ``broad.EVAL_SEED``): any colour, every scale, gradients, stripes, checkers;
- ``world``: world scenes of all colour-shape pairs (seed 12345, as ``pretrain_world``);
- ``subjects``: the 8 DreamBooth subjects' 5 views each (``render_views``, seed 0);
- ``probe``: issue 32's disc holding a square in three colours the world never uses;
- ``stripes_<p>``: two-colour stripes of period p px, one picture per period.

Also the encode and decode time of one picture (median of 20, ``--num_threads``), CPU and wall.
Writes ``--out`` (JSON) and with ``--grid`` a PNG: originals | ``--baseline_vae``'s round
trip (if given) | this VAE's::

    python benchmarks/vae_round_trip.py --vae hra_diffusion/assets/tiny-sd-world/vae \\
        --out benchmarks/results/world_vae_broad/old_vae.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
from PIL import Image

from hra_diffusion import cli, world
from hra_diffusion.errors import fail
from hra_diffusion.eval.report import contact_sheet, package_versions, write_json
from hra_diffusion.world import broad, subjects

WORLD_SEED = 12345
"""Seed of the world scenes, as ``pretrain_world.evaluate_vae`` draws them."""


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(description="Round-trip PSNR and colour histogram of a VAE.")
    parser.add_argument(
        "--vae", type=cli.existing_dir, required=True, help="Local diffusers AutoencoderKL folder."
    )
    parser.add_argument("--out", type=cli.output_file, required=True, help="JSON file to write.")
    parser.add_argument(
        "--broad_count",
        type=cli.positive_int,
        default=broad.EVAL_COUNT,
        help=f"Held-out broad pictures. Default: {broad.EVAL_COUNT}.",
    )
    parser.add_argument(
        "--world_count", type=cli.positive_int, default=256, help="World scenes. Default: 256."
    )
    parser.add_argument("--num_threads", type=cli.positive_int, default=1, help="Default: 1.")
    parser.add_argument(
        "--grid", type=cli.output_file, default=None, help="PNG of originals and round trips."
    )
    parser.add_argument(
        "--baseline_vae",
        type=cli.existing_dir,
        default=None,
        help="A VAE folder for the grid's middle column.",
    )
    return parser


def load_vae(path: str) -> diffusers.AutoencoderKL:
    """A local VAE folder, in fp32 eval mode; a clear error if it is not one."""
    if not (Path(path) / "config.json").is_file():
        fail(f"--vae {path} is not a local VAE folder (no config.json in it).")
    return diffusers.AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()


@torch.no_grad()
def round_trip(vae: diffusers.AutoencoderKL, images: list[Image.Image]) -> list[Image.Image]:
    """``images`` through the VAE (latent mean), rounded to uint8 RGB, in batches of 64."""
    out = []
    for i in range(0, len(images), 64):
        batch = np.stack([world.image_to_array(im) for im in images[i : i + 64]])
        pixels = torch.from_numpy(batch)  # (B, 3, 64, 64) in [-1, 1]
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample  # (B, 3, 64, 64)
        array = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
        out += [Image.fromarray(a) for a in array.numpy()]  # (64, 64, 3) each
    return out


def picture_sets(broad_count: int, world_count: int) -> dict[str, list[Image.Image]]:
    """The scored sets, by name (see the module docstring)."""
    rng = np.random.default_rng(WORLD_SEED)
    sets = {
        "broad": broad.evaluation_set(broad_count),
        "world": [world.render_scene(world.sample_scene(rng, "all")) for _ in range(world_count)],
        "subjects": [view for s in subjects.SUBJECTS.values() for view in subjects.render_views(s)],
        "probe": [broad.probe()],
    }
    for period in broad.PERIODS:
        sets[f"stripes_{period}"] = [broad.stripes(period)]
    return sets


def scores(originals: list[Image.Image], trips: list[Image.Image]) -> dict[str, float]:
    """Pooled PSNR, the worst picture's PSNR, the mean and largest histogram L1, and the mean
    L1 of hard-binned histograms (for comparison with issue 32's 1.37)."""
    l1 = [broad.histogram_l1(a, b) for a, b in zip(originals, trips, strict=True)]
    hard = [broad.histogram_l1(a, b, soft=False) for a, b in zip(originals, trips, strict=True)]
    worst = min(broad.psnr(a, b) for a, b in zip(originals, trips, strict=True))
    return {
        "count": len(originals),
        "psnr_db": round(broad.psnr(originals, trips), 2),
        "psnr_worst_db": round(worst, 2),
        "hist_l1_mean": round(float(np.mean(l1)), 4),
        "hist_l1_max": round(float(np.max(l1)), 4),
        "hard_hist_l1_mean": round(float(np.mean(hard)), 4),
    }


def mean_l1(a: list[Image.Image], b: list[Image.Image]) -> float:
    """Mean histogram L1 of paired pictures."""
    pairs = zip(a, b, strict=True)
    return round(float(np.mean([broad.histogram_l1(x, y) for x, y in pairs])), 4)


def instrument_check(pictures: list[Image.Image]) -> dict[str, float]:
    """The metrics on known answers: each broad picture against itself (L1 0, PSNR inf),
    against the next one (another picture: L1 near 2), and shifted by one level on every
    channel (a barely visible change: L1 at most 3 · 2 / 36.4 = 0.16)."""
    other = pictures[1:] + pictures[:1]
    shifted = [Image.fromarray(np.minimum(np.asarray(im), 254) + 1) for im in pictures]
    return {
        "hist_l1_identical_mean": mean_l1(pictures, pictures),
        "hist_l1_other_picture_mean": mean_l1(pictures, other),
        "hist_l1_one_level_shift_mean": mean_l1(pictures, shifted),
        "psnr_other_picture_db": round(broad.psnr(pictures, other), 2),
        "psnr_one_level_shift_db": round(broad.psnr(pictures, shifted), 2),
    }


@torch.no_grad()
def timings(vae: diffusers.AutoencoderKL, repeats: int = 20) -> dict[str, float]:
    """Median encode and decode milliseconds of one 64 px picture, in CPU time of this
    process (steady on a loaded machine, where wall time is not) and in wall time."""
    pixels = torch.from_numpy(world.image_to_array(broad.probe()))[None]  # (1, 3, 64, 64)
    result: dict[str, float] = {}
    for clock_name, clock in (("cpu", time.process_time), ("wall", time.perf_counter)):
        encode, decode = [], []
        for _ in range(repeats):
            start = clock()
            latents = vae.encode(pixels).latent_dist.mean  # (1, 4, 16, 16)
            middle = clock()
            vae.decode(latents)
            encode.append(middle - start)
            decode.append(clock() - middle)
        result[f"encode_{clock_name}_ms"] = round(1000 * statistics.median(encode), 2)
        result[f"decode_{clock_name}_ms"] = round(1000 * statistics.median(decode), 2)
    return result


def write_grid(path: Path, sets: dict, trips: list[dict], names: list[str]) -> None:
    """Rows of sample pictures: original, then each VAE's round trip with its PSNR and L1."""
    picks = [("probe", 0)] + [("broad", i) for i in range(min(8, len(sets["broad"])))]
    picks += [("world", i) for i in range(min(2, len(sets["world"])))]
    picks += [("subjects", 5 * i) for i in range(len(subjects.SUBJECTS))]
    picks += [(f"stripes_{p}", 0) for p in broad.PERIODS[:3]]
    rows = []
    for key, i in picks:
        original = sets[key][i]
        row = [(original, f"{key} {i}")]
        for name, trip in zip(names, trips, strict=True):
            image = trip[key][i]
            psnr = broad.psnr(original, image)
            l1 = broad.histogram_l1(original, image)
            row.append((image, f"{name}: {psnr:.1f} dB, L1 {l1:.2f}"))
        rows.append(row)
    title = "original | " + " | ".join(names) + " (round trip, latent mean)"
    contact_sheet(rows, path, title, tile=128)


@cli.cli_main("--broad_count and --world_count")
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.num_threads)
    start = time.time()
    vae = load_vae(args.vae)
    sets = picture_sets(args.broad_count, args.world_count)
    trips = {name: round_trip(vae, images) for name, images in sets.items()}
    result = {
        "vae": args.vae,
        "parameters": sum(p.numel() for p in vae.parameters()),
        "block_out_channels": list(vae.config.block_out_channels),
        "layers_per_block": vae.config.layers_per_block,
        "seeds": {"broad": broad.EVAL_SEED, "world": WORLD_SEED, "subject_views": 0},
        "sets": {name: scores(sets[name], trips[name]) for name in sets},
        "per_subject": {
            name: scores(sets["subjects"][5 * i : 5 * i + 5], trips["subjects"][5 * i : 5 * i + 5])
            for i, name in enumerate(subjects.SUBJECTS)
        },
        "timing_1_picture": {"num_threads": args.num_threads, **timings(vae)},
        "instrument_check": instrument_check(sets["broad"]),
    }
    if args.grid:
        names, all_trips = [], []
        if args.baseline_vae:
            baseline = load_vae(args.baseline_vae)
            names.append("baseline")
            all_trips.append({k: round_trip(baseline, v) for k, v in sets.items()})
        names.append("this VAE")
        all_trips.append(trips)
        write_grid(Path(args.grid), sets, all_trips, names)
    result["wall_seconds"] = round(time.time() - start, 1)
    result["command"] = " ".join(["python", *sys.argv]) if argv is None else None
    result["versions"] = package_versions()
    write_json(Path(args.out), result)
    for name, row in result["sets"].items():
        print(f"{name:12s} {row}")
    print(result["timing_1_picture"])


if __name__ == "__main__":
    main()
