"""Condition encoder, its attachment to the UNet, control weight files and the control pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hra_diffusion import UNET_ATTENTION_FF_TARGETS, HRAConfig, inject_hra, load_hra_weights
from hra_diffusion.control import (
    attach_condition_encoder,
    build_condition_encoder,
    condition_encoder_of,
    control_condition,
    control_parameters,
    detach_condition_encoder,
    load_control_weights,
    lora_config_of,
    merge_control_adapter,
    save_control_weights,
)
from hra_diffusion.layer import HRALayer
from hra_diffusion.pipelines import sample_control
from hra_diffusion.pipelines.pipeline_hra_control import StableDiffusionHRAControlPipeline
from hra_diffusion.world.tiny_sd import build_tiny_pipeline

STEPS = 3


def controlled_unet(width: int = 32):
    unet = build_tiny_pipeline(width=width, seed=0).unet
    inject_hra(unet, HRAConfig(r=8, target_modules=UNET_ATTENTION_FF_TARGETS))
    attach_condition_encoder(unet, build_condition_encoder(unet))
    return unet


@pytest.fixture(scope="module")
def zero_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Control weights at initialisation: HRA at the identity, encoder output zero."""
    return save_control_weights(tmp_path_factory.mktemp("zero"), controlled_unet())


def control_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def sample(pipe, image: Image.Image, seed: int = 0, **kwargs) -> np.ndarray:
    return pipe(
        "a red square",
        image=image,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images


def load_pipe(model_dir: Path, weights: Path) -> StableDiffusionHRAControlPipeline:
    pipe = StableDiffusionHRAControlPipeline.from_base(model_dir, weights)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_step_zero_equals_base_pipeline(tiny_model_dir: Path, zero_weights: Path) -> None:
    pipe = load_pipe(tiny_model_dir, zero_weights)
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base.set_progress_bar_config(disable=True)
    ours = sample(pipe, control_image(0))  # (1, 32, 32, 3)
    reference = base(
        "a red square",
        height=32,
        width=32,
        num_inference_steps=STEPS,
        guidance_scale=9.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_condition_reaches_both_guidance_halves() -> None:
    unet = controlled_unet()
    with torch.no_grad():
        condition_encoder_of(unet).conv_out.weight.normal_()
    x = torch.randn(2, 4, 4, 4)  # the [uncond; cond] batch of one sample
    t = torch.tensor([10, 10])
    text = torch.randn(2, 77, 32)
    cond = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), control_condition(unet, cond):
        tiled = unet(x, t, text).sample
        explicit = unet(x, t, text, control_cond=cond.repeat(2, 1, 1, 1)).sample
        other = unet(x, t, text, control_cond=torch.rand(1, 3, 32, 32)).sample
    torch.testing.assert_close(tiled, explicit)
    assert not torch.allclose(tiled, other)
    with pytest.raises(RuntimeError, match="no control condition was given"):
        unet(x, t, text)
    with pytest.raises(ValueError, match="the condition must have the image's size"):
        unet(x, t, text, control_cond=torch.rand(2, 3, 16, 16))
    encoder = detach_condition_encoder(unet)
    assert isinstance(unet.conv_in, torch.nn.Conv2d) and encoder is not None


def test_pipeline_with_other_scheduler_and_batches(
    tiny_model_dir: Path, zero_weights: Path
) -> None:
    pipe = load_pipe(tiny_model_dir, zero_weights)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    images = pipe(
        ["a", "b"],
        image=[control_image(0), control_image(1)],
        num_images_per_prompt=2,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert images.shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match="3 control images for 2 prompts"):
        pipe(["a", "b"], image=[control_image(0)] * 3, num_inference_steps=1)
    with pytest.raises(ValueError, match="Pass the control image"):
        pipe("a", num_inference_steps=1)


def test_load_refuses_weights_of_another_model(tmp_path: Path, zero_weights: Path) -> None:
    unet = build_tiny_pipeline(width=16, seed=0).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"is \(\d+, \d+\), not \(\d+, \d+\): not trained on this"):
        load_control_weights(unet, zero_weights)
    assert unet.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    with pytest.raises(FileNotFoundError, match="holds no hra_control_weights"):
        load_control_weights(unet, tmp_path)


