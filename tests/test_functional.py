"""The HRA math against a dense reference computed the naive way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hra_diffusion.formats.glora import glora_factors
from hra_diffusion.functional import (
    dora_magnitude,
    gram_schmidt,
    hra_conv2d,
    hra_linear,
    initial_u,
    lora_factors,
    merged_weight,
    orthogonality_penalty,
    reflection_factors,
)


def dense_reflections(u: torch.Tensor) -> torch.Tensor:
    """H = H_1 H_2 ⋯ H_r as an explicit product of d × d reflections."""
    d, r = u.shape
    eye = torch.eye(d, dtype=u.dtype)
    h = eye
    for i in range(r):
        u_i = u[:, i] / u[:, i].norm()
        h = h @ (eye - 2 * torch.outer(u_i, u_i))
    return h


def dense_gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """H = I − 2 Q Qᵀ with Q from a textbook Gram–Schmidt loop."""
    qs: list[torch.Tensor] = []
    for i in range(u.shape[1]):
        q = u[:, i]
        for prev in qs:
            q = q - (prev @ u[:, i]) * prev
        qs.append(q / q.norm())
    q = torch.stack(qs, dim=1)
    return torch.eye(u.shape[0], dtype=u.dtype) - 2 * q @ q.T


def dense_h(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    return dense_gram_schmidt(u) if apply_gs else dense_reflections(u)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def linear_case(r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(3, 5, 24, generator=g),
        "weight": torch.randn(10, 24, generator=g),
        "bias": torch.randn(10, generator=g),
        "u": torch.randn(24, r, generator=g),
    }


def conv_case(r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(2, 3, 9, 8, generator=g),
        "weight": torch.randn(5, 3, 3, 2, generator=g),  # non-square kernel: d = 3·3·2 = 18
        "bias": torch.randn(5, generator=g),
        "u": torch.randn(18, r, generator=g),
    }


CONV_ARGS = {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}


def reference_linear(x, weight, bias, u, apply_gs):
    return F.linear(x, weight @ dense_h(u, apply_gs), bias)


def reference_conv(x, weight, bias, u, apply_gs):
    w = (weight.flatten(1) @ dense_h(u, apply_gs)).reshape(weight.shape)
    return F.conv2d(x, w, bias, **CONV_ARGS)


def ours_conv(x, weight, bias, u, apply_gs):
    return hra_conv2d(x, weight, bias, u, apply_gs, **CONV_ARGS)


LAYERS = {
    "linear": (linear_case, hra_linear, reference_linear),
    "conv2d": (conv_case, ours_conv, reference_conv),
}


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("r", [1, 2, 7, 8])
@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-frozen", "x-trains"])
def test_output_and_gradient_match_dense_reference(layer, r, apply_gs, x_grad):
    """Both exact forms (weight side when x needs no gradient, input side when it does)."""
    make_case, ours, reference = LAYERS[layer]
    case = make_case(r)
    u32 = case["u"].clone().requires_grad_(True)
    x32 = case["x"].clone().requires_grad_(x_grad)
    y = ours(x32, case["weight"], case["bias"], u32, apply_gs)
    y.pow(2).sum().backward()

    u64 = case["u"].double().requires_grad_(True)
    x64 = case["x"].double().requires_grad_(x_grad)
    y_ref = reference(x64, case["weight"].double(), case["bias"].double(), u64, apply_gs)
    y_ref.pow(2).sum().backward()

    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(u32.grad, u64.grad) < 1e-5
    if x_grad:
        assert rel_err(x32.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("apply_gs", [False, True])
def test_inference_without_grad_matches_dense_reference(apply_gs):
    case = linear_case(8)
    with torch.no_grad():
        y = hra_linear(case["x"], case["weight"], case["bias"], case["u"], apply_gs)
    y_ref = reference_linear(*(case[k].double() for k in ("x", "weight", "bias", "u")), apply_gs)
    assert rel_err(y, y_ref) < 1e-5


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("apply_gs", [False, True])
def test_gradcheck_fp64(layer, apply_gs):
    make_case, ours, _ = LAYERS[layer]
    case = {k: v.double() for k, v in make_case(3).items()}
    x = case["x"].requires_grad_(True)
    u = case["u"].requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, u: ours(x, case["weight"], case["bias"], u, apply_gs), (x, u)
    )


@pytest.mark.parametrize("r", [2, 4, 8])
def test_even_r_initialisation_is_exactly_identity(r):
    u = initial_u(32, r, apply_gs=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(u[:, 0::2], u[:, 1::2])
    h = dense_reflections(u.double())
    assert torch.allclose(h, torch.eye(32, dtype=torch.float64), atol=1e-12)
    v, c = reflection_factors(u, apply_gs=False)
    assert (v @ c @ v.T).abs().max() < 1e-5  # H = I − V C Vᵀ = I


@pytest.mark.parametrize("apply_gs", [False, True])
def test_odd_r_and_gram_schmidt_do_not_start_at_identity(apply_gs):
    u = initial_u(32, 3 if not apply_gs else 4, apply_gs, torch.Generator().manual_seed(0))
    h = dense_h(u.double(), apply_gs)
    assert (h - torch.eye(32, dtype=torch.float64)).abs().max() > 0.1


def test_initial_u_matches_kaiming_uniform_bound():
    u = initial_u(4096, 8, apply_gs=False, generator=torch.Generator().manual_seed(0))
    bound = (1 / 4) ** 0.5  # kaiming-uniform(a=√5) on (d, r/2): 1/sqrt(fan_in = r/2)
    assert u.abs().max() <= bound
    assert u.abs().max() > 0.99 * bound


def test_paper_init_is_the_kaiming_draw_bit_for_bit():
    half = torch.empty(48, 4)  # (d, r/2): the paper's draw, written out
    torch.nn.init.kaiming_uniform_(half, a=5**0.5, generator=torch.Generator().manual_seed(3))
    u = initial_u(48, 8, apply_gs=False, generator=torch.Generator().manual_seed(3))
    assert torch.equal(u, torch.repeat_interleave(half, 2, dim=1))
    default = initial_u(48, 8, False, torch.Generator().manual_seed(3))
    assert torch.equal(default, initial_u(48, 8, False, torch.Generator().manual_seed(3), "paper"))
    assert torch.equal(default, u)


@pytest.mark.parametrize(("d", "r", "apply_gs"), [(32, 2, False), (320, 8, False), (64, 5, False),
                                                  (64, 4, True)])  # fmt: skip
def test_scaled_init_has_paper_directions_and_norm_sqrt_r(d, r, apply_gs):
    paper = initial_u(d, r, apply_gs, torch.Generator().manual_seed(0), init="paper")
    scaled = initial_u(d, r, apply_gs, torch.Generator().manual_seed(0), init="scaled")
    norms = scaled.double().norm(dim=0)  # (r,)
    assert torch.allclose(norms, torch.full((r,), r**0.5, dtype=torch.float64), atol=1e-6)
    same_directions = paper.double() / paper.double().norm(dim=0)
    assert torch.allclose(scaled.double() / norms, same_directions, atol=1e-7)
    assert torch.allclose(dense_h(scaled.double(), apply_gs), dense_h(paper.double(), apply_gs))


@pytest.mark.parametrize("r", [2, 4, 8, 16])
def test_scaled_init_is_exactly_identity_for_even_r(r):
    u = initial_u(320, r, apply_gs=False, generator=torch.Generator().manual_seed(0), init="scaled")
    assert torch.equal(u[:, 0::2], u[:, 1::2])  # paired bit for bit: each pair cancels
    h = dense_reflections(u.double())
    assert torch.allclose(h, torch.eye(320, dtype=torch.float64), atol=1e-12)


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match=r"init must be one of \('paper', 'scaled'\)"):
        initial_u(8, 2, apply_gs=False, init="unit")


@pytest.mark.parametrize("apply_gs", [False, True])
def test_exports_depend_only_on_directions(apply_gs):
    u = torch.randn(24, 4, dtype=torch.float64)  # (d, r): a trained U
    rescaled = u * torch.tensor([0.01, 3.0, 70.0, 0.5], dtype=torch.float64)  # other norms
    weight = torch.randn(10, 24, dtype=torch.float64)  # (d_out, d)
    a, b = lora_factors(weight, u, apply_gs)
    a2, b2 = lora_factors(weight, rescaled, apply_gs)
    assert torch.allclose(a, a2, atol=1e-12) and torch.allclose(b, b2, atol=1e-12)
    assert torch.allclose(weight + b2 @ a2, weight @ dense_h(u, apply_gs), atol=1e-12)
    glora, glora2 = glora_factors(u, 10, apply_gs), glora_factors(rescaled, 10, apply_gs)
    assert all(torch.allclose(glora[k], glora2[k], atol=1e-12) for k in glora)


@pytest.mark.parametrize("apply_gs", [False, True])
def test_factored_h_is_orthogonal_and_matches_dense(apply_gs):
    u = torch.randn(20, 6, dtype=torch.float64)
    v, c = reflection_factors(u, apply_gs)
    h = torch.eye(20, dtype=torch.float64) - v @ c @ v.T
    assert torch.allclose(h, dense_h(u, apply_gs), atol=1e-12)
    assert torch.allclose(h.T @ h, torch.eye(20, dtype=torch.float64), atol=1e-12)


def test_gram_schmidt_matches_textbook_loop_column_by_column():
    u = torch.randn(15, 5, dtype=torch.float64)
    q = gram_schmidt(u)
    expected = []
    for i in range(5):
        col = u[:, i] - sum((expected[j] @ u[:, i]) * expected[j] for j in range(i))
        expected.append(col / col.norm())
    assert torch.allclose(q, torch.stack(expected, dim=1), atol=1e-12)


@pytest.mark.parametrize("shape", [(10, 24), (5, 3, 3, 2)])
@pytest.mark.parametrize("apply_gs", [False, True])
def test_merge_inverse_and_lora_factors(shape, apply_gs):
    weight = torch.randn(*shape, dtype=torch.float64)
    u = torch.randn(weight[0].numel(), 7, dtype=torch.float64)
    expected = (weight.flatten(1) @ dense_h(u, apply_gs)).reshape(shape)

    merged = merged_weight(weight, u, apply_gs)
    assert torch.allclose(merged, expected, atol=1e-12)
    assert torch.allclose(merged_weight(merged, u, apply_gs, inverse=True), weight, atol=1e-12)

    a, b = lora_factors(weight, u, apply_gs)
    delta = b.flatten(1) @ a.flatten(1)  # (d_out, d)
    assert torch.allclose(weight + delta.reshape(shape), expected, atol=1e-12)


def test_merged_weight_keeps_dtype_and_uses_fp32_math():
    """fp32 math rounds once, at the end: its bf16 result is the fp64 product rounded to bf16,
    up to 1 ulp in a rare tie (over 200 seeds: at most 1 of 240 entries, relative error at
    most 1.9e-3). The same product computed in bf16 throughout misses the rounded value in
    44-66 % of the entries, with a relative error of 3.1e-3 to 5.3e-3."""
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        weight = torch.randn(10, 24, generator=g).to(torch.bfloat16)
        u = torch.randn(24, 4, generator=g)
        merged = merged_weight(weight, u)
        expected = weight.double() @ dense_reflections(u.double())
        assert merged.dtype == torch.bfloat16
        rounded = expected.to(torch.bfloat16)
        ulps = (merged.view(torch.int16).int() - rounded.view(torch.int16).int()).abs()
        assert ulps.max() <= 1 and (ulps > 0).float().mean() <= 0.02, (seed, ulps)
        assert rel_err(merged, expected) < 2.5e-3, seed


def test_orthogonality_penalty_matches_naive_formula():
    u = torch.randn(12, 4, dtype=torch.float64)
    u_hat = torch.stack([u[:, i] / u[:, i].norm() for i in range(4)], dim=1)
    expected = ((torch.eye(4, dtype=torch.float64) - u_hat.T @ u_hat) ** 2).sum()
    assert torch.allclose(orthogonality_penalty(u), expected)
    q, _ = torch.linalg.qr(u)
    assert orthogonality_penalty(q) < 1e-20


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-frozen", "x-trains"])
def test_half_precision_base_keeps_fp32_adapter(dtype, layer, x_grad):
    make_case, ours, _ = LAYERS[layer]
    case = make_case(8)
    u = case["u"].clone().requires_grad_(True)
    y32 = ours(case["x"], case["weight"], case["bias"], case["u"], False)
    x = case["x"].to(dtype).requires_grad_(x_grad)
    y = ours(x, case["weight"].to(dtype), case["bias"].to(dtype), u, False)
    y.float().pow(2).sum().backward()
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    assert rel_err(y, y32) < 2e-2
    assert u.grad.dtype == torch.float32 and torch.isfinite(u.grad).all()


@pytest.mark.parametrize("x_grad", [False, True], ids=["x-frozen", "x-trains"])
def test_autocast_runs_in_bf16_with_fp32_adapter(x_grad):
    case = linear_case(8)
    u = case["u"].clone().requires_grad_(True)
    x = case["x"].clone().requires_grad_(x_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = hra_linear(x, case["weight"], case["bias"], u)
    y.float().sum().backward()
    reference = reference_linear(*(case[k] for k in ("x", "weight", "bias", "u")), False)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, reference) < 2e-2
    assert u.grad.dtype == torch.float32


class ShapeRecorder(TorchFunctionMode):
    """Records the shape of every tensor produced by a torch function."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-frozen", "x-trains"])
