"""train/train_dreambooth_hra.py --adapter lora: diffusers-style PEFT LoRA on a tiny pipeline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from hra_diffusion.train.train_dreambooth_hra import main

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "subject"
PROMPT = "a photo of qwe toy"


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled example subject's pictures (without their caption files)."""
    folder = tmp_path_factory.mktemp("lora") / "subject"
    return Path(shutil.copytree(SUBJECT, folder, ignore=shutil.ignore_patterns("*.txt")))


def lora_args(model_dir: Path, subject: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(subject),
        "--instance_prompt", PROMPT,
        "--output_dir", str(out),
        "--resolution", "32",
        "--max_train_steps", "2",
        "--learning_rate", "1e-2",
        "--report_to", "none",
        "--adapter", "lora",
        *extra,
    ]  # fmt: skip


def sample(pipe: StableDiffusionPipeline) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(
        PROMPT, num_inference_steps=2, generator=generator, output_type="pt"
    ).images  # (1, 3, 32, 32)


def test_two_step_lora_run_loads_in_diffusers_and_changes_outputs(
    model_dir: Path, subject: Path, tmp_path: Path
):
    out = tmp_path / "out"
    summary = main(
        lora_args(
            model_dir, subject, out, "--train_text_encoder", "--checkpointing_steps", "1",
            "--output_kohya_format",
        )
    )  # fmt: skip

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert sum(t.numel() for t in weights.values()) == summary["trainable_parameters"]
    unet_keys = [k for k in weights if k.startswith("unet.")]
    text_keys = [k for k in weights if k.startswith("text_encoder.text_model.encoder.")]
    assert unet_keys and text_keys and len(unet_keys) + len(text_keys) == len(weights)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in weights)
    down = weights[next(k for k in unet_keys if k.endswith("attn1.to_q.lora_A.weight"))]
    assert down.shape[0] == 4 and down.dtype == torch.float32  # rank 4, stored in fp32
    assert not (out / "hra_weights.safetensors").exists()
    assert (out / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()
    with safe_open(out / "pytorch_lora_weights_kohya.safetensors", "pt") as f:
        assert any(k.startswith("lora_unet_") for k in f.keys())
        assert f.metadata()["ss_network_dim"] == "4"
    card = (out / "README.md").read_text()
    assert card.startswith("# LoRA DreamBooth adapter") and "load_lora_weights" in card
    assert "load_hra_weights" not in card and "rank=4" in card

    base = sample(StableDiffusionPipeline.from_pretrained(model_dir))
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(out)
    tuned = sample(pipe)
    assert (tuned - base).abs().max() > 1e-3
    step_1 = StableDiffusionPipeline.from_pretrained(model_dir)
    step_1.load_lora_weights(out / "checkpoint-1")
    assert not torch.allclose(sample(step_1), tuned)


def test_lora_resume_matches_uninterrupted_run(model_dir: Path, subject: Path, tmp_path: Path):
    common = ("--checkpointing_steps", "2", "--random_flip")
    main(lora_args(model_dir, subject, tmp_path / "full", *common, "--max_train_steps", "4"))
    interrupted = tmp_path / "interrupted"
    main(lora_args(model_dir, subject, interrupted, *common))
    with pytest.raises(SystemExit, match="already holds finished weights"):
        main(lora_args(model_dir, subject, interrupted, *common))
    summary = main(
        lora_args(
            model_dir, subject, interrupted, *common,
            "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
        )
    )  # fmt: skip
    assert summary["global_step"] == 4
    full = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    resumed = load_file(interrupted / "pytorch_lora_weights.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--adapter", "lora", "--hra_r", "8"), "--hra_r has no effect with --adapter lora"),
        (
            ("--adapter", "lora", "--hra_init", "scaled"),
            "--hra_init has no effect with --adapter lora",
        ),
        (("--adapter", "lora", "--hra_magnitude"), "--hra_magnitude has no effect with --adapter"),
        (
            ("--adapter", "lora", "--hra_apply_gs", "--hra_lambda", "0"),
            "--hra_apply_gs, --hra_lambda have no effect with --adapter lora",
        ),
        (("--adapter", "lora", "--export_lora"), "--export_lora has no effect"),
        (("--lora_rank", "4"), "--lora_rank has no effect with --adapter hra"),
    ],
)
def test_options_of_the_other_adapter_are_refused(
    model_dir: Path, subject: Path, tmp_path: Path, extra: tuple[str, ...], message: str
):
    argv = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(subject),
        "--instance_prompt", PROMPT,
        "--output_dir", str(tmp_path / "out"),
        *extra,
    ]  # fmt: skip
    with pytest.raises(SystemExit, match=f"error: {message}"):
        main(argv)
    assert not (tmp_path / "out").exists()
