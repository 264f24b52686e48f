"""The HRA math as pure functions.

HRA (Yuan et al., "Bridging the Gap between Low-rank and Orthogonal Adaptation via
Householder Reflection Adaptation", NeurIPS 2024, arXiv:2405.17484) fine-tunes a
frozen weight W (d_out × d) as W H, with

    H = H_1 H_2 ⋯ H_r,    H_i = I − 2 û_i û_iᵀ,    û_i = u_i / ||u_i||.

Every such H can be written H = I − V C Vᵀ with V (d, r) and C (r, r):

- plain HRA: V = Û and C = T, the compact WY factor (Schreiber & Van Loan, 1989)
  with T⁻¹ = ½ I + triu(ÛᵀÛ, 1);
- Gram–Schmidt HRA: V = Q, the orthonormalised U, and C = 2 I.

So W H = W − (W V C) Vᵀ is a rank-r update ΔW = B A with A = Vᵀ, B = −W V C (the
exact LoRA that :func:`lora_factors` exports), and a Linear layer computes

    y = x (W H)ᵀ + b = (x − (x V)(V C)ᵀ) Wᵀ + b = x Wᵀ − (x V)(W V C)ᵀ + b

without ever forming a d × d matrix, in whichever form is cheaper (see
:func:`hra_linear`): LoRA's cost. A Conv2d layer, whose H acts on flattened
patches, uses the weight side, y = conv(x, W) − conv(conv(x, Vᵀ), W V C): LoRA's
cost plus one W V product.
The small algebra (normalisation, ÛᵀÛ, T) runs in fp32 (fp64 for fp64 inputs) with
autocast off.

With a learnable magnitude m (d_out,) (``HRAConfig.magnitude``) the adapted weight is

    W' = diag(m) · W H,    y = m ⊙ (x (W H)ᵀ) + b    (the bias is not scaled),

per output feature (per output channel for a Conv2d). Since H is orthogonal, the rows of
W H have the norms of W's rows, so W' = diag(m ⊙ ‖W_row‖) · (W H) / ‖(W H)_row‖: DoRA's
form with V = W + B A (:func:`lora_factors`) and DoRA magnitude m ⊙ ‖W_row‖
(:func:`dora_magnitude`). m starts at ones, W' = W H.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from hra_diffusion.config import INITS


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (never for devices without autocast)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A block with autocast off for ``device_type`` (nothing to do without autocast)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def unit_columns(u: torch.Tensor) -> torch.Tensor:
    """Û: each column of ``u`` (d, r) divided by its Euclidean norm."""
    return u / u.norm(dim=0, keepdim=True)  # (d, r)


def wy_factor(u_hat: torch.Tensor) -> torch.Tensor:
    """T with H_1 ⋯ H_r = I − Û T Ûᵀ, from T⁻¹ = ½ I + triu(ÛᵀÛ, 1)."""
    r = u_hat.shape[1]
    eye = torch.eye(r, dtype=u_hat.dtype, device=u_hat.device)
    t_inv = 0.5 * eye + torch.triu(u_hat.T @ u_hat, diagonal=1)  # (r, r)
    return torch.linalg.solve_triangular(t_inv, eye, upper=True)  # (r, r)


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Q: the columns of ``u`` (d, r) orthonormalised in order (classical Gram–Schmidt).

    Computed with a QR decomposition whose signs are fixed so that diag(R) > 0,
    which makes Q equal to the Gram–Schmidt result column by column.
    """
    q, r = torch.linalg.qr(u)  # (d, r), (r, r)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)  # (r,)
    return q * signs


