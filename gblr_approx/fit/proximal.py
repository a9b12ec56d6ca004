"""Proximal gradient on Gaudi parameters (the Gaudi-GBLR formulation, math.md 5).

Parameters: per component ``k`` a width and a location on each side (fractions of ``m`` and
``n``), and full-length factors ``U_k (m, r)``, ``V_k (n, r)`` of which only the parts inside
the intervals matter for the hard matrix. One step:

1. smooth matrix ``W_sigma = sum_k Diag(g_k^out) U_k V_k^T Diag(g_k^in)`` with Gaudi masks of
   straight-through-rounded widths/locations (:func:`~gblr_approx.gaudi.gaudi_mask`);
2. loss ``||W - W_sigma||_F^2 / ||W||_F^2``; Adam step on factors, widths and locations;
3. proximal step of the width penalty ``penalty * sum(widths)``: soft-threshold by
   ``penalty * structure_lr`` and clamp to ``[0, 1]``; locations wrapped mod 1;
4. **exact budget projection**: ``w <- clamp(w - tau, 0, 1)`` with the smallest ``tau >= 0``
   (bisection) for which the hard cost ``sum_k min(r (h_k + w_k), h_k w_k)`` with the true row
   and column lengths ``h_k = round(w_k^out m)``, ``w_k = round(w_k^in n)`` fits the budget;
5. the hard matrix (boxcar masks, factors restricted to the intervals) is evaluated and yielded.

Cost per step ``O(K r m n)`` (the smooth matrix is formed densely), plus ``O(K (m log m + n log
n))`` for the masks.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..formats.gblr import GBLR
from ..gaudi import gaudi_mask, round_ste

__all__ = ["proximal_gradient"]


def _hard_cost(wo: torch.Tensor, wi: torch.Tensor, m: int, n: int, r: int) -> int:
    h = torch.round(wo * m).clamp(0, m)
    w = torch.round(wi * n).clamp(0, n)
    active = (h > 0) & (w > 0)
    c = torch.minimum(r * (h + w), h * w) * active
    return int(c.sum())


def _project_budget(wo: torch.Tensor, wi: torch.Tensor, m: int, n: int, r: int, budget: int):
    """Exact projection by bisection on the common shift ``tau`` (true side lengths)."""
    if _hard_cost(wo, wi, m, n, r) <= budget:
        return wo, wi
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if _hard_cost((wo - mid).clamp(0, 1), (wi - mid).clamp(0, 1), m, n, r) <= budget:
            hi = mid
        else:
            lo = mid
    return (wo - hi).clamp(0, 1), (wi - hi).clamp(0, 1)


def _start_params(start: GBLR, r: int, K: int | None, gen: torch.Generator):
    """Full-length factors and fractional widths/locations from a hard GBLR start."""
    m, n = start.shape
    dt, dev = start.dtype, start.device
    Us, Vs, wo, lo, wi, li = [], [], [], [], [], []
    for k in range(start.num_components):
        h, w = int(start.row_width[k]), int(start.col_width[k])
        if h == 0 or w == 0:
            continue
        Uk, Vk = start.component(k)
        if bool(start.is_dense[k]):
            U0, S, Vh = torch.linalg.svd(start.block(k), full_matrices=False)
            s = S.sqrt()
            Uk, Vk = U0 * s, Vh.T * s
        # split into pieces of rank r (the last one zero-padded): same block, own parameters
        for t0 in range(0, Uk.shape[1], r):
            Up, Vp = Uk[:, t0 : t0 + r], Vk[:, t0 : t0 + r]
            if Up.shape[1] < r:
                Up = torch.cat([Up, Up.new_zeros(h, r - Up.shape[1])], 1)
                Vp = torch.cat([Vp, Vp.new_zeros(w, r - Vp.shape[1])], 1)
            Uf = torch.zeros(m, r, dtype=dt, device=dev)
            Vf = torch.zeros(n, r, dtype=dt, device=dev)
            Uf[start.row_indices(k)] = Up
            Vf[start.col_indices(k)] = Vp
            Us.append(Uf)
            Vs.append(Vf)
            wo.append(h / m)
            lo.append(int(start.row_start[k]) / m)
            wi.append(w / n)
            li.append(int(start.col_start[k]) / n)
    if K is not None:
        Us, Vs, wo, lo, wi, li = Us[:K], Vs[:K], wo[:K], lo[:K], wi[:K], li[:K]
    t = lambda x: torch.tensor(x, dtype=dt, device=dev)  # noqa: E731
    return torch.stack(Us), torch.stack(Vs), t(wo), t(lo), t(wi), t(li)


def _hard(U, V, wo, lo, wi, li, m: int, n: int) -> GBLR:
    h = torch.round(wo * m).long().clamp(0, m)
    w = torch.round(wi * n).long().clamp(0, n)
    r0 = torch.round(lo * m).long() % m
    c0 = torch.round(li * n).long() % n
    keep = ((h > 0) & (w > 0)).nonzero().flatten().tolist()
    factors = []
    for k in keep:
        ri = (int(r0[k]) + torch.arange(int(h[k]), device=U.device)) % m
        ci = (int(c0[k]) + torch.arange(int(w[k]), device=U.device)) % n
        factors.append((U[k][ri].detach().clone(), V[k][ci].detach().clone()))
    return GBLR(
        (m, n), r0[keep], h[keep], c0[keep], w[keep], factors, dtype=U.dtype, device=U.device
    )


def proximal_gradient(
    W: torch.Tensor,
    budget: int,
    start: GBLR,
    *,
    steps: int = 200,
    seed: int = 0,
    rank_per_component: int = 1,
    components: int | None = None,
    lr: float = 5e-3,
    structure_lr: float | None = None,
    sigma: tuple[float, float] | float | None = None,
    penalty: float = 0.0,
    restarts: int = 1,
) -> Iterator[tuple[GBLR, float, float]]:
    """Run proximal gradient from ``start``; yield ``(hard GBLR, rel_error, smooth loss)``.

    Parameters
    ----------
    W : Tensor (m, n)
    budget : int
        MACs; every yielded matrix satisfies ``flops <= budget``.
    start : GBLR
        Initial structure and content (e.g. the best embedded start).
    steps : int
        Gradient steps.
    rank_per_component : int
        Rank ``r`` of every component (start components are truncated / padded to it).
    components : int, optional
        Use at most this many components of the start.
    lr : float
        Adam learning rate of the factors (the loss is relative, so this is scale-free).
    structure_lr : float, optional
        Adam learning rate of widths and locations (default ``10 / min(m, n)``, as in the
        official fitter).
    sigma : float or (start, end) or None
        Gaudi smoothing, annealed linearly from ``start`` to ``end`` (None: no Gaussian).
    penalty : float
        Width penalty (the proximal soft-threshold is ``penalty * structure_lr``).
    restarts : int
        Accepted for API symmetry; one run is made.
    """
    m, n = W.shape
    r = int(rank_per_component)
    gen = torch.Generator().manual_seed(int(seed))
    U, V, wo, lo, wi, li = _start_params(start, r, components, gen)
    for t in (U, V, wo, lo, wi, li):
        t.requires_grad_(True)
    slr = 10.0 / min(m, n) if structure_lr is None else float(structure_lr)
    opt = torch.optim.Adam(
        [
            {"params": [U, V], "lr": lr},
            {"params": [wo, lo, wi, li], "lr": slr, "betas": (0.0, 0.999)},
        ]
    )
    nrm2 = W.pow(2).sum()
    if isinstance(sigma, (tuple, list)):
        s0, s1 = float(sigma[0]), float(sigma[1])
    else:
        s0 = s1 = sigma
    for step in range(int(steps)):
        sig = None if s0 is None else s0 + (s1 - s0) * step / max(steps - 1, 1)
        go = gaudi_mask(round_ste(wo, m), round_ste(lo, m), m, sigma=sig)  # (K, m)
        gi = gaudi_mask(round_ste(wi, n), round_ste(li, n), n, sigma=sig)  # (K, n)
        Uo = U * go.unsqueeze(-1)
        Vi = V * gi.unsqueeze(-1)
        Wh = torch.einsum("kmr,knr->mn", Uo, Vi)
        loss = (W - Wh).pow(2).sum() / nrm2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            thr = penalty * slr
            wo.sub_(thr).clamp_(0, 1)
            wi.sub_(thr).clamp_(0, 1)
            po, pi = _project_budget(wo, wi, m, n, r, budget)
            wo.copy_(po)
            wi.copy_(pi)
            lo.remainder_(1.0)
            li.remainder_(1.0)
            G = _hard(U, V, wo, lo, wi, li, m, n)
            err = float((W - G.to_dense()).norm() / nrm2.sqrt())
        yield G, err, float(loss.detach())
