"""HRA against LoRA in the procedural world: DreamBooth on held-out subjects, same budget.

One command, resumable, meant for the background (not CI)::

    nohup nice -n 10 python benchmarks/method_world.py > out/method_world.log 2>&1 &

Methods, all on the modules of ``hra_diffusion/world/dreambooth.args`` (the bundled model's
recipe: attention without the text-side ``attn2.to_k``/``to_v``, feed-forward and ResNet
convolutions, 64 px, one caption per view; ``--max_train_steps`` 800 here) with the same
steps, batch and schedule; only the adapter and its learning rate differ:

- ``hra``: HRA r = 8, λ = 0;  ``hra_lambda``: HRA r = 8, λ = 1e-3;
- ``hra_gs``: HRA r = 8 with Gram-Schmidt (the paper's λ = ∞);
- ``hra_scaled``: HRA r = 8, λ = 0, columns initialised to norm √r (``--hra_init scaled``:
  the angle per step no longer shrinks with the layer's width);
- ``hra_magnitude``: HRA r = 8, λ = 0, with a learnable per-output magnitude
  (``--hra_magnitude``: diag(m) W H; d_out more parameters per layer);
- ``lora``: diffusers-style LoRA through PEFT (``--adapter lora``) of the rank whose parameter
  count on those modules is nearest HRA r = 8's (``hra_diffusion.injection.lora_rank_like_hra``).

1. **Learning rate.** Every method trains at every ``--learning_rates`` on
   ``--sweep_subject`` (first of ``--seeds``); the rate with the best ``--select_by`` at the
   last step is kept (by default the lowest colour distance to the subject's views: DINO on
   one subject prefers the model that moved least, see the README). The sweep subject is not
   a test subject, so no test metric picks a rate. ``--sweep_only`` stops here and writes the
   sweep alone (its runs are reused later).
2. **Runs.** Every method at its rate on every ``--subjects`` x ``--seeds``.
3. **Scores** at every ``--curve_every`` steps (the checkpoints): ``--num_images`` samples of
   "a qwe <noun>" and of "a qwe <noun> on a blue background" (image i from seed i), scored
   through ``eval/`` with the bundled world evaluators (``SubjectScorer`` of
   ``eval/evaluate_dreambooth.py``): DINO (the attribute ViT's CLS token), CLIP-I, CLIP-T
   (identifier dropped), ``dino_feature_diversity`` (an LPIPS-style diversity on the ViT's
   features, not LPIPS; LPIPS itself only where its backbone file is installed); and by the
   world scorer (:mod:`hra_diffusion.eval.world_dreambooth`): the object's colour-histogram
   distance to the subject's views and the share of blue backgrounds. Also each run's
   trainable parameters and median step time (``training_log.jsonl``).
4. **How far each adapter moved the base** at every checkpoint (:func:`weight_change`): the
   relative change ‖W_t − W_0‖_F / ‖W_0‖_F of the adapted layers' weights with the adapter
   merged (HRA) or fused (LoRA), over all adapted layers together. It tells a method that
   learns slowly early from one whose updates are small at the same learning rate.
5. **Ceiling and floor** of every score, per test subject (:func:`reference_record`): the
   samples a perfect model would draw (the subject at fresh placements on the views'
   backgrounds, and on blue for the recontext prompt), decoded by the base's VAE like every
   sample, scored the same way; and every other subject drawn the same way (the mean over
   them). A score reads against these two rows, not against 0 and 1.

A finished (method, learning rate, subject, seed) run keeps ``record.json`` in its folder
under ``--work_dir`` and is skipped on a rerun; an interrupted training resumes from its
last checkpoint. ``--reuse`` takes finished runs and sweep scores from earlier
``results.json`` files of this benchmark made with the same settings (the runs are
deterministic: a rerun reproduces them to the last digit) instead of training them again.
Writes ``results.json`` (every run, the sweep, the chosen rates), ``results.md`` (mean ± std
over subjects and seeds, LoRA minus each HRA method paired by subject and seed, and the
sweep), ``fidelity_curve.png`` (DINO per step, mean over runs), ``colour_distance_curve.png``
(the colour distance per step) and ``weight_change.png`` (the relative weight change per
step) to ``--output_dir``. Training options after ``--`` go to every run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

from hra_diffusion import cli
from hra_diffusion.errors import fail
from hra_diffusion.eval.dreambooth_benchmark import strip_identifier
from hra_diffusion.eval.evaluate_dreambooth import METRICS, SubjectScorer
from hra_diffusion.eval.models import default_device
from hra_diffusion.eval.report import (
    fmt,
    fmt_stat,
    markdown_table,
    package_versions,
    split_passthrough,
    write_json,
)
from hra_diffusion.eval.similarity import mean_std
from hra_diffusion.eval.world_dreambooth import (
    IDENTIFIER,
    distances,
    generate,
    prompts,
    recontext_rate,
    vae_round_trip,
)
from hra_diffusion.formats.hra import WEIGHTS_NAME, atomic_write
from hra_diffusion.formats.lora import LORA_WEIGHTS_NAME
from hra_diffusion.inference import load_pipeline
from hra_diffusion.injection import lora_rank_like_hra
from hra_diffusion.plots import line_chart
from hra_diffusion.train import train_dreambooth_hra
from hra_diffusion.train.reporting import TRAINING_LOG_NAME
from hra_diffusion.world.evaluators import CLIP_FILE, VIT_DIR
from hra_diffusion.world.subjects import (
    DREAMBOOTH_RECIPE,
    RECONTEXT_BACKGROUND,
    SUBJECTS,
    render_views,
    write_views,
)
from hra_diffusion.world.tiny_sd import default_model_path

HRA_R = 8
"""HRA's size in every HRA method (the paper's controllable-setting r)."""

METHODS: dict[str, tuple[str, list[str]]] = {
    "hra": ("HRA r=8 λ=0", ["--hra_r", str(HRA_R)]),
    "hra_lambda": ("HRA r=8 λ=1e-3", ["--hra_r", str(HRA_R), "--hra_lambda", "1e-3"]),
    "hra_gs": ("HRA r=8 Gram-Schmidt", ["--hra_r", str(HRA_R), "--hra_apply_gs"]),
    "hra_scaled": ("HRA r=8 scaled init", ["--hra_r", str(HRA_R), "--hra_init", "scaled"]),
    "hra_magnitude": ("HRA r=8 + magnitude", ["--hra_r", str(HRA_R), "--hra_magnitude"]),
    "lora": ("LoRA (PEFT)", ["--adapter", "lora"]),
}
"""Name: (label, training options); LoRA's ``--lora_rank`` is added by :func:`method_args`."""

