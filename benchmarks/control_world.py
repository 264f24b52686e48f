"""Does control training make the bundled model follow its condition? Edges and label maps.

    nice -n 10 python benchmarks/control_world.py

On the procedural world (:mod:`hra_diffusion.world`), with the bundled default model:

1. ``train/make_world_dataset.py`` writes a training set (training colour-shape pairs) and
   an evaluation set (fresh scenes of every pair) in the control folder layout;
2. ``train/train_control_hra.py`` trains HRA + a condition encoder twice: on Canny edges
   (computed from the images) and on the segmentation label maps (``--adapter lora``: a
   PEFT LoRA of the rank whose parameter count is nearest HRA's, the same data and budget);
3. ``pipelines/sample_control.py`` draws one image per evaluation condition with each;
   the base model draws the same captions with the same seeds *without* any condition;
4. ``eval/evaluate_control.py`` scores both: Canny IoU/F1 against the scenes' edge maps,
   and mIoU/mAcc/aAcc of the bundled world SegFormer against their label maps;
5. :func:`condition_use` asks whether the trained model uses its condition at all: its
   noise-prediction loss with each scene's own condition and with another scene's.

Heavy outputs (data, weights, samples) go to ``--work_dir``; a step whose output is
already there is skipped, so a second run only scores again (delete the folder to redo).
The results (the four ``evaluate_control`` outputs, ``summary.json`` and the grids
condition | base without condition | trained) go to ``--results_dir``; ``summary.json``
keeps the tasks and timings of earlier runs, so ``--tasks canny`` and
``--tasks segmentation`` can run side by side. Options after ``--`` go to every
``train_control_hra.py`` run and are recorded in ``summary.json``, e.g.
``-- --proportion_empty_prompts 0.5``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image

from hra_diffusion import cli, world
from hra_diffusion.conditions import label_to_color
from hra_diffusion.control import load_control_weights
from hra_diffusion.eval.report import split_passthrough
from hra_diffusion.injection import lora_rank_like_hra
from hra_diffusion.train import train_control_hra
from hra_diffusion.train.control_data import ControlDataset, collate_control, load_control_source
from hra_diffusion.train.setup import tokenize
from hra_diffusion.world.tiny_sd import default_model_path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("canny", "segmentation")
GRID_ROWS = 8
DIAGNOSTIC_TIMESTEPS = (100, 300, 500, 700, 900)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work_dir",
        type=cli.output_dir,
        default="out/control_world",
        help="Data, weights, samples.",
    )
    parser.add_argument(
        "--results_dir",
        type=cli.output_dir,
        default="benchmarks/results/control_world",
        help="Result files.",
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--adapter",
        choices=("hra", "lora"),
        default="hra",
        help="hra (default), or lora: PEFT LoRA of the rank whose parameter count on the "
        "same modules is nearest HRA's (both counts go to summary.json).",
    )
    parser.add_argument("--num_train", type=cli.positive_int, default=1000, help="Training scenes.")
    parser.add_argument("--num_eval", type=cli.positive_int, default=32, help="Evaluation scenes.")
    parser.add_argument(
        "--max_offset",
        type=cli.between(0, world.SIZE // 2, " pixels"),
        default=world.WIDE_OFFSET,
        help="Object-centre shift range of training and evaluation scenes, pixels per axis. "
        f"Default: {world.WIDE_OFFSET:g} (the bundled model saw {world.MAX_OFFSET:g}: wider "
        "layouts are what only the condition can tell).",
    )
    parser.add_argument("--max_train_steps", type=cli.positive_int, default=1000, help="Per task.")
    parser.add_argument(
        "--train_batch_size", type=cli.positive_int, default=8, help="The paper's 8."
    )
    parser.add_argument(
        "--learning_rate",
        type=cli.positive_float,
        default=9e-4,
        help="Default: the paper's 9e-4 (3e-3 kills the condition encoder's last block; "
        "to train the adapter faster, pass '-- --condition_encoder_lr 9e-4').",
    )
    parser.add_argument("--steps", type=cli.positive_int, default=20, help="DDIM sampling steps.")
    parser.add_argument(
        "--guidance_scale", type=cli.non_negative_float, default=9.0, help="The paper's 9."
    )
    parser.add_argument("--seed", type=cli.seed, default=0)
    return parser


def adapter_options(adapter: str, extra: list[str]) -> tuple[list[str], dict[str, int]]:
    """The training options that choose the adapter, and the parameter counts of both
    adapters on the modules the training script adapts (its default, or ``extra``'s)."""
    placeholders = ["--train_data_dir", ".", "--condition_type", "canny"]
    options = train_control_hra.build_parser().parse_args([*placeholders, *extra])
    unet = UNet2DConditionModel.from_pretrained(default_model_path(), subfolder="unet")
    rank, hra, lora = lora_rank_like_hra(unet, options.hra_target_modules, options.hra_r)
    counts = {"hra_r": options.hra_r, "hra": hra, "lora_rank": rank, "lora": lora}
    return (["--adapter", "lora", "--lora_rank", str(rank)] if adapter == "lora" else []), counts


def run(args: list[str]) -> None:
    """Run one of the project's scripts with this interpreter; stop if it fails."""
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


@torch.no_grad()
def sample_base(eval_dir: Path, out: Path, args: argparse.Namespace) -> None:
    """The base model on the evaluation captions, no condition, the seeds sample_control uses."""
    pipe = StableDiffusionPipeline.from_pretrained(default_model_path())
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (eval_dir / "metadata.jsonl").read_text().splitlines()]
    for index, row in enumerate(rows):
        image = pipe(
            row["text"],
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            generator=torch.Generator().manual_seed(args.seed + index),
        ).images[0]
        image.save(out / row["image"])


