"""Render the tables of the lab notebook (and of docs pages) from the committed results JSON.

Every table of recorded figures in ``benchmarks/NOTEBOOK.md`` and ``docs/*.md`` sits
between two markers::

    <!-- table: method_world -->
    ...generated Markdown table...
    <!-- /table -->

and is produced by the function of that name below, which reads only files committed under
``benchmarks/results/`` (or the bundled models' own records under ``hra_diffusion/assets/``).
Prose stays hand-written; the figures cannot drift from their JSON.

    python benchmarks/render_notebook.py          # rewrite the tables in place
    python benchmarks/render_notebook.py --check  # exit 1 if a committed page differs
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ASSETS = ROOT / "hra_diffusion" / "assets"
PAGES = [ROOT / "benchmarks" / "NOTEBOOK.md", *sorted((ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"(<!-- table: (?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def load(relative: str) -> dict:
    return json.loads((RESULTS / relative).read_text())


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}"


def pct0(x: float) -> str:
    return f"{round(100 * x)} %"


def ints(n: int) -> str:
    return f"{n:,}"


def lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


# --- DreamBooth on the world ----------------------------------------------------------


def _noun(subject: dict) -> str:
    return subject["prompts"]["instance"].split()[-1]


def dreambooth_world() -> str:
    data = load("dreambooth_world/results.json")
    rows = []
    for name, s in data["subjects"].items():
        base, tuned = s["base"], s["tuned"]
        rows.append(
            [
                f"{name} ({_noun(s)})",
                f"{base['instance']['object']:.2f} → {tuned['instance']['object']:.2f}",
                pct0(s["object_distance_closed"]),
                f"{s['vae_round_trip']['object']:.2f}",
                f"{pct0(base['recontext']['background_rate'])} → "
                f"{pct0(tuned['recontext']['background_rate'])}",
                f"{tuned['recontext']['object']:.2f}",
                f"{s['train_seconds']:.0f} s",
            ]
        )
    rows.append(["mean", "", pct0(data["mean_object_distance_closed"]), "", "", "", ""])
    header = [
        "subject (noun)",
        "object distance base → tuned",
        "closed",
        "VAE floor",
        "blue background, base → tuned",
        "blue: object distance",
        "training",
    ]
    return table(header, rows)


def _options(args: list[str]) -> str:
    return "`" + " ".join(args) + "`" if args else "(the recipe as recorded)"


def dreambooth_world_sweep() -> str:
    rows = []
    for path in sorted((RESULTS / "dreambooth_world_sweep").glob("*.json")):
        data = json.loads(path.read_text())
        closed = ", ".join(
            f"{name} {pct0(s['object_distance_closed'])}" for name, s in data["subjects"].items()
        )
        blue = ", ".join(
            f"{name} {pct0(s['tuned']['recontext']['background_rate'])}"
            for name, s in data["subjects"].items()
        )
        captions = "yes" if data.get("captions") else "no"
        rows.append(
            [path.stem, data["num_images"], captions, _options(data["extra_args"]), closed, blue]
        )
    header = [
        "run",
        "images / prompt",
        "caption files",
        "options on top of its recipe",
        "closed",
        "blue background",
    ]
    return table(header, rows)


# --- HRA against LoRA (method_world) --------------------------------------------------

METHODS = {
    "hra": "HRA r=8 λ=0",
    "hra_lambda": "HRA r=8 λ=1e-3",
    "hra_gs": "HRA r=8 Gram–Schmidt",
    "hra_scaled": "HRA r=8 scaled init",
    "hra_magnitude": "HRA r=8 + magnitude",
    "lora": "LoRA r={rank} (PEFT)",
}


def _method_label(method: str, data: dict) -> str:
    rank = data.get("parameter_match", {}).get("lora_rank", 4)
    return METHODS[method].format(rank=rank)


def _method_table(relative: str) -> str:
    data = load(relative)
    steps = [str(s) for s in data["curve_steps"]]
    first, last = steps[0], steps[-1]
    # runs with ceiling and floor rows were scored by the identity evaluators (issue 32)
    bounded = "references" in data
    caveat = "" if bounded else " (not identity)"
    columns = [  # key, label, higher is better
        ("dino", f"DINO slot ↑{caveat}", True),
        ("clip_i", f"CLIP-I ↑{caveat}", True),
        ("clip_t", "CLIP-T ↑", True),
        ("dino_feature_diversity", "ViT-feature diversity ↑", True),
        ("object_distance", "colour distance ↓", False),
        ("blue_background_rate", "blue background ↑", True),
    ]
    methods = data["methods"]
    best = {}
    for key, _, higher in columns:
        values = {m: v["scores"][key]["mean"] for m, v in methods.items()}
        best[key] = (max if higher else min)(values, key=values.get)
    base = data["base"]["scores"]
    rows = [
        ["base model", "–", "0"]
        + [f"{base[key]['mean']:.3f}" for key, _, _ in columns]
        + ["0", "–"]
    ]
    for bound, label in (
        ("ceiling", "ceiling: the subject itself"),
        ("floor", "floor: another subject"),
    ):
        if bounded:
            scores = data["references"][bound]
            rows.append(
                [label, "–", "–"]
                + [f"{scores[key]['mean']:.3f}" for key, _, _ in columns]
                + ["–", "–"]
            )
    for method, m in methods.items():
        cells = []
        for key, _, _ in columns:
            score = m["scores"][key]
            text = f"{score['mean']:.3f}"
            if key not in ("dino_feature_diversity", "blue_background_rate"):
                text += f" ± {score['std']:.3f}"
            cells.append(bold(text, best[key] == method))
        change = m["curve"]
        rows.append(
            [
                _method_label(method, data),
                lr(data["learning_rates"][method]),
                ints(m["trainable_parameters"]),
                *cells,
                f"{change[first]['weight_change']['mean']:.3f} / "
                f"{change[last]['weight_change']['mean']:.3f}",
                f"{m['step_seconds']['mean']:.3f} s",
            ]
        )
    header = (
        ["method", "lr", "#param"]
        + [label for _, label, _ in columns]
        + [f"‖ΔW‖/‖W‖ at {first} / {last} steps", "step"]
    )
    return table(header, rows)


def method_world() -> str:
    return _method_table("method_world/results.json")


def method_world_select_dino() -> str:
    return _method_table("method_world_select_dino/results.json")


def method_world_paired() -> str:
    data = load("method_world/results.json")
    keys = [
        ("object_distance", "colour distance"),
        ("clip_t", "CLIP-T"),
        ("dino", "DINO slot (not identity)"),
        ("clip_i", "CLIP-I (not identity)"),
    ]
    rows = []
    for method, paired in data["paired_vs_lora"].items():
        cells = []
        for key, _ in keys:
            p = paired[key]
            cells.append(
                f"{p['mean']:+.3f} ± {p['stderr']:.3f} (LoRA higher in {p['higher']} of {p['n']})"
            )
        rows.append([_method_label(method, data), *cells])
    header = ["LoRA minus", *(label for _, label in keys)]
    return table(header, rows)


def method_world_curve() -> str:
    data = load("method_world/results.json")
    steps = [str(s) for s in data["curve_steps"]]
    rows = []
    for method, m in data["methods"].items():
        curve = m["curve"]
        rows.append(
            [
                _method_label(method, data),
                lr(data["learning_rates"][method]),
                " / ".join(f"{curve[s]['object_distance']['mean']:.3f}" for s in steps),
                " / ".join(f"{curve[s]['clip_t']['mean']:.3f}" for s in steps),
                " / ".join(f"{curve[s]['weight_change']['mean']:.3f}" for s in steps),
            ]
        )
    at = " / ".join(steps)
    header = [
        "method",
        "lr",
        f"colour distance at {at}",
        f"CLIP-T at {at}",
        f"‖ΔW‖/‖W‖ at {at}",
    ]
    return table(header, rows)


def method_world_sweep() -> str:
    data = load("method_world_sweep/results.json")
    rows = []
    for method, by_rate in data["sweep"].items():
        rates = sorted(by_rate, key=float)
        dino = {r: by_rate[r]["dino"] for r in rates}
        dist = {r: by_rate[r]["object_distance"] for r in rates}
        dino_pick = max(dino, key=dino.get)
        dist_pick = min(dist, key=dist.get)
        rows.append(
            [
                _method_label(method, load("method_world/results.json")),
                " / ".join(f"{dino[r]:.3f}" for r in rates),
                " / ".join(bold(f"{dist[r]:.3f}", r == dist_pick) for r in rates),
                lr(float(dino_pick)),
                lr(float(dist_pick)),
            ]
        )
    at = " / ".join(lr(float(r)) for r in sorted(next(iter(data["sweep"].values())), key=float))
    header = [
        "method",
        f"DINO slot at {at}",
        f"colour distance at {at}",
        "DINO picks",
        "colour distance picks",
    ]
    return table(header, rows)


# --- the world's base model and evaluators --------------------------------------------


def _attrs(split: dict) -> list[str]:
    return [pct0(split[k]) for k in ("background", "color", "shape", "all")]


def world_base() -> str:
    data = load("world_base/results.json")
    settings = data["settings"]
    rows = [
        ["seen", settings["num_seen"], *_attrs(data["seen"])],
        ["held_out", settings["num_held_out"], *_attrs(data["held_out"])],
    ]
    return table(["split", "images", "background", "object colour", "shape", "all three"], rows)


def world_guidance() -> str:
    rows = []
    paths = sorted(
        (RESULTS / "world_guidance").glob("guidance_*.json"), key=lambda p: float(p.stem[9:])
    )
    for path in paths:
        data = json.loads(path.read_text())
        rows.append(
            [
                data["settings"]["guidance_scale"],
                *_attrs(data["seen"]),
                *_attrs(data["held_out"]),
            ]
        )
    header = [
        "guidance",
        "seen: background",
        "colour",
        "shape",
        "all three",
        "held out: background",
        "colour",
        "shape",
        "all three",
    ]
    return table(header, rows)


def text_encoder_ab() -> str:
    rows = []
    for folder in ("text_encoder_ab_3500", "text_encoder_ab"):
        for variant in ("joint", "frozen"):
            unet = load(f"{folder}/{variant}/unet.json")
            scores = load(f"{folder}/{variant}/results.json")
            rows.append(
                [
                    unet["text_encoder"],
                    ints(unet["steps"]),
                    f"{unet['final_loss_mean_last_100']:.4f}",
                    " / ".join(
                        pct0(scores["seen"][k]) for k in ("background", "color", "shape", "all")
                    ),
                    " / ".join(
                        pct0(scores["held_out"][k]) for k in ("background", "color", "shape", "all")
                    ),
                ]
            )
    header = [
        "text encoder",
        "UNet steps",
        "loss (last 100 steps)",
        "seen: background / colour / shape / all three",
        "held out: background / colour / shape / all three",
    ]
    return table(header, rows)


def _caption_accuracy(relative: str) -> str:
    data = load(relative)
    rows = []
    for split in ("seen", "held_out"):
        for reader, scores in data[split]["generated"].items():
            rows.append(
                [split, reader, *(pct0(scores[k]) for k in ("shape", "color", "background", "all"))]
            )
    header = ["split", "reader", "shape", "object colour", "background", "all three"]
    return table(header, rows)


def world_caption_accuracy() -> str:
    return _caption_accuracy("world_caption_accuracy/results.json")


def world_caption_accuracy_96_48() -> str:
    return _caption_accuracy("world_caption_accuracy_96_48/results.json")


def world_evaluators_quality() -> str:
    data = load("world_evaluators/results.json")
    rows = []
    for images in ("rendered", "vae"):
        d = data[images]
        rows.append(
            [
                images,
                pct(d["clip_caption_top1"]) + " %",
                *(pct(d["vit_attributes"][k]) + " %" for k in ("shape", "color", "background")),
                *(pct(d["segformer"][k]) + " %" for k in ("mIoU", "mAcc", "aAcc")),
            ]
        )
    header = [
        "images",
        "CLIP caption top-1",
        "ViT shape",
        "ViT colour",
        "ViT background",
        "SegFormer mIoU",
        "mAcc",
        "aAcc",
    ]
    return table(header, rows)


def world_evaluators_training() -> str:
    rows = []
    for model in ("clip", "vit", "segformer"):
        recipe = json.loads((ASSETS / "world-evaluators" / f"recipe_{model}.json").read_text())
        args = recipe["command_args"]
        batch = args["segformer_batch_size"] if model == "segformer" else args["batch_size"]
        rows.append(
            [
                model,
                ints(recipe["parameters"]),
                f"{recipe['steps']} × {batch}",
                f"{recipe['cpu_seconds'] / 60:.1f} min",
                f"{recipe['wall_seconds'] / 60:.1f} min",
            ]
        )
    header = ["model", "params", "steps × batch", "CPU time", "wall time (shared machine)"]
    return table(header, rows)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {round(seconds % 60)} s"


def pretraining_stages() -> str:
    recipe = json.loads((ASSETS / "tiny-sd-world" / "pretraining" / "recipe.json").read_text())
    stages = recipe["stages"]
    rows = []
    for stage, label in (
        ("vae", "VAE"),
        ("unet", "UNet + text encoder"),
        ("decoder", "decoder refinement"),
    ):
        st = stages[stage]
        args = st["command_args"]
        batch = args["unet_batch_size"] if stage == "unet" else args["vae_batch_size"]
        if "psnr_world_db" in st:
            result = (
                f"PSNR {st['psnr_world_db']:.1f} dB (world), "
                f"{st['psnr_canvas_db']:.1f} dB (canvases)"
            )
        else:
            result = f"loss {st['final_loss_mean_last_100']:.3f} (mean of the last 100 steps)"
        rows.append(
            [
                label,
                f"`--stage {stage}`",
                f"{ints(st['steps'])} × {batch}",
                _minutes(st["wall_seconds"]),
                result,
            ]
        )
    return table(["stage", "command", "steps", "wall time", "result"], rows)


# --- control on the world -------------------------------------------------------------


def _seg(scores: dict) -> str:
    return f"{pct(scores['mIoU'])} / {pct(scores['mAcc'])} / {pct(scores['aAcc'])} %"


def _canny(scores: dict) -> str:
    return f"{scores['iou']['mean']:.3f} / {scores['f1']['mean']:.3f}"


def _mse(task: dict, digits: int = 4) -> str:
    use = task.get("condition_use_mse")
    if not use:
        return "—"
    return f"{use['own_condition']:.{digits}f} vs {use['other_scene_condition']:.{digits}f}"


def control_recipe() -> str:
    tasks = load("control_world_recipe/summary.json")["tasks"]
    seg, canny = tasks["segmentation"], tasks["canny"]
    rows = [
        [
            "base, no condition",
            _seg(seg["base_without_condition"]),
            _canny(canny["base_without_condition"]),
            "—",
        ],
        ["trained on label maps", bold(_seg(seg["trained"]), True), "—", _mse(seg)],
        ["trained on Canny edges", "—", bold(_canny(canny["trained"]), True), _mse(canny)],
    ]
    header = [
        "32 evaluation scenes",
        "mIoU / mAcc / aAcc",
        "Canny IoU / F1",
        "MSE, own condition vs another scene's",
    ]
    return table(header, rows)


def _adapter_label(summary: dict) -> str:
    params = summary.get("adapter_parameters", {"hra_r": 8, "lora_rank": 3})
    if summary["settings"].get("adapter", "hra") == "lora":
        return f"LoRA r={params['lora_rank']}"
    return f"HRA r={params['hra_r']}"


def control_hra_vs_lora() -> str:
    runs = {
        0: ["control_world_recipe", "control_world_recipe_lora"],
        1: ["control_world_recipe_seed1_hra", "control_world_recipe_seed1_lora"],
    }
    rows = []
    for seed, folders in runs.items():
        summaries = [load(f"{folder}/summary.json") for folder in folders]
        tasks = summaries[0]["tasks"]
        rows.append(
            [
                "base, no condition",
                seed,
                _seg(tasks["segmentation"]["base_without_condition"]),
                _canny(tasks["canny"]["base_without_condition"]),
                "—",
            ]
        )
        for summary in summaries:
            tasks = summary["tasks"]
            rows.append(
                [
                    _adapter_label(summary),
                    seed,
                    _seg(tasks["segmentation"]["trained"]),
                    _canny(tasks["canny"]["trained"]),
                    f"{_mse(tasks['segmentation'])}; {_mse(tasks['canny'])}",
                ]
            )
    header = [
        "32 evaluation scenes",
        "seed",
        "mIoU / mAcc / aAcc",
        "Canny IoU / F1",
        "MSE own vs other condition (labels; edges)",
    ]
    return table(header, rows)


def _rates(summary: dict) -> str:
    options = summary["settings"].get("train_options", [])
    encoder = summary["settings"]["learning_rate"]
    if "--condition_encoder_lr" in options:
        encoder = float(options[options.index("--condition_encoder_lr") + 1])
    return f"{lr(summary['settings']['learning_rate'])} / {lr(encoder)}"


def control_split_lr() -> str:
    pairs = [  # (seed 0, seed 1) per row
        ("control_world_recipe", "control_world_recipe_seed1_hra"),
        ("control_world_split_lr_hra", "control_world_split_lr_seed1_hra"),
        ("control_world_recipe_lora", "control_world_recipe_seed1_lora"),
        ("control_world_split_lr_lora", "control_world_split_lr_seed1_lora"),
    ]
    first = [load(f"{folder}/summary.json")["tasks"]["segmentation"] for folder in pairs[0]]
    base = [s["base_without_condition"] for s in first]
    rows = [
        [
            "base, no condition",
            "–",
            _seg(base[0]),
            _seg(base[1]),
            pct((base[0]["mIoU"] + base[1]["mIoU"]) / 2) + " %",
        ]
    ]
    for folders in pairs:
        summaries = [load(f"{folder}/summary.json") for folder in folders]
        trained = [s["tasks"]["segmentation"]["trained"] for s in summaries]
        rows.append(
            [
                _adapter_label(summaries[0]),
                _rates(summaries[0]),
                _seg(trained[0]),
                _seg(trained[1]),
                pct((trained[0]["mIoU"] + trained[1]["mIoU"]) / 2) + " %",
            ]
        )
    header = [
        "segmentation",
        "adapter lr / encoder lr",
        "mIoU / mAcc / aAcc, seed 0",
        "seed 1",
        "mean mIoU",
    ]
    return table(header, rows)


def control_empty_prompts() -> str:
    runs = [
        ("control_world_empty_prompts", "half the prompts empty"),
        ("control_world_5k", "half the prompts empty"),
        ("control_world_no_captions", "every prompt empty"),
    ]
    base = load(f"{runs[0][0]}/summary.json")["tasks"]["segmentation"]["base_without_condition"]
    rows = [["base, no condition", _seg(base), "—"]]
    for folder, what in runs:
        summary = load(f"{folder}/summary.json")
        seg = summary["tasks"]["segmentation"]
        seconds = summary["timings"]["train_segmentation_seconds"]
        steps = ints(summary["settings"]["max_train_steps"])
        rows.append(
            [f"{steps} steps, {what} ({seconds:.0f} s)", _seg(seg["trained"]), _mse(seg, 6)]
        )
    header = ["run", "mIoU / mAcc / aAcc", "noise-prediction MSE, own condition vs another scene's"]
    return table(header, rows)


CONTROL_RUNS = [
    "control_world",
    "control_world_wide",
    "control_world_empty_prompts",
    "control_world_no_captions",
    "control_world_5k",
    "control_world_high_noise",
    "control_world_lr9e-4_uniform_timesteps",
    "control_world_recipe",
    "control_world_recipe_lora",
    "control_world_recipe_seed1_hra",
    "control_world_recipe_seed1_lora",
    "control_world_split_lr_hra",
    "control_world_split_lr_lora",
    "control_world_split_lr_seed1_hra",
    "control_world_split_lr_seed1_lora",
]


def control_runs() -> str:
    rows = []
    for folder in CONTROL_RUNS:
        summary = load(f"{folder}/summary.json")
        settings = summary["settings"]
        options = [o for o in settings.get("train_options", []) if o not in ("--adapter", "lora")]
        if "--lora_rank" in options:
            i = options.index("--lora_rank")
            options = options[:i] + options[i + 2 :]
        seg = summary["tasks"].get("segmentation")
        seconds = summary["timings"].get("train_segmentation_seconds")
        rows.append(
            [
                f"`{folder}`",
                _adapter_label(summary),
                settings["seed"],
                ints(settings["max_train_steps"]),
                lr(settings["learning_rate"]),
                settings.get("max_offset", "7 (bundled)"),
                _options(options) if options else "none",
                _seg(seg["trained"]) if seg else "—",
                _seg(seg["base_without_condition"]) if seg else "—",
                _mse(seg) if seg else "—",
                f"{seconds:.0f} s" if seconds else "—",
            ]
        )
    header = [
        "results folder",
        "adapter",
        "seed",
        "steps",
        "lr",
        "max offset (px)",
        "training options",
        "segmentation: trained",
        "base, no condition",
        "MSE own vs other",
        "training (labels)",
    ]
    return table(header, rows)


def control_wide_rescored() -> str:
    rows = []
    for name, folder in (("first-generation SegFormer", ""), ("current SegFormer", "rescored/")):
        scores = {
            part: load(f"control_world_wide/{folder}segmentation_{part}/results.json")["metrics"]
            for part in ("trained", "base_without_condition")
        }
        rows.append([name, _seg(scores["trained"]), _seg(scores["base_without_condition"])])
    return table(["scored by", "trained", "base, no condition"], rows)


# --- performance ------------------------------------------------------------------------

VARIANTS = {
    "frozen": "frozen floor",
    "peft_lora": "PEFT LoRA r=8",
    "peft_oft": "PEFT OFT (block 32)",
    "peft_hra": "PEFT HRA r=8",
    "ours": "**ours r=8**",
}


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def _train_step(relative: str) -> str:
    data = load(relative)
    rows = []
    for result in data["results"]:
        for key, label in VARIANTS.items():
            v = result["variants"].get(key)
            if v is None:
                if key in data.get("skipped", {}):
                    rows.append(
                        [result["batch"], label, f"not run: {data['skipped'][key]}", "–", "–"]
                    )
                continue
            cells = [f"{v['median_s']:.3f} s", _mib(v["saved_bytes"]), ints(v["params"])]
            if key == "ours":
                cells = [f"**{c}**" for c in cells[:2]] + cells[2:]
            rows.append([result["batch"], label, *cells])
    header = ["batch", "variant", "median step", "memory saved for backward", "trainable params"]
    return table(header, rows)


def train_step_cpu() -> str:
    return _train_step("train_step_cpu.json")


def train_step_cpu_sdxl() -> str:
    return _train_step("train_step_cpu_sdxl.json")


def _op_count(relative: str) -> str:
    data = load(relative)
    res = data["results"]
    layers = data["adapted_layers"]
    floor = res["frozen"]["ops_by_phase"]
    floor_fb = floor["forward"] + floor["backward"]
    lora = res["peft_lora"]
    lora_fb = lora["ops_by_phase"]["forward"] + lora["ops_by_phase"]["backward"] - floor_fb
    rows = []
    for key, label in VARIANTS.items():
        v = res[key]
        phase = v["ops_by_phase"]
        if key == "frozen":
            rows.append(
                [label, ints(v["ops"]), *(ints(phase[p]) for p in phase), "–", "–", "–", "–"]
            )
            continue
        above = v["ops_above_floor"]
        fb = phase["forward"] + phase["backward"] - floor_fb
        rows.append(
            [
                label,
                ints(v["ops"]),
                *(ints(phase[p]) for p in ("forward", "backward", "optimizer")),
                f"{ints(above)} ({above / layers:.1f})",
                f"{above / lora['ops_above_floor']:.2f}×",
                f"{ints(fb)} ({fb / layers:.1f})",
                f"{fb / lora_fb:.2f}×",
            ]
        )
    header = [
        "variant",
        "ops / step",
        "forward",
        "backward",
        "AdamW",
        "above floor (per layer)",
        "vs LoRA",
        "fwd + bwd above floor (per layer)",
        "vs LoRA",
    ]
    return table(header, rows)


def op_count_cpu() -> str:
    return _op_count("op_count_cpu.json")


def op_count_cpu_sdxl() -> str:
    return _op_count("op_count_cpu_sdxl.json")


def flops() -> str:
    rows = []
    for relative, name in (("op_count_cpu.json", "SD-1.5"), ("op_count_cpu_sdxl.json", "SDXL")):
        res = load(relative)["results"]
        for size in res["frozen"]["flops"]:
            side = int(size.split("_")[1])
            lora = res["peft_lora"]["flops"][size]
            cells = [f"{res['frozen']['flops'][size] / 1e9:,.1f} G"]
            for key in ("peft_lora", "peft_oft", "peft_hra", "ours"):
                value = res[key]["flops"][size]
                ratio = value / lora
                if ratio < 1.2:
                    ratio_text = f"{ratio:.3f}×"
                else:
                    ratio_text = f"{ratio:.2f}×" if ratio < 10 else f"{ratio:.1f}×"
                    ratio_text = f"{ratio:.0f}×" if ratio >= 100 else ratio_text
                cells.append(bold(f"{value / 1e9:,.1f} G ({ratio_text})", key == "ours"))
            rows.append([name, f"{side}×{side} ({side * 8} px)", *cells])
    header = [
        "UNet",
        "latents",
        "frozen floor",
        "PEFT LoRA r=8",
        "PEFT OFT",
        "PEFT HRA r=8",
        "**ours r=8**",
    ]
    return table(header, rows)


def dreambooth_step_cpu() -> str:
    data = load("dreambooth_step_cpu.json")
    labels = {
        "plain": "plain",
        "cached": "`--cache_latents --pre_compute_text_embeddings`",
        "compiled": "`--torch_compile` (Inductor)",
    }
    rows = []
    for key, label in labels.items():
        excess = " / ".join(f"{s:.1f}" for s in data["warmup_excess_s"][key])
        rows.append(
            [
                label,
                f"{data['median_per_step_s'][key]:.3f} s",
                f"{data['time_over_plain'][key]:.2f}×",
                f"{excess} s",
                f"{data['final_loss'][key]:.8f}",
            ]
        )
    header = [
        "variant",
        "median step",
        "vs plain",
        "first steps' excess (run 1 / run 2)",
        f"final loss ({data['steps']} steps)",
    ]
    return table(header, rows)


def identity_evaluators() -> str:
    """Old and new world evaluators on the 8 named subjects (``eval/validate_identity.py``)."""
    rows = []
    for weights in ("old", "new"):
        data = load(f"world_evaluators_identity/{weights}.json")
        n = len(data["subjects"])
        for key, label in (("dino", "DINO slot"), ("clip_i", "CLIP-I")):
            r = data[key]
            ceiling, floor = r["protocol"]["ceiling"], r["protocol"]["floor"]
            rows.append(
                [
                    label,
                    weights,
                    f"{r['raw']['pair_auc']:.3f}",
                    f"{sum(r['raw']['subject_top1'])}/{n}",
                    f"{r['vae']['pair_auc']:.3f}",
                    f"{sum(r['vae']['subject_top1'])}/{n}",
                    f"{r['raw']['cosine']['same_subject_other_background']:.3f}",
                    f"{r['raw']['cosine']['other_subject_same_background']:.3f}",
                    f"{ceiling['mean']:.3f} ± {ceiling['std']:.3f}",
                    f"{floor['mean']:.3f} ± {floor['std']:.3f}",
                ]
            )
    header = [
        "instrument",
        "weights",
        "pair AUC, raw",
        "subject top-1, raw",
        "pair AUC, VAE",
        "subject top-1, VAE",
        "cos same subject / other bg",
        "cos other subject / same bg",
        "ceiling (perfect copy)",
        "floor (other subject)",
    ]
    return table(header, rows)


WORLD_VAES = {
    "bundled": "old_vae.json",
    "4 ch": "new_vae.json",
    "8 ch": "vae8.json",
    "16 ch": "vae16.json",
}
"""The bundled VAE and the broad-picture candidates by latent channels (``vae_round_trip.py``)."""


def world_vae_broad() -> str:
    """PSNR and histogram L1 of the bundled VAE and each broad-picture candidate."""
    vaes = {
        name: load(f"world_vae_broad/{file}")
        for name, file in WORLD_VAES.items()
        if (RESULTS / "world_vae_broad" / file).is_file()
    }
    names = {
        "broad": "held-out broad pictures",
        "subjects": "the 8 subjects' views",
        "world": "world scenes",
        "probe": "the issue's probe",
        "stripes_4": "stripes, 4 px period",
    }
    rows = []
    for key, label in names.items():
        count = vaes["bundled"]["sets"][key]["count"]
        rows.append(
            [f"{label} ({count})"]
            + [f"{v['sets'][key]['psnr_db']:.2f}" for v in vaes.values()]
            + [f"{v['sets'][key]['hist_l1_mean']:.3f}" for v in vaes.values()]
        )
    header = (
        ["set"] + [f"PSNR {name} (dB)" for name in vaes] + [f"histogram L1 {name}" for name in vaes]
    )
    return table(header, rows)


def startup_cpu() -> str:
    """Start-up of ``import hra_diffusion`` and every CLI's ``--help`` (bench_startup.py)."""
    data = load("startup_cpu.json")
    rows = [
        [f"`{row['command']}`", f"{row['median_s']:.2f} s", f"{row['ratio']:.2f}"]
        for row in data["results"]
    ]
    return table(["command", "median wall time", f"ratio to `{data['reference']}`"], rows)