SWEEP_SUBJECT = "robot"
TEST_SUBJECTS = [name for name in SUBJECTS if name != SWEEP_SUBJECT]
PROMPT_KEYS = ("instance", "recontext")
WORLD_SCORES = ("object_distance", "recontext_object_distance", "blue_background_rate")
SELECTION_METRICS = {"object_distance": min, "dino": max, "clip_i": max}
"""The metrics ``--select_by`` may pick a learning rate by, each with how its best is found."""


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """What every run shares: the base, the budget, the scorer and the work folder."""

    model: str
    work: Path
    steps: int
    curve_every: int
    num_images: int
    extra: list[str]
    lora_rank: int
    scorer: SubjectScorer
    targets: list[str]
    reused_runs: dict = field(repr=False, default_factory=dict)
    base_pipe: object = field(repr=False, default=None)
    base_weights: dict = field(repr=False, default=None)

    @property
    def curve_steps(self) -> list[int]:
        return list(range(self.curve_every, self.steps + 1, self.curve_every))


@dataclass(frozen=True)
class Run:
    """One training run of the benchmark."""

    method: str
    lr: float
    subject: str
    seed: int

    def folder(self, work: Path) -> Path:
        return work / "runs" / self.method / f"lr{self.lr:g}" / self.subject / f"seed{self.seed}"


def recipe_args() -> list[str]:
    """The recipe's options without its HRA size (every method sets its own)."""
    return [arg for arg in DREAMBOOTH_RECIPE.read_text().split() if not arg.startswith("--hra_r")]


def training_options(extra: list[str]) -> argparse.Namespace:
    """The training script's parsed options for the recipe plus ``extra`` (for the targets)."""
    placeholders = ["--instance_data_dir", ".", "--instance_prompt", "."]
    return train_dreambooth_hra.build_parser().parse_args([*recipe_args(), *placeholders, *extra])


def method_args(method: str, lora_rank: int) -> list[str]:
    """A method's training options."""
    options = METHODS[method][1]
    return [*options, "--lora_rank", str(lora_rank)] if method == "lora" else options


# --------------------------------------------------------------------------- runs