def reflection_factors(u: torch.Tensor, apply_gs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, C) in fp32 (or wider) such that H = I − V C Vᵀ; see the module docstring."""
    with autocast_off(u.device.type):
        u32 = _at_least_fp32(u)
        if apply_gs:
            q = gram_schmidt(u32)  # (d, r)
            return q, 2.0 * torch.eye(u.shape[1], dtype=q.dtype, device=q.device)
        u_hat = unit_columns(u32)  # (d, r)
        return u_hat, wy_factor(u_hat)


def orthogonality_penalty(u: torch.Tensor) -> torch.Tensor:
    """||I − ÛᵀÛ||²_F for one layer, in fp32."""
    with autocast_off(u.device.type):
        u_hat = unit_columns(_at_least_fp32(u))  # (d, r)
        gram = u_hat.T @ u_hat  # (r, r)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return (eye - gram).pow(2).sum()


def batched_reflection_factors(
    u: torch.Tensor, apply_gs: bool, eye: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, −V C) for a stack of G layers' reflections ``u`` (G, d, r), in fp32 (or wider).

    The batched form of :func:`reflection_factors`: one normalisation, one Gram product
    and one small solve for all G layers. For r ≤ 8 the WY factor needs no solve: with
    S = triu(ÛᵀÛ, 1) and N = −2 S (strictly upper, so Nʳ = 0),

        T = 2 (I − N)⁻¹ = 2 (I + N)(I + N²)(I + N⁴)    exactly,

    a few batched matmuls and no host synchronisation. Larger r uses a batched
    triangular solve. ``eye``, the (r, r) identity in the factors' dtype and device, may
    be passed in to reuse one buffer across calls. Returns V (G, d, r) and −V C (G, d, r),
    the pair :func:`factored_linear` takes.
    """
    with autocast_off(u.device.type):
        u32 = _at_least_fp32(u)
        r = u.shape[-1]
        if apply_gs:
            q = _batched_gram_schmidt(u32)  # (G, d, r)
            return q, -2.0 * q
        u_hat = u32 / torch.linalg.vector_norm(u32, dim=1, keepdim=True)  # (G, d, r)
        strict = torch.triu(u_hat.mT @ u_hat, diagonal=1)  # (G, r, r): S
        if eye is None:
            eye = torch.eye(r, dtype=u_hat.dtype, device=u_hat.device)  # (r, r)
        if r <= 8:
            t = torch.add(eye, strict, alpha=-2.0)  # (G, r, r): I + N
            power, scale = strict, -2.0  # N = scale · S
            for _ in range(max(0, math.ceil(math.log2(r)) - 1)):
                power, scale = power @ power, scale * scale  # N^(2^k) = scale · S^(2^k)
                t = torch.baddbmm(t, t, power, alpha=scale)  # (G, r, r): t (I + N^(2^k))
            t = -2.0 * t  # (G, r, r): −T = −2 (I − N)⁻¹
        else:
            t_inv = torch.add(strict, eye, alpha=0.5)  # (G, r, r)
            t = -torch.linalg.solve_triangular(t_inv, eye.expand_as(t_inv), upper=True)
        return u_hat, u_hat @ t  # (G, d, r), (G, d, r): V, −V C


def _batched_gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(u)  # (G, d, r), (G, r, r)
    signs = torch.diagonal(r, dim1=-2, dim2=-1).sign()  # (G, r)
    return q * torch.where(signs == 0, 1.0, signs).unsqueeze(1)  # (G, d, r)


def hra_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    apply_gs: bool = False,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x (W H)ᵀ + b for a Linear weight W (d_out, d) and reflections U (d, r); with a
    ``magnitude`` m (d_out,), y = m ⊙ (x (W H)ᵀ) + b.

    Computes (V, C) with :func:`reflection_factors` and applies them with
    :func:`factored_linear`; see there for the two exact forms of the product.
    Outside autocast the matmuls run in W's dtype and the result has ``x``'s dtype;
    under autocast they run in the autocast dtype, as for ``nn.Linear``.
    """
    v, c = reflection_factors(u, apply_gs)  # (d, r), (r, r)
    with autocast_off(v.device.type):
        minus_vc = v @ -c  # (d, r)
    return factored_linear(x, weight, bias, v, minus_vc, magnitude)


def matmul_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a layer's matmuls run in now: autocast's if enabled, else W's."""
    device = weight.device.type
    if autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def factored_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    v: torch.Tensor,
    minus_vc: torch.Tensor,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x (W H)ᵀ + b given H = I − V C Vᵀ as V (d, r) and −V C (d, r); with a
    ``magnitude`` m (d_out,), y = m ⊙ (x (W H)ᵀ) + b (:func:`scale_outputs`).

    Two exact forms of the same product; the cheaper one for ``x`` is used:

    - input side, y = (x + (x V)(−V C)ᵀ) Wᵀ + b, when ``x`` needs a gradient anyway:
      the backward through W is then already paid, so HRA costs LoRA's two rank-r
      products over the tokens and nothing more (the second one fused with the sum);
    - weight side, y = x Wᵀ + (x V)(−W V C)ᵀ + b, when ``x`` needs none (e.g. the text
      embeddings entering ``attn2.to_k``/``to_v``): one W (V C) product instead of a
      backward through W for the tokens.

    Dtypes as in :func:`hra_linear`. ``x`` is cast once to the matmul dtype; ``v`` and
    ``minus_vc`` given in it cost no cast.
    """
    dtype = matmul_dtype(weight)
    x_in, v, minus_vc = x.to(dtype), v.to(dtype), minus_vc.to(dtype)
    inner_bias = bias if magnitude is None else None  # a magnitude scales W H, not b
    rows = x_in.reshape(-1, x.shape[-1])  # (M, d)
    down = rows @ v  # (M, r)
    if x.requires_grad or not torch.is_grad_enabled():
        x_h = torch.addmm(rows, down, minus_vc.T)  # (M, d): x Hᵀ
        y = F.linear(x_h.view(x.shape), weight, inner_bias)  # (..., d_out)
    else:
        minus_wvc = weight @ minus_vc  # (d_out, r): W H = W + minus_wvc Vᵀ
        y = torch.addmm(F.linear(rows, weight, inner_bias), down, minus_wvc.T)  # (M, d_out)
        y = y.view(*x.shape[:-1], -1)  # (..., d_out)
    if magnitude is not None:
        y = scale_outputs(y, magnitude, bias, channel_dim=-1)  # (..., d_out)
    return y if autocast_enabled(x.device.type) else y.to(x.dtype)


def scale_outputs(
    y: torch.Tensor, magnitude: torch.Tensor, bias: torch.Tensor | None, channel_dim: int
) -> torch.Tensor:
    """m ⊙ y + b along ``channel_dim`` (-1 for a Linear's features, 1 for a conv's channels),
    in ``y``'s dtype: the magnitude scales the bias-free output x (W H)ᵀ, never the bias."""
    shape = [1] * y.dim()
    shape[channel_dim] = -1
    scale = magnitude.to(y.dtype).view(shape)  # (1, ..., d_out, ..., 1)
    if bias is None:
        return y * scale
    return torch.addcmul(bias.to(y.dtype).view(shape), y, scale)