@torch.no_grad()
def condition_use(run_dir: Path, eval_dir: Path, task: str, seed: int) -> dict[str, float]:
    """Does the trained model use its condition? Its noise-prediction MSE on the evaluation
    scenes (read as training reads them) with their own conditions and with the conditions
    rolled by one scene (same noise, same timesteps :data:`DIAGNOSTIC_TIMESTEPS`). Equal
    losses: the condition is ignored, whatever the samples look like."""
    pipe = StableDiffusionPipeline.from_pretrained(default_model_path())
    load_control_weights(pipe.unet, run_dir)
    source = load_control_source(str(eval_dir), "folder", task, "image", "condition", "text")
    dataset = ControlDataset(source, task, world.SIZE)
    batch = collate_control([dataset[(index, seed)] for index in range(len(dataset))])
    cond = batch["conditioning_pixel_values"]  # (N, 3, H, W) in [0, 1]
    text = pipe.text_encoder(tokenize(pipe.tokenizer, batch["text"]))[0]  # (N, 77, D)
    latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.mean  # (N, C, h, w)
    latents = latents * pipe.vae.config.scaling_factor
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(seed)
    losses = {"own_condition": 0.0, "other_scene_condition": 0.0}
    for t in DIAGNOSTIC_TIMESTEPS:
        noise = torch.randn(latents.shape, generator=generator)  # (N, C, h, w)
        timesteps = torch.full((len(dataset),), t)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        for name, c in (("own_condition", cond), ("other_scene_condition", cond.roll(1, 0))):
            prediction = pipe.unet(noisy, timesteps, text, control_cond=c).sample
            losses[name] += float(((prediction - noise) ** 2).mean()) / len(DIAGNOSTIC_TIMESTEPS)
    return losses


def grid(rows: list[list[Image.Image]], path: Path, tile: int = 128) -> None:
    """Rows of equally sized tiles, no labels (the README's table names the columns)."""
    canvas = Image.new("RGB", (tile * len(rows[0]) + 4 * (len(rows[0]) - 1), tile * len(rows)))
    canvas.paste((255, 255, 255), (0, 0, canvas.width, canvas.height))
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            tile_image = image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST)
            canvas.paste(tile_image, (c * (tile + 4), r * tile))
    canvas.save(path)


