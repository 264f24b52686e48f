"""End-to-end tests of train/train_dreambooth_hra.py on a tiny real pipeline (CPU, 32 px)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_TARGETS,
    HRAConfig,
    hra_state_dict,
    inject_hra,
    load_hra_weights,
)
from hra_diffusion.train.arg_checks import check_common_args
from hra_diffusion.train.data import DreamBoothDataset, read_captions
from hra_diffusion.train.setup import tokenize
from hra_diffusion.train.train_dreambooth_hra import build_parser, inject_adapters, main, parse_args
from hra_diffusion.world.tiny_sd import build_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "train_dreambooth_hra.py"
SUBJECT = REPO / "examples" / "subject"
PROMPT = "a photo of qwe toy"


@pytest.fixture
def subject(tmp_path: Path) -> Path:
    """A copy of the bundled example subject's pictures (without their caption files)."""
    return Path(
        shutil.copytree(SUBJECT, tmp_path / "subject", ignore=shutil.ignore_patterns("*.txt"))
    )


def base_args(model_dir: Path, subject: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(subject),
        "--instance_prompt", PROMPT,
        "--output_dir", str(out),
        "--resolution", "32",
        "--max_train_steps", "2",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip


def expected_parameter_count(model_dir: Path, r: int, text_encoder: bool = False) -> int:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    inject_hra(pipe.unet, HRAConfig(r=r, target_modules=UNET_ATTENTION_TARGETS))
    count = sum(u.numel() for u in hra_state_dict(pipe.unet).values())
    if text_encoder:
        inject_hra(pipe.text_encoder, HRAConfig(r=r, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
        count += sum(u.numel() for u in hra_state_dict(pipe.text_encoder).values())
    return count


# --------------------------------------------------------------------------- training runs


def test_two_step_run_writes_loadable_weights(model_dir: Path, subject: Path, tmp_path: Path):
    (subject / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    argv = base_args(
        model_dir, subject, out,
        "--report_to", "tensorboard",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
        "--validation_prompt", PROMPT, PROMPT + " on a beach", "--validation_steps", "1",
        "--num_validation_images", "2", "--num_validation_inference_steps", "2",
        "--export_lora",
    )  # fmt: skip
    with pytest.warns(UserWarning, match="skipping 1 non-image file.*notes.txt"):
        summary = main(argv)

    assert summary["global_step"] == 2
    assert summary["trainable_parameters"] == expected_parameter_count(model_dir, r=8)
    for name in [
        "hra_weights.safetensors",
        "pytorch_lora_weights.safetensors",
        "README.md",
        "validation_grid.png",
        "validation/step-000001/grid.png",
        "validation/step-000002/03.png",
        "checkpoint-2/hra_weights.safetensors",
        "checkpoint-2/optimizer.bin",
        "checkpoint-2/trainer_state.json",
    ]:
        assert (out / name).is_file(), name
    assert not (out / "checkpoint-1").exists()  # rotated away by --checkpoints_total_limit 1
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    grid = Image.open(out / "validation_grid.png")
    assert grid.width == 64 and grid.height > 64  # a row of 2 per prompt, each captioned
    assert grid.getpixel((63, 33)) == (255, 255, 255)  # the caption band under the first row
    for picture in ("loss.png", "learning_rate.png"):
        assert Image.open(out / picture).size == (640, 360)
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2]

    weights = load_file(out / "hra_weights.safetensors")
    assert all(k.startswith("unet.") and k.endswith(".hra_u") for k in weights)
    assert sum(u.numel() for u in weights.values()) == summary["trainable_parameters"]
    with safe_open(out / "hra_weights.safetensors", "pt") as f:
        assert HRAConfig.from_json(f.metadata()["unet.hra_config"]).r == 8

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    assert len(load_hra_weights(pipe, out)) == len(weights)
    card = (out / "README.md").read_text()
    assert PROMPT in card and "load_hra_weights" in card and "`--hra_r` | `8`" in card
    assert "![loss curve](loss.png)" in card and "![validation](validation_grid.png)" in card


def test_prior_preservation_generates_then_reuses_class_images(
    model_dir: Path, subject: Path, tmp_path: Path
):
    class_dir = tmp_path / "class"
    extra = (
        "--with_prior_preservation", "--class_prompt", "a photo of toy",
        "--class_data_dir", str(class_dir), "--num_class_images", "2",
        "--sample_batch_size", "2", "--prior_loss_weight", "0.5",
    )  # fmt: skip
    summary = main(base_args(model_dir, subject, tmp_path / "a", *extra))
    generated = sorted(class_dir.glob("*.png"))
    assert [p.name for p in generated] == ["generated-00000.png", "generated-00001.png"]
    assert Image.open(generated[0]).size == (32, 32)
    parts = summary["losses"]
    assert summary["loss"] == pytest.approx(parts["instance_loss"] + 0.5 * parts["prior_loss"])

    stamps = [p.stat().st_mtime_ns for p in generated]
    main(base_args(model_dir, subject, tmp_path / "b", *extra, "--max_train_steps", "1"))
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))] == stamps