def write_record(path: Path, record: dict) -> None:
    """``record`` as JSON, written atomically (a record marks its run as finished)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=1) + "\n"))


def subject_views(subject: str, s: Settings) -> Path:
    """The subject's five views with their per-view captions (written once)."""
    folder = s.work / "views" / subject
    if not folder.is_dir():
        write_views(SUBJECTS[subject], folder, caption=prompts(SUBJECTS[subject])["instance"])
    return folder


def train(run: Run, s: Settings) -> Path:
    """Train one run (resuming an interrupted one) unless it finished; returns its folder."""
    out = run.folder(s.work) / "train"
    if (out / "README.md").is_file():  # the model card is written last
        return out
    argv = [
        *recipe_args(),
        "--pretrained_model_name_or_path", s.model,
        "--instance_data_dir", str(subject_views(run.subject, s)),
        "--instance_prompt", prompts(SUBJECTS[run.subject])["instance"],
        "--caption_extension", ".txt",
        "--output_dir", str(out),
        "--report_to", "none",
        "--seed", str(run.seed),
        "--learning_rate", f"{run.lr:g}",
        "--max_train_steps", str(s.steps),
        "--checkpointing_steps", str(s.curve_every),
        "--resume_from_checkpoint", "latest",
        *method_args(run.method, s.lora_rank),
        *s.extra,
    ]  # fmt: skip
    train_dreambooth_hra.main(argv)
    return out


