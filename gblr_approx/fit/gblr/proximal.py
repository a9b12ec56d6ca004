"""Proximal gradient on Gaudi parameters, refining a hard GBLR start (math.md 2, 5).

Parameters: ``K`` components of rank ``r``, each with a width and a location per side
(fractions of ``m`` and ``n``) and full-length factors ``U_k (m, r)``, ``V_k (n, r)`` of which
only the parts inside the intervals enter the hard matrix. They are stored flattened:
``U (m, K r)``, ``V (n, K r)``.

Initialisation reproduces the start exactly (but for dense blocks, cut to the singular
triplets their cost ``h w`` pays for as rank-``r`` pieces, see :meth:`GaudiParams.from_gblr`):
the widths/locations are the start's whole-entry
intervals divided by the side lengths, and the factors are the start's factors inside the
intervals. The *dormant* entries (outside the intervals) are set to their least-squares values
``u_jk = R[j, :] b_k G_kk^{-1}`` (``b_k`` the masked column factor, ``G_kk = b_k^T b_k``), so that
the width gradient at a boundary measures the real first-order gain of growing there.

One step (``t = 0, 1, ...``):

1. masks ``g_k = Gaudi(round_ste(w_k), round_ste(l_k); sigma_t)`` on both sides (batched over
   ``k``, one FFT each side); with ``sigma = None`` they are the exact boxcars of the current
   hard intervals;
2. loss ``||W - (M_out * U)(M_in * V)^T||^2 / ||W||^2`` and its exact gradients in closed form
   (three ``(m, n, K r)`` products), the mask gradients mapped to widths/locations by autograd
   through the Gaudi FFT (math.md 2.5);
3. Adam step (``betas = (0, 0.999)`` as in the official code) on widths and locations with a step
   measured in *entries* (``structure_lr`` entries per step);
4. proximal step of the width penalty ``penalty * sum(widths)``: soft-threshold by
   ``penalty * lr`` and clamp to ``[0, 1]``; locations wrapped mod 1;
5. **exact budget projection**: ``w <- clamp(w - tau, 0, 1)`` with the smallest ``tau >= 0``
   (bisection) for which the hard cost ``sum_k min(r (h_k + w_k), h_k w_k)`` with the true side
   lengths fits the budget;
6. factor update on the *new* hard intervals (so factors never lag the structure): a few
   iterations of batched, Jacobi-preconditioned conjugate gradient on the exact least-squares
   problem for all ``U`` (rows decouple; warm-started), then for all ``V``, then the dormant
   entries' least-squares values. Every ``refit_every`` steps the solve is run longer.
7. the hard matrix is evaluated and yielded.

Cost per step ``O(K r m n)`` for the products plus ``O(cg_iters (m + n) (K r)^2)`` for the
factor update, and ``O(K (m log m + n log n))`` for the masks. There is no Python loop over
components inside a step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from ...formats.gblr import GBLR
from ...gaudi import boxcar, gaudi_mask, round_ste
from ...linalg import svd

__all__ = ["proximal_gradient", "GaudiParams", "hard_cost", "project_budget"]


# ------------------------------------------------------------------------------- cost/budget
def hard_cost(wo: torch.Tensor, wi: torch.Tensor, m: int, n: int, r: int) -> int:
    """MACs of the hard structure of fractional widths ``wo (K,)`` (rows) and ``wi (K,)``.

    ``sum_k min(r (h_k + w_k), h_k w_k)`` with ``h_k = round(wo_k m)``, ``w_k = round(wi_k n)``;
    components with an empty side cost nothing.
    """
    h = torch.round(wo.detach() * m).clamp(0, m)
    w = torch.round(wi.detach() * n).clamp(0, n)
    c = torch.minimum(r * (h + w), h * w) * ((h > 0) & (w > 0))
    return int(c.sum())


def project_budget(
    wo: torch.Tensor, wi: torch.Tensor, m: int, n: int, r: int, budget: int, iters: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact projection of the widths onto the budget: ``clamp(w - tau / N, 0, 1)``.

    The shift ``tau >= 0`` is in *entries* (``N`` = the side length, so both sides of a
    rectangular matrix lose the same number of rows/columns), the smallest one for which the
    budget holds, found by bisection on the hard cost (:func:`hard_cost`, true side lengths,
    so rectangular matrices are handled exactly). Returns new tensors (inputs untouched);
    ``tau = 0`` when the budget already holds. The result always satisfies the budget.
    """
    wo, wi = wo.detach().clamp(0, 1), wi.detach().clamp(0, 1)
    if hard_cost(wo, wi, m, n, r) <= budget:
        return wo, wi
    lo, hi = 0.0, float(max(m, n))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if hard_cost((wo - mid / m).clamp(0, 1), (wi - mid / n).clamp(0, 1), m, n, r) <= budget:
            hi = mid
        else:
            lo = mid
    return (wo - hi / m).clamp(0, 1), (wi - hi / n).clamp(0, 1)


