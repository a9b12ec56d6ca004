"""Shared linear-algebra helpers: exact and randomized truncated SVD.

All functions keep the input's device and dtype; nothing falls back silently to another
backend or algorithm.
"""

from __future__ import annotations

import torch

from .validation import check_positive_int

__all__ = [
    "svd", "randomized_svd", "truncated_factors", "balanced_factors", "check_sketch_options",
]


def svd(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``W = U diag(S) Vh`` (batched over leading dims), singular values descending.

    Cost: ``O(m n min(m, n))`` per matrix.
    """
    return torch.linalg.svd(W, full_matrices=False)


def check_sketch_options(oversample: object, power_iters: object) -> tuple[int, int]:
    """Validate the randomized range finder's ``oversample`` and ``power_iters`` (ints >= 0).

    A negative ``oversample`` would silently lower the rank of the sketch (``-9`` gave rank 0);
    a negative ``power_iters`` has no meaning. Raises TypeError/ValueError naming the argument.
    """
    return (check_positive_int(oversample, "oversample", minimum=0),
            check_positive_int(power_iters, "power_iters", minimum=0))


def randomized_svd(
    W: torch.Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1).

    A Gaussian range finder with ``rank + oversample`` columns and ``power_iters`` subspace
    (power) iterations, re-orthonormalised by QR at each pass.

    Error: with ``q`` power iterations the expected spectral error is at most
    ``(1 + c) ** (1 / (2q + 1)) * sigma_{rank+1}`` for a modest constant ``c`` depending on the
    oversampling, so it approaches the optimal (Eckart-Young) error as ``q`` grows; for
    matrices with slowly decaying spectra (typical of trained weights) use ``power_iters >= 2``.
    Cost: ``O((2q + 2) m n (rank + oversample))``, versus ``O(m n min(m, n))`` for the exact SVD.

    Returns
    -------
    U : (m, rank), S : (rank,), Vh : (rank, n)

    Raises
    ------
    ValueError
        ``rank < 1``, ``oversample < 0`` or ``power_iters < 0``.
    """
    rank = check_positive_int(rank, "rank")
    oversample, power_iters = check_sketch_options(oversample, power_iters)
    m, n = W.shape
    k = min(rank + oversample, m, n)
    gen = torch.Generator(device=W.device).manual_seed(int(seed))
    omega = torch.randn(n, k, generator=gen, device=W.device, dtype=W.dtype)
    Q, _ = torch.linalg.qr(W @ omega)
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(W.T @ Q)
        Q, _ = torch.linalg.qr(W @ Z)
    B = Q.T @ W
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    return U[:, :rank], S[:rank], Vh[:rank]


def balanced_factors(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``U diag(S) Vh`` into ``(L, R)`` with ``L = U sqrt(S)``, ``R = Vh^T sqrt(S)``.

    Works batched over leading dimensions. Returns ``L (..., m, r)`` and ``R (..., n, r)`` so
    that the product is ``L @ R.mT``.
    """
    s = S.clamp_min(0).sqrt()
    return U * s.unsqueeze(-2), Vh.mT * s.unsqueeze(-2)


def truncated_factors(
    W: torch.Tensor,
    rank: int,
    *,
    method: str = "exact",
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors ``(L, R, S_all)`` of ``W`` with ``W ~ L @ R.T``.

    ``S_all`` holds every singular value computed (all of them for ``method="exact"``).
    ``oversample`` and ``power_iters`` (integers >= 0) are checked for both methods, so a bad
    value is refused even where the exact SVD ignores it.
    """
    check_sketch_options(oversample, power_iters)
    if method == "exact":
        U, S, Vh = svd(W)
        L, R = balanced_factors(U[:, :rank], S[:rank], Vh[:rank])
        return L, R, S
    if method == "randomized":
        U, S, Vh = randomized_svd(
            W, rank, oversample=oversample, power_iters=power_iters, seed=seed
        )
        L, R = balanced_factors(U, S, Vh)
        return L, R, S
    raise ValueError(f"method must be 'exact' or 'randomized'; got {method!r}")