def adapted_pipeline(model: str, weights: Path, method: str):
    """The base with a checkpoint's adapter: HRA merged, or LoRA through diffusers."""
    if method == "lora":
        pipe = load_pipeline(model)
        pipe.load_lora_weights(weights)
    else:
        pipe = load_pipeline(model, weights=weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def score_samples(pipe, subject: str, folder: Path, s: Settings) -> dict[str, float]:
    """Sample both prompts into ``folder`` and score them (eval/ metrics + world scores)."""
    texts = prompts(SUBJECTS[subject])
    images = {key: generate(pipe, texts[key], s.num_images) for key in PROMPT_KEYS}
    return score_images(images, subject, folder, s)


def score_images(
    images: dict[str, list[Image.Image]], subject: str, folder: Path, s: Settings
) -> dict[str, float]:
    """Save each prompt's images into ``folder`` and score them against the subject's views."""
    views_dir = subject_views(subject, s)
    references = sorted(views_dir.glob("*.png"))
    views = [Image.open(p).convert("RGB") for p in references]
    texts = prompts(SUBJECTS[subject])
    folder.mkdir(parents=True, exist_ok=True)
    groups = {}
    for index, key in enumerate(PROMPT_KEYS):
        groups[index] = []
        for k, image in enumerate(images[key]):
            groups[index].append(folder / f"{index}_{k:02d}.png")
            image.save(groups[index][-1])
    clip_t = [strip_identifier(texts[key], IDENTIFIER) for key in PROMPT_KEYS]
    metrics = s.scorer.score(references, groups, clip_t, tqdm(disable=True))
    scores = {name: metrics[name]["mean"] for name in METRICS}
    scores["object_distance"] = distances(images["instance"], views)["object"]
    scores["recontext_object_distance"] = distances(images["recontext"], views)["object"]
    scores["blue_background_rate"] = recontext_rate(images["recontext"])
    return scores


def perfect_samples(subject: str, count: int) -> dict[str, list[Image.Image]]:
    """What a perfect model would draw: ``subject`` at fresh placements (view seeds 1, 2, ...)
    on the views' backgrounds for the instance prompt and on the recontext background for
    the other, as :func:`~hra_diffusion.world.subjects.render_views` places it."""
    instance = [
        im for seed in range(1, count // 5 + 2) for im in render_views(SUBJECTS[subject], seed)
    ]
    recontext = render_views(SUBJECTS[subject], count, (RECONTEXT_BACKGROUND,) * count)
    return {"instance": instance[:count], "recontext": recontext}


def reference_record(subject: str, s: Settings) -> dict:
    """The scores' ceiling and floor for ``subject`` (computed once): the subject itself
    (:func:`perfect_samples`, decoded by the base's VAE like every sample) and each other
    subject drawn the same way, averaged over the others."""
    path = s.work / "base" / subject / "references.json"
    if path.is_file():
        return json.loads(path.read_text())
    pipe = base_pipe(s)

    def decoded(name: str) -> dict[str, list[Image.Image]]:
        samples = perfect_samples(name, s.num_images)
        return {key: vae_round_trip(pipe, images) for key, images in samples.items()}

    folder = path.parent / "references"
    ceiling = score_images(decoded(subject), subject, folder / subject, s)
    others = [
        score_images(decoded(other), subject, folder / other, s)
        for other in SUBJECTS
        if other != subject
    ]
    floor = {name: statistics.fmean(o[name] for o in others) for name in ceiling}
    record = {"subject": subject, "ceiling": ceiling, "floor": floor}
    write_record(path, record)
    return record


def adapter_parameters(folder: Path, method: str) -> int:
    """Trainable parameters of a run, counted in its weights file."""
    name = LORA_WEIGHTS_NAME if method == "lora" else WEIGHTS_NAME
    with safe_open(folder / name, "pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def step_seconds(folder: Path) -> float:
    """Median wall time of a training step (``training_log.jsonl``)."""
    rows = [json.loads(line) for line in (folder / TRAINING_LOG_NAME).read_text().splitlines()]
    return statistics.median(row["seconds"] for row in rows)


def adapted_weights(unet: UNet2DConditionModel, targets: list[str]) -> dict[str, torch.Tensor]:
    """The weights of the ``targets`` layers by their plain module name (PEFT's and our
    wrappers keep the base weight as ``<name>.base_layer.weight``)."""
    weights = {}
    for name, tensor in unet.state_dict().items():
        name = name.replace(".base_layer", "")
        if any(name.endswith(f".{target}.weight") for target in targets):
            weights[name] = tensor
    return weights


def relative_change(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> float:
    """‖W_t − W_0‖_F / ‖W_0‖_F over all layers of ``base`` together, in float64."""
    change = sum(((tuned[k].double() - w.double()) ** 2).sum() for k, w in base.items())
    size = sum((w.double() ** 2).sum() for w in base.values())
    return float((change / size).sqrt())


def weight_change(run: Run, s: Settings) -> dict[str, float]:
    """{step: relative weight change} of a finished run's checkpoints (cached in its folder)."""
    path = run.folder(s.work) / "weight_change.json"
    if path.is_file():
        return json.loads(path.read_text())
    if s.base_weights is None:
        s.base_weights = adapted_weights(load_pipeline(s.model).unet, s.targets)
    changes = {}
    for step in s.curve_steps:
        pipe = adapted_pipeline(
            s.model, run.folder(s.work) / "train" / f"checkpoint-{step}", run.method
        )
        if run.method == "lora":
            pipe.fuse_lora()
        changes[str(step)] = relative_change(s.base_weights, adapted_weights(pipe.unet, s.targets))
    write_record(path, changes)
    return changes


def run_record(run: Run, s: Settings) -> dict:
    """Train and score one run, or read its record if it finished before; with the run's
    :func:`weight_change` (kept in a file of its own); a ``--reuse`` file's record as it is."""
    if run in s.reused_runs:
        return s.reused_runs[run]
    record = scored_run(run, s)
    return {**record, "weight_change": weight_change(run, s)}


def scored_run(run: Run, s: Settings) -> dict:
    """Train and score one run, or read its record if it finished before."""
    path = run.folder(s.work) / "record.json"
    if path.is_file():
        return json.loads(path.read_text())
    out = train(run, s)
    steps = {}
    for step in s.curve_steps:
        pipe = adapted_pipeline(s.model, out / f"checkpoint-{step}", run.method)
        steps[str(step)] = score_samples(pipe, run.subject, run.folder(s.work) / f"step-{step}", s)
    record = {
        "run": asdict(run),
        "trainable_parameters": adapter_parameters(out, run.method),
        "step_seconds": step_seconds(out),
        "steps": steps,
    }
    write_record(path, record)
    print(json.dumps({"finished": record["run"], "last": steps[str(s.steps)]}), flush=True)
    return record


def base_pipe(s: Settings):
    """The base pipeline, loaded once."""
    if s.base_pipe is None:
        s.base_pipe = load_pipeline(s.model)
        s.base_pipe.set_progress_bar_config(disable=True)
    return s.base_pipe


def base_record(subject: str, s: Settings) -> dict:
    """The base model's scores for a subject (computed once)."""
    path = s.work / "base" / subject / "record.json"
    if path.is_file():
        return json.loads(path.read_text())
    record = {"subject": subject, "scores": score_samples(base_pipe(s), subject, path.parent, s)}
    write_record(path, record)
    return record


# --------------------------------------------------------------------------- summary


def last_step(record: dict, s: Settings) -> dict[str, float]:
    """A run's scores at its last step."""
    return record["steps"][str(s.steps)]


def summarise(records: list[dict], s: Settings) -> dict:
    """Mean ± std over runs of the last step's scores, the step time and parameters."""
    names = [*METRICS, *WORLD_SCORES]
    return {
        "runs": len(records),
        "scores": {n: mean_std([last_step(r, s)[n] for r in records]) for n in names},
        "step_seconds": mean_std([r["step_seconds"] for r in records]),
        "trainable_parameters": records[0]["trainable_parameters"],
        "curve": {
            str(step): {
                **{n: mean_std([r["steps"][str(step)][n] for r in records]) for n in names},
                "weight_change": mean_std([r["weight_change"][str(step)] for r in records]),
            }
            for step in s.curve_steps
        },
    }


COLUMNS = (
    ("dino", "DINO ↑"),
    ("clip_i", "CLIP-I ↑"),
    ("clip_t", "CLIP-T ↑"),
    ("dino_feature_diversity", "LPIPS-style diversity (ViT features) ↑"),
    ("lpips_diversity", "LPIPS diversity ↑"),
    ("object_distance", "colour distance ↓"),
    ("blue_background_rate", "blue background ↑"),
)


REFERENCE_ROWS = {
    "ceiling": "ceiling: the subject itself, decoded",
    "floor": "floor: another subject, decoded",
}
"""The rows that bound every score (:func:`reference_record`)."""


def results_table(results: dict) -> str:
    """The method table: one row per method (and the base), mean ± std over runs, with the
    relative weight change at the first and last checkpoint (LPIPS only where available)."""
    columns = [c for c in COLUMNS if results["lpips"]["available"] or c[0] != "lpips_diversity"]
    first, last = str(results["curve_steps"][0]), str(results["curve_steps"][-1])
    header = ["method", "lr", "#param", "step (s)", "runs", *(label for _, label in columns)]
    header += [f"‖ΔW‖/‖W‖ step {first}", f"‖ΔW‖/‖W‖ step {last}"]
    base = results["base"]
    rows = [
        ["base model", "–", "0", "–", str(base["runs"])]
        + [fmt_stat(base["scores"][name]) for name, _ in columns]
        + ["0", "0"]
    ]
    for bound, label in REFERENCE_ROWS.items():
        scores = results["references"][bound]
        rows.append(
            [label, "–", "–", "–", str(scores["dino"]["n"])]
            + [fmt_stat(scores[name]) for name, _ in columns]
            + ["–", "–"]
        )
    for method, summary in results["methods"].items():
        rows.append(
            [
                METHODS[method][0],
                f"{results['learning_rates'][method]:g}",
                f"{summary['trainable_parameters']:,}",
                fmt_stat(summary["step_seconds"]),
                str(summary["runs"]),
                *(fmt_stat(summary["scores"][name]) for name, _ in columns),
                fmt_stat(summary["curve"][first]["weight_change"]),
                fmt_stat(summary["curve"][last]["weight_change"]),
            ]
        )
    return markdown_table(header, rows)


PAIRED = ("dino", "clip_i", "clip_t", "object_distance")
"""The scores compared run by run (same subject and seed) between LoRA and each HRA method."""


def paired_difference(a: list[dict], b: list[dict], metric: str, s: Settings) -> dict:
    """``metric`` of runs ``a`` minus runs ``b`` at the last step, paired by subject and seed:
    the mean difference, its standard error sqrt(Σ(d − mean)² / (n(n − 1))), the number of
    pairs n and in how many ``a`` is higher."""
    by_run = {(r["run"]["subject"], r["run"]["seed"]): last_step(r, s)[metric] for r in b}
    diffs = [last_step(r, s)[metric] - by_run[(r["run"]["subject"], r["run"]["seed"])] for r in a]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    spread = math.fsum((d - mean) ** 2 for d in diffs) / (n * (n - 1)) if n > 1 else math.nan
    return {"mean": mean, "stderr": math.sqrt(spread), "n": n, "higher": sum(d > 0 for d in diffs)}


def paired_against_lora(records: dict[str, list[dict]], s: Settings) -> dict:
    """{HRA method: {metric: LoRA minus it}} (empty without LoRA)."""
    if "lora" not in records:
        return {}
    return {
        method: {m: paired_difference(records["lora"], runs, m, s) for m in PAIRED}
        for method, runs in records.items()
        if method != "lora"
    }


def paired_table(results: dict) -> str:
    """LoRA minus each HRA method, paired by subject and seed: mean ± standard error."""
    labels = dict(COLUMNS)
    header = ["LoRA minus", *(labels[m] for m in PAIRED)]
    rows = [
        [METHODS[method][0]]
        + [
            f"{fmt(d['mean'])} ± {fmt(d['stderr'])} (LoRA higher {d['higher']}/{d['n']})"
            for d in (by_metric[m] for m in PAIRED)
        ]
        for method, by_metric in results["paired_vs_lora"].items()
    ]
    return markdown_table(header, rows)


def sweep_table(results: dict) -> str:
    """The learning-rate sweep on the sweep subject: last-step scores per method and rate."""
    names = ("dino", "clip_i", "object_distance", "weight_change")
    header = ["method", "lr", "DINO ↑", "CLIP-I ↑", "colour distance ↓", "‖ΔW‖/‖W‖", "chosen"]
    rows = []
    for method, by_rate in results["sweep"].items():
        for lr, scores in by_rate.items():
            chosen = "yes" if float(lr) == results["learning_rates"][method] else ""
            rows.append([METHODS[method][0], lr, *(fmt(scores[n]) for n in names), chosen])
    return markdown_table(header, rows)


def chart_label(method: str) -> str:
    """A method's label for the charts: PIL's default font has no Greek letters."""
    return METHODS[method][0].replace("λ", "lambda")


def write_outputs(results: dict, out: Path, s: Settings) -> None:
    """results.json, results.md, the subject-fidelity curve and the weight-change curve."""
    write_json(out / "results.json", results)
    text = (
        "# HRA vs LoRA in the procedural world\n\n"
        f"{len(results['subjects'])} subjects x {len(results['seeds'])} seeds, "
        f"{s.steps} steps; last step, mean ± std over runs. Learning rates from the sweep on "
        f"`{results['sweep_subject']}` (by {results['select_by']}). LPIPS: "
        f"{'available' if results['lpips']['available'] else 'unavailable'}.\n\n"
    )
    paired = "\n## LoRA minus each HRA method, paired by subject and seed (last step)\n\n"
    paired += paired_table(results) if results["paired_vs_lora"] else "No LoRA runs.\n"
    sweep = f"\n## Learning-rate sweep on `{results['sweep_subject']}`\n\n" + sweep_table(results)
    (out / "results.md").write_text(text + results_table(results) + paired + sweep)
    for metric, name, title in (
        ("dino", "fidelity_curve.png", "subject fidelity (DINO, world ViT) per step"),
        ("object_distance", "colour_distance_curve.png", "colour distance to the views per step"),
        ("weight_change", "weight_change.png", "relative weight change ||dW||/||W|| per step"),
    ):
        series = {
            chart_label(m): [(int(step), v[metric]["mean"]) for step, v in summary["curve"].items()]
            for m, summary in results["methods"].items()
        }
        if metric != "weight_change":
            base = results["base"]["scores"][metric]["mean"]
            series["base model"] = [(s.curve_steps[0], base), (s.steps, base)]
        line_chart(series, out / name, title)


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=cli.model_ref, default=None, help="Base pipeline (the bundled default)."
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="Default: all."
    )
    parser.add_argument(
        "--subjects",
        nargs="+",
        choices=list(SUBJECTS),
        default=TEST_SUBJECTS,
        help=f"Test subjects. Default: the {len(TEST_SUBJECTS)} besides {SWEEP_SUBJECT}.",
    )
    parser.add_argument(
        "--sweep_subject",
        choices=list(SUBJECTS),
        default=SWEEP_SUBJECT,
        help=f"Subject of the learning-rate sweep, not a test subject. Default: {SWEEP_SUBJECT}.",
    )
    parser.add_argument("--seeds", nargs="+", type=cli.seed, default=[0, 1], help="Default: 0 1.")
    parser.add_argument(
        "--learning_rates",
        nargs="+",
        type=cli.positive_float,
        default=[1e-3, 3e-3, 1e-2],
        help="The sweep, the same for every method. Default: 1e-3 3e-3 1e-2.",
    )
    parser.add_argument(
        "--select_by",
        choices=list(SELECTION_METRICS),
        default="object_distance",
        help="The sweep subject's last-step score that picks each method's rate: "
        "object_distance (lowest; the default), dino or clip_i (highest).",
    )
    parser.add_argument(
        "--reuse",
        type=cli.existing_file,
        nargs="+",
        default=[],
        metavar="RESULTS_JSON",
        help="Earlier results.json files of this benchmark (full or --sweep_only) made with "
        "the same model path, recipe, training options, steps, checkpoints, images and sweep "
        "subject: their finished runs and sweep scores are taken instead of trained again.",
    )
    parser.add_argument(
        "--max_train_steps", type=cli.positive_int, default=800, help="Default: 800."
    )
    parser.add_argument(
        "--curve_every",
        type=cli.positive_int,
        default=200,
        help="Checkpoint and score every this many steps (divides --max_train_steps). "
        "Default: 200.",
    )
    parser.add_argument("--num_images", type=cli.positive_int, default=8, help="Per prompt; 8.")
    parser.add_argument(
        "--sweep_only",
        action="store_true",
        help="Run only the learning-rate sweep and write it (results.json, results.md) to "
        "--output_dir; no test runs.",
    )
    parser.add_argument(
        "--work_dir", type=cli.output_dir, default="out/method_world", help="Views, runs, samples."
    )
    parser.add_argument(
        "--output_dir", type=cli.output_dir, default="benchmarks/results/method_world"
    )
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that would make the comparison unsound, with one line each."""
    if args.sweep_subject in args.subjects:
        fail(
            f"--sweep_subject {args.sweep_subject} is also in --subjects: its learning rate "
            "would be chosen on a test subject; pick a sweep subject outside --subjects."
        )
    if args.max_train_steps % args.curve_every:
        fail(
            f"--curve_every {args.curve_every} does not divide --max_train_steps "
            f"{args.max_train_steps}; choose a divisor, e.g. {args.max_train_steps // 4 or 1}."
        )


def best_rate(by_rate: dict[str, dict[str, float]], metric: str) -> float:
    """The rate (a key of ``by_rate``) whose scores are best by ``metric``
    (:data:`SELECTION_METRICS`: lowest distance, highest similarity)."""
    best = SELECTION_METRICS[metric]
    return float(best(by_rate, key=lambda lr: by_rate[lr][metric]))


def run_sweep(
    args: argparse.Namespace, s: Settings, reused_sweep: dict
) -> tuple[dict, dict[str, float]]:
    """Every method at every rate on the sweep subject: {method: {rate: last-step scores and
    weight change}} (taken from ``reused_sweep`` where it has them), and each method's
    :func:`best_rate` by ``--select_by``."""
    sweep: dict[str, dict[str, dict]] = {}
    chosen: dict[str, float] = {}
    last = str(s.steps)
    for method in args.methods:
        sweep[method] = {}
        for lr in args.learning_rates:
            if f"{lr:g}" in reused_sweep.get(method, {}):
                sweep[method][f"{lr:g}"] = reused_sweep[method][f"{lr:g}"]
                continue
            record = run_record(Run(method, lr, args.sweep_subject, args.seeds[0]), s)
            sweep[method][f"{lr:g}"] = {
                **record["steps"][last],
                "weight_change": record["weight_change"][last],
            }
        chosen[method] = best_rate(sweep[method], args.select_by)
    return sweep, chosen


def reuse_settings(args: argparse.Namespace, s: Settings) -> dict:
    """The settings an earlier results.json must share with this run for ``--reuse`` (every
    results.json records them)."""
    return {
        "model": s.model,
        "recipe": recipe_args(),
        "extra_args": s.extra,
        "max_train_steps": s.steps,
        "curve_steps": s.curve_steps,
        "num_images": s.num_images,
        "sweep_subject": args.sweep_subject,
    }


def load_reused(args: argparse.Namespace, s: Settings) -> dict:
    """The ``--reuse`` files' sweep scores, {method: {rate: scores}}, after checking that each
    was made with this run's settings; their finished runs go to ``s.reused_runs``."""
    settings = reuse_settings(args, s)
    sweep: dict[str, dict] = {}
    for name in args.reuse:
        path = Path(name)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            fail(f"--reuse {name} is not JSON ({error}); pass a results.json of this benchmark.")
        for key, value in settings.items():
            if key not in data:
                fail(f"--reuse {name} has no {key}: not a results.json of this version of "
                     "the benchmark; rerun without it.")  # fmt: skip
            if data[key] != value:
                fail(f"--reuse {name} was made with {key} {data[key]!r}, this run has "
                     f"{value!r}; match the settings or rerun without --reuse.")  # fmt: skip
        if data["seeds"][0] == args.seeds[0]:  # the sweep's seed
            for method, by_rate in data["sweep"].items():
                sweep.setdefault(method, {}).update(null_as_nan(by_rate))
        for record in (r for runs in data.get("runs", {}).values() for r in runs):
            s.reused_runs[Run(**record["run"])] = null_as_nan(record)
    return sweep


def null_as_nan(scores: dict | float | None) -> dict | float:
    """``scores`` as read from a results.json, with its nulls (written for NaN, e.g. LPIPS
    without its backbone) back to NaN."""
    if isinstance(scores, dict):
        return {key: null_as_nan(value) for key, value in scores.items()}
    return math.nan if scores is None else scores


def write_sweep(
    args: argparse.Namespace, s: Settings, sweep: dict, chosen: dict[str, float]
) -> dict:
    """``--sweep_only``: results.json (the sweep and the chosen rates) and results.md."""
    results = {
        **reuse_settings(args, s),
        "seeds": args.seeds[:1],
        "select_by": args.select_by,
        "sweep": sweep,
        "learning_rates": chosen,
        "packages": package_versions(),
    }
    out = Path(args.output_dir)
    write_json(out / "results.json", results)
    table = sweep_table(results)
    (out / "results.md").write_text(
        f"# Learning-rate sweep on `{args.sweep_subject}` (seed {args.seeds[0]}, "
        f"{s.steps} steps, chosen by {args.select_by})\n\n{table}"
    )
    print(table)
    return results


@cli.cli_main("--num_images")
def main(argv: list[str] | None = None) -> dict:
    """Run (or resume) the benchmark; returns the results written to ``--output_dir``."""
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    check_args(args)
    model = args.model or str(default_model_path())
    targets = training_options(extra).hra_target_modules
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    rank, hra_count, lora_count = lora_rank_like_hra(unet, targets, HRA_R)
    scorer_options = argparse.Namespace(
        dino_model=str(VIT_DIR),
        clip_model=str(CLIP_FILE),
        device=default_device(),
        lpips_net="vgg",
        lpips_size=64,
        batch_size=16,
    )
    s = Settings(
        model,
        Path(args.work_dir),
        args.max_train_steps,
        args.curve_every,
        args.num_images,
        extra,
        rank,
        SubjectScorer(scorer_options),
        targets,
    )
    sweep, chosen = run_sweep(args, s, load_reused(args, s))
    if args.sweep_only:
        return write_sweep(args, s, sweep, chosen)
    records = {
        method: [
            run_record(Run(method, chosen[method], subject, seed), s)
            for subject in args.subjects
            for seed in args.seeds
        ]
        for method in args.methods
    }
    base = [base_record(subject, s)["scores"] for subject in args.subjects]
    references = [reference_record(subject, s) for subject in args.subjects]
    results = {
        "model": model,
        "recipe": recipe_args(),
        "extra_args": extra,
        "target_modules": targets,
        "max_train_steps": s.steps,
        "curve_steps": s.curve_steps,
        "num_images": s.num_images,
        "subjects": args.subjects,
        "seeds": args.seeds,
        "sweep_subject": args.sweep_subject,
        "select_by": args.select_by,
        "reused": args.reuse,
        "parameter_match": {
            "hra_r": HRA_R,
            "hra": hra_count,
            "lora_rank": rank,
            "lora": lora_count,
        },
        "sweep": sweep,
        "learning_rates": chosen,
        "base": {
            "runs": len(base),
            "scores": {n: mean_std([b[n] for b in base]) for n in (*METRICS, *WORLD_SCORES)},
        },
        "references": {
            bound: {
                n: mean_std([r[bound][n] for r in references]) for n in (*METRICS, *WORLD_SCORES)
            }
            for bound in ("ceiling", "floor")
        },
        "methods": {method: summarise(rs, s) for method, rs in records.items()},
        "paired_vs_lora": paired_against_lora(records, s),
        "runs": records,
        "lpips": (
            {"available": True}
            if s.scorer.lpips is not None
            else {"available": False, "reason": s.scorer.lpips_unavailable}
        ),
        "packages": package_versions(),
    }
    out = Path(args.output_dir)
    write_outputs(results, out, s)
    print(results_table(results))
    return results


if __name__ == "__main__":
    main()
