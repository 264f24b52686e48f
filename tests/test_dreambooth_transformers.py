"""SD3 and FLUX.1: the tiny transformer bases, train/train_dreambooth_hra_sd3.py and
train/train_dreambooth_hra_flux.py, and the library's support (family detection, loading,
LoRA export into diffusers' own loaders), on CPU at 32 px."""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import diffusers
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from hra_diffusion import (
    FLUX_TARGETS,
    SD3_TARGETS,
    HRAConfig,
    export_lora,
    hra_state_dict,
    inject_hra,
    load_hra_weights,
    save_hra_weights,
)
from hra_diffusion.errors import InputError
from hra_diffusion.families import base_family
from hra_diffusion.pipelines import export
from hra_diffusion.train import train_dreambooth_hra_flux, train_dreambooth_hra_sd3
from hra_diffusion.train.flow_matching import flow_matching_loss, noise_latents
from hra_diffusion.world.tiny_transformers import save_tiny_transformer_pipeline

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "subject"
PROMPT = "a photo of qwe toy"
FAMILIES = {
    "sd3": (diffusers.StableDiffusion3Pipeline, SD3_TARGETS, train_dreambooth_hra_sd3),
    "flux": (diffusers.FluxPipeline, FLUX_TARGETS, train_dreambooth_hra_flux),
}
pytestmark = pytest.mark.filterwarnings("ignore:--instance_data_dir")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny SD3 and FLUX.1 pipelines, saved once per module (read only)."""
    root = tmp_path_factory.mktemp("transformer_bases")
    return {family: save_tiny_transformer_pipeline(root / family, family) for family in FAMILIES}


@pytest.fixture
def subject(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SUBJECT, tmp_path / "subject"))


def pipe_of(bases: dict[str, Path], family: str) -> diffusers.DiffusionPipeline:
    pipe = FAMILIES[family][0].from_pretrained(bases[family])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: diffusers.DiffusionPipeline) -> torch.Tensor:
    """Two sampling steps at 32 px with a fixed seed: (1, 3, 32, 32)."""
    return pipe(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images.float()


def base_args(model_dir: Path, subject: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(subject),
        "--instance_prompt", PROMPT,
        "--output_dir", str(out),
        "--resolution", "32",
        "--max_train_steps", "3",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip


def hashes(root: Path) -> dict[Path, str]:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in root.rglob("*")
    }


# --------------------------------------------------------------------------- bases, library


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_base_is_of_its_family_and_samples(bases: dict[str, Path], family: str):
    assert base_family(str(bases[family])) == family
    pipe = pipe_of(bases, family)
    assert torch.isfinite(sample(pipe)).all()
    again = pipe_of(bases, family)
    assert torch.equal(sample(again), sample(pipe))


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_and_exact_lora_export_give_the_same_images(
    bases: dict[str, Path], family: str, tmp_path: Path
):
    """HRA moved off the identity; the file loads back, and the exported LoRA loads with
    diffusers' own load_lora_weights, both giving the trained model's images."""
    pipe = pipe_of(bases, family)
    torch.manual_seed(1)
    inject_hra(pipe.transformer, HRAConfig(r=4, target_modules=FAMILIES[family][1]))
    with torch.no_grad():
        for u in hra_state_dict(pipe.transformer).values():
            u.add_(torch.randn_like(u))  # paired columns no longer cancel
    expected = sample(pipe)
    path = save_hra_weights(tmp_path / "hra", transformer=pipe.transformer)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["base_family"] == family
        assert {key.split(".")[0] for key in f.keys()} == {"transformer"}

    fresh = pipe_of(bases, family)
    assert (sample(fresh) - expected).abs().max() > 1e-3  # the adapter changes the images
    load_hra_weights(fresh, tmp_path / "hra")
    assert (sample(fresh) - expected).abs().max() <= 1e-5

    export_lora(tmp_path / "hra", pipe_of(bases, family), tmp_path / "lora")
    plain = pipe_of(bases, family)
    plain.load_lora_weights(tmp_path / "lora")
    assert (sample(plain) - expected).abs().max() <= 1e-4


def test_weights_of_another_family_are_refused_in_one_line(bases: dict[str, Path], tmp_path: Path):
    sd3 = pipe_of(bases, "sd3")
    inject_hra(sd3.transformer, HRAConfig(r=2, target_modules=SD3_TARGETS))
    save_hra_weights(tmp_path, transformer=sd3.transformer)
    flux = pipe_of(bases, "flux")
    with pytest.raises(InputError) as info:
        load_hra_weights(flux, tmp_path)
    message = str(info.value)
    assert "Stable Diffusion 3" in message and "FLUX.1" in message and "\n" not in message
    assert not any(hra_state_dict(flux.transformer))  # nothing was injected
    with pytest.raises(InputError, match="Stable Diffusion 3 base, but this is a FLUX.1 trans"):
        load_hra_weights(flux.transformer, tmp_path)


def test_glora_and_peft_and_sd3_kohya_exports_are_refused_in_one_line(
    bases: dict[str, Path], tmp_path: Path
):
    """FLUX.1 exports as kohya too (tests/test_kohya_flux.py); the rest is refused."""
    for family, formats in (("flux", ("glora", "peft")), ("sd3", ("kohya", "glora", "peft"))):
        pipe = pipe_of(bases, family)
        inject_hra(pipe.transformer, HRAConfig(r=2, target_modules=FAMILIES[family][1]))
        weights = save_hra_weights(tmp_path / family, transformer=pipe.transformer)
        before = hashes(tmp_path)
        for fmt in formats:
            output = tmp_path / ("x" if fmt == "peft" else "x.safetensors")
            argv = ["--format", fmt, "--weights", str(weights), "--model", str(bases[family]),
                    "--output", str(output)]  # fmt: skip
            with pytest.raises(SystemExit) as info:
                export.main(argv)
            name = {"flux": "FLUX.1", "sd3": "Stable Diffusion 3"}[family]
            message = str(info.value)
            assert info.value.code == 2 and f"--format {fmt} is not written for {name}" in message
        assert hashes(tmp_path) == before


def test_flow_matching_loss_is_zero_at_the_true_velocity():
    """x_σ = (1 − σ) x_0 + σ ε, and v = ε − x_0 (or x_σ − σ v = x_0 preconditioned)."""
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents = torch.randn(3, 4, 4, 4)
    for scheme, precondition in (("logit_normal", False), ("mode", True), ("sigma_sqrt", False)):
        args = argparse.Namespace(
            weighting_scheme=scheme,
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            precondition_outputs=precondition,
        )
        sample, noise = noise_latents(latents, scheduler, args, torch.Generator().manual_seed(0))
        sigmas = sample.sigmas
        torch.testing.assert_close(sample.noisy, (1 - sigmas) * latents + sigmas * noise)
        torch.testing.assert_close(sample.timesteps, 1000 * sigmas.flatten())
        assert flow_matching_loss(noise - latents, sample, noise, args) < 1e-10
        assert flow_matching_loss(noise, sample, noise, args) > 0.1


# --------------------------------------------------------------------------- the scripts


@pytest.mark.parametrize("family", FAMILIES)
def test_three_steps_train_resume_exactly_and_export(
    bases: dict[str, Path], family: str, subject: Path, tmp_path: Path
):
    """3 steps straight equal 2 + resume 1 (prior preservation on, class images generated
    with the base's own sampler); the weights and the LoRA export give the same images."""
    main = FAMILIES[family][2].main
    scheme = {"sd3": "logit_normal", "flux": "mode"}[family]
    common = (
        "--hra_r", "4", "--learning_rate", "3e-2", "--random_flip", "--checkpointing_steps", "2",
        "--export_lora", "--weighting_scheme", scheme, "--with_prior_preservation",
        "--class_prompt", "a photo of toy", "--class_data_dir", str(tmp_path / "class"),
        "--num_class_images", "2", "--class_inference_steps", "2", "--max_sequence_length", "16",
    )  # fmt: skip
    full = tmp_path / "full"
    kohya = ("--output_kohya_format",) if family == "flux" else ()
    summary = main(
        base_args(
            bases[family], subject, full, *common, *kohya,
            "--validation_prompt", PROMPT, "--validation_steps", "3",
            "--num_validation_images", "1", "--num_validation_inference_steps", "2",
        )
    )  # fmt: skip
    assert summary["global_step"] == 3 and set(summary["losses"]) == {"instance_loss", "prior_loss"}
    assert len(list((tmp_path / "class").glob("generated-*.png"))) == 2
    weights = load_file(full / "hra_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"}
    assert sum(u.numel() for u in weights.values()) == summary["trainable_parameters"]
    for name in ["pytorch_lora_weights.safetensors", "README.md", "validation_grid.png",
                 "checkpoint-2/hra_weights.safetensors"]:  # fmt: skip
        assert (full / name).is_file(), name
    assert FAMILIES[family][0].__name__ in (full / "README.md").read_text()
    kohya = full / "pytorch_lora_weights_kohya.safetensors"
    assert kohya.is_file() == (family == "flux")  # FLUX.1 keys: tests/test_kohya_flux.py
    assert (kohya.name in (full / "README.md").read_text()) == (family == "flux")

    interrupted = tmp_path / "interrupted"
    main(base_args(bases[family], subject, interrupted, *common, "--max_train_steps", "2"))
    resumed = main(
        base_args(
            bases[family], subject, interrupted, *common, "--resume_from_checkpoint", "latest"
        )
    )
    assert resumed["global_step"] == 3
    again = load_file(interrupted / "hra_weights.safetensors")
    for key in weights:
        torch.testing.assert_close(again[key], weights[key], atol=0, rtol=0)

    base = sample(pipe_of(bases, family))
    hra = pipe_of(bases, family)
    load_hra_weights(hra, full)
    lora = pipe_of(bases, family)
    lora.load_lora_weights(full)
    expected = sample(hra)
    assert (expected - base).abs().max() > 1e-4  # training moved the model
    assert (sample(lora) - expected).abs().max() <= 1e-4


# --------------------------------------------------------------------------- bad inputs


def refused(main, argv: list[str], *fragments: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    message = str(info.value)
    assert info.value.code == 2 and ": error: " in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("family", FAMILIES)
def test_every_option_is_documented(family: str):
    for action in FAMILIES[family][2].build_parser()._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize(
    ("script", "base", "fragments"),
    [
        ("sd3", "flux", ("is a FLUX.1 pipeline", "train/train_dreambooth_hra_flux.py")),
        ("flux", "sd3", ("is a Stable Diffusion 3 pipeline", "train_dreambooth_hra_sd3.py")),
        ("flux", "sd", ("is a Stable Diffusion 1.x/2.x pipeline", "train_dreambooth_hra.py")),
    ],
)
def test_base_of_another_family_is_refused_before_anything_loads(
    bases: dict[str, Path],
    model_dir: Path,
    script: str,
    base: str,
    fragments: tuple[str, ...],
    subject: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_loading)
    before = hashes(tmp_path)
    model = model_dir if base == "sd" else bases[base]
    refused(FAMILIES[script][2].main, base_args(model, subject, tmp_path / "out"), *fragments)
    assert hashes(tmp_path) == before


@pytest.mark.parametrize(
    ("family", "extra", "fragment"),
    [
        ("sd3", ("--output_kohya_format",), "--output_kohya_format is not available for Stable"),
        ("flux", ("--resolution", "40"), "--resolution 40 is not a multiple of 16"),
    ],
)
def test_unsupported_options_are_refused_in_one_line(
    bases: dict[str, Path],
    subject: Path,
    tmp_path: Path,
    family: str,
    extra: tuple[str, ...],
    fragment: str,
):
    before = hashes(tmp_path)
    argv = base_args(bases[family], subject, tmp_path / "out", *extra)
    refused(FAMILIES[family][2].main, argv, fragment)
    assert hashes(tmp_path) == before