# --- HRA step size (hra_step_size.py) -----------------------------------------------------


def _step_size(setting: str) -> str:
    """‖ΔW‖_F / ‖W‖_F after the first AdamW step, mean over the layers of each input width."""
    data = load("hra_step_size.json")[setting]
    rows = data["rows"]
    if setting == "single":
        widths = [str(d) for d in data["widths"]]
        value = {(row["label"], str(row["d"])): row["first_step"]["all"] for row in rows}
    else:
        widths = list(rows[0]["first_step"]["by_width"])
        value = {
            (row["label"], d): row["first_step"]["by_width"][d] for row in rows for d in widths
        }
    labels = list(dict.fromkeys(row["label"] for row in rows))
    body = [[label] + [f"{value[label, d]:.2e}" for d in widths] for label in labels]
    return table(["adapter", *[f"d = {d}" for d in widths]], body)


def hra_step_size_single() -> str:
    """A square nn.Linear at each width (hra_step_size.py, setting 1)."""
    return _step_size("single")


def hra_step_size_world() -> str:
    """The bundled world UNet, the DreamBooth recipe's targets (setting 2)."""
    return _step_size("world")


def hra_step_size_sd15() -> str:
    """SD-1.5's UNet with random weights, the attention projections (setting 3)."""
    return _step_size("sd15")


TABLES = {
    name: fn
    for name, fn in globals().items()
    if callable(fn)
    and getattr(fn, "__module__", None) == __name__
    and not name.startswith("_")
    and name not in {"load", "table", "pct", "pct0", "ints", "lr", "bold"}
}


def render(text: str) -> str:
    """``text`` with every marked table replaced by its rendering."""

    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; known: {', '.join(sorted(TABLES))}")
        return f"{match.group(1)}{TABLES[name]()}\n{match.group(4)}"

    return MARKER.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a committed page differs from its rendering"
    )
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text()
        rendered = render(text)
        if rendered == text:
            continue
        if args.check:
            stale.append(page)
            diff = difflib.unified_diff(
                text.splitlines(), rendered.splitlines(), str(page), "rendered", lineterm=""
            )
            print("\n".join(diff))
        else:
            page.write_text(rendered)
            print(f"rendered {page.relative_to(ROOT)}")
    if stale:
        names = ", ".join(str(p.relative_to(ROOT)) for p in stale)
        print(
            f"error: {names} differ from their rendering: run python benchmarks/render_notebook.py"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
