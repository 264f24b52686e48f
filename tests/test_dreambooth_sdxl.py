"""SDXL: the tiny SDXL pipeline, train/train_dreambooth_hra_sdxl.py and the library's SDXL
support (loading, LoRA export into diffusers' SDXL loader, merge, PEFT), on CPU at 32 px."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_TARGETS,
    HRAConfig,
    export_lora,
    hra_layers,
    hra_state_dict,
    inject_hra,
    load_hra_weights,
    merge_hra,
    save_hra_weights,
    save_peft_adapter,
    unload_hra,
)
from hra_diffusion.inference import load_pipeline
from hra_diffusion.pipelines import generate
from hra_diffusion.train import train_dreambooth_hra
from hra_diffusion.train.train_dreambooth_hra_sdxl import (
    build_parser,
    encode_prompt,
    inject_adapters,
    main,
    parse_args,
    tokenize_sdxl,
)
from hra_diffusion.world.tiny_sd import build_tiny_pipeline
from hra_diffusion.world.tiny_sdxl import build_tiny_sdxl_pipeline

REPO = Path(__file__).resolve().parents[1]
SUBJECT = REPO / "examples" / "subject"
PROMPT = "a photo of qwe toy"
pytestmark = pytest.mark.filterwarnings("ignore:--resolution 32 is not a multiple of 64")


@pytest.fixture
def subject(tmp_path: Path) -> Path:
    return Path(shutil.copytree(SUBJECT, tmp_path / "subject"))


def sdxl_pipe(path: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def sample(pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    """Two denoising steps at 32 px with a fixed seed, as a float tensor."""
    images = pipe(
        PROMPT,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    return images.float()  # (1, 3, 32, 32)


def trained_pipeline(path: Path, seed: int = 1) -> StableDiffusionXLPipeline:
    """The tiny SDXL with HRA on the UNet and both text encoders, moved off the identity."""
    pipe = sdxl_pipe(path)
    torch.manual_seed(seed)
    inject_hra(pipe.unet, HRAConfig(r=4, target_modules=UNET_ATTENTION_TARGETS))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        inject_hra(encoder, HRAConfig(r=4, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
            for _, u in hra_state_dict(model).items():
                u.add_(torch.randn_like(u))  # paired columns no longer cancel
    return pipe


# --------------------------------------------------------------------------- the tiny SDXL


def test_tiny_sdxl_has_sdxl_layout_and_runs():
    pipe = build_tiny_sdxl_pipeline(width=16)
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    assert tuple(config.transformer_layers_per_block) == (1, 2)
    assert config.cross_attention_dim == (
        pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and len(pipe.tokenizer) == 49408
    pipe.set_progress_bar_config(disable=True)
    assert torch.isfinite(sample(pipe)).all()
    other = build_tiny_sdxl_pipeline(width=16)
    assert torch.equal(other.unet.conv_in.weight, pipe.unet.conv_in.weight)  # deterministic


def test_encode_prompt_matches_the_pipeline(sdxl_dir: Path):
    pipe = sdxl_pipe(sdxl_dir)
    ids = tokenize_sdxl([pipe.tokenizer, pipe.tokenizer_2], [PROMPT])  # (1, 2, 77)
    ours, ours_pooled = encode_prompt([pipe.text_encoder, pipe.text_encoder_2], ids)
    theirs, _, theirs_pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    torch.testing.assert_close(ours_pooled, theirs_pooled, atol=0, rtol=0)


# --------------------------------------------------------------------------- library


def test_hra_init_scaled_reaches_the_unet_and_both_text_encoders(
    sdxl_dir: Path, subject: Path, tmp_path: Path
):
    argv = base_args(sdxl_dir, subject, tmp_path, "--train_text_encoder", "--hra_r", "2")
    args = parse_args([*argv, "--hra_init", "scaled"])
    pipe = sdxl_pipe(sdxl_dir)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    unet_params, encoder_params = inject_adapters(args, pipe.unet, encoders)
    assert unet_params and encoder_params
    assert all(m.hra_config.init == "scaled" for m in [pipe.unet, *encoders])
    for u in unet_params + encoder_params:
        torch.testing.assert_close(u.norm(dim=0), torch.full((2,), 2**0.5), atol=1e-6, rtol=0)


def test_hra_magnitude_reaches_the_unet_and_both_text_encoders(
    sdxl_dir: Path, subject: Path, tmp_path: Path
):
    argv = base_args(sdxl_dir, subject, tmp_path, "--train_text_encoder", "--hra_r", "2")
    args = parse_args([*argv, "--hra_magnitude"])
    pipe = sdxl_pipe(sdxl_dir)
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    unet_params, encoder_params = inject_adapters(args, pipe.unet, encoders)
    assert all(m.hra_config.magnitude for m in [pipe.unet, *encoders])
    for model, params in ((pipe.unet, unet_params), *((e, encoder_params) for e in encoders)):
        layers = [layer for _, layer in hra_layers(model)]
        assert layers and all(torch.equal(lay.hra_m, torch.ones_like(lay.hra_m)) for lay in layers)
        assert {id(lay.hra_m) for lay in layers} <= {id(p) for p in params}


def test_weights_of_three_components_round_trip_and_merge(sdxl_dir: Path, tmp_path: Path):
    pipe = trained_pipeline(sdxl_dir)
    expected = sample(pipe)
    path = save_hra_weights(tmp_path, pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    keys = load_file(path)
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}

    fresh = sdxl_pipe(sdxl_dir)
    base = sample(fresh)
    assert len(load_hra_weights(fresh, tmp_path)) == len(keys)
    torch.testing.assert_close(sample(fresh), expected, atol=1e-5, rtol=0)
    merge_hra(fresh)
    torch.testing.assert_close(sample(fresh), expected, atol=1e-4, rtol=0)
    unload_hra(fresh)
    torch.testing.assert_close(sample(fresh), base, atol=1e-5, rtol=0)

    only = sdxl_pipe(sdxl_dir)
    loaded = load_hra_weights(only, tmp_path, component="text_encoder_2")
    assert loaded and all(k.startswith("text_encoder_2.") for k in loaded)
    assert not any(hra_state_dict(only.unet)) and not any(hra_state_dict(only.text_encoder))


def test_text_encoder_keys_load_with_or_without_text_model_level(sdxl_dir: Path, tmp_path: Path):
    """transformers 4 names both CLIP encoders ``text_model.…``; 5 drops it for CLIPTextModel."""
    pipe = trained_pipeline(sdxl_dir)
    expected = sample(pipe)
    keys = load_file(save_hra_weights(tmp_path / "a", pipe.unet, pipe.text_encoder,
                                      pipe.text_encoder_2))  # fmt: skip
    for variant, rename in {
        "with": lambda rest: rest if rest.startswith("text_model.") else "text_model." + rest,
        "without": lambda rest: rest.removeprefix("text_model."),
    }.items():
        renamed = {}
        for key, u in keys.items():
            component, _, rest = key.partition(".")
            renamed[f"{component}.{rename(rest) if component != 'unet' else rest}"] = u
        save_file(renamed, tmp_path / f"{variant}.safetensors")
        fresh = sdxl_pipe(sdxl_dir)
        assert len(load_hra_weights(fresh, tmp_path / f"{variant}.safetensors")) == len(keys)
        torch.testing.assert_close(sample(fresh), expected, atol=1e-5, rtol=0)


def test_exported_lora_loads_in_diffusers_sdxl_with_the_same_images(sdxl_dir: Path, tmp_path: Path):
    pipe = trained_pipeline(sdxl_dir)
    expected = sample(pipe)
    save_hra_weights(tmp_path / "hra", pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    lora = export_lora(tmp_path / "hra", sdxl_pipe(sdxl_dir), tmp_path / "lora")
    assert {k.split(".")[0] for k in load_file(lora)} == {"unet", "text_encoder", "text_encoder_2"}

    plain = sdxl_pipe(sdxl_dir)
    plain.load_lora_weights(tmp_path / "lora")
    assert (sample(plain) - expected).abs().max() <= 1e-4


def test_peft_adapter_of_the_second_text_encoder(sdxl_dir: Path, tmp_path: Path):
    pipe = trained_pipeline(sdxl_dir)
    ids = pipe.tokenizer_2(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = pipe.text_encoder_2(ids).text_embeds
    save_peft_adapter(pipe.text_encoder_2, tmp_path / "peft")

    peft_model = PeftModel.from_pretrained(sdxl_pipe(sdxl_dir).text_encoder_2, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).text_embeds, expected, atol=1e-5, rtol=0)
    fresh = sdxl_pipe(sdxl_dir)
    load_hra_weights(fresh, tmp_path / "peft", component="text_encoder_2")
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.text_encoder_2(ids).text_embeds, expected, atol=1e-5, rtol=0
        )


def sd1_weights(folder: Path) -> Path:
    """HRA weights of a tiny SD 1.x UNet and text encoder."""
    sd = build_tiny_pipeline(width=16, seed=0)
    inject_hra(sd.unet, HRAConfig(r=4, target_modules=UNET_ATTENTION_TARGETS))
    inject_hra(sd.text_encoder, HRAConfig(r=4, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    return save_hra_weights(folder, sd.unet, sd.text_encoder)


def sdxl_weights(sdxl_dir: Path, folder: Path) -> Path:
    pipe = trained_pipeline(sdxl_dir)
    return save_hra_weights(folder, pipe.unet, pipe.text_encoder, pipe.text_encoder_2)


def without_base_family(path: Path) -> Path:
    """The file as hra-diffusion wrote it before it recorded the base family."""
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "base_family"}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    old = path.with_name("old.safetensors")
    save_file(tensors, old, {**metadata, "format_version": "2"})
    return old


def refused(target, path: Path, *fragments: str) -> None:
    """Loading ``path`` into ``target`` fails with one line holding ``fragments``, before
    any layer is touched."""
    with pytest.raises(ValueError) as info:
        load_hra_weights(target, path)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    for model in (target.unet, target.text_encoder) if hasattr(target, "unet") else (target,):
        assert not any(hra_state_dict(model))  # nothing was modified


def test_files_record_their_base_family(sdxl_dir: Path, tmp_path: Path):
    for path, family in [
        (sd1_weights(tmp_path / "sd"), "sd"),
        (sdxl_weights(sdxl_dir, tmp_path / "sdxl"), "sdxl"),
    ]:
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata()["base_family"] == family


def test_sd1_weights_are_refused_by_sdxl_naming_both_bases(
    model_dir: Path, sdxl_dir: Path, tmp_path: Path
):
    path = sd1_weights(tmp_path)
    both = ("trained on a Stable Diffusion 1.x/2.x base", "this is a Stable Diffusion XL")
    refused(sdxl_pipe(sdxl_dir), path, *both, "pipeline")
    refused(sdxl_pipe(sdxl_dir).unet, path, *both, "UNet")
    with pytest.raises(ValueError, match="this is a Stable Diffusion XL pipeline"):
        export_lora(path, sdxl_pipe(sdxl_dir), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
    old = without_base_family(path)  # no metadata: the layer check names both bases
    refused(sdxl_pipe(sdxl_dir), old, "not trained on this Stable Diffusion XL UNet",
            "(Stable Diffusion 1.x/2.x?)")  # fmt: skip


def test_sdxl_weights_are_refused_by_sd1_naming_both_bases(
    model_dir: Path, sdxl_dir: Path, tmp_path: Path
):
    path = sdxl_weights(sdxl_dir, tmp_path)
    sd = StableDiffusionPipeline.from_pretrained(model_dir)
    both = ("trained on a Stable Diffusion XL base", "this is a Stable Diffusion 1.x/2.x")
    refused(sd, path, *both, "pipeline")
    refused(sd.unet, path, *both, "UNet")
    old = without_base_family(path)  # no metadata: its second text encoder names both
    refused(
        StableDiffusionPipeline.from_pretrained(model_dir),
        old,
        "only a Stable Diffusion XL base has",
        "this Stable Diffusion 1.x/2.x pipeline",
    )
    unet_only = trained_pipeline(sdxl_dir).unet
    old = without_base_family(save_hra_weights(tmp_path / "unet", unet_only))
    refused(
        StableDiffusionPipeline.from_pretrained(model_dir),
        old,
        "not trained on this Stable Diffusion 1.x/2.x UNet",
        "(Stable Diffusion XL?)",
    )


def test_generate_cli_runs_sdxl_with_weights(sdxl_dir: Path, tmp_path: Path):
    pipe = trained_pipeline(sdxl_dir)
    save_hra_weights(tmp_path / "hra", pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    common = ["--model", str(sdxl_dir), "--prompt", PROMPT, "--num_images", "1", "--steps", "2"]
    common += ["--height", "32", "--width", "32", "--guidance_scale", "5"]
    generate.main([*common, "--weights", str(tmp_path / "hra"), "--out", str(tmp_path / "a")])
    generate.main([*common, "--out", str(tmp_path / "b")])
    adapted = (tmp_path / "a" / "prompt00_seed0.png").read_bytes()
    assert adapted != (tmp_path / "b" / "prompt00_seed0.png").read_bytes()
    assert isinstance(load_pipeline(sdxl_dir), StableDiffusionXLPipeline)


# --------------------------------------------------------------------------- training runs


def test_three_steps_train_all_components_resume_exactly_and_export(
    sdxl_dir: Path, subject: Path, tmp_path: Path
):
    common = (
        "--train_text_encoder", "--text_encoder_lr", "5e-5", "--hra_r", "4",
        "--random_flip", "--checkpointing_steps", "2", "--export_lora",
    )  # fmt: skip
    full = tmp_path / "full"
    summary = main(
        base_args(
            sdxl_dir, subject, full, *common,
            "--validation_prompt", PROMPT, "--validation_steps", "3",
            "--num_validation_images", "1", "--num_validation_inference_steps", "2",
        )
    )  # fmt: skip
    assert summary["global_step"] == 3
    weights = load_file(full / "hra_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder", "text_encoder_2"}
    assert sum(u.numel() for u in weights.values()) == summary["trainable_parameters"]
    for name in ["pytorch_lora_weights.safetensors", "README.md", "validation_grid.png",
                 "checkpoint-2/hra_weights.safetensors"]:  # fmt: skip
        assert (full / name).is_file(), name
    assert "StableDiffusionXLPipeline" in (full / "README.md").read_text()
    at_step_2 = load_file(full / "checkpoint-2" / "hra_weights.safetensors")
    assert all(not torch.equal(at_step_2[k], weights[k]) for k in weights if "unet" in k[:4])
    for component in ("text_encoder.", "text_encoder_2."):  # both text encoders train too
        # (not every layer: the first encoder's last layer is after the penultimate states)
        assert any(
            not torch.equal(at_step_2[k], weights[k]) for k in weights if k.startswith(component)
        ), component

    interrupted = tmp_path / "interrupted"
    main(base_args(sdxl_dir, subject, interrupted, *common, "--max_train_steps", "2"))
    resumed = main(
        base_args(sdxl_dir, subject, interrupted, *common, "--resume_from_checkpoint", "latest")
    )
    assert resumed["global_step"] == 3
    again = load_file(interrupted / "hra_weights.safetensors")
    for key in weights:
        torch.testing.assert_close(again[key], weights[key], atol=1e-6, rtol=0)

    hra = sdxl_pipe(sdxl_dir)
    load_hra_weights(hra, full)
    lora = sdxl_pipe(sdxl_dir)
    lora.load_lora_weights(full)
    assert (sample(lora) - sample(hra)).abs().max() <= 1e-4


def test_prior_preservation_generates_class_images_with_sdxl(
    sdxl_dir: Path, subject: Path, tmp_path: Path
):
    class_dir = tmp_path / "class"
    summary = main(
        base_args(
            sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "1",
            "--with_prior_preservation", "--class_prompt", "a photo of toy",
            "--class_data_dir", str(class_dir), "--num_class_images", "2",
            "--snr_gamma", "5", "--prior_loss_weight", "0.5",
            "--debiased_estimation_loss", "--min_timestep", "500",
        )
    )  # fmt: skip
    assert len(list(class_dir.glob("generated-*.png"))) == 2
    parts = summary["losses"]
    assert summary["loss"] == pytest.approx(parts["instance_loss"] + 0.5 * parts["prior_loss"])


def test_repeats_lengthen_the_epoch(model_dir: Path, subject: Path, tmp_path: Path):
    """--repeats (shared by both scripts): 5 pictures x 2 repeats in batches of 5."""
    argv = base_args(model_dir, subject, tmp_path / "out", "--train_batch_size", "5")
    argv = [a for a in argv if a not in ("--max_train_steps", "3")]
    summary = train_dreambooth_hra.main([*argv, "--repeats", "2", "--num_train_epochs", "1"])
    assert len(list(subject.glob("*.png"))) == 5
    assert summary["global_step"] == 2


# --------------------------------------------------------------------------- bad inputs


def fails_with(run, argv: list[str], *fragments: str) -> None:
    with pytest.raises(SystemExit) as info:
        run(argv)
    message = str(info.value)
    assert info.value.code == 2 and ": error: " in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_every_option_is_documented():
    for action in build_parser()._actions:
        assert action.help, action.option_strings


def test_sd1_base_is_refused_naming_the_sd1_script(model_dir: Path, subject: Path, tmp_path: Path):
    out = tmp_path / "out"
    fails_with(main, base_args(model_dir, subject, out), "Stable Diffusion 1.x",
               "train/train_dreambooth_hra.py")  # fmt: skip
    assert not out.exists()


def test_sdxl_base_is_refused_by_the_sd1_script(sdxl_dir: Path, subject: Path, tmp_path: Path):
    out = tmp_path / "out"
    argv = base_args(sdxl_dir, subject, out)
    fails_with(train_dreambooth_hra.main, argv, "Stable Diffusion XL",
               "train/train_dreambooth_hra_sdxl.py")  # fmt: skip
    assert not out.exists()


def test_vae_with_other_latent_channels_is_refused(sdxl_dir: Path, subject: Path, tmp_path: Path):
    vae_dir = tmp_path / "vae16"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=16).save_pretrained(
        vae_dir
    )
    argv = base_args(sdxl_dir, subject, tmp_path / "out")
    fails_with(main, [*argv, "--pretrained_vae_model_name_or_path", str(vae_dir)],
               "16-channel latents", "takes 4")  # fmt: skip


def test_text_encoder_lr_needs_train_text_encoder(sdxl_dir: Path, subject: Path, tmp_path: Path):
    argv = base_args(sdxl_dir, subject, tmp_path / "out", "--text_encoder_lr", "1e-5")
    fails_with(main, argv, "--text_encoder_lr needs --train_text_encoder")


def test_resolution_not_a_multiple_of_64_warns(sdxl_dir: Path, subject: Path, tmp_path: Path):
    argv = base_args(sdxl_dir, subject, tmp_path / "out", "--resolution", "36")
    fails_with(main, argv, "not a multiple of 8")
    with pytest.warns(UserWarning, match="not a multiple of 64"):
        main(base_args(sdxl_dir, subject, tmp_path / "out", "--max_train_steps", "1"))
