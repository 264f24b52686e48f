"""One table of bad inputs run through every command-line tool, in process.

Each bad input must stop the tool with exit status 2 and ONE line (``prog: error: ...``,
at most 200 characters from ``error:`` on, besides the paths it quotes) naming the problem
(the diagnosis in the table, never just a path) and the fix, print no traceback, and leave
every file that existed before unchanged (hashed before and after). A prompt over the tokenizer's
77 tokens is not an error: it warns once, saying how many tokens, and which words, are
dropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from hra_diffusion import (
    UNET_ATTENTION_FF_TARGETS,
    HRAConfig,
    attach_condition_encoder,
    build_condition_encoder,
    inject_hra,
    save_control_weights,
    save_hra_weights,
)
from hra_diffusion.eval import compare_runs, evaluate_control, evaluate_dreambooth
from hra_diffusion.eval.dreambooth_benchmark import subject_prompts, subjects
from hra_diffusion.pipelines import export, generate, sample_control
from hra_diffusion.train import (
    train_control_hra,
    train_dreambooth_hra,
    train_dreambooth_hra_flux,
    train_dreambooth_hra_sd3,
    train_dreambooth_hra_sdxl,
)
from hra_diffusion.world.tiny_sd import build_tiny_pipeline
from hra_diffusion.world.tiny_sdxl import save_tiny_sdxl
from hra_diffusion.world.tiny_transformers import save_tiny_transformer_pipeline

LONG_PROMPT = " ".join(["red"] * 100)  # 100 tokens + start and end: 25 past CLIP's 77


def png_bytes(seed: int, size: int = 32, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    high = 256 if mode == "RGB" else 151
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, high, shape, dtype=np.uint8), mode).save(buffer, "PNG")
    return buffer.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@dataclass
class World:
    """Every input the table needs, good and bad, written once."""

    root: Path
    model: Path
    sdxl: Path

    def __getattr__(self, name: str) -> Path:
        return self.root / name


def write_images(folder: Path, count: int = 3, mode: str = "RGB") -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        (folder / f"{i}.png").write_bytes(png_bytes(i, mode=mode))
    return folder


def hra_weights(model: Path, out: Path) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(model)
    inject_hra(pipe.unet, HRAConfig(r=2))
    return save_hra_weights(out, unet=pipe.unet)


def control_weights(pipe: StableDiffusionPipeline, out: Path) -> Path:
    inject_hra(pipe.unet, HRAConfig(r=2, target_modules=UNET_ATTENTION_FF_TARGETS))
    attach_condition_encoder(pipe.unet, build_condition_encoder(pipe.unet, (4, 8, 8, 16)))
    return save_control_weights(out, pipe.unet)


def write_control_data(root: Path, broken: bool = False) -> Path:
    write_images(root / "images", 2)
    write_images(root / "conditions", 2, mode="L")
    if broken:
        (root / "images" / "1.png").write_bytes(truncated(png_bytes(1)))
    lines = [
        json.dumps({"image": f"{i}.png", "condition": f"{i}.png", "text": "a"}) for i in (0, 1)
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def write_generated(root: Path, broken: bool = False) -> Path:
    """<root>/dog/<prompt>_00.png for the 25 prompts of the DreamBooth subject "dog"."""
    prompts = subject_prompts(subjects()["dog"], "qwe")
    folder = root / "dog"
    folder.mkdir(parents=True)
    (folder / "prompts.json").write_text(json.dumps(prompts))
    for p in range(len(prompts)):
        (folder / f"{p:02d}_00.png").write_bytes(png_bytes(p))
    if broken:
        (folder / "03_00.png").write_bytes(truncated(png_bytes(3)))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("inputs")
    model, other = root / "model", root / "other_model"
    build_tiny_pipeline(width=32, seed=0).save_pretrained(model)
    build_tiny_pipeline(width=16, seed=0).save_pretrained(other)
    w = World(root, model, save_tiny_sdxl(root / "sdxl", width=16))
    for family in ("sd3", "flux"):  # w.sd3, w.flux
        save_tiny_transformer_pipeline(root / family, family)
    write_images(w.subject)
    (w.root / "empty").mkdir()
    write_images(w.broken_subject)
    (w.broken_subject / "notes.doc").write_text("not a picture")
    (w.broken_subject / "cut.png").write_bytes(truncated(png_bytes(7)))
    hra_weights(model, w.weights)
    hra_weights(other, w.other_weights)
    hra_weights(other, w.eval_other / "dog")
    torch.save({"unet.x.hra_u": torch.zeros(2, 2)}, w.pickled)
    w.pickled.rename(w.root / "pickled.safetensors")
    w.eval_pickled.mkdir()
    (w.eval_pickled / "dog.safetensors").write_bytes((w.root / "pickled.safetensors").read_bytes())
    good = (w.weights / "hra_weights.safetensors").read_bytes()
    (w.root / "truncated.safetensors").write_bytes(truncated(good))
    control_weights(StableDiffusionPipeline.from_pretrained(model), w.control)
    control_weights(build_tiny_pipeline(width=16, seed=0), w.other_control)
    write_control_data(w.control_data)
    write_control_data(w.broken_control_data, broken=True)
    (w.empty_control_data).mkdir()
    (w.empty_control_data / "metadata.jsonl").write_text("")
    write_images(w.conditions, 2, mode="L")
    lines = [json.dumps({"condition": f"{i}.png", "text": "a"}) for i in (0, 1)]
    w.prompts.write_text("\n".join(lines) + "\n")
    (w.root / "no_prompts.jsonl").write_text("")
    write_images(w.broken_conditions, 2, mode="L")
    (w.broken_conditions / "1.png").write_bytes(truncated(png_bytes(1, mode="L")))
    write_generated(w.generated)
    write_generated(w.broken_generated, broken=True)
    (w.dataset / "dog").mkdir(parents=True)
    (w.dataset / "dog" / "00.png").write_bytes(png_bytes(0))
    write_images(w.seg_images, 2)
    write_images(w.seg_labels, 2, mode="L")
    write_images(w.broken_seg_images, 2)
    (w.broken_seg_images / "1.png").write_bytes(truncated(png_bytes(1)))
    broken_model(model, w.truncated_model, "unet/diffusion_pytorch_model.safetensors")
    broken_model(model, w.garbled_model, "vae/config.json")
    train_dreambooth_hra.main(
        [*dreambooth(w, w.run_r2, "--hra_r", "2"), "--checkpointing_steps", "1"]
    )
    (w.root / "results.json").write_text(json.dumps({"task": "canny", "metrics": {}}))
    (w.root / "not_json.json").write_text("{ this is not json")
    return w


def broken_model(model: Path, copy: Path, name: str) -> None:
    """A copy of the pipeline folder ``model`` whose file ``name`` is cut in half."""
    shutil.copytree(model, copy)
    (copy / name).write_bytes(truncated((copy / name).read_bytes()))


def finished(folder: Path, name: str) -> Path:
    """An output folder holding a finished run's marker file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b"a finished run")
    return folder