@cli.cli_main("--train_batch_size")
def main(argv: list[str] | None = None) -> None:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    work, results = Path(args.work_dir), Path(args.results_dir)
    train_dir, eval_dir = work / "data_train", work / "data_eval"
    timings: dict[str, float] = {}
    if not (train_dir / "metadata.jsonl").exists():
        run(["train/make_world_dataset.py", "--output_dir", str(train_dir),
             "--num_scenes", str(args.num_train), "--seed", str(args.seed),
             "--max_offset", str(args.max_offset)])  # fmt: skip
    if not (eval_dir / "metadata.jsonl").exists():
        run(["train/make_world_dataset.py", "--output_dir", str(eval_dir), "--split", "all",
             "--num_scenes", str(args.num_eval), "--seed", str(args.seed + 1),
             "--max_offset", str(args.max_offset)])  # fmt: skip
    base_dir = work / "samples_base"
    if not base_dir.exists():
        sample_base(eval_dir, base_dir, args)
    summary_path = results / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"tasks": {}}
    adapter, counts = adapter_options(args.adapter, extra)
    summary["settings"] = {**vars(args), "train_options": [*adapter, *extra]}
    summary["adapter_parameters"] = counts
    for task in args.tasks:
        run_dir, samples = work / task, work / f"samples_{task}"
        start = time.perf_counter()
        if not (run_dir / "hra_control_weights.safetensors").exists():
            run(["train/train_control_hra.py", "--train_data_dir", str(train_dir),
                 "--condition_type", task, "--resolution", "64", "--center_crop",
                 "--condition_encoder_channels", "16", "32", "64",
                 "--train_batch_size", str(args.train_batch_size),
                 "--max_train_steps", str(args.max_train_steps),
                 "--learning_rate", str(args.learning_rate), "--seed", str(args.seed),
                 "--checkpointing_steps", str(args.max_train_steps),
                 "--output_dir", str(run_dir), "--overwrite_output_dir",
                 *adapter, *extra])  # fmt: skip
            timings[f"train_{task}_seconds"] = round(time.perf_counter() - start, 1)
        conditions = eval_dir / ("images" if task == "canny" else "conditions")
        if not samples.exists():
            run(["pipelines/sample_control.py", "--weights", str(run_dir),
                 "--conditions_dir", str(conditions),
                 "--prompts", str(eval_dir / "metadata.jsonl"),
                 "--condition_type", task, "--steps", str(args.steps),
                 "--guidance_scale", str(args.guidance_scale), "--seed", str(args.seed),
                 "--out", str(samples)])  # fmt: skip
        scores = {}
        for name, images in (("base_without_condition", base_dir), ("trained", samples)):
            out = results / f"{task}_{name}"
            if task == "canny":
                run(["eval/evaluate_control.py", "canny", "--images", str(images),
                     "--control", str(eval_dir / "edges"), "--output_dir", str(out),
                     "--overwrite_output_dir"])  # fmt: skip
            else:
                labels = str(eval_dir / "conditions")
                run(["eval/evaluate_control.py", "segmentation", "--images", str(images),
                     "--labels", labels, "--output_dir", str(out),
                     "--overwrite_output_dir"])  # fmt: skip
            scores[name] = json.loads((out / "results.json").read_text())["metrics"]
        scores["condition_use_mse"] = condition_use(run_dir, eval_dir, task, args.seed)
        summary["tasks"][task] = scores
        rows = []
        for line in (eval_dir / "metadata.jsonl").read_text().splitlines()[:GRID_ROWS]:
            name = json.loads(line)["image"]
            if task == "canny":
                condition = Image.open(eval_dir / "edges" / name)
            else:
                condition = label_to_color(Image.open(eval_dir / "conditions" / name))
            rows.append([condition, Image.open(base_dir / name), Image.open(samples / name)])
        grid(rows, results / f"grid_{task}.png")
    summary["timings"] = {**summary.get("timings", {}), **timings}
    results.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["tasks"], indent=2))


if __name__ == "__main__":
    main()