def lora_controlled_unet(width: int = 32, rank: int = 2):
    """A tiny UNet with a PEFT LoRA on the control targets and an encoder, all non-zero."""
    unet = build_tiny_pipeline(width=width, seed=0).unet
    unet.requires_grad_(False)
    targets = list(UNET_ATTENTION_FF_TARGETS)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    attach_condition_encoder(unet, build_condition_encoder(unet))
    with torch.no_grad():
        for param in control_parameters(unet):
            param.normal_(std=0.1)
    return unet


def test_lora_control_file_round_trips(tmp_path: Path) -> None:
    unet = lora_controlled_unet()
    names = [name for name, p in unet.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n or "condition_encoder." in n for n in names)
    assert len(control_parameters(unet)) == len(names)
    path = save_control_weights(tmp_path, unet)
    with safe_open(path, "pt") as file:
        metadata, keys = file.metadata(), list(file.keys())
    assert json.loads(metadata["unet.lora_config"]) == {
        "r": 2,
        "lora_alpha": 2,
        "target_modules": sorted(UNET_ATTENTION_FF_TARGETS),
    }
    assert "unet.hra_config" not in metadata
    assert any(k.startswith("unet.") and k.endswith(".lora_B.weight") for k in keys)

    fresh = build_tiny_pipeline(width=32, seed=0).unet
    load_control_weights(fresh, path)
    assert lora_config_of(fresh).r == 2
    x, t, text = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = unet(x, t, text, control_cond=cond).sample
        loaded = fresh(x, t, text, control_cond=cond).sample
        base = build_tiny_pipeline(width=32, seed=0).unet(x, t, text).sample
    torch.testing.assert_close(loaded, expected)
    assert (loaded - base).abs().max() > 1e-3  # the LoRA and the encoder do act


@pytest.mark.parametrize("adapter", ["hra", "lora"])
def test_merging_the_control_adapter_keeps_the_output(adapter: str) -> None:
    unet = lora_controlled_unet() if adapter == "lora" else controlled_unet()
    with torch.no_grad():
        for param in control_parameters(unet):
            param.normal_(std=0.1, generator=torch.Generator().manual_seed(param.numel()))
    x, t, text = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 32, 32)
    layers = [m for m in unet.modules() if isinstance(m, (HRALayer, LoraLayer))]
    assert len(layers) == 7 * 9  # 7 blocks x (attn1, attn2: q, k, v, out; ff.net.0.proj)
    inputs = [torch.randn(3, layer.base_layer.in_features) for layer in layers]
    with torch.no_grad():
        before = unet(x, t, text, control_cond=cond).sample
        adapted = [layer(z) for layer, z in zip(layers, inputs, strict=True)]
        base_weights = [layer.base_layer.weight.clone() for layer in layers]
        merge_control_adapter(unet)
        after = unet(x, t, text, control_cond=cond).sample
        for layer, z, out, weight in zip(layers, inputs, adapted, base_weights, strict=True):
            # Folded into the base weights: the bare base layer now computes the adapted one.
            assert (layer.base_layer.weight - weight).abs().max() > 1e-3
            torch.testing.assert_close(layer.base_layer(z), out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-4)


def test_lora_control_file_that_does_not_fit_leaves_the_unet_as_it_was(tmp_path: Path) -> None:
    path = save_control_weights(tmp_path, lora_controlled_unet(rank=2))
    tensors, metadata = load_file(path), safe_open(path, "pt").metadata()
    key = next(k for k in tensors if k.endswith(".lora_A.weight"))
    tensors[key] = torch.zeros(3, tensors[key].shape[1])  # rank 3 where the config says 2
    save_file(tensors, tmp_path / "bad.safetensors", metadata)
    unet = build_tiny_pipeline(width=32, seed=0).unet
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"LoRA tensor .*lora_A.weight has shape \(3, "):
        load_control_weights(unet, tmp_path / "bad.safetensors")
    assert lora_config_of(unet) is None and condition_encoder_of(unet) is None
    assert unet.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_load_hra_weights_points_control_files_to_their_loader(zero_weights: Path) -> None:
    pipe = build_tiny_pipeline(width=32, seed=0)
    for path in (zero_weights, zero_weights.parent):
        with pytest.raises(ValueError, match="load_control_weights"):
            load_hra_weights(pipe, path)