# --------------------------------------------------------------------------- the CLIs


def dreambooth(w: World, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model or w.model),
        "--instance_data_dir", str(w.subject), "--instance_prompt", "a qwe toy",
        "--resolution", "32", "--report_to", "none", "--max_train_steps", "1",
        "--output_dir", str(out), *extra,
    ]  # fmt: skip


def sdxl(w: World, out: Path, *extra: str) -> list[str]:
    return dreambooth(w, out, *extra, model=w.sdxl)


def sd3(w: World, out: Path, *extra: str) -> list[str]:
    return dreambooth(w, out, *extra, model=w.sd3)


def flux(w: World, out: Path, *extra: str) -> list[str]:
    return dreambooth(w, out, *extra, model=w.flux)


def control(w: World, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(w.model), "--train_data_dir", str(w.control_data),
        "--condition_type", "segmentation", "--resolution", "32",
        "--condition_encoder_channels", "4", "8", "8", "16", "--report_to", "none",
        "--max_train_steps", "1", "--output_dir", str(out), *extra,
    ]  # fmt: skip


def generation(w: World, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(w.model), "--weights", str(w.weights), "--prompt", "a red circle",
        "--num_images", "1", "--steps", "1", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def sampling(w: World, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(w.model), "--weights", str(w.control), "--conditions_dir",
        str(w.conditions), "--prompts", str(w.prompts), "--condition_type", "segmentation",
        "--resolution", "32", "--steps", "1", "--device", "cpu", "--out", str(out), *extra,
    ]  # fmt: skip


def scoring(w: World, out: Path, *extra: str) -> list[str]:
    return [
        "--dataset_dir", str(w.dataset), "--generated_dir", str(w.generated),
        "--subjects", "dog", "--device", "cpu", "--output_dir", str(out), *extra,
    ]  # fmt: skip


def segmentation(w: World, out: Path, *extra: str) -> list[str]:
    return [
        "segmentation", "--images", str(w.seg_images), "--labels", str(w.seg_labels),
        "--device", "cpu", "--output_dir", str(out), *extra,
    ]  # fmt: skip


def comparison(w: World, out: Path, *extra: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    results = str(w.root / "results.json")
    return [results, results, "--output", str(out / "chart.png"), *extra]


def exporting(w: World, out: Path, *extra: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    return [
        "--format", "glora", "--weights", str(w.weights), "--output",
        str(out / "glora.safetensors"), *extra,
    ]  # fmt: skip


def replaced(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with the value after ``flag`` replaced (its first occurrence)."""
    index = argv.index(flag)
    return [*argv[: index + 1], value, *argv[index + 2 :]]


def without(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value."""
    index = argv.index(flag)
    return [*argv[:index], *argv[index + 2 :]]


Build = Callable[[World, Path], list[str]]
MODEL = "--pretrained_model_name_or_path"

TRAINERS = {
    "dreambooth": (train_dreambooth_hra.main, dreambooth, "--instance_data_dir"),
    "dreambooth_sdxl": (train_dreambooth_hra_sdxl.main, sdxl, "--instance_data_dir"),
    "dreambooth_sd3": (train_dreambooth_hra_sd3.main, sd3, "--instance_data_dir"),
    "dreambooth_flux": (train_dreambooth_hra_flux.main, flux, "--instance_data_dir"),
    "control": (train_control_hra.main, control, "--train_data_dir"),
}
FINISHED = {
    "dreambooth": "hra_weights.safetensors",
    "dreambooth_sdxl": "hra_weights.safetensors",
    "dreambooth_sd3": "hra_weights.safetensors",
    "dreambooth_flux": "hra_weights.safetensors",
    "control": "hra_control_weights.safetensors",
}


def trainer_cases() -> list[tuple[str, Callable, Build, str]]:
    cases = []
    for name, (main, build, data) in TRAINERS.items():
        empty = "holds no examples" if name == "control" else "contains no images"
        broken = "broken_control_data" if name == "control" else "broken_subject"
        marker = FINISHED[name]
        cases += [
            (f"{name}-missing_model", main,
             lambda w, o, b=build: replaced(b(w, o), MODEL, str(w.root / "nope")),
             "does not exist: give a diffusers folder"),
            (f"{name}-model_folder_without_index", main,
             lambda w, o, b=build: replaced(b(w, o), MODEL, str(w.empty)),
             "has no model_index.json"),
            (f"{name}-missing_data", main,
             lambda w, o, b=build, d=data: replaced(b(w, o), d, str(w.root / "nope")),
             "does not exist"),
            (f"{name}-empty_data", main,
             lambda w, o, b=build, d=data, n=name: replaced(
                 b(w, o), d, str(w.empty_control_data if n == "control" else w.empty)),
             empty),
            (f"{name}-undecodable_image", main,
             lambda w, o, b=build, d=data, k=broken: replaced(b(w, o), d, str(w.root / k)),
             "cannot be decoded"),
            (f"{name}-zero_batch", main,
             lambda w, o, b=build: b(w, o, "--train_batch_size", "0"),
             "must be a positive integer, got 0"),
            (f"{name}-negative_steps", main,
             lambda w, o, b=build: b(w, o, "--max_train_steps", "-2"),
             "must be a positive integer, got -2"),
            (f"{name}-resolution_not_multiple_of_8", main,
             lambda w, o, b=build: replaced(b(w, o), "--resolution", "100"),
             "100 is not a multiple of 8"),
            (f"{name}-finished_output", main,
             lambda w, o, b=build, m=marker: b(w, finished(o, m)), "--overwrite_output_dir"),
        ]  # fmt: skip
    return cases


def weight_cases(
    name: str, main: Callable, build: Build, flag: str, other: str, empty: str = "holds neither"
) -> list[tuple[str, Callable, Build, str]]:
    """The bad-weights rows of a CLI reading weights from ``flag``; ``empty`` is the diagnosis
    of a folder without weights."""
    return [
        (f"{name}-missing_weights", main,
         lambda w, o: replaced(build(w, o), flag, str(w.root / "nope")), "does not exist"),
        (f"{name}-weights_folder_empty", main,
         lambda w, o: replaced(build(w, o), flag, str(w.empty)), empty),
        (f"{name}-pickle_renamed_safetensors", main,
         lambda w, o: replaced(build(w, o), flag, str(w.root / "pickled.safetensors")),
         "is a pickle"),
        (f"{name}-truncated_safetensors", main,
         lambda w, o: replaced(build(w, o), flag, str(w.root / "truncated.safetensors")),
         "is truncated or corrupt"),
        (f"{name}-weights_of_another_base", main,
         lambda w, o: replaced(build(w, o), flag, str(getattr(w, other))),
         "not (32, 2): not trained on this"),
    ]  # fmt: skip


CASES = [
    *trainer_cases(),
    ("dreambooth-resume_with_another_hra_r", train_dreambooth_hra.main,
     lambda w, o: dreambooth(w, o, "--resume_from_checkpoint", str(w.run_r2 / "checkpoint-1")),
     "was written with --hra_r 2, this run has 8; resume with --hra_r 2"),
    ("dreambooth-resume_with_another_hra_init", train_dreambooth_hra.main,
     lambda w, o: dreambooth(w, o, "--hra_r", "2", "--hra_init", "scaled",
                             "--resume_from_checkpoint", str(w.run_r2 / "checkpoint-1")),
     "was written with --hra_init paper, this run has scaled; resume with --hra_init paper"),
    ("dreambooth-resume_with_another_hra_magnitude", train_dreambooth_hra.main,
     lambda w, o: dreambooth(w, o, "--hra_r", "2", "--hra_magnitude",
                             "--resume_from_checkpoint", str(w.run_r2 / "checkpoint-1")),
     "was written with --hra_magnitude False, this run has True; resume with --hra_magnitude"),
    ("dreambooth-hra_magnitude_with_kohya_format", train_dreambooth_hra.main,
     lambda w, o: dreambooth(w, o, "--hra_magnitude", "--output_kohya_format"),
     "--output_kohya_format cannot hold --hra_magnitude"),
    ("dreambooth-truncated_model_weights", train_dreambooth_hra.main,
     lambda w, o: replaced(dreambooth(w, o), MODEL, str(w.truncated_model)),
     "diffusion_pytorch_model.safetensors is truncated or corrupt"),
    ("dreambooth-model_config_not_json", train_dreambooth_hra.main,
     lambda w, o: replaced(dreambooth(w, o), MODEL, str(w.garbled_model)),
     "vae/config.json is not JSON"),
    ("dreambooth-blank_instance_prompt", train_dreambooth_hra.main,
     lambda w, o: replaced(dreambooth(w, o), "--instance_prompt", "   "),
     "--instance_prompt: must not be empty or blank"),
    ("dreambooth-negative_learning_rate", train_dreambooth_hra.main,
     lambda w, o: dreambooth(w, o, "--learning_rate=-1e-4"),
     "--learning_rate: must be a number > 0"),
    ("dreambooth-huge_resolution", train_dreambooth_hra.main,
     lambda w, o: replaced(dreambooth(w, o), "--resolution", "100000"),
     "over the limit of 2048"),
    ("dreambooth-output_dir_is_a_file", train_dreambooth_hra.main,
     lambda w, o: dreambooth(w, w.root / "results.json"), "is a file"),
    ("generate-truncated_model_weights", generate.main,
     lambda w, o: replaced(generation(w, o), "--model", str(w.truncated_model)),
     "is truncated or corrupt"),
    ("generate-blank_prompt", generate.main,
     lambda w, o: replaced(generation(w, o), "--prompt", " "), "must not be empty or blank"),
    ("generate-huge_height", generate.main,
     lambda w, o: generation(w, o, "--height", "100000"), "over the limit of 2048"),
    ("generate-nan_guidance", generate.main,
     lambda w, o: generation(w, o, "--guidance_scale", "nan"), "must be a finite number"),
    ("generate-output_is_a_file", generate.main,
     lambda w, o: generation(w, w.root / "results.json"), "is a file"),
    ("evaluate_dreambooth-output_is_a_file", evaluate_dreambooth.main,
     lambda w, o: scoring(w, w.root / "results.json"), "is a file"),
    ("control-zero_encoder_lr", train_control_hra.main,
     lambda w, o: control(w, o, "--condition_encoder_lr", "0"),
     "--condition_encoder_lr: must be a number > 0, got 0"),
    ("generate-missing_model", generate.main,
     lambda w, o: replaced(generation(w, o), "--model", "/nonexistent"),
     "--model: /nonexistent does not exist: give a diffusers folder"),
    *weight_cases("generate", generate.main, generation, "--weights", "other_weights"),
    ("generate-zero_images", generate.main,
     lambda w, o: replaced(generation(w, o), "--num_images", "0"), "must be a positive integer"),
    ("generate-negative_steps", generate.main,
     lambda w, o: replaced(generation(w, o), "--steps", "-1"), "must be a positive integer"),
    ("generate-height_not_multiple_of_8", generate.main,
     lambda w, o: generation(w, o, "--height", "60"), "--height: 60 is not a multiple of 8"),
    ("generate-finished_output", generate.main,
     lambda w, o: generation(w, finished(o, "generation.json")), "--overwrite"),
    ("sample_control-missing_model", sample_control.main,
     lambda w, o: replaced(sampling(w, o), "--model", str(w.root / "nope")), "does not exist"),
    *weight_cases("sample_control", sample_control.main, sampling, "--weights", "other_control",
                  "holds no hra_control_weights"),
    ("sample_control-missing_conditions", sample_control.main,
     lambda w, o: replaced(sampling(w, o), "--conditions_dir", str(w.root / "nope")),
     "does not exist"),
    ("sample_control-empty_prompts", sample_control.main,
     lambda w, o: replaced(sampling(w, o), "--prompts", str(w.root / "no_prompts.jsonl")),
     "holds no prompts"),
    ("sample_control-undecodable_condition", sample_control.main,
     lambda w, o: replaced(sampling(w, o), "--conditions_dir", str(w.broken_conditions)),
     "cannot be decoded"),
    ("sample_control-zero_steps", sample_control.main,
     lambda w, o: replaced(sampling(w, o), "--steps", "0"), "must be a positive integer"),
    ("sample_control-resolution_not_multiple_of_8", sample_control.main,
     lambda w, o: replaced(sampling(w, o), "--resolution", "60"), "is not a multiple of 8"),
    ("sample_control-finished_output", sample_control.main,
     lambda w, o: sampling(w, finished(o, "metadata.jsonl")), "--overwrite"),
    ("evaluate_dreambooth-missing_dataset", evaluate_dreambooth.main,
     lambda w, o: replaced(scoring(w, o), "--dataset_dir", str(w.root / "nope")),
     "does not exist"),
    ("evaluate_dreambooth-empty_generated", evaluate_dreambooth.main,
     lambda w, o: replaced(scoring(w, o), "--generated_dir", str(w.root)), "not found"),
    ("evaluate_dreambooth-undecodable_image", evaluate_dreambooth.main,
     lambda w, o: replaced(scoring(w, o), "--generated_dir", str(w.broken_generated)),
     "1 image(s) could not be decoded"),
    ("evaluate_dreambooth-zero_batch", evaluate_dreambooth.main,
     lambda w, o: scoring(w, o, "--batch_size", "0"), "must be a positive integer"),
    ("evaluate_dreambooth-negative_images", evaluate_dreambooth.main,
     lambda w, o: scoring(w, o, "--num_images", "-1"), "must be a positive integer"),
    ("evaluate_dreambooth-finished_output", evaluate_dreambooth.main,
     lambda w, o: scoring(w, finished(o, "results.json")), "--overwrite_output_dir"),
    ("evaluate_dreambooth-missing_base_model", evaluate_dreambooth.main,
     lambda w, o: [*without(scoring(w, o), "--generated_dir"), "--weights",
                   str(w.eval_other / "{subject}"), "--base_model", str(w.root / "nope")],
     "does not exist"),
    ("evaluate_dreambooth-pickle_renamed_safetensors", evaluate_dreambooth.main,
     lambda w, o: [*without(scoring(w, o), "--generated_dir"), "--weights",
                   str(w.eval_pickled / "{subject}.safetensors"), "--base_model", str(w.model)],
     "is a pickle"),
    ("evaluate_dreambooth-weights_of_another_base", evaluate_dreambooth.main,
     lambda w, o: [*without(scoring(w, o), "--generated_dir"), "--weights",
                   str(w.eval_other / "{subject}"), "--base_model", str(w.model)],
     "is (16, 2), not (32, 2): not trained on this"),
    ("evaluate_control-missing_images", evaluate_control.main,
     lambda w, o: replaced(segmentation(w, o), "--images", str(w.root / "nope")),
     "does not exist"),
    ("evaluate_control-empty_images", evaluate_control.main,
     lambda w, o: replaced(segmentation(w, o), "--images", str(w.empty)), "is empty"),
    ("evaluate_control-undecodable_image", evaluate_control.main,
     lambda w, o: replaced(segmentation(w, o), "--images", str(w.broken_seg_images)),
     "could not be decoded"),
    ("evaluate_control-zero_batch", evaluate_control.main,
     lambda w, o: segmentation(w, o, "--batch_size", "0"), "must be a positive integer"),
    ("evaluate_control-missing_model", evaluate_control.main,
     lambda w, o: segmentation(w, o, "--segformer_model", str(w.root / "nope")),
     "does not exist"),
    ("evaluate_control-finished_output", evaluate_control.main,
     lambda w, o: segmentation(w, finished(o, "results.json")), "--overwrite_output_dir"),
    ("compare_runs-missing_results", compare_runs.main,
     lambda w, o: [str(w.root / "nope.json"), *comparison(w, o)], "does not exist"),
    ("compare_runs-not_json", compare_runs.main,
     lambda w, o: [str(w.root / "not_json.json"), *comparison(w, o)], "is not JSON"),
    ("compare_runs-output_folder_missing", compare_runs.main,
     lambda w, o: [*comparison(w, o), "--output", str(o / "nope" / "chart.png")],
     "does not exist"),
    ("compare_runs-existing_output", compare_runs.main,
     lambda w, o: comparison(w, finished(o, "chart.png")), "--overwrite"),
    *weight_cases("export", export.main, lambda w, o: exporting(w, o, "--model", str(w.model)),
                  "--weights", "other_weights"),
    ("export-missing_model", export.main,
     lambda w, o: exporting(w, o, "--model", str(w.root / "nope")), "does not exist"),
    ("export-existing_output", export.main,
     lambda w, o: exporting(w, finished(o, "glora.safetensors")), "--overwrite"),
    ("export-output_folder_missing", export.main,
     lambda w, o: [*exporting(w, o), "--output", str(o / "nope" / "g.safetensors")],
     "does not exist"),
]  # fmt: skip


def hashes(*roots: Path) -> dict[Path, str]:
    return {
        path: hashlib.sha256(path.read_bytes()).hexdigest()
        for root in roots
        for path in root.rglob("*")
        if path.is_file()
    }


def progress(line: str) -> bool:
    """A progress bar's line (tqdm, e.g. transformers' "Loading weights")."""
    return "it/s]" in line or "s/it]" in line


def error_line(err: str) -> str:
    """The one line a refusal printed on stderr (progress bars aside)."""
    lines = [line for line in err.strip().splitlines() if line.strip() and not progress(line)]
    assert len(lines) == 1, err
    return lines[0]


def without_paths(line: str, *roots: Path) -> str:
    """``line`` without the paths under ``roots`` it quotes: those are the user's length."""
    for root in roots:
        line = re.sub(re.escape(str(root)) + r"\S*", "", line)
    return line


@pytest.mark.parametrize(("main", "build", "fragment"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_input_is_refused_in_one_line(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    main: Callable,
    build: Build,
    fragment: str,
) -> None:
    argv = build(world, tmp_path / "out")
    before = hashes(world.root, tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    line = error_line(err)
    assert ": error: " in line and fragment in line, line
    message = line[line.index("error: ") :]  # the program name is the runner's here
    assert len(without_paths(message, world.root, tmp_path)) <= 200, line
    after = hashes(world.root, tmp_path)
    assert {path: after.get(path) for path in before} == before


LONG_PROMPT_CASES = [
    ("dreambooth", train_dreambooth_hra.main,
     lambda w, o: replaced(dreambooth(w, o), "--instance_prompt", LONG_PROMPT)),
    ("generate", generate.main, lambda w, o: replaced(generation(w, o), "--prompt", LONG_PROMPT)),
]  # fmt: skip


@pytest.mark.parametrize(("main", "build"), [c[1:] for c in LONG_PROMPT_CASES],
                         ids=[c[0] for c in LONG_PROMPT_CASES])  # fmt: skip
def test_prompt_over_77_tokens_warns_once(
    world: World, tmp_path: Path, main: Callable, build: Build
) -> None:
    dropped = r'25 tokens are dropped from the end of the longest \("red red red'
    with pytest.warns(UserWarning, match=dropped) as record:
        main(build(world, tmp_path / "out"))
    assert sum("tokens are dropped" in str(r.message) for r in record) == 1
