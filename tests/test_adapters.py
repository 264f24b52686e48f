"""Named HRA adapters: load several, switch, stack, disable, delete, unload to the exact base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    HRAConfig,
    delete_hra_adapters,
    disable_hra,
    enable_hra,
    get_active_hra_adapters,
    hra_layers,
    hra_parameters,
    inject_hra,
    list_hra_adapters,
    load_hra_weights,
    merge_hra,
    save_hra_weights,
    set_hra_adapters,
    unload_hra,
    unmerge_hra,
)
from hra_diffusion.functional import merged_weight
from hra_diffusion.world.tiny_sd import build_tiny_pipeline

LAYER = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def forward(pipe: StableDiffusionPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, H, W)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)  # (B, tokens)
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]  # (B, tokens, width)
        return pipe.unet(latents, 10, encoder_hidden_states=hidden).sample


def make_adapter(model_dir: Path, folder: Path, seed: int, apply_gs: bool, text: bool) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    inject_hra(pipe.unet, HRAConfig(r=4, apply_gs=apply_gs))
    if text:
        inject_hra(pipe.text_encoder, HRAConfig(r=2, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for p in hra_parameters(model):
                p.copy_(torch.randn(p.shape, generator=generator))
    return save_hra_weights(folder, pipe.unet, pipe.text_encoder if text else None)


@pytest.fixture(scope="module")
def files(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two subjects: "dog" (UNet + text encoder) and "cat" (Gram–Schmidt, UNet only)."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "dog": make_adapter(tiny_model_dir, root / "dog", 1, apply_gs=False, text=True),
        "cat": make_adapter(tiny_model_dir, root / "cat", 2, apply_gs=True, text=False),
    }


def alone(model_dir: Path, file: Path) -> torch.Tensor:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    load_hra_weights(pipe, file)
    return forward(pipe)


def test_load_switch_stack_disable_delete_unload(files, tiny_model_dir: Path) -> None:
    base = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    base_state = {k: v.clone() for k, v in base.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in base.text_encoder.state_dict().items()}
    base_out = forward(base)

    load_hra_weights(base, files["dog"], adapter_name="dog")
    load_hra_weights(base, files["cat"], adapter_name="cat")
    assert list_hra_adapters(base) == {"unet": ["dog", "cat"], "text_encoder": ["dog"]}
    assert get_active_hra_adapters(base) == ["cat"]  # the adapter just loaded
    torch.testing.assert_close(forward(base), alone(tiny_model_dir, files["cat"]))

    set_hra_adapters(base, "dog")
    torch.testing.assert_close(forward(base), alone(tiny_model_dir, files["dog"]))

    set_hra_adapters(base, ["dog", "cat"])  # W H_dog H_cat
    assert get_active_hra_adapters(base) == ["dog", "cat"]
    dog, cat = (StableDiffusionPipeline.from_pretrained(tiny_model_dir) for _ in range(2))
    load_hra_weights(dog, files["dog"])
    load_hra_weights(cat, files["cat"])
    dog_layer, cat_layer = dog.unet.get_submodule(LAYER), cat.unet.get_submodule(LAYER)
    w = base_state[f"{LAYER}.weight"]  # (d_out, d)
    expected = merged_weight(merged_weight(w, dog_layer.hra_u), cat_layer.hra_u, apply_gs=True)
    x = torch.randn(5, w.shape[1])  # (N, d)
    with torch.no_grad():
        stacked = base.unet.get_submodule(LAYER)(x)  # (N, d_out)
    torch.testing.assert_close(stacked, x @ expected.T, rtol=1e-5, atol=1e-5)

    disable_hra(base)
    assert not any(hra_layers(base.unet)) and torch.equal(forward(base), base_out)
    enable_hra(base)
    torch.testing.assert_close(base.unet.get_submodule(LAYER)(x), stacked)

    delete_hra_adapters(base, "dog")
    assert list_hra_adapters(base) == {"unet": ["cat"]}
    assert get_active_hra_adapters(base) == ["cat"]
    torch.testing.assert_close(forward(base), alone(tiny_model_dir, files["cat"]))

    load_hra_weights(base, files["dog"], adapter_name="dog")
    unload_hra(base)
    assert list_hra_adapters(base) == {}
    assert not any(hra_layers(base.unet)) and not any(hra_layers(base.text_encoder))
    for model, state in ((base.unet, base_state), (base.text_encoder, base_text)):
        after = model.state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], state[k]) for k in state)  # bit-exact base
    assert torch.equal(forward(base), base_out)


def test_single_active_adapter_trains_its_own_tensors(files, tiny_model_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_hra_weights(pipe, files["dog"], adapter_name="dog")
    load_hra_weights(pipe, files["cat"], adapter_name="cat")
    set_hra_adapters(pipe, "dog")
    params = hra_parameters(pipe.unet)
    registered = pipe.unet.hra_registry.adapters["dog"].tensors
    assert {id(p) for p in params} == {id(p) for p in registered.values()}
    assert all(p.requires_grad for p in params)


def test_unnamed_layers_become_the_default_adapter(files, tiny_model_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_hra_weights(pipe, files["dog"])
    load_hra_weights(pipe, files["cat"], adapter_name="cat")
    assert list_hra_adapters(pipe) == {"unet": ["default", "cat"], "text_encoder": ["default"]}
    set_hra_adapters(pipe, "default")
    torch.testing.assert_close(forward(pipe), alone(tiny_model_dir, files["dog"]))


def test_bad_names_and_shapes(files, tiny_model_dir: Path, tmp_path: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_hra_weights(pipe, files["dog"], adapter_name="dog")
    before = forward(pipe)
    with pytest.raises(ValueError, match="adapter named 'dog' is already loaded"):
        load_hra_weights(pipe, files["cat"], adapter_name="dog")
    with pytest.raises(ValueError, match="No HRA adapter named 'bird'.*loaded: \\['dog'\\]"):
        set_hra_adapters(pipe, ["dog", "bird"])
    with pytest.raises(ValueError, match="No HRA adapter named 'bird'"):
        delete_hra_adapters(pipe, "bird")
    with pytest.raises(ValueError, match="pass adapter_name="):
        load_hra_weights(pipe, files["cat"])
    other = build_tiny_pipeline(width=16)
    inject_hra(other.unet, HRAConfig(r=4))
    small = save_hra_weights(tmp_path, unet=other.unet)
    with pytest.raises(ValueError, match=r"adapter 'small'.*unet\..*\.hra_u is \("):
        load_hra_weights(pipe, small, adapter_name="small")
    merge_hra(pipe)
    with pytest.raises(ValueError, match="is merged: call unmerge_hra"):
        set_hra_adapters(pipe, [])
    unmerge_hra(pipe)
    assert list_hra_adapters(pipe) == {"unet": ["dog"], "text_encoder": ["dog"]}
    assert get_active_hra_adapters(pipe) == ["dog"]
    torch.testing.assert_close(forward(pipe), before, rtol=1e-5, atol=1e-6)


def make_magnitude_adapter(model_dir: Path, folder: Path, seed: int) -> Path:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    inject_hra(pipe.unet, HRAConfig(r=4, magnitude=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in hra_layers(pipe.unet):
            layer.hra_u.copy_(torch.randn(layer.hra_u.shape, generator=generator))
            layer.hra_m.copy_(1 + 0.3 * torch.randn(layer.hra_m.shape, generator=generator))
    return save_hra_weights(folder, pipe.unet)


def test_magnitude_adapters_switch_and_stack_as_diag_m_w_h(
    files, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Stacked, adapter after adapter: diag(m_b) (diag(m_a) W H_a) H_b; plain ones add no m."""
    mags = {f"m{i}": make_magnitude_adapter(tiny_model_dir, tmp_path / f"m{i}", i) for i in (1, 2)}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    load_hra_weights(pipe, mags["m1"])  # unnamed: becomes "default", keeping its magnitude
    load_hra_weights(pipe, mags["m2"], adapter_name="m2")
    load_hra_weights(pipe, files["cat"], adapter_name="cat")
    set_hra_adapters(pipe, "default")
    torch.testing.assert_close(forward(pipe), alone(tiny_model_dir, mags["m1"]))
    set_hra_adapters(pipe, "m2")
    torch.testing.assert_close(forward(pipe), alone(tiny_model_dir, mags["m2"]))
    params = hra_parameters(pipe.unet)
    adapter = pipe.unet.hra_registry.adapters["m2"]
    registered = [*adapter.tensors.values(), *adapter.magnitudes.values()]
    assert {id(p) for p in params} == {id(p) for p in registered}

    singles = {}
    for name in ("m1", "m2", "cat"):
        single = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
        load_hra_weights(single, mags.get(name, files["cat"]))
        singles[name] = single.unet.get_submodule(LAYER)
    w = singles["cat"].base_layer.weight.detach()  # (d_out, d)
    m1, m2, cat = singles["m1"], singles["m2"], singles["cat"]
    x = torch.randn(5, w.shape[1])  # (N, d)
    for names, expected in {
        ("default", "m2"): merged_weight(
            merged_weight(w, m1.hra_u, magnitude=m1.hra_m), m2.hra_u, magnitude=m2.hra_m
        ),
        ("m2", "cat"): merged_weight(
            merged_weight(w, m2.hra_u, magnitude=m2.hra_m), cat.hra_u, apply_gs=True
        ),
    }.items():
        set_hra_adapters(pipe, list(names))
        with torch.no_grad():
            stacked = pipe.unet.get_submodule(LAYER)(x)  # (N, d_out)
        torch.testing.assert_close(stacked, x @ expected.T, rtol=1e-5, atol=1e-5)
