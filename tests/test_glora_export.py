"""GLoRA export: under the UIs' own update rules it is W H, on any base.

The rules, written down from the consumers' code:

- AUTOMATIC1111 ``extensions-builtin/Lora/network_glora.py`` (``calc_updown``):
  ``updown = (w2b @ w1b) + ((orig_weight @ w2a) @ w1a)`` with w1a = a1, w1b = b1,
  w2a = a2, w2b = b2; ``network.py`` ``finalize_updown`` reshapes it to the weight's
  shape and scales by ``calc_scale()`` (``alpha / dim`` only when ``dim`` is set, which
  the GLoRA module never does: 1.0) times the strength.
- ComfyUI ``comfy/weight_adapter/glora.py`` (``calculate_weight``; Forge's
  ``backend/patcher/lora.py`` is the same rule): "old" convention when
  b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1] (then rank = a1.shape[0]),
  unless also b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0] and the weight
  is not square; old: ``diff = mm(b2, b1) + mm(mm(W.flatten(1), a2), a1)``, new:
  ``diff = mm(mm(W, a1), a2) + mm(b1, b2)``; ``W += strength * (alpha / rank) * diff``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    HRAConfig,
    export_glora,
    hra_layers,
    hra_parameters,
    inject_hra,
    load_hra_weights,
    save_hra_weights,
)
from hra_diffusion.formats.glora import GLORA_PARTS
from hra_diffusion.layer import HRALayer
from hra_diffusion.world.tiny_sd import build_tiny_pipeline

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in")


def a1111_updown(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float = 1.0):
    """AUTOMATIC1111's GLoRA update of a Linear weight (see the module docstring)."""
    w1a, w1b, w2a, w2b = t["a1.weight"], t["b1.weight"], t["a2.weight"], t["b2.weight"]
    updown = (w2b @ w1b) + ((weight.to(w1a.dtype) @ w2a) @ w1a)
    return weight + updown.reshape(weight.shape) * 1.0 * strength


def comfy_weight(weight: torch.Tensor, t: dict[str, torch.Tensor], strength: float = 1.0):
    """ComfyUI's (and Forge's) GLoRA ``calculate_weight`` (see the module docstring)."""
    a1, a2, b1, b2, alpha = (t[p] for p in GLORA_PARTS)
    old = False
    if b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]:
        rank, old = a1.shape[0], True
    if b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]:
        if not (old and a2.shape[0] == weight.shape[0] and weight.shape[0] == weight.shape[1]):
            rank, old = a2.shape[0], False
    a1, a2, b1, b2 = (x.flatten(start_dim=1).float() for x in (a1, a2, b1, b2))
    scale = alpha.item() / rank
    if old:
        diff = (b2 @ b1 + (weight.flatten(start_dim=1).float() @ a2) @ a1).reshape(weight.shape)
    else:
        diff = ((weight.float() @ a1) @ a2 + b1 @ b2).reshape(weight.shape)
    return weight + strength * scale * diff


