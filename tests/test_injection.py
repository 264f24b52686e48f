"""Injection into tiny real diffusers/transformers models, merge/unmerge/unload, PEFT parity."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from peft import HRAConfig as PeftHRAConfig
from peft import LoraConfig, get_peft_model
from torch import nn

from hra_diffusion import (
    TEXT_ENCODER_ATTENTION_TARGETS,
    UNET_ATTENTION_FF_TARGETS,
    HRAConfig,
    hra_layers,
    hra_parameters,
    hra_state_dict,
    inject_hra,
    merge_hra,
    orthogonality_loss,
    unload_hra,
    unmerge_hra,
)
from hra_diffusion.injection import lora_rank_like_hra
from hra_diffusion.layer import HRAConv2d, HRALinear
from hra_diffusion.world.tiny_sd import tiny_text_encoder, tiny_unet


@pytest.fixture
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return tiny_unet(width=16).eval()


def unet_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
    }


def run(unet: nn.Module, seed: int = 0) -> torch.Tensor:
    return unet(**unet_inputs(seed)).sample


def randomise(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hra_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))


def test_default_targets_adapt_every_unet_attention_projection(unet):
    names = inject_hra(unet, HRAConfig(r=8))
    assert len(names) == 7 * 8  # 7 transformer blocks × (attn1, attn2) × (q, k, v, out)
    assert all(n.split(".attn")[1][2:] in {"to_q", "to_k", "to_v", "to_out.0"} for n in names)
    assert sum(p.numel() for p in hra_parameters(unet)) == 8 * sum(
        layer.base_layer.in_features for _, layer in hra_layers(unet)
    )


def test_controllable_targets_add_the_geglu_projection(unet):
    names = inject_hra(unet, HRAConfig(r=8, target_modules=UNET_ATTENTION_FF_TARGETS))
    assert len(names) == 7 * 9
    assert sum(n.endswith("ff.net.0.proj") for n in names) == 7


def test_sd15_unet_has_128_adapted_linears_and_795648_parameters_at_r8():
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    names = inject_hra(unet, HRAConfig(r=8))
    assert len(names) == 128
    assert sum(p.numel() for p in hra_parameters(unet)) == 795_648


def test_text_encoder_targets():
    text_encoder = tiny_text_encoder(width=16)
    names = inject_hra(text_encoder, HRAConfig(r=4, target_modules=TEXT_ENCODER_ATTENTION_TARGETS))
    assert len(names) == 2 * 4  # 2 layers × (q, k, v, out)
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    assert text_encoder(ids).last_hidden_state.shape == (1, 4, 16)


def test_regex_targets(unet):
    names = inject_hra(unet, HRAConfig(r=2, target_modules=(r".*attn2\.to_(q|k)",)))
    assert len(names) == 7 * 2
    assert all(n.endswith(("attn2.to_q", "attn2.to_k")) for n in names)


def test_even_r_starts_at_the_base_model(unet):
    base = run(unet)
    inject_hra(unet, HRAConfig(r=8))
    assert torch.allclose(run(unet), base, atol=1e-5)


def test_gram_schmidt_does_not_start_at_the_base_model(unet):
    base = run(unet)
    inject_hra(unet, HRAConfig(r=8, apply_gs=True))
    assert (run(unet) - base).abs().max() > 1e-3


def test_odd_r_warns_that_it_does_not_start_at_identity(unet):
    with pytest.warns(UserWarning, match="odd r=7"):
        inject_hra(unet, HRAConfig(r=7))


def test_only_hra_u_trains(unet):
    inject_hra(unet, HRAConfig(r=4))
    run(unet).pow(2).mean().backward()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert trainable == with_grad == set(hra_state_dict(unet))
    assert all(n.endswith(".hra_u") for n in trainable)
    assert all(hra_state_dict(unet)[n].shape[1] == 4 for n in trainable)


def test_state_dict_keys_and_shapes(unet):
    inject_hra(unet, HRAConfig(r=6))
    state = hra_state_dict(unet)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.hra_u"
    assert state[key].shape == (16, 6)  # (d_in = cross_attention_dim, r)
    assert state[key].dtype == torch.float32


def test_merge_unmerge_unload(unet):
    base = run(unet)
    originals = {n: m for n, m in unet.named_modules() if n.endswith("to_q")}
    weights = {n: m.weight.detach().clone() for n, m in originals.items()}
    inject_hra(unet, HRAConfig(r=8))
    randomise(unet)
    adapted = run(unet)
    assert (adapted - base).abs().max() > 1e-3

    merge_hra(unet)
    assert all(layer.merged for _, layer in hra_layers(unet))
    assert torch.allclose(run(unet), adapted, atol=1e-5)

    unmerge_hra(unet)
    for name, module in originals.items():
        assert torch.allclose(module.weight, weights[name], atol=1e-5)
    assert torch.allclose(run(unet), adapted, atol=1e-5)

    merge_hra(unet)
    unload_hra(unet)
    assert not any(hra_layers(unet))
    assert not hasattr(unet, "hra_config")
    for name, module in originals.items():
        assert unet.get_submodule(name) is module
        assert torch.allclose(module.weight, weights[name], atol=1e-5)
    assert torch.allclose(run(unet), base, atol=1e-5)


def test_unload_with_merge_keeps_the_adapted_model(unet):
    inject_hra(unet, HRAConfig(r=8))
    randomise(unet)
    adapted = run(unet)
    unload_hra(unet, merge=True)
    assert not any(hra_layers(unet))
    assert isinstance(
        unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn1.to_q"), nn.Linear
    )
    assert torch.allclose(run(unet), adapted, atol=1e-5)


def test_conv2d_layers(unet):
    base = run(unet)
    names = inject_hra(unet, HRAConfig(r=4, target_modules=("conv1",)))
    assert len(names) == 8  # one per resnet: 2 down + 2 mid + 4 up
    assert all(isinstance(unet.get_submodule(n), HRAConv2d) for n in names)
    assert torch.allclose(run(unet), base, atol=1e-5)
    randomise(unet)
    adapted = run(unet)
    merge_hra(unet)
    assert torch.allclose(run(unet), adapted, atol=1e-4)


def test_mixed_precision_base(unet):
    reference = run(unet)
    inject_hra(unet, HRAConfig(r=8))
    randomise(unet)
    adapted32 = run(unet)
    unet.to(torch.bfloat16)
    for p in hra_parameters(unet):
        p.data = p.data.float()
    inputs = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in unet_inputs().items()
    }
    out = unet(**inputs).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert ((out.float() - adapted32).norm() / adapted32.norm()) < 5e-2
    assert ((out.float() - reference).norm() / reference.norm()) > 1e-2


def test_short_training_loop_lowers_the_loss(unet):
    inject_hra(unet, HRAConfig(r=4, lambda_orth=1e-3))
    target = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(hra_parameters(unet), lr=3e-2)
    losses = []
    for _ in range(15):
        loss = (run(unet) - target).pow(2).mean() + 1e-3 * orthogonality_loss(unet)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]


def test_orthogonality_loss_sums_layers(unet):
    inject_hra(unet, HRAConfig(r=2))
    # paired init: Û = [û, û], so I − ÛᵀÛ = [[0, −1], [−1, 0]] and each layer contributes 2
    assert torch.allclose(orthogonality_loss(unet), torch.tensor(2.0 * 56), atol=1e-4)


def test_errors_are_clear(unet):
    with pytest.raises(ValueError, match="No module matches.*Some module names"):
        inject_hra(unet, HRAConfig(target_modules=("query",)))
    with pytest.raises(TypeError, match="norm1.*LayerNorm"):
        inject_hra(unet, HRAConfig(target_modules=("transformer_blocks.0.norm1",)))
    assert not any(hra_layers(unet)), "a failed injection must leave the model untouched"
    inject_hra(unet, HRAConfig(target_modules=("to_q",)))
    with pytest.raises(ValueError, match="already has an HRA adapter"):
        inject_hra(unet, HRAConfig(target_modules=("to_q",)))
    with pytest.raises(ValueError, match="one HRA configuration"):
        inject_hra(unet, HRAConfig(r=4, target_modules=("to_k",)))
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="groups=1"):
        inject_hra(grouped, HRAConfig(target_modules=("0",)))
    with pytest.raises(ValueError, match="no HRA layers"):
        orthogonality_loss(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="positive integer"):
        HRAConfig(r=0)
    with pytest.raises(ValueError, match=r"init must be one of \('paper', 'scaled'\), got 'unit'"):
        HRAConfig(init="unit")


def test_second_injection_with_same_config_extends_the_targets(unet):
    inject_hra(unet, HRAConfig(r=4, target_modules=("to_q",)))
    inject_hra(unet, HRAConfig(r=4, target_modules=("to_k",)))
    assert unet.hra_config.target_modules == ("to_q", "to_k")
    assert len(list(hra_layers(unet))) == 28
    assert all(p.requires_grad for p in hra_parameters(unet))
    assert len(hra_parameters(unet)) == 28


def test_scaled_init_starts_at_the_base_with_columns_of_norm_sqrt_r(unet):
    expected = run(unet)
    inject_hra(unet, HRAConfig(r=4, init="scaled"))
    assert unet.hra_config.init == "scaled"
    for _, layer in hra_layers(unet):
        assert torch.allclose(layer.hra_u.norm(dim=0), torch.full((4,), 2.0), atol=1e-6)
    torch.testing.assert_close(run(unet), expected)
    with pytest.raises(ValueError, match="init='scaled', magnitude=False; a model holds one"):
        inject_hra(unet, HRAConfig(r=4, target_modules=("conv1",), init="paper"))


def randomise_magnitudes(model: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in hra_layers(model):
            layer.hra_m.copy_(1 + 0.5 * torch.randn(layer.hra_m.shape, generator=g))


def test_magnitude_starts_at_the_base_and_trains_with_u(unet):
    expected = run(unet)
    targets = ("to_q", "to_k", "to_v", "to_out.0", "conv1")
    inject_hra(unet, HRAConfig(r=4, target_modules=targets, magnitude=True))
    assert unet.hra_config.magnitude
    for name, layer in hra_layers(unet):
        assert torch.equal(layer.hra_m, torch.ones(layer.base_layer.weight.shape[0])), name
        assert layer.hra_m.dtype == torch.float32 and layer.hra_m.requires_grad
    torch.testing.assert_close(run(unet), expected)
    run(unet).pow(2).mean().backward()
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert trainable == with_grad == set(hra_state_dict(unet))
    assert {n.rsplit(".", 1)[-1] for n in trainable} == {"hra_u", "hra_m"}
    assert len(hra_parameters(unet)) == len(trainable)
    with pytest.raises(ValueError, match="magnitude=True; a model holds one HRA configuration"):
        inject_hra(unet, HRAConfig(r=4, target_modules=("conv2",)))


def test_magnitude_batched_path_merge_unmerge_unload(unet):
    """The bank's batched factors and the per-layer functions agree; merge folds m in."""
    base = run(unet)
    weights = {n: m.weight.detach().clone() for n, m in unet.named_modules() if n.endswith("to_q")}
    inject_hra(unet, HRAConfig(r=4, target_modules=("to_q", "conv1"), magnitude=True))
    randomise(unet)
    randomise_magnitudes(unet)
    adapted = run(unet)  # the model's pre-hook: batched factors
    assert (adapted - base).abs().max() > 1e-3
    sample = unet_inputs()["sample"]
    conv_in = unet.conv_in(sample)
    layer = unet.get_submodule("down_blocks.0.resnets.0.conv1")
    for _, each in hra_layers(unet):
        each.factors = None  # force the per-layer path
    unbanked = layer(conv_in)
    run(unet)
    torch.testing.assert_close(layer(conv_in), unbanked, atol=1e-5, rtol=1e-5)

    merge_hra(unet)
    torch.testing.assert_close(run(unet), adapted, atol=1e-4, rtol=1e-4)
    unmerge_hra(unet)
    for name, weight in weights.items():
        torch.testing.assert_close(unet.get_submodule(name).base_layer.weight, weight)
    torch.testing.assert_close(run(unet), adapted, atol=1e-5, rtol=1e-5)
    unload_hra(unet, merge=True)
    torch.testing.assert_close(run(unet), adapted, atol=1e-4, rtol=1e-4)