@pytest.mark.parametrize("adapter", ["hra", "lora"])
def test_sampling_cli_writes_one_image_per_condition(
    tiny_model_dir: Path, zero_weights: Path, tmp_path: Path, adapter: str
) -> None:
    weights = (
        save_control_weights(tmp_path / "lora", lora_controlled_unet())
        if adapter == "lora"
        else zero_weights
    )
    conditions = tmp_path / "conditions"
    conditions.mkdir()
    for name, label in (("ADE_a.png", 3), ("ADE_b.png", 150)):
        Image.fromarray(np.full((24, 24), label, np.uint8)).save(conditions / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"condition": "ADE_a.png", "text": "a"}\n{"condition": "ADE_b.png", "text": "b"}\n'
    )
    argv = [
        "--model", str(tiny_model_dir),
        "--weights", str(weights),
        "--conditions_dir", str(conditions),
        "--prompts", str(prompts),
        "--condition_type", "segmentation",
        "--resolution", "32",
        "--steps", "2",
        "--out", str(tmp_path / "out"),
    ]  # fmt: skip
    written = sample_control.main(argv)
    assert [p.name for p in written] == ["ADE_a.png", "ADE_b.png"]
    assert Image.open(written[0]).size == (32, 32)
    records = [json.loads(line) for line in (tmp_path / "out" / "metadata.jsonl").open()]
    assert [r["seed"] for r in records] == [0, 1] and records[1]["text"] == "b"
    prompts.write_text('{"condition": "ADE_c.png", "text": "c"}\n')
    with pytest.raises(SystemExit, match=r"condition file .*ADE_c\.png does not exist"):
        sample_control.main([*argv, "--overwrite"])


def test_sdxl_base_is_refused_by_the_pipeline_and_the_cli(
    zero_weights: Path, tmp_path: Path, sdxl_dir: Path
):
    """Controllable generation is SD 1.x/2.x only for now: one line, before anything loads."""
    fragment = "is a Stable Diffusion XL pipeline, but controllable generation supports"
    with pytest.raises(ValueError, match=fragment) as info:
        StableDiffusionHRAControlPipeline.from_base(sdxl_dir, zero_weights)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=fragment):
        StableDiffusionHRAControlPipeline.from_pretrained(sdxl_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"condition": "a.png", "text": "a"}\n')
    Image.fromarray(np.full((24, 24), 3, np.uint8)).save(tmp_path / "a.png")
    argv = ["--model", str(sdxl_dir), "--weights", str(zero_weights), "--prompts", str(prompts),
            "--conditions_dir", str(tmp_path), "--out", str(tmp_path / "out")]  # fmt: skip
    with pytest.raises(SystemExit, match=fragment):
        sample_control.main(argv)


def test_hra_magnitude_control_file_round_trips(tmp_path: Path) -> None:
    unet = build_tiny_pipeline(width=32, seed=0).unet
    inject_hra(unet, HRAConfig(r=4, target_modules=UNET_ATTENTION_FF_TARGETS, magnitude=True))
    attach_condition_encoder(unet, build_condition_encoder(unet))
    with torch.no_grad():
        for param in control_parameters(unet):
            param.normal_(std=0.1, generator=torch.Generator().manual_seed(param.numel()))
    path = save_control_weights(tmp_path, unet)
    with safe_open(path, "pt") as file:
        metadata, keys = file.metadata(), list(file.keys())
    assert json.loads(metadata["unet.hra_config"])["magnitude"] is True
    assert sum(k.endswith(".hra_m") for k in keys) == sum(k.endswith(".hra_u") for k in keys) > 0
    fresh = build_tiny_pipeline(width=32, seed=0).unet
    load_control_weights(fresh, path)
    assert fresh.hra_config.magnitude
    x, t, text = torch.randn(2, 4, 4, 4), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    cond = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = unet(x, t, text, control_cond=cond).sample
        loaded = fresh(x, t, text, control_cond=cond).sample
    torch.testing.assert_close(loaded, expected)
