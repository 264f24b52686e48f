"""export_lora: diffusers' load_lora_weights reproduces the HRA model exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    HRAConfig,
    export_glora,
    export_lora,
    hra_layers,
    hra_parameters,
    inject_hra,
    load_hra_weights,
    merge_hra,
    save_hra_weights,
    save_peft_adapter,
)
from hra_diffusion.formats.hra import model_module_path, read_adapter
from hra_diffusion.formats.lora import base_fingerprint
from hra_diffusion.formats.peft import write_peft_adapter
from hra_diffusion.functional import merged_weight
from hra_diffusion.world.tiny_sd import build_tiny_pipeline

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"


def load(model_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(model_dir)


def outputs(pipe: StableDiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(UNet noise prediction, text-encoder hidden states) for fixed random inputs."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, H, W)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)  # (B, tokens)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]  # (B, tokens, width)
        return pipe.unet(latents, 10, encoder_hidden_states=hidden).sample, hidden


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    error = ((actual - expected).norm() / expected.norm()).item()
    assert error < tol, f"relative error {error:.2e} >= {tol}"


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An HRA pipeline (UNet attention + 3×3 convs, text encoder) and its LoRA export."""
    folder = tmp_path_factory.mktemp("export")
    hra = load(tiny_model_dir)
    unet_targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1")
    inject_hra(hra.unet, HRAConfig(r=4, target_modules=unet_targets))
    inject_hra(hra.text_encoder, HRAConfig(r=2, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hra_parameters(hra.unet) + hra_parameters(hra.text_encoder):
            p.copy_(torch.randn(p.shape, generator=generator))
    save_hra_weights(folder / "hra", unet=hra.unet, text_encoder=hra.text_encoder)
    lora_file = export_lora(folder / "hra", load(tiny_model_dir), folder / "lora")
    return hra, outputs(hra), lora_file


def test_lora_reproduces_hra_fused_and_unfused(exported, tiny_model_dir: Path) -> None:
    _, (unet_out, text_out), lora_file = exported
    assert lora_file.name == "pytorch_lora_weights.safetensors"
    pipe = load(tiny_model_dir)
    pipe.load_lora_weights(lora_file.parent, adapter_name="hra")
    unfused_unet, unfused_text = outputs(pipe)
    assert_rel_close(unfused_unet, unet_out)
    assert_rel_close(unfused_text, text_out)
    pipe.fuse_lora()
    fused_unet, fused_text = outputs(pipe)
    assert_rel_close(fused_unet, unfused_unet, 1e-5)
    assert_rel_close(fused_text, unfused_text, 1e-5)


def test_half_weight_is_linear_in_the_weights(exported, tiny_model_dir: Path) -> None:
    hra, _, lora_file = exported
    pipe = load(tiny_model_dir)
    base_w = pipe.unet.get_submodule(LAYER).weight.detach().clone()  # (d_out, d)
    hra_layer = hra.unet.get_submodule(LAYER)
    full_w = merged_weight(hra_layer.base_layer.weight, hra_layer.hra_u)  # (d_out, d)
    pipe.load_lora_weights(lora_file.parent, adapter_name="hra")
    pipe.set_adapters("hra", 0.5)

    x = torch.randn(3, base_w.shape[1])  # (N, d)
    with torch.no_grad():
        half_out = pipe.unet.get_submodule(LAYER)(x)  # (N, d_out)
    torch.testing.assert_close(half_out, x @ ((base_w + full_w) / 2).T, rtol=1e-5, atol=1e-6)

    pipe.fuse_lora()
    fused_w = pipe.unet.get_submodule(LAYER).base_layer.weight
    torch.testing.assert_close(fused_w, (base_w + full_w) / 2, rtol=1e-5, atol=1e-6)


def test_metadata_records_the_base(exported, tiny_model_dir: Path) -> None:
    _, _, lora_file = exported
    with safe_open(str(lora_file), framework="pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in keys}
    assert metadata["format"] == "hra-diffusion/lora-export"
    assert dtypes == {torch.float32}
    assert f"unet.{LAYER}.lora_A.weight" in keys
    assert any(k.startswith("text_encoder.") and k.endswith(".lora_B.weight") for k in keys)
    text_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in text_keys)
    base = load(tiny_model_dir)
    weights = {}
    for key in keys:
        if key.endswith(".lora_A.weight"):
            component, path = key.removesuffix(".lora_A.weight").split(".", 1)
            model = getattr(base, component)
            weights[f"{component}.{path}.weight"] = model.get_submodule(
                model_module_path(model, path)
            ).weight
    assert metadata["base_fingerprint"] == base_fingerprint(weights)


def test_export_against_another_base_fails_cleanly(exported, tmp_path: Path) -> None:
    _, _, lora_file = exported
    hra_folder = lora_file.parent.parent / "hra"
    with pytest.raises(ValueError, match=r"is \(\d+, \d\), not \(\d+, \d\)"):
        export_lora(hra_folder, build_tiny_pipeline(width=16), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_from_a_merged_pipeline_fails_cleanly(exported, tiny_model_dir: Path, tmp_path):
    _, _, lora_file = exported
    hra_folder = lora_file.parent.parent / "hra"
    pipe = load(tiny_model_dir)
    load_hra_weights(pipe, hra_folder)
    merge_hra(pipe)
    with pytest.raises(ValueError, match="merged; call unmerge_hra first"):
        export_lora(hra_folder, pipe, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_scaled_init_trained_a_step_exports_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    hra = load(tiny_model_dir)
    inject_hra(hra.unet, HRAConfig(r=4, target_modules=("to_q", "to_k", "to_v"), init="scaled"))
    optimizer = torch.optim.AdamW(hra_parameters(hra.unet), lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, H, W)
    hidden = torch.randn(1, 77, 32, generator=generator)  # (B, tokens, width)
    hra.unet(latents, 10, encoder_hidden_states=hidden).sample.square().mean().backward()
    optimizer.step()  # only the directions of U count: the export is that of any U
    base_out, hra_out = outputs(load(tiny_model_dir))[0], outputs(hra)[0]
    assert (hra_out - base_out).norm() > 1e-3 * base_out.norm()  # the step moved the model
    save_hra_weights(tmp_path / "hra", unet=hra.unet)
    lora_file = export_lora(tmp_path / "hra", load(tiny_model_dir), tmp_path / "lora")
    pipe = load(tiny_model_dir)
    pipe.load_lora_weights(lora_file.parent, adapter_name="hra")
    assert_rel_close(outputs(pipe)[0], hra_out)


@pytest.fixture(scope="module")
def magnitude_exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """An HRA pipeline with magnitudes (UNet attention + 3×3 convs, text encoder), its weights
    file and its LoRA export (DoRA keys)."""
    folder = tmp_path_factory.mktemp("magnitude")
    hra = load(tiny_model_dir)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1")
    inject_hra(hra.unet, HRAConfig(r=4, target_modules=targets, magnitude=True))
    text_targets = TEXT_ENCODER_ATTENTION_TARGETS
    inject_hra(hra.text_encoder, HRAConfig(r=2, target_modules=text_targets, magnitude=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (hra.unet, hra.text_encoder):
            for _, layer in hra_layers(model):
                layer.hra_u.copy_(torch.randn(layer.hra_u.shape, generator=generator))
                layer.hra_m.copy_(1 + 0.3 * torch.randn(layer.hra_m.shape, generator=generator))
    weights = save_hra_weights(folder / "hra", unet=hra.unet, text_encoder=hra.text_encoder)
    return outputs(hra), weights, export_lora(weights, load(tiny_model_dir), folder / "lora")


def test_magnitude_exports_as_dora_that_diffusers_reproduces(
    magnitude_exported, tiny_model_dir: Path
) -> None:
    (unet_out, text_out), _, lora_file = magnitude_exported
    with safe_open(str(lora_file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mags = {k: v for k, v in tensors.items() if k.endswith(".lora_magnitude_vector.weight")}
    downs = [k for k in tensors if k.endswith(".lora_A.weight")]
    assert len(mags) == len(downs) == 7 * 2 * 4 + 8 + 2 * 4
    convs = [k for k in mags if k.endswith("conv1.lora_magnitude_vector.weight")]
    assert len(convs) == 8 and all(mags[k].shape == (1, mags[k].numel(), 1, 1) for k in convs)
    assert all(v.dim() == 1 for k, v in mags.items() if k not in convs)  # (d_out,)
    pipe = load(tiny_model_dir)
    pipe.load_lora_weights(lora_file.parent, adapter_name="hra")
    dora_unet, dora_text = outputs(pipe)
    assert (dora_text - text_out).abs().max() <= 1e-4
    assert (dora_unet - unet_out).abs().max() <= 1e-4
    assert (unet_out - outputs(load(tiny_model_dir))[0]).abs().max() > 1e-2  # it does act


def test_magnitude_weights_refuse_kohya_glora_and_peft_exports(
    magnitude_exported, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _, weights, _ = magnitude_exported
    kohya = r"--hra_magnitude weights \(DoRA\) cannot be exported in kohya's format"
    with pytest.raises(ValueError, match=kohya):
        export_lora(weights, load(tiny_model_dir), tmp_path / "kohya", kohya=True)
    glora = r"--hra_magnitude weights \(hra_m\) cannot be exported as GLoRA"
    with pytest.raises(ValueError, match=glora):
        export_glora(weights, tmp_path / "glora")
    peft = r"--hra_magnitude weights \(hra_m\) cannot be exported as a PEFT HRA adapter"
    with pytest.raises(ValueError, match=peft):
        write_peft_adapter(read_adapter(weights), tmp_path / "peft")
    pipe = load(tiny_model_dir)
    load_hra_weights(pipe, weights)
    with pytest.raises(ValueError, match=peft):
        save_peft_adapter(pipe.unet, tmp_path / "peft")
    assert not any(tmp_path.iterdir())