def hra_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    u: torch.Tensor,
    apply_gs: bool = False,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Conv2d with weight W H, where W (out, in, kh, kw) is flattened to (out, in·kh·kw);
    with a ``magnitude`` m (out,), weight diag(m) W H and the bias unscaled.

    U has shape (in·kh·kw, r), PEFT's layout. The adapter path is a conv with the
    r reflection vectors as kernels followed by a 1×1 conv, exactly as LoRA does it
    (see :func:`factored_conv2d`). Dtypes behave as in :func:`hra_linear`.
    """
    v, c = reflection_factors(u, apply_gs)  # (in·kh·kw, r), (r, r)
    with autocast_off(v.device.type):
        minus_vc = v @ -c  # (in·kh·kw, r)
    return factored_conv2d(x, weight, bias, v, minus_vc, stride, padding, dilation, magnitude)


def factored_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    v: torch.Tensor,
    minus_vc: torch.Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] | str = 0,
    dilation: int | tuple[int, int] = 1,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = conv(x, W) + conv(conv(x, Vᵀ), −W V C) given V and −V C (in·kh·kw, r); with a
    ``magnitude`` m (out,), y = m ⊙ (that without b) + b, channel by channel."""
    dtype = matmul_dtype(weight)
    x_in, v, minus_vc = x.to(dtype), v.to(dtype), minus_vc.to(dtype)
    inner_bias = bias if magnitude is None else None  # a magnitude scales W H, not b
    minus_wvc = weight.flatten(1) @ minus_vc  # (out, r)
    kernels = v.T.reshape(-1, *weight.shape[1:])  # (r, in, kh, kw)
    up = minus_wvc.reshape(weight.shape[0], -1, 1, 1)  # (out, r, 1, 1)
    down = F.conv2d(x_in, kernels, None, stride, padding, dilation)  # (B, r, H', W')
    y = F.conv2d(x_in, weight, inner_bias, stride, padding, dilation) + F.conv2d(down, up)
    if magnitude is not None:
        y = scale_outputs(y, magnitude, bias, channel_dim=1)  # (B, out, H', W')
    return y if autocast_enabled(x.device.type) else y.to(x.dtype)  # (B, out, H', W')


