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