# ------------------------------------------------------------------------------- parameters
class GaudiParams:
    """Flattened Gaudi-GBLR parameters: ``U (m, K r)``, ``V (n, K r)``, widths/locations (K,).

    Built from a hard :class:`~gblr_approx.GBLR` by :meth:`from_gblr` (components split into
    rank-``r`` pieces on the same rectangle, the last one zero-padded; a dense block ``h x w``
    keeps its leading ``floor(h w / min(r (h + w), h w)) r`` singular triplets, the most
    whose pieces cost no more than the block, and ``exact`` is then False); :meth:`to_gblr`
    returns the hard matrix of the current rounded intervals.
    """

    def __init__(self, U, V, wo, lo, wi, li, r: int) -> None:
        self.U, self.V = U, V
        self.wo, self.lo, self.wi, self.li = wo, lo, wi, li
        self.r = int(r)
        self.m, self.n = U.shape[0], V.shape[0]
        #: whether the hard matrix of these parameters is the GBLR they were built from
        #: (:meth:`from_gblr` sets it False when it truncated dense blocks or components)
        self.exact = True

    @property
    def K(self) -> int:  # noqa: N802 - the paper's symbol
        return int(self.wo.numel())

    @classmethod
    def from_gblr(cls, G: GBLR, r: int = 1, components: int | None = None) -> GaudiParams:
        m, n = G.shape
        dt, dev = G.dtype, G.device
        Us, Vs, wo, lo, wi, li = [], [], [], [], [], []
        exact = True
        for k in range(G.num_components):
            h, w = int(G.row_width[k]), int(G.col_width[k])
            if h == 0 or w == 0:
                continue
            if bool(G.is_dense[k]):
                U0, S, Vh = svd(G.block(k))
                keep = int((S > S[0] * 1e-12).sum()) if S.numel() else 0
                # rank-r pieces on the block's rectangle cost min(r (h + w), h w) each: keep
                # as many singular triplets as fit the dense block's own cost h w (a full
                # split would cost more, and the budget projection would then shrink every
                # width, so the start would be lost)
                pieces = max(1, (h * w) // min(r * (h + w), h * w))
                if keep > pieces * r:
                    keep, exact = pieces * r, False
                s = S[: max(keep, 1)].sqrt()
                Uk, Vk = U0[:, : s.numel()] * s, Vh[: s.numel()].T * s
            else:
                Uk, Vk = G.component(k)
            ri, ci = G.row_indices(k), G.col_indices(k)
            for t0 in range(0, Uk.shape[1], r):
                Up, Vp = Uk[:, t0 : t0 + r], Vk[:, t0 : t0 + r]
                if Up.shape[1] < r:
                    Up = torch.cat([Up, Up.new_zeros(h, r - Up.shape[1])], 1)
                    Vp = torch.cat([Vp, Vp.new_zeros(w, r - Vp.shape[1])], 1)
                Uf = torch.zeros(m, r, dtype=dt, device=dev)
                Vf = torch.zeros(n, r, dtype=dt, device=dev)
                Uf[ri] = Up
                Vf[ci] = Vp
                Us.append(Uf)
                Vs.append(Vf)
                wo.append(h / m)
                lo.append(int(G.row_start[k]) / m)
                wi.append(w / n)
                li.append(int(G.col_start[k]) / n)
        if components is not None:
            exact = exact and components >= len(Us)
            Us, Vs = Us[:components], Vs[:components]
            wo, lo, wi, li = wo[:components], lo[:components], wi[:components], li[:components]
        if not Us:
            raise ValueError("the start has no non-empty component to refine")

        def t(x):
            return torch.tensor(x, dtype=dt, device=dev)

        out = cls(torch.cat(Us, 1), torch.cat(Vs, 1), t(wo), t(lo), t(wi), t(li), r)
        out.exact = exact
        return out

    def integer_intervals(self):
        """``(row_start, row_width, col_start, col_width)`` LongTensors (K,) of the rounding."""
        m, n = self.m, self.n
        h = torch.round(self.wo.detach() * m).long().clamp(0, m)
        w = torch.round(self.wi.detach() * n).long().clamp(0, n)
        r0 = torch.round(self.lo.detach() * m).long() % m
        c0 = torch.round(self.li.detach() * n).long() % n
        return r0, h, c0, w

    def hard_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Boxcar masks ``(m, K r)`` and ``(n, K r)`` of the rounded intervals."""
        r0, h, c0, w = self.integer_intervals()
        dt = self.U.dtype
        Mo = boxcar(h, r0, self.m, dtype=dt).to(self.U.device).T
        Mi = boxcar(w, c0, self.n, dtype=dt).to(self.U.device).T
        return Mo.repeat_interleave(self.r, 1), Mi.repeat_interleave(self.r, 1)

    def cost(self) -> int:
        return hard_cost(self.wo, self.wi, self.m, self.n, self.r)

    def num_components(self) -> int:
        """Components of the hard matrix (those whose rounded intervals are not empty)."""
        _, h, _, w = self.integer_intervals()
        return int(((h > 0) & (w > 0)).sum())

    def snapshot(self) -> Callable[[], GBLR]:
        """A copy of the current iterate that builds its hard GBLR when called (building it
        loops over the components, so it is done only for the iterate finally kept)."""
        q = GaudiParams(
            self.U.detach().clone(),
            self.V.detach().clone(),
            *(t.detach().clone() for t in (self.wo, self.lo, self.wi, self.li)),
            r=self.r,
        )
        return q.to_gblr

    def to_gblr(self) -> GBLR:
        """The hard matrix: factors restricted to the rounded intervals (empty ones dropped)."""
        m, n, r = self.m, self.n, self.r
        r0, h, c0, w = self.integer_intervals()
        keep = ((h > 0) & (w > 0)).nonzero().flatten().tolist()
        U = self.U.detach().reshape(m, -1, r)
        V = self.V.detach().reshape(n, -1, r)
        dev = U.device
        factors = []
        for k in keep:
            ri = (int(r0[k]) + torch.arange(int(h[k]), device=dev)) % m
            ci = (int(c0[k]) + torch.arange(int(w[k]), device=dev)) % n
            factors.append((U[ri, k].clone(), V[ci, k].clone()))
        return GBLR((m, n), r0[keep], h[keep], c0[keep], w[keep], factors, dtype=U.dtype,
                    device=dev)


# ------------------------------------------------------------------------------- factor solves
def cg_factor_solve(
    W: torch.Tensor, X: torch.Tensor, Mx: torch.Tensor, B: torch.Tensor, iters: int
) -> torch.Tensor:
    """Least-squares ``min_X ||W - (Mx * X) B^T||_F`` over the entries where ``Mx = 1``.

    Rows decouple (normal equations ``Mx_i * ((Mx_i * x_i) G) = Mx_i * (W_i B)``, ``G = B^T B``),
    so all rows run one batched, Jacobi-preconditioned conjugate gradient, warm-started at
    ``X``. ``W (a, b)``, ``X, Mx (a, P)``, ``B (b, P)``. Cost ``O(a b P + iters a P^2)``.
    Entries where ``Mx = 0`` are returned unchanged.
    """
    a, b, P = X.shape[0], B.shape[0], B.shape[1]
    # the normal operator X -> (X G) * Mx either through the Gram G = B^T B (b P^2 once, then
    # a P^2 per iteration) or through B twice (2 a b P per iteration): the cheaper one
    use_gram = b * P * P + iters * a * P * P <= iters * 2 * a * b * P + a * b * P
    if use_gram:
        G = B.T @ B
        dg = torch.diagonal(G)

        def normal(Y: torch.Tensor) -> torch.Tensor:
            return (Y @ G) * Mx
    else:
        dg = B.pow(2).sum(0)

        def normal(Y: torch.Tensor) -> torch.Tensor:
            return ((Y @ B.T) @ B) * Mx
    d = dg.clamp_min(1e-30 * float(dg.max().clamp_min(1e-300)))
    Xa = X * Mx
    R = (W @ B) * Mx - normal(Xa)
    Z = R / d
    Pp = Z
    rz = (R * Z).sum(1, keepdim=True)
    tiny = torch.finfo(X.dtype).tiny
    for _ in range(int(iters)):
        AP = normal(Pp)
        den = (Pp * AP).sum(1, keepdim=True)
        a = torch.where(den > tiny, rz / den.clamp_min(tiny), torch.zeros_like(den))
        Xa = Xa + a * Pp
        R = R - a * AP
        Z = R / d
        rz2 = (R * Z).sum(1, keepdim=True)
        beta = torch.where(rz > tiny, rz2 / rz.clamp_min(tiny), torch.zeros_like(rz))
        Pp = Z + beta * Pp
        rz = rz2
    return torch.where(Mx > 0, Xa, X)


def dormant_fill(
    R: torch.Tensor,
    X: torch.Tensor,
    Mx: torch.Tensor,
    B: torch.Tensor,
    r: int,
    Q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Least-squares values of the entries outside the intervals (``Mx = 0``).

    For a row ``j`` outside component ``k``'s interval, ``x_jk = R[j, :] b_k G_kk^{-1}`` with the
    residual ``R = W - A B^T`` (which does not contain component ``k`` at row ``j``) and the
    ``(r, r)`` Gram ``G_kk`` of the masked factor ``b_k``: the factor the row would get if the
    interval grew to include it. ``O(a b P)`` (one product) plus ``K`` batched ``r x r`` solves.
    """
    a, P = X.shape
    K = P // r
    Q = (R @ B if Q is None else Q).reshape(a, K, r)
    Bk = B.reshape(B.shape[0], K, r)
    Gkk = torch.einsum("bkr,bks->krs", Bk, Bk)
    scale = torch.diagonal(Gkk, dim1=1, dim2=2).amax(1)
    live = scale > torch.finfo(X.dtype).tiny
    reg = torch.where(live, 1e-10 * scale, torch.ones_like(scale))
    if r == 1:
        Y = (Q[..., 0] / (Gkk[:, 0, 0] + reg)).reshape(a, P)
    else:
        Gkk = Gkk + reg[:, None, None] * torch.eye(r, dtype=X.dtype, device=X.device)
        Y = torch.linalg.solve(Gkk, Q.permute(1, 2, 0)).permute(2, 0, 1).reshape(a, P)
    Y = torch.where(live.repeat_interleave(r)[None, :], Y, torch.zeros_like(Y))
    return torch.where(Mx > 0, X, Y)


def refit_factors(
    W: torch.Tensor, p: GaudiParams, cg_iters: int, sides: str = "uv"
) -> dict[str, torch.Tensor]:
    """Joint least-squares update of all factors on the current hard intervals, in place.

    ``U`` given ``V`` (CG), then ``V`` given ``U`` (CG) (``sides`` selects which), then the
    dormant entries of both. Returns the state of the new iterate: hard masks ``Mo, Mi``,
    masked factors ``A = Mo * U``, ``B = Mi * V``, residual ``R = W - A B^T`` and the products
    ``QU = R B``, ``QV = R^T A`` (which are also, up to ``-2 / ||W||^2``, the gradients of the
    loss in ``A`` and ``B``).
    """
    Mo, Mi = p.hard_masks()
    if "u" in sides:
        p.U = cg_factor_solve(W, p.U, Mo, Mi * p.V, cg_iters)
    A = Mo * p.U
    if "v" in sides:
        p.V = cg_factor_solve(W.T, p.V, Mi, A, cg_iters)
    B = Mi * p.V
    R = W - A @ B.T
    QU, QV = R @ B, R.T @ A
    p.U = dormant_fill(R, p.U, Mo, B, p.r, QU)
    p.V = dormant_fill(R.T, p.V, Mi, A, p.r, QV)
    return {"Mo": Mo, "Mi": Mi, "A": A, "B": B, "R": R, "QU": QU, "QV": QV}


# ------------------------------------------------------------------------------- the method
def _quad(X: torch.Tensor, B: torch.Tensor, r: int) -> torch.Tensor:
    """``x_jk G_kk x_jk^T`` for every row ``j`` and component ``k`` (``G_kk`` = Gram of ``B``'s
    ``k``-th ``r`` columns): ``(a, K)``."""
    a, P = X.shape
    K = P // r
    if r == 1:
        return X.pow(2) * B.pow(2).sum(0)
    Bk = B.reshape(B.shape[0], K, r)
    Gkk = torch.einsum("bkr,bks->krs", Bk, Bk)
    Xk = X.reshape(a, K, r)
    return torch.einsum("akr,krs,aks->ak", Xk, Gkk, Xk)


def _sigma_at(sigma, step: int, steps: int) -> float | None:
    if sigma is None:
        return None
    if isinstance(sigma, (tuple, list)):
        s0, s1 = float(sigma[0]), float(sigma[1])
        frac = step / max(steps - 1, 1)
        # geometric interpolation: sigma spans decades (1 ... 100)
        return float(math.exp(math.log(s0) + (math.log(s1) - math.log(s0)) * frac))
    return float(sigma)


def proximal_gradient(
    W: torch.Tensor,
    budget: int,
    start: GBLR,
    *,
    steps: int = 40,
    seed: int = 0,
    rank_per_component: int = 1,
    components: int | None = None,
    structure_lr: float = 0.3,
    sigma: tuple[float, float] | float | str | None = "auto",
    penalty: float = 0.0,
    cg_iters: int = 2,
    refit_every: int = 10,
    refit_iters: int = 8,
    lr: float | None = None,
    restarts: int = 1,
    gradient: str = "midpoint",
    best: float = math.inf,
) -> Iterator[tuple[GBLR | Callable[[], GBLR] | None, float, float, int, int]]:
    """Proximal gradient from ``start``; yield ``(G, rel_error, loss, flops, components)``
    per step (``components``: of the hard iterate).

    The first yield is the start itself (step 0 reproduces it exactly), unless the start's
    dense blocks or ``rank_per_component > 1`` make its Gaudi parameters differ from it (see
    :meth:`GaudiParams.from_gblr`); then it is their hard matrix, with its own error and
    cost. Afterwards ``G`` is
    ``None`` unless the iterate's hard error beats ``best`` and every earlier iterate; then it
    is a snapshot, a zero-argument callable returning the hard :class:`GBLR` (so the caller
    materialises only the iterate it keeps).

    Parameters
    ----------
    W : Tensor (m, n)
    budget : int
        MACs; every yielded iterate satisfies ``flops <= budget`` (exact projection).
    start : GBLR
        Initial hard matrix (e.g. the interval-ALS result); must fit the budget.
    steps : int
        Gradient steps.
    seed : int
        Unused (the method is deterministic); kept for a uniform signature.
    rank_per_component : int
        Rank ``r`` of every component (start components are split / zero-padded to it).
    components : int, optional
        Use at most this many components of the start.
    structure_lr : float
        Adam step of widths and locations in *entries* per step (default 0.3: a boundary moves
        after two consistent steps; the STE rounding hides smaller moves).
    sigma : "auto", None, float or (start, end)
        Gaudi smoothing of the masks through which the structure gradient is taken; a pair
        is interpolated geometrically (a homotopy). ``"auto"`` (default): ``N / (2 pi)`` per
        side, a Gaussian blur of one entry, which localises ``d g / d w`` at the edges (the
        undamped Dirichlet derivative has slowly decaying side lobes). ``None``: exact
        boxcars. With ``gradient="midpoint"`` the loss is always that of the hard matrix.
    penalty : float
        Width penalty ``lambda`` of ``lambda * sum(widths)`` in units of the relative loss per
        unit width; its prox is the soft-threshold by ``penalty * step``.
    cg_iters, refit_every, refit_iters : int
        Conjugate-gradient iterations of the per-step factor update, and a longer solve
        (``refit_iters``) every ``refit_every`` steps.
    gradient : {"midpoint", "gaudi"}
        Mask sensitivities fed to the Gaudi chain rule: ``"gaudi"`` is the plain derivative
        ``d loss / d g`` at the current masks; ``"midpoint"`` (default) the derivative at
        ``g = 1/2`` of every entry, i.e. the exact change of the hard loss when the entry is
        switched on/off. Composed with ``d g / d w`` (a half-sample spike at each edge,
        math.md 2.5) it gives the centred difference of the hard loss in the width and
        location, including the value of the edge rows, which the plain derivative misses.
    lr, restarts :
        Accepted for backward compatibility (factors are solved exactly, not stepped).
    best : float
        Error to beat before hard matrices are materialised.
    """
    del seed, lr, restarts
    if not (
        sigma is None
        or sigma == "auto"
        or (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0)
        or (
            isinstance(sigma, (tuple, list))
            and len(sigma) == 2
            and all(isinstance(x, (int, float)) and x > 0 for x in sigma)
        )
    ):
        raise ValueError(f"sigma must be 'auto', None, a positive float or a pair; got {sigma!r}")
    if gradient not in ("midpoint", "gaudi"):
        raise ValueError(f"gradient must be 'midpoint' or 'gaudi'; got {gradient!r}")
    m, n = W.shape
    r = int(rank_per_component)
    p = GaudiParams.from_gblr(start, r, components)
    if p.cost() > budget:  # (rank_per_component > 1 pads rank-1 pieces to rank r)
        wo, wi = project_budget(p.wo, p.wi, m, n, r, budget)
        p.wo, p.wi = wo, wi
        p.exact = False
    nrm2 = W.pow(2).sum()
    nrm = float(nrm2.sqrt()) or 1.0
    # step 0: the start, exactly, when the parameters represent it within the budget; else
    # their own hard matrix (dense blocks cut to what their cost holds, or widths projected)
    st = refit_factors(W, p, 0, sides="")
    err0 = float(st["R"].norm()) / nrm
    best = min(best, err0)
    if p.exact:
        yield start, err0, err0**2, start.flops, start.num_components
    else:
        yield p.to_gblr(), err0, err0**2, p.cost(), p.num_components()

    struct = [p.wo, p.lo, p.wi, p.li]
    for t in struct:
        t.requires_grad_(True)
    # Structure step: the gradient scaled by one running RMS per side (not per coordinate as
    # Adam does: that moves every width at the same speed whatever its gain, and the budget
    # projection then shrinks them at random), measured in entries per step, with a
    # backtracking safeguard: a step whose hard error (after the factor update) is worse than
    # the current one is undone and the step size halved; accepted steps enlarge it.
    rms = [0.0, 0.0]
    beta2 = 0.9
    eta = float(structure_lr)
    eta_min = 1e-3 * max(eta, 1e-12)
    cur = err0
    for step in range(int(steps)):
        if sigma == "auto":
            sig, sig_o, sig_i = 1.0, m / (2 * math.pi), n / (2 * math.pi)
        else:
            sig = sig_o = sig_i = _sigma_at(sigma, step, steps)
        go = gaudi_mask(round_ste(p.wo, m), round_ste(p.lo, m), m, sigma=sig_o)  # (K, m)
        gi = gaudi_mask(round_ste(p.wi, n), round_ste(p.li, n), n, sigma=sig_i)  # (K, n)
        with torch.no_grad():
            if gradient == "midpoint" or sig is None:
                # the loss is that of the hard matrix: its gradients are already known
                So, Si, B, A = st["Mo"], st["Mi"], st["B"], st["A"]
                loss = cur**2
                gA = st["QU"] * (-2.0 / nrm2)
                gB = st["QV"] * (-2.0 / nrm2)
            else:  # plain Gaudi gradient of the smooth matrix
                So = go.detach().T.repeat_interleave(r, 1)
                Si = gi.detach().T.repeat_interleave(r, 1)
                A, B = So * p.U, Si * p.V
                E = A @ B.T - W
                loss = float(E.pow(2).sum() / nrm2)
                gA = (E @ B) * (2.0 / nrm2)
                gB = (E.T @ A) * (2.0 / nrm2)
            d_go = (gA * p.U).reshape(m, -1, r).sum(-1).T
            d_gi = (gB * p.V).reshape(n, -1, r).sum(-1).T
            if gradient == "midpoint":
                # d loss / d g at g = 1/2 of each entry (the exact secant of switching the entry
                # on/off): adds (1 - 2 g) u G_kk u. At least-squares factors the plain
                # derivative vanishes inside the intervals; the secant keeps the value of rows.
                d_go = d_go + (1 - 2 * So[:, ::r].T) * _quad(p.U, B, r).T / nrm2
                d_gi = d_gi + (1 - 2 * Si[:, ::r].T) * _quad(p.V, A, r).T / nrm2
        for t in struct:
            t.grad = None
        torch.autograd.backward([go, gi], [d_go, d_gi])
        with torch.no_grad():
            before = p.integer_intervals()
            moved = False
            if eta > 0:
                for side, (wt, lt, N) in enumerate(((p.wo, p.lo, m), (p.wi, p.li, n))):
                    gw, gl = wt.grad, lt.grad
                    ms = float(torch.cat([gw, gl]).pow(2).mean())
                    rms[side] = beta2 * rms[side] + (1 - beta2) * ms
                    denom = math.sqrt(rms[side] / (1 - beta2 ** (step + 1))) + 1e-300
                    scale = (eta / N) / denom
                    wt.sub_(scale * gw)
                    lt.sub_(scale * gl)
                if penalty:  # prox of penalty * sum(widths): soft-threshold (widths >= 0)
                    p.wo.sub_(penalty * eta / m)
                    p.wi.sub_(penalty * eta / n)
                p.wo.clamp_(0, 1)
                p.wi.clamp_(0, 1)
                wo, wi = project_budget(p.wo, p.wi, m, n, r, budget)
                p.wo.copy_(wo)
                p.wi.copy_(wi)
                p.lo.remainder_(1.0)
                p.li.remainder_(1.0)
                after = p.integer_intervals()
                moved = any(not torch.equal(x, y) for x, y in zip(before, after, strict=True))
            if moved:
                # safeguard: the moved structure with the current factors (new rows carry
                # their least-squares dormant values) must not be worse than the current
                # iterate; otherwise undo it (re-centred on the old whole-entry intervals, away
                # from the rounding edge) and halve the step
                Mo, Mi = p.hard_masks()
                trial = float((W - (Mo * p.U) @ (Mi * p.V).T).norm()) / nrm
                if trial > cur:
                    r0, h, c0, w = before
                    for t, v in zip(struct, (h / m, r0 / m, w / n, c0 / n), strict=True):
                        t.copy_(v.to(t.dtype))
                    eta = max(0.5 * eta, eta_min)
                    moved = False
                else:
                    eta = min(2.0 * eta, 4.0 * float(structure_lr))
            long = (step + 1) % max(int(refit_every), 1) == 0
            sides = "uv" if (long or moved) else ("u" if step % 2 == 0 else "v")
            st = refit_factors(W, p, refit_iters if long else cg_iters, sides)
            err = float(st["R"].norm()) / nrm
            cur = err
        G = None
        if err < best:
            best = err
            G = p.snapshot()
        yield G, err, loss, p.cost(), p.num_components()