def test_training_forward_never_builds_a_d_by_d_matrix(apply_gs, x_grad):
    d = 24
    case = linear_case(8)
    u = case["u"].clone().requires_grad_(True)
    x = case["x"].clone().requires_grad_(x_grad)
    with ShapeRecorder() as recorder:
        hra_linear(x, case["weight"], case["bias"], u, apply_gs)
    assert recorder.shapes, "the recorder saw no tensor"
    assert all(sum(size >= d for size in shape) < 2 for shape in recorder.shapes)


def magnitude_of(d_out: int, seed: int = 1) -> torch.Tensor:
    """A magnitude away from ones, some entries negative."""
    return torch.randn(d_out, generator=torch.Generator().manual_seed(seed))  # (d_out,)


def reference_magnitude_linear(x, weight, bias, u, apply_gs, m):
    """y = x (diag(m) W H)ᵀ + b, H built as a dense product."""
    return F.linear(x, m.unsqueeze(1) * (weight @ dense_h(u, apply_gs)), bias)


def reference_magnitude_conv(x, weight, bias, u, apply_gs, m):
    w = (m.unsqueeze(1) * (weight.flatten(1) @ dense_h(u, apply_gs))).reshape(weight.shape)
    return F.conv2d(x, w, bias, **CONV_ARGS)