def merged_weight(
    weight: torch.Tensor,
    u: torch.Tensor,
    apply_gs: bool = False,
    inverse: bool = False,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """W H (or W Hᵀ = W H⁻¹ with ``inverse=True``), computed in fp32, returned in W's dtype.

    ``weight`` may be a Linear (d_out, d) or Conv2d (out, in, kh, kw) weight. With a
    ``magnitude`` m (d_out,): diag(m) W H, and its inverse diag(1/m) W Hᵀ (which needs
    every m ≠ 0: ``ValueError`` otherwise).
    """
    v, c = reflection_factors(u, apply_gs)  # (d, r), (r, r)
    if inverse:
        c = c.T  # Hᵀ = I − V Cᵀ Vᵀ
    with autocast_off(weight.device.type):
        w = _at_least_fp32(weight.detach()).flatten(1)  # (d_out, d)
        if magnitude is not None and inverse:
            m = _at_least_fp32(magnitude.detach())  # (d_out,)
            if bool((m == 0).any()):
                raise ValueError(
                    "Cannot unmerge: the HRA magnitude has a zero entry, so diag(m) W H lost "
                    "those rows of W."
                )
            w = w / m.unsqueeze(1)  # (d_out, d)
        new_w = w - (w @ v @ c) @ v.T  # (d_out, d)
        if magnitude is not None and not inverse:
            new_w = new_w * _at_least_fp32(magnitude.detach()).unsqueeze(1)  # (d_out, d)
    return new_w.reshape(weight.shape).to(weight.dtype)


def dora_magnitude(weight: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's magnitude vector for diag(m) W H, in fp32: m ⊙ ‖W_row‖₂ (d_out,).

    A row's norm is taken over every input dimension (in·kh·kw for a Conv2d), PEFT's
    convention. H is orthogonal, so ‖(W H)_row‖ = ‖W_row‖ and DoRA's
    m_dora ⊙ (W + B A) / ‖(W + B A)_row‖ with (A, B) = :func:`lora_factors` is
    exactly diag(m) W H.
    """
    with autocast_off(weight.device.type):
        w = _at_least_fp32(weight.detach()).flatten(1)  # (d_out, d)
        return _at_least_fp32(magnitude.detach()) * w.norm(dim=1)  # (d_out,)


def lora_factors(
    weight: torch.Tensor, u: torch.Tensor, apply_gs: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact rank-r LoRA pair (A, B) with W H = W + B A, in fp32.

    A = Vᵀ (r, d) and B = −W V C (d_out, r). For a Conv2d weight, A is returned
    as conv kernels (r, in, kh, kw) and B as a 1×1 conv (out, r, 1, 1), the
    layout diffusers' LoRA loader expects.
    """
    v, c = reflection_factors(u, apply_gs)  # (d, r), (r, r)
    with autocast_off(weight.device.type):
        w = _at_least_fp32(weight.detach()).flatten(1)  # (d_out, d)
        a = v.T.contiguous()  # (r, d)
        b = -(w @ v @ c)  # (d_out, r)
    if weight.dim() == 4:
        return a.reshape(-1, *weight.shape[1:]), b.reshape(weight.shape[0], -1, 1, 1)
    return a, b


def initial_u(
    d: int,
    r: int,
    apply_gs: bool,
    generator: torch.Generator | None = None,
    init: str = "paper",
) -> torch.Tensor:
    """The initialisation of U (d, r), in fp32: the paper's (``init="paper"``) or the same
    directions rescaled (``init="scaled"``).

    Even r without Gram–Schmidt: d × r/2 kaiming-uniform columns (a = √5), each
    repeated twice, so adjacent reflections cancel and H = I exactly. Otherwise
    plain kaiming-uniform over all r columns (H ≠ I at step 0).

    Kaiming-uniform draws each entry from U(−b, b) with b = 1/√fan_in, fan_in the number
    of drawn columns (r/2 when paired, else r), so ``"paper"`` columns have
    ‖u_i‖ ≈ √(d/(3 fan_in)) = √(2d/(3r)) (paired): they grow with the input width d.
    Adam moves every entry of u_i by about lr per step, turning û_i by
    θ ≈ lr √d / ‖u_i‖, and moves an isotropic W by ‖W ΔH‖_F / ‖W‖_F ≈ 2√2 √r θ / √d
    = 2√2 √r lr / ‖u_i‖, which for ``"paper"`` is ≈ 2√3 r lr / √d: wider layers move
    slower at the same learning rate.

    ``"scaled"`` takes the same draw (same directions, same pairing) and sets every
    column to u_i ← √r · u_i / ‖u_i‖, so the estimate becomes 2√2 lr whatever d and r.
    Only the norms differ: û, hence H at step 0, are those of the paper draw, and every
    export reads only û.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}.")
    paired = r % 2 == 0 and not apply_gs
    cols = r // 2 if paired else r
    half = torch.empty(d, cols)  # (d, cols)
    torch.nn.init.kaiming_uniform_(half, a=math.sqrt(5), generator=generator)
    if init == "scaled":
        half = half * (math.sqrt(r) / half.norm(dim=0, keepdim=True))  # (d, cols): ‖u_i‖ = √r
    return torch.repeat_interleave(half, 2, dim=1) if paired else half  # (d, r)