@pytest.mark.parametrize(
    "extra", [(), ("--hra_magnitude", "--train_text_encoder")], ids=["plain", "magnitude"]
)
def test_resume_matches_uninterrupted_run(
    model_dir: Path, subject: Path, tmp_path: Path, extra: tuple[str, ...]
):
    common = ("--checkpointing_steps", "2", "--random_flip", *extra)
    main(base_args(model_dir, subject, tmp_path / "full", *common, "--max_train_steps", "4"))

    interrupted = tmp_path / "interrupted"
    main(base_args(model_dir, subject, interrupted, *common))
    half_written = interrupted / ".checkpoint-3.tmp"  # what a kill during a save leaves
    half_written.mkdir()
    (half_written / "optimizer.bin").write_bytes(b"trunc")
    summary = main(
        base_args(
            model_dir, subject, interrupted, *common,
            "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
        )
    )  # fmt: skip

    assert summary["global_step"] == 4
    assert not half_written.exists()
    full_log, resumed_log = (
        [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}  # wall times differ
            for line in (folder / "training_log.jsonl").read_text().splitlines()
        ]
        for folder in (tmp_path / "full", interrupted)
    )
    assert len(full_log) == 4 and resumed_log == full_log  # the whole run's curve
    full = load_file(tmp_path / "full" / "hra_weights.safetensors")
    resumed = load_file(interrupted / "hra_weights.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)
    at_step_2 = load_file(interrupted / "checkpoint-2" / "hra_weights.safetensors")
    assert any(not torch.equal(at_step_2[k], full[k]) for k in full)  # steps 3-4 did train
    magnitudes = {k: v for k, v in full.items() if k.endswith(".hra_m")}
    if extra:  # one m (d_out,) per adapted layer, UNet and text encoder, moved off 1
        assert len(magnitudes) == len(full) // 2
        assert {k.split(".")[0] for k in magnitudes} == {"unet", "text_encoder"}
        assert all(
            v.dim() == 1 and not torch.equal(v, torch.ones_like(v)) for v in magnitudes.values()
        )
        assert "magnitude=True" in (interrupted / "README.md").read_text()
    else:
        assert not magnitudes


def test_hra_lambda_adds_the_orthogonality_loss(model_dir: Path, subject: Path, tmp_path: Path):
    one_step = ("--max_train_steps", "1")
    plain = main(base_args(model_dir, subject, tmp_path / "plain", *one_step))
    regular = main(base_args(model_dir, subject, tmp_path / "reg", *one_step, "--hra_lambda", "1"))
    orth = regular["losses"]["orth_loss"]
    assert orth > 0  # paired initial reflections are far from orthogonal
    assert "orth_loss" not in plain["losses"]
    assert regular["loss"] == pytest.approx(plain["loss"] + orth, rel=1e-5)


def test_hra_init_scaled_rescales_the_paper_columns(model_dir: Path, subject: Path, tmp_path: Path):
    start = {}
    for init in ("paper", "scaled"):
        argv = base_args(model_dir, subject, tmp_path, "--hra_r", "4", "--train_text_encoder")
        args = parse_args([*argv, "--hra_init", init])
        pipe = StableDiffusionPipeline.from_pretrained(model_dir)
        torch.manual_seed(0)
        params = inject_adapters(args, pipe.unet, pipe.text_encoder)
        assert pipe.unet.hra_config.init == pipe.text_encoder.hra_config.init == init
        start[init] = [p.detach().clone() for p in params]  # each (d, 4)
    assert len(start["scaled"]) == len(start["paper"]) > 0
    for paper, scaled in zip(start["paper"], start["scaled"], strict=True):
        norms = scaled.norm(dim=0)  # (4,)
        torch.testing.assert_close(norms, torch.full((4,), 2.0), atol=1e-6, rtol=0)
        assert not torch.allclose(paper.norm(dim=0), norms)
        torch.testing.assert_close(scaled / norms, paper / paper.norm(dim=0))


def test_train_text_encoder_adapts_clip_attention(model_dir: Path, subject: Path, tmp_path: Path):
    out = tmp_path / "out"
    summary = main(
        base_args(
            model_dir, subject, out, "--train_text_encoder", "--gradient_checkpointing",
            "--hra_r", "4", "--learning_rate", "1e-2", "--output_kohya_format",
        )
    )  # fmt: skip
    weights = load_file(out / "hra_weights.safetensors")
    te_keys = [k for k in weights if k.startswith("text_encoder.")]
    assert te_keys and all(k.split(".")[-2] in TEXT_ENCODER_ATTENTION_TARGETS for k in te_keys)
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    expected = expected_parameter_count(model_dir, r=4, text_encoder=True)
    assert summary["trainable_parameters"] == expected
    hra = StableDiffusionPipeline.from_pretrained(model_dir)
    assert len(load_hra_weights(hra, out)) == len(weights)

    # The kohya file: kohya/ComfyUI/A1111 names (see test_kohya_export.py), diffusers loads it.
    kohya = load_file(out / "pytorch_lora_weights_kohya.safetensors")
    modules = {key.partition(".")[0] for key in kohya}
    assert len(kohya) == 3 * len(modules) == 3 * len(weights)
    for name in modules:
        assert name.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")), name
        assert kohya[f"{name}.alpha"].item() == kohya[f"{name}.lora_down.weight"].shape[0]
    lora = StableDiffusionPipeline.from_pretrained(model_dir)
    lora.load_lora_weights(out, weight_name="pytorch_lora_weights_kohya.safetensors")
    images = []
    for pipe in (hra, lora):
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        images.append(
            pipe(
                PROMPT,
                num_inference_steps=2,
                height=32,
                width=32,
                generator=generator,
                output_type="np",
            ).images  # fmt: skip
        )
    assert abs(images[0] - images[1]).max() <= 1e-4
    assert "pytorch_lora_weights_kohya.safetensors" in (out / "README.md").read_text()


def test_two_processes_on_cpu(model_dir: Path, subject: Path, tmp_path: Path):
    out = tmp_path / "out"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--nproc_per_node", "2", str(SCRIPT)]
    command += base_args(model_dir, subject, out, "--checkpointing_steps", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("DreamBooth HRA training finished") == 1  # rank 0 reports
    assert (out / "hra_weights.safetensors").is_file()
    checkpoint = out / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }


def test_bf16_mixed_precision_keeps_adapters_in_fp32(
    model_dir: Path, subject: Path, tmp_path: Path
):
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), *base_args(model_dir, subject, out)]
    command += ["--mixed_precision", "bf16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = load_file(out / "hra_weights.safetensors")
    assert weights and all(u.dtype == torch.float32 for u in weights.values())
    assert all(torch.isfinite(u).all() for u in weights.values())


# --------------------------------------------------------------------------- bad inputs


def test_every_option_is_documented():
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def fails_with(argv: list[str], *fragments: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value)
    assert info.value.code == 2, message
    for fragment in fragments:
        assert fragment in message, message


def test_missing_instance_folder(model_dir: Path, tmp_path: Path):
    out = tmp_path / "out"
    fails_with(base_args(model_dir, tmp_path / "nope", out), "--instance_data_dir", "nope")
    assert not out.exists()


def test_instance_folder_without_images(model_dir: Path, tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.warns(UserWarning, match="readme.txt"):
        fails_with(base_args(model_dir, empty, tmp_path / "out"), "contains no images")


def test_undecodable_images_are_listed(model_dir: Path, subject: Path, tmp_path: Path):
    (subject / "broken.png").write_bytes(b"\x89PNG not really")
    (subject / "cut.jpg").write_bytes(b"\xff\xd8\xff")
    fails_with(
        base_args(model_dir, subject, tmp_path / "out"),
        "cannot be decoded",
        "broken.png",
        "cut.jpg",
    )


def test_resolution_must_be_a_multiple_of_8(model_dir: Path, subject: Path, tmp_path: Path):
    argv = base_args(model_dir, subject, tmp_path / "out") + ["--resolution", "100"]
    fails_with(argv, "multiple of 8", "96 or 104")


def test_prior_preservation_needs_class_prompt(model_dir: Path, subject: Path, tmp_path: Path):
    argv = base_args(model_dir, subject, tmp_path / "out", "--with_prior_preservation")
    fails_with(argv, "--class_prompt")


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [("folder", "no model_index.json"), ("missing", "does not exist"), ("hub", "hub")],
)
def test_unloadable_model_path(
    subject: Path, tmp_path: Path, kind: str, fragment: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast, no network
    model = {
        "folder": str(tmp_path),
        "missing": str(tmp_path / "no-such-model"),
        "hub": "no-such-org/no-such-model",
    }[kind]
    fails_with(base_args(Path(model), subject, tmp_path / "out"), fragment)


def test_finished_output_dir_is_kept(model_dir: Path, subject: Path, tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    weights = out / "hra_weights.safetensors"
    weights.write_bytes(b"finished weights")
    fails_with(base_args(model_dir, subject, out), "--overwrite_output_dir", "--resume_from")
    assert weights.read_bytes() == b"finished weights"
    assert sorted(p.name for p in out.iterdir()) == ["hra_weights.safetensors"]


def test_resume_from_missing_checkpoint(model_dir: Path, subject: Path, tmp_path: Path):
    argv = base_args(model_dir, subject, tmp_path / "out")
    fails_with(argv + ["--resume_from_checkpoint", str(tmp_path / "ckpt")], "not a checkpoint")


def test_8bit_adam_needs_bitsandbytes(model_dir: Path, subject: Path, tmp_path: Path):
    argv = base_args(model_dir, subject, tmp_path / "out", "--use_8bit_adam")
    if importlib.util.find_spec("bitsandbytes") is None:
        fails_with(argv, "pip install bitsandbytes")
    else:
        check_common_args(build_parser().parse_args(argv))  # accepted when installed


def test_caption_files_give_each_picture_its_prompt(subject: Path):
    images = sorted(subject.glob("*.png"))
    for i, image in enumerate(images):
        image.with_suffix(".txt").write_text(f"a photo of qwe toy  number {i}\n")
    captions = read_captions(images, ".txt", PROMPT)
    assert captions == [f"a photo of qwe toy number {i}" for i in range(len(images))]
    assert read_captions(images, None, PROMPT) == [PROMPT] * len(images)

    tokenizer = build_tiny_pipeline(width=16, seed=0).tokenizer
    dataset = DreamBoothDataset(images, tokenize(tokenizer, captions), 32, False, False)
    for i in range(len(images)):
        ids = dataset[(i, 0)]["instance_prompt_ids"]
        assert torch.equal(ids, tokenize(tokenizer, [captions[i]])[0])


def test_missing_caption_file_is_named(model_dir: Path, subject: Path, tmp_path: Path):
    images = sorted(subject.glob("*.png"))
    for image in images[1:]:
        image.with_suffix(".caption").write_text("a photo of qwe toy")
    argv = base_args(model_dir, subject, tmp_path / "out", "--caption_extension", ".caption")
    fails_with(argv, images[0].name, "has no caption file", "--caption_extension")
    images[0].with_suffix(".caption").write_text("  \n")
    fails_with(argv, "is empty")
