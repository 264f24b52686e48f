"""Embedding similarities and summary statistics for the subject-driven metrics.

Cosine similarity of embeddings a_i, b_j:  cos(a_i, b_j) = <a_i, b_j> / (||a_i|| ||b_j||).
DINO and CLIP-I average it over every (real reference, generated) pair:

    score = 1 / (N M) * sum_i sum_j cos(real_i, gen_j)

CLIP-T pairs each generated image with its own prompt: score = mean_k cos(img_k, text_k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All cosine similarities between the rows of ``a`` (N, D) and ``b`` (M, D), shape (N, M)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)  # (N, D)
    b = torch.nn.functional.normalize(b.double(), dim=-1)  # (M, D)
    return a @ b.T  # (N, M)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over every pair (i, j): ``1/(N M) sum_ij cos(a_i, b_j)``."""
    return cosine_matrix(a, b).mean().item()


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cos(a_k, b_k) for ``a`` and ``b`` of the same shape (K, D); returns (K,)."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # (K,)


def distinct_pairs(n: int) -> list[tuple[int, int]]:
    """Index pairs (i, j) with i < j among n items: n (n - 1) / 2 unordered pairs."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """Mean and population standard deviation of ``values``, with their count ``n``.

    mean = sum_k x_k / n,  std = sqrt(sum_k (x_k - mean)^2 / n).  Empty input gives NaN.
    """
    n = len(values)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    mean = math.fsum(values) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / n)
    return {"mean": mean, "std": std, "n": n}


def feature_distance(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """LPIPS-style distance of paired images from feature stacks, without learned weights.

    ``xs[l]`` and ``ys[l]`` are layer l's token features (B, T, D) of the two batches. Each
    token's feature vector is unit-normalised (as LPIPS does per pixel), then

        d(x, y) = 1/L sum_l 1/T sum_t || f̂_l,t(x) − f̂_l,t(y) ||²       (each term in [0, 4])

    LPIPS weighs the channels of each layer with linear heads calibrated on human
    judgements; here every channel and layer weighs the same, so it is *not* LPIPS.
    Returns (B,).
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("need the same, non-zero number of layers for both batches")
    per_layer = []
    for x, y in zip(xs, ys, strict=True):
        x = torch.nn.functional.normalize(x.double(), dim=-1)  # (B, T, D)
        y = torch.nn.functional.normalize(y.double(), dim=-1)  # (B, T, D)
        per_layer.append(((x - y) ** 2).sum(dim=-1).mean(dim=-1))  # (B,)
    return torch.stack(per_layer).mean(dim=0)  # (B,)