def ours_magnitude_conv(x, weight, bias, u, apply_gs, m):
    return hra_conv2d(x, weight, bias, u, apply_gs, **CONV_ARGS, magnitude=m)


def ours_magnitude_linear(x, weight, bias, u, apply_gs, m):
    return hra_linear(x, weight, bias, u, apply_gs, magnitude=m)


MAGNITUDE_LAYERS = {
    "linear": (linear_case, ours_magnitude_linear, reference_magnitude_linear),
    "conv2d": (conv_case, ours_magnitude_conv, reference_magnitude_conv),
}


@pytest.mark.parametrize("layer", MAGNITUDE_LAYERS)
@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("x_grad", [False, True], ids=["x-frozen", "x-trains"])
def test_magnitude_output_and_gradients_match_dense_reference(layer, apply_gs, x_grad):
    """y = m ⊙ (x (W H)ᵀ) + b: the bias is not scaled; gradients reach U, m and x."""
    make_case, ours, reference = MAGNITUDE_LAYERS[layer]
    case = make_case(4)
    m0 = magnitude_of(case["weight"].shape[0])  # (d_out,)
    u32, m32 = case["u"].clone().requires_grad_(True), m0.clone().requires_grad_(True)
    x32 = case["x"].clone().requires_grad_(x_grad)
    y = ours(x32, case["weight"], case["bias"], u32, apply_gs, m32)
    y.pow(2).sum().backward()

    u64, m64 = case["u"].double().requires_grad_(True), m0.double().requires_grad_(True)
    x64 = case["x"].double().requires_grad_(x_grad)
    y_ref = reference(x64, case["weight"].double(), case["bias"].double(), u64, apply_gs, m64)
    y_ref.pow(2).sum().backward()

    assert y.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5
    assert rel_err(u32.grad, u64.grad) < 1e-5
    assert rel_err(m32.grad, m64.grad) < 1e-5
    if x_grad:
        assert rel_err(x32.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("layer", MAGNITUDE_LAYERS)
def test_magnitude_of_ones_is_plain_hra_and_gradcheck(layer):
    make_case, ours, _ = MAGNITUDE_LAYERS[layer]
    _, plain, _ = LAYERS[layer]
    case = {k: v.double() for k, v in make_case(3).items()}
    ones = torch.ones(case["weight"].shape[0], dtype=torch.float64)  # (d_out,)
    args = (case["x"], case["weight"], case["bias"], case["u"], False)
    torch.testing.assert_close(ours(*args, ones), plain(*args), atol=1e-12, rtol=0)
    m = magnitude_of(case["weight"].shape[0]).double().requires_grad_(True)
    u = case["u"].requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda u, m: ours(case["x"], case["weight"], case["bias"], u, False, m), (u, m)
    )