def reference_h(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """H (d, d) as the explicit product of reflections, computed from scratch (fp64)."""
    u = u.double()
    d, r = u.shape
    if apply_gs:
        q = []
        for i in range(r):
            v = u[:, i] - sum((u[:, i] @ qj) * qj for qj in q) if q else u[:, i]
            q.append(v / v.norm())
        u = torch.stack(q, dim=1)
    h = torch.eye(d, dtype=torch.float64)
    for i in range(r):
        v = u[:, i] / u[:, i].norm()
        h = h @ (torch.eye(d, dtype=torch.float64) - 2 * torch.outer(v, v))
    return h


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def adapt(pipe: StableDiffusionPipeline, apply_gs: bool) -> StableDiffusionPipeline:
    inject_hra(pipe.unet, HRAConfig(r=4, target_modules=UNET_TARGETS, apply_gs=apply_gs))
    inject_hra(pipe.text_encoder, HRAConfig(r=2, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in hra_parameters(pipe.unet) + hra_parameters(pipe.text_encoder):
            p.copy_(torch.randn(p.shape, generator=generator))
    return pipe


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "gram_schmidt"])
def exported(request, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("glora")
    hra = adapt(StableDiffusionPipeline.from_pretrained(tiny_model_dir), request.param)
    save_hra_weights(folder, unet=hra.unet, text_encoder=hra.text_encoder)
    glora = export_glora(folder, folder / "hra_glora.safetensors")
    with safe_open(str(glora), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    return hra, folder, tensors, metadata


def layers_by_kohya_name(pipe: StableDiffusionPipeline) -> dict[str, tuple[object, str]]:
    """Every Linear/Conv2d (or HRA layer) of the UNet and text encoder, by its kohya name."""
    names = {}
    for prefix, model in (("lora_unet_", pipe.unet), ("lora_te_", pipe.text_encoder)):
        for name, module in model.named_modules():
            if name.endswith("base_layer"):
                continue
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, HRALayer)):
                path = name
                if model is pipe.text_encoder and not path.startswith("text_model."):
                    path = "text_model." + path  # transformers 5 dropped the level
                names[prefix + path.replace(".", "_")] = (model, name)
    return names


def test_keys_shapes_and_metadata(exported) -> None:
    hra, _, tensors, metadata = exported
    assert metadata["format"] == "lycoris-glora"
    assert HRAConfig.from_json(metadata["unet.hra_config"]).r == 4
    real = layers_by_kohya_name(hra)
    adapted = {name: layer for model in (hra.unet, hra.text_encoder) for name, layer in
               hra_layers(model)}  # fmt: skip
    modules = {key.split(".", 1)[0] for key in tensors}
    assert len(modules) == len(adapted)
    for name in modules:
        assert name in real, name
        assert name.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_"))
        model, path = real[name]
        layer = model.get_submodule(path)
        d_out, d_in = layer.weight.shape[0], layer.weight[0].numel()
        r = layer.r
        shapes = {p: tuple(tensors[f"{name}.{p}"].shape) for p in GLORA_PARTS}
        assert shapes == {
            "a1.weight": (r, d_in),
            "a2.weight": (d_in, r),
            "b1.weight": (r, d_in),
            "b2.weight": (d_out, r),
            "alpha": (),
        }
        assert tensors[f"{name}.alpha"].item() == r
        assert not tensors[f"{name}.b1.weight"].any() and not tensors[f"{name}.b2.weight"].any()
        assert tensors[f"{name}.a1.weight"].dtype == torch.float32


@pytest.mark.parametrize("base_seed", [0, 1], ids=["training_base", "other_base"])
def test_consumer_rules_give_w_h_on_any_base(exported, base_seed: int) -> None:
    """ComfyUI's rule on every layer, A1111's on the Linear ones: W H to 1e-5."""
    hra, _, tensors, _ = exported
    base = build_tiny_pipeline(width=32, seed=base_seed)
    trained = layers_by_kohya_name(hra)
    on_base = layers_by_kohya_name(base)
    checked = {"comfy": 0, "a1111": 0}
    for name in {key.split(".", 1)[0] for key in tensors}:
        model, path = trained[name]
        layer = model.get_submodule(path)
        base_model, base_path = on_base[name]
        weight = base_model.get_submodule(base_path).weight.detach()  # this base's W
        expected = weight.double().flatten(1) @ reference_h(layer.hra_u, layer.apply_gs)
        expected = expected.reshape(weight.shape)
        parts = {p: tensors[f"{name}.{p}"] for p in GLORA_PARTS}
        assert rel_error(comfy_weight(weight, parts), expected) <= 1e-5, name
        checked["comfy"] += 1
        if weight.dim() == 2:
            assert rel_error(a1111_updown(weight, parts), expected) <= 1e-5, name
            checked["a1111"] += 1
    assert checked["comfy"] > checked["a1111"] > 0  # convs included for ComfyUI
    if base_seed == 1:
        assert not torch.equal(base.unet.conv_in.weight, hra.unet.conv_in.weight)


def test_strength_is_linear(exported) -> None:
    hra, _, tensors, _ = exported
    name = next(k.split(".", 1)[0] for k in tensors if "attn2_to_q" in k)
    model, path = layers_by_kohya_name(hra)[name]
    weight = model.get_submodule(path).weight.detach()
    parts = {p: tensors[f"{name}.{p}"] for p in GLORA_PARTS}
    full = comfy_weight(weight, parts)
    torch.testing.assert_close(comfy_weight(weight, parts, 0.5), (weight + full) / 2)


def test_consumer_patched_base_runs_like_hra_on_that_base(exported) -> None:
    """Patch a second base with ComfyUI's rule: same outputs as HRA loaded on that base."""
    _, folder, tensors, _ = exported
    patched, adapted = build_tiny_pipeline(width=32, seed=1), build_tiny_pipeline(width=32, seed=1)
    load_hra_weights(adapted, folder)
    layers = layers_by_kohya_name(patched)
    with torch.no_grad():
        for name in {key.split(".", 1)[0] for key in tensors}:
            model, path = layers[name]
            module = model.get_submodule(path)
            parts = {p: tensors[f"{name}.{p}"] for p in GLORA_PARTS}
            module.weight.copy_(comfy_weight(module.weight, parts))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, H, W)
    ids = torch.randint(0, 49408, (1, 77), generator=generator)  # (B, tokens)
    results = []
    with torch.no_grad():
        for pipe in (patched, adapted):
            hidden = pipe.text_encoder(ids)[0]  # (B, tokens, width)
            results.append(pipe.unet(latents, 10, encoder_hidden_states=hidden).sample)
    assert rel_error(results[0], results[1]) <= 1e-4


def test_old_files_take_sizes_from_the_model(exported, tmp_path: Path) -> None:
    hra, folder, tensors, _ = exported
    file = folder / "hra_weights.safetensors"
    with safe_open(str(file), framework="pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {k: v for k, v in f.metadata().items() if not k.endswith(".out_features")}
    old = tmp_path / "v1.safetensors"
    save_file(weights, old, {**metadata, "format_version": "1"})
    with pytest.raises(ValueError, match=r"does not record the output size.*--model BASE"):
        export_glora(old, tmp_path / "glora.safetensors")
    assert not (tmp_path / "glora.safetensors").exists()
    again = export_glora(old, tmp_path / "glora.safetensors", pipeline=build_tiny_pipeline(32))
    with safe_open(str(again), framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), tensors[k]) for k in tensors)
    assert json.loads(metadata["unet.hra_config"])["r"] == 4
