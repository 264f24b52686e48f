"""The batched factor path against the per-layer pure functions (fp64, outputs and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hra_diffusion import HRAConfig, hra_layers, hra_parameters, inject_hra, unload_hra
from hra_diffusion.batched import BANK_ATTRIBUTE
from hra_diffusion.functional import (
    batched_reflection_factors,
    hra_linear,
    reflection_factors,
)
from hra_diffusion.world.tiny_sd import tiny_unet


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def fp64_unet(r: int = 8, apply_gs: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    unet = tiny_unet(width=16).double().eval()
    inject_hra(unet, HRAConfig(r=r, apply_gs=apply_gs))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in hra_parameters(unet):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return unet


def unet_inputs(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(2, 4, 8, 8, generator=g).to(dtype),
        "timestep": torch.tensor([10, 500]),
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g).to(dtype),
    }


def output_and_grads(unet: nn.Module, sample_grad: bool = False):
    inputs = unet_inputs()
    inputs["sample"].requires_grad_(sample_grad)
    out = unet(**inputs).sample
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)
    params = hra_parameters(unet)
    grads = torch.autograd.grad((out * weights).sum(), params)
    return out.detach(), grads


def without_bank(unet: nn.Module):
    """The same model computing every layer's factors on its own (the pure functions)."""
    getattr(unet, BANK_ATTRIBUTE).remove()
    delattr(unet, BANK_ATTRIBUTE)
    for _, layer in hra_layers(unet):
        layer.factors = None
    return unet


@pytest.mark.parametrize("r", [1, 2, 3, 5, 8, 9, 16])
@pytest.mark.parametrize("apply_gs", [False, True])
def test_batched_factors_equal_the_per_layer_factors(r, apply_gs):
    u = torch.randn(4, 24, r, generator=torch.Generator().manual_seed(r), dtype=torch.float64)
    u.requires_grad_(True)
    v, vc = batched_reflection_factors(u, apply_gs)  # (4, 24, r) each
    probe = torch.randn(2, *v.shape, generator=torch.Generator().manual_seed(1), dtype=v.dtype)
    grad = torch.autograd.grad((v * probe[0]).sum() + (vc * probe[1]).sum(), u)[0]
    for i in range(u.shape[0]):
        u_i = u[i].detach().clone().requires_grad_(True)
        v_i, c_i = reflection_factors(u_i, apply_gs)
        vc_i = -(v_i @ c_i)
        grad_i = torch.autograd.grad((v_i * probe[0, i]).sum() + (vc_i * probe[1, i]).sum(), u_i)[0]
        torch.testing.assert_close(v[i], v_i, rtol=0, atol=1e-12)
        torch.testing.assert_close(vc[i], vc_i, rtol=0, atol=1e-10)
        torch.testing.assert_close(grad[i], grad_i, rtol=0, atol=1e-9)


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("sample_grad", [False, True])
def test_unet_output_and_gradients_equal_the_pure_functions(apply_gs, sample_grad):
    batched = output_and_grads(fp64_unet(apply_gs=apply_gs), sample_grad)
    reference = output_and_grads(without_bank(fp64_unet(apply_gs=apply_gs)), sample_grad)
    torch.testing.assert_close(batched[0], reference[0], rtol=0, atol=1e-6)
    for g_batched, g_reference in zip(batched[1], reference[1], strict=True):
        torch.testing.assert_close(g_batched, g_reference, rtol=1e-6, atol=1e-6)


def test_one_factor_computation_per_group_and_no_solve_for_small_r():
    unet = fp64_unet(r=8)
    counter = OpCounter()
    with counter:
        output_and_grads(unet)
    groups = {(layer.hra_u.shape, layer.weight.dtype) for _, layer in hra_layers(unet)}
    assert len(groups) < len(list(hra_layers(unet)))
    assert counter.counts["triu"] == 2 * len(groups)  # forward and backward, once per group
    assert "linalg_solve_triangular" not in counter.counts
    reference = OpCounter()
    with reference:
        output_and_grads(without_bank(fp64_unet(r=8)))
    assert reference.counts["linalg_solve_triangular"] >= len(list(hra_layers(unet)))


def test_a_layer_called_after_an_update_uses_its_new_weights():
    unet = fp64_unet()
    output_and_grads(unet)  # fills the cached factors
    name, layer = next(iter(hra_layers(unet)))
    with torch.no_grad():
        layer.hra_u.add_(1.0)  # an optimizer step
    x = torch.randn(3, layer.weight.shape[1], dtype=torch.float64)
    expected = hra_linear(x, layer.weight, layer.bias, layer.hra_u)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-12)


def test_factors_from_a_no_grad_forward_are_not_used_for_training():
    unet = fp64_unet()
    with torch.no_grad():
        unet(**unet_inputs())
    _, layer = next(iter(hra_layers(unet)))
    x = torch.randn(3, layer.weight.shape[1], dtype=torch.float64)
    layer(x).sum().backward()
    assert layer.hra_u.grad is not None and layer.hra_u.grad.abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = output_and_grads(fp64_unet().train(), sample_grad=True)
    unet = fp64_unet().train()
    unet.enable_gradient_checkpointing()
    checkpointed = output_and_grads(unet, sample_grad=True)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=0, atol=1e-10)
    for g_checkpointed, g_plain in zip(checkpointed[1], plain[1], strict=True):
        torch.testing.assert_close(g_checkpointed, g_plain, rtol=0, atol=1e-10)


def test_bf16_autocast_over_a_bf16_base_matches_the_pure_functions():
    def run(unet):
        unet.to(torch.bfloat16)
        for p in hra_parameters(unet):
            p.data = p.data.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return unet(**unet_inputs(torch.bfloat16)).sample.float()

    batched, reference = run(fp64_unet()), run(without_bank(fp64_unet()))
    assert ((batched - reference).norm() / reference.norm()) < 2e-2


def test_state_dict_keys_and_unload_are_unchanged():
    unet = fp64_unet()
    keys = set(unet.state_dict())
    assert not any("bank" in k or "factor" in k for k in keys)
    unload_hra(unet)
    assert not hasattr(unet, BANK_ATTRIBUTE)
    assert not unet._forward_pre_hooks


def test_a_trained_model_can_be_deep_copied():
    unet = fp64_unet()
    output_and_grads(unet)  # leaves factors that belong to the last graph
    twin = copy.deepcopy(unet)
    torch.testing.assert_close(output_and_grads(twin)[0], output_and_grads(unet)[0])
    assert getattr(twin, BANK_ATTRIBUTE).layers[0] is next(iter(hra_layers(twin)))[1]