@pytest.mark.parametrize("shape", [(10, 24), (5, 3, 3, 2)])
@pytest.mark.parametrize("apply_gs", [False, True])
def test_magnitude_merge_inverse_and_dora_form(shape, apply_gs):
    """diag(m) W H, its inverse, and DoRA's m_dora ⊙ V / ‖V_row‖ with V = W + B A."""
    weight = torch.randn(*shape, dtype=torch.float64)
    u = torch.randn(weight[0].numel(), 5, dtype=torch.float64)
    m = magnitude_of(shape[0]).double()  # (d_out,)
    expected = m.unsqueeze(1) * (weight.flatten(1) @ dense_h(u, apply_gs))  # (d_out, d)

    merged = merged_weight(weight, u, apply_gs, magnitude=m)
    assert torch.allclose(merged, expected.reshape(shape), atol=1e-12)
    unmerged = merged_weight(merged, u, apply_gs, inverse=True, magnitude=m)
    assert torch.allclose(unmerged, weight, atol=1e-12)

    a, b = lora_factors(weight, u, apply_gs)
    v = weight.flatten(1) + b.flatten(1) @ a.flatten(1)  # (d_out, d): V = W + B A
    m_dora = dora_magnitude(weight, m)  # (d_out,)
    assert torch.allclose(m_dora, m * weight.flatten(1).norm(dim=1), atol=1e-12)
    dora = (m_dora / v.norm(dim=1)).unsqueeze(1) * v  # (d_out, d)
    assert torch.allclose(dora, expected, atol=1e-12)


def test_unmerge_with_a_zero_magnitude_is_refused():
    weight, u = torch.randn(4, 6), torch.randn(6, 2)
    m = torch.tensor([1.0, 0.0, 2.0, 1.0])
    with pytest.raises(ValueError, match="magnitude has a zero entry"):
        merged_weight(weight, u, inverse=True, magnitude=m)


@pytest.mark.parametrize("x_grad", [False, True], ids=["x-frozen", "x-trains"])
def test_magnitude_under_bf16_autocast_keeps_fp32_parameters(x_grad):
    case = linear_case(8)
    u = case["u"].clone().requires_grad_(True)
    m = magnitude_of(10).requires_grad_(True)
    x = case["x"].clone().requires_grad_(x_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = hra_linear(x, case["weight"], case["bias"], u, magnitude=m)
    y.float().sum().backward()
    y_ref = reference_magnitude_linear(
        *(case[k].double() for k in ("x", "weight", "bias", "u")), False, m.detach().double()
    )
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 2e-2
    assert m.grad.dtype == torch.float32 and torch.isfinite(m.grad).all()