def test_unmerge_refuses_a_zero_magnitude(unet):
    inject_hra(unet, HRAConfig(r=2, target_modules=("attn1.to_q",), magnitude=True))
    name, layer = next(hra_layers(unet))
    weight = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.hra_m[0] = 0.0
    merge_hra(unet)
    with pytest.raises(ValueError, match="magnitude has a zero entry"):
        unmerge_hra(unet)
    assert layer.merged and not torch.equal(layer.base_layer.weight, weight), name


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 7)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("target", ["proj", "conv"])
def test_matches_peft_hra_output_and_gradient(apply_gs, target):
    torch.manual_seed(0)
    ours_model, peft_base = TwoLayers(), TwoLayers()
    peft_base.load_state_dict(ours_model.state_dict())
    inject_hra(ours_model, HRAConfig(r=4, target_modules=(target,), apply_gs=apply_gs))
    peft_model = get_peft_model(
        peft_base, PeftHRAConfig(r=4, target_modules=[target], apply_GS=apply_gs)
    )
    ours_layer = ours_model.get_submodule(target)
    peft_layer = peft_model.base_model.model.get_submodule(target)
    with torch.no_grad():
        ours_layer.hra_u.copy_(torch.randn(ours_layer.hra_u.shape))
        peft_layer.hra_u["default"].copy_(ours_layer.hra_u)
    x = torch.randn(2, 12) if target == "proj" else torch.randn(2, 3, 6, 6)

    y_ours, y_peft = ours_layer(x), peft_layer(x)
    y_ours.pow(2).sum().backward()
    y_peft.pow(2).sum().backward()
    assert isinstance(ours_layer, HRALinear if target == "proj" else HRAConv2d)
    assert torch.allclose(y_ours, y_peft, rtol=1e-5, atol=1e-5)
    assert torch.allclose(
        ours_layer.hra_u.grad, peft_layer.hra_u["default"].grad, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("targets", [UNET_ATTENTION_FF_TARGETS, ("attn1.to_q", "conv1")])
def test_lora_rank_like_hra_counts_what_injection_adds(
    unet: UNet2DConditionModel, targets: tuple[str, ...], magnitude: bool
) -> None:
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    rank, hra_count, lora_count = lora_rank_like_hra(unet, targets, 8, magnitude)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    hra_unet, lora_unet = copy.deepcopy(unet), copy.deepcopy(unet)
    inject_hra(hra_unet, HRAConfig(r=8, target_modules=targets, magnitude=magnitude))
    assert hra_count == sum(p.numel() for p in hra_parameters(hra_unet))
    lora_unet.requires_grad_(False)
    lora_unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)))
    assert lora_count == sum(p.numel() for p in lora_unet.parameters() if p.requires_grad)
    per_rank = lora_count // rank
    assert abs(lora_count - hra_count) <= per_rank / 2  # no other rank is nearer
    with pytest.raises(ValueError, match="No module matches"):
        lora_rank_like_hra(unet, ("nothing_here",), 8)
