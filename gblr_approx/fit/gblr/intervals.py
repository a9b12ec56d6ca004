"""Interval alternating least squares: exact structure and content updates, one component at a time.

This is the discrete counterpart of the proximal-gradient fit on Gaudi parameters. The
penalised objective is

    ||W - sum_k P_k||_F^2 + lam * sum_k r_k (h_k + w_k),

where ``P_k = Diag(b_k^out) U_k V_k^T Diag(b_k^in)`` has boxcar masks on cyclic intervals
(math.md 1.4) and ``lam`` is the price of one MAC (the width penalty of math.md 5.1).

For one component, with the others fixed and its column interval and ``V_k`` fixed, the
objective separates over rows: keeping row ``i`` gains ``g_i = q_i (V^T V)^{-1} q_i^T`` with
``q_i = R_k[i, I^in] V`` (``R_k`` the residual with the component's own part added back) and
costs ``lam * r_k``. The best row interval is therefore the maximum-sum *cyclic* subarray of
``g_i - lam r_k`` (prefix sums, ``O(m)``), and the best ``U_k`` on it is the least-squares
solution ``Q (V^T V)^{-1}``. The same holds for the columns with ``U_k`` fixed. Each half
step is an exact minimisation, so the penalised objective never increases: widths shrink
(soft-thresholding at ``lam``), grow, or move (the interval may jump), and a component whose
best interval is empty is removed.

The price ``lam`` is adjusted between sweeps so that the cost approaches the budget from
below (the analogue of the exact budget projection); only iterates with cost within the
budget are reported.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ...formats.gblr import GBLR
from ...linalg import choose_svd_method, frob2, svd, top_svd

__all__ = ["IntervalComponent", "IntervalModel", "best_cyclic_interval", "interval_stage"]


def best_cyclic_interval(
    a: torch.Tensor | np.ndarray, min_width: int = 1
) -> tuple[int, int, float]:
    """Cyclic interval maximising ``sum(a[I])``: returns ``(start, width, value)``.

    The empty interval (value 0) is returned when every interval has a negative sum.
    ``O(N)`` with prefix sums: the best non-wrapping interval is ``max_j (S_j - min_{i<=j}
    S_i)``; a wrapping one is the complement of the minimum-sum interval. Runs in NumPy
    (float64): the vectors are short and this is called once per component side per sweep.
    With ``min_width > 1`` only intervals of at least that many entries (or the empty one)
    compete (clipped to ``N``; :func:`_best_wide_interval`, also ``O(N)``).
    """
    x = a.detach().double().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, float)
    N = x.shape[0]
    if min_width > 1:
        return _best_wide_interval(x, min(int(min_width), N))
    S = np.empty(N + 1)
    S[0] = 0.0
    np.cumsum(x, out=S[1:])
    cmin = np.minimum.accumulate(S)
    d = S - cmin
    j = int(np.argmax(d))
    best = float(d[j])
    i = int(np.argmin(S[: j + 1]))
    start, width = i, j - i
    total = float(S[-1])
    cmax = np.maximum.accumulate(S)
    e = S - cmax
    j2 = int(np.argmin(e))
    worst = float(e[j2])
    i2 = int(np.argmax(S[: j2 + 1]))
    if total - worst > best and j2 - i2 < N:
        # complement of [i2, j2): starts at j2 and wraps around to i2
        return j2 % N, N - (j2 - i2), total - worst
    if best <= 0.0:
        return 0, 0, 0.0
    return start, width, best


def _window_min(x: np.ndarray, k: int) -> np.ndarray:
    """``out[t] = min(x[t : t + k])`` for ``t`` in ``[0, len(x) - k]``, in ``O(len(x))``
    (van Herk / Gil-Werman: prefix minima and suffix minima within blocks of ``k``)."""
    L = x.shape[0]
    nb = -(-L // k)
    pad = np.full(nb * k, np.inf)
    pad[:L] = x
    blocks = pad.reshape(nb, k)
    pre = np.minimum.accumulate(blocks, axis=1).ravel()
    suf = np.minimum.accumulate(blocks[:, ::-1], axis=1)[:, ::-1].ravel()
    t = np.arange(L - k + 1)
    return np.minimum(suf[t], pre[t + k - 1])


def _best_wide_interval(x: np.ndarray, L: int) -> tuple[int, int, float]:
    """Best cyclic interval of ``x`` (length ``N``) with ``L <= width <= N``, or the empty one.

    On the doubled prefix sums ``S`` (length ``2N + 1``) an interval is ``[i, j)`` with start
    ``i < N`` and ``L <= j - i <= N``; for each end ``j`` the best start minimises ``S_i``
    over the window ``[j - N, j - L]`` (a sliding minimum).
    """
    N = x.shape[0]
    S = np.zeros(2 * N + 1)
    np.cumsum(np.concatenate([x, x]), out=S[1:])
    starts = np.full(2 * N, np.inf)
    starts[:N] = S[:N]  # only starts i < N; the rest never win a window
    K = N - L + 1  # window of starts for one end: i in [j - N, j - L]
    padded = np.concatenate([np.full(K - 1, np.inf), starts])
    mins = _window_min(padded, K)  # mins[t] = min(starts[t - K + 1 : t + 1])
    ends = np.arange(L, 2 * N)
    vals = S[ends] - mins[ends - L]
    k = int(np.argmax(vals))
    best = float(vals[k])
    if not np.isfinite(best) or best <= 0.0:
        return 0, 0, 0.0
    j = int(ends[k])
    lo, hi = max(0, j - N), min(j - L, N - 1)
    i = lo + int(np.argmin(S[lo : hi + 1]))
    return i, j - i, best


@dataclass
class IntervalComponent:
    """One component: intervals (start, width in entries) and factors on them."""

    r0: int
    h: int
    c0: int
    w: int
    U: torch.Tensor  # (h, r)
    V: torch.Tensor  # (w, r)

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def cost(self) -> int:
        if self.h == 0 or self.w == 0:
            return 0
        return min(self.rank * (self.h + self.w), self.h * self.w)


def _col_slices(c0: int, w: int, n: int) -> list[tuple[int, int, int]]:
    if c0 + w <= n:
        return [(c0, c0 + w, 0)]
    return [(c0, n, 0), (0, c0 + w - n, n - c0)]


class IntervalModel:
    """Components with cyclic intervals, fitted by interval ALS (see module docstring).

    Parameters
    ----------
    W : Tensor (m, n)
    comps : list of IntervalComponent
        Initial components (their residual is computed here).
    min_width : int
        Smallest row and column width (entries, clipped to ``m`` and ``n``) an update may give
        a component; an update that cannot afford it removes the component. 1 = no limit.
    """

    def __init__(
        self,
        W: torch.Tensor,
        comps: list[IntervalComponent],
        *,
        own: bool = False,
        min_width: int = 1,
    ) -> None:
        self.W = W
        self.m, self.n = W.shape
        self.min_width = int(min_width)
        self.comps = [c for c in comps if c.h > 0 and c.w > 0 and c.rank > 0]
        # large layers: float64 sums without float64 copies (linalg.frob2)
        self._big = W.numel() >= _threshold()
        self.norm2 = (frob2(W) if self._big else float(W.double().pow(2).sum())) or 1.0
        # own=True: W is a scratch copy that becomes the residual (no second m x n copy)
        self.R = W if own else W.clone()
        self.budget: int | None = None
        self._cost = sum(c.cost() for c in self.comps)
        for c in self.comps:
            self._add(c, -1.0)

    # --------------------------------------------------------------- helpers
    def _add(self, c: IntervalComponent, alpha: float) -> None:
        """``R[rect] += alpha * U V^T`` in place (no temporary block)."""
        for a, b, oa in _col_slices(c.r0, c.h, self.m):
            for p, q, op in _col_slices(c.c0, c.w, self.n):
                self.R[a:b, p:q].addmm_(c.U[oa : oa + b - a], c.V[op : op + q - p].T, alpha=alpha)

    def _rows_times(self, c0: int, w: int, V: torch.Tensor) -> torch.Tensor:
        """``R[:, I] @ V`` for the cyclic column interval ``I`` (m, r)."""
        out = None
        for p, q, op in _col_slices(c0, w, self.n):
            t = self.R[:, p:q] @ V[op : op + q - p]
            out = t if out is None else out + t
        return out

    def _cols_times(self, r0: int, h: int, U: torch.Tensor) -> torch.Tensor:
        """``R[I, :]^T @ U`` for the cyclic row interval ``I`` (n, r)."""
        out = None
        for a, b, oa in _col_slices(r0, h, self.m):
            t = self.R[a:b].T @ U[oa : oa + b - a]
            out = t if out is None else out + t
        return out

    @staticmethod
    def _gains(Q: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-index gains ``q G^{-1} q^T`` and the least-squares factor ``Q G^{-1}``."""
        if G.shape[0] == 1:
            g = float(G) if float(G) > 0 else 0.0
            if g == 0.0:
                return torch.zeros(Q.shape[0], dtype=Q.dtype, device=Q.device), Q * 0
            X = Q / g
            return (Q * X).sum(1), X
        X = torch.linalg.solve(
            G + 1e-12 * torch.eye(G.shape[0], dtype=G.dtype, device=G.device), Q.T
        ).T
        return (Q * X).sum(1), X

    @staticmethod
    def _take(X: torch.Tensor, start: int, width: int) -> torch.Tensor:
        N = X.shape[0]
        if start + width <= N:
            return X[start : start + width]
        return torch.cat([X[start:], X[: start + width - N]], 0)

    # --------------------------------------------------------------- updates
    @staticmethod
    def _interval_within(
        g: torch.Tensor, price: float, max_width: int, min_width: int = 1
    ) -> tuple[int, int]:
        """Best cyclic interval of ``g - price`` of at least ``min_width`` entries, with the
        price raised (bisection) until the interval has at most ``max_width`` entries."""
        min_width = min(min_width, g.shape[0])
        if max_width <= 0 or max_width < min_width:
            return 0, 0
        g = g.detach().double().cpu().numpy()
        s, w, _ = best_cyclic_interval(g - price, min_width)
        if w <= max_width:
            return s, w
        lo, hi = price, max(price, 1e-300) * 2.0
        top = float(g.max())
        while True:
            s, w, _ = best_cyclic_interval(g - hi, min_width)
            if w <= max_width or hi > top:
                break
            lo, hi = hi, hi * 2.0
        best = (s, w) if w <= max_width else (0, 0)
        for _ in range(30):
            mid = 0.5 * (lo + hi)
            s, w, _ = best_cyclic_interval(g - mid, min_width)
            if w <= max_width:
                best, hi = (s, w), mid
            else:
                lo = mid
            if hi - lo <= 1e-9 * hi:
                break
        return best

    def update(self, c: IntervalComponent, lam: float) -> None:
        """Exact update of one component's row interval + U, then column interval + V.

        With ``self.budget`` set, each interval is chosen so that the total cost stays within
        it (the price is raised for this component by bisection when needed).
        """
        r = c.rank
        self._cost -= c.cost()
        self._add(c, 1.0)
        room = math.inf if self.budget is None else (self.budget - self._cost)
        Q = self._rows_times(c.c0, c.w, c.V)
        g, X = self._gains(Q, c.V.T @ c.V)
        max_h = self.m if room == math.inf else min(self.m, int(room // r) - c.w)
        s, h = self._interval_within(g, lam * r, max_h, self.min_width)
        if h == 0:
            c.h = 0
            return
        c.r0, c.h = s, h
        c.U = self._take(X, s, h).contiguous()
        Q2 = self._cols_times(c.r0, c.h, c.U)
        g2, X2 = self._gains(Q2, c.U.T @ c.U)
        max_w = self.n if room == math.inf else min(self.n, int(room // r) - c.h)
        s2, w = self._interval_within(g2, lam * r, max_w, self.min_width)
        if w == 0:
            c.w = 0
            return
        c.c0, c.w = s2, w
        c.V = self._take(X2, s2, w).contiguous()
        self._add(c, -1.0)
        self._cost += c.cost()

    def spawn(
        self, lam: float, gen: torch.Generator, count: int = 16, splits: tuple[int, ...] = (2, 4, 8)
    ) -> int:
        """Add up to ``count`` rank-1 components where the residual has the most energy per MAC.

        Candidates are the blocks of ``d x d`` grids (``d`` in ``splits``) at a random cyclic
        offset; each is scored by ``sigma_1^2 / (h + w)`` of the residual on it (four power
        iterations), and the best ones whose score exceeds the price ``lam`` enter with their
        least-squares factors. The following sweeps resize or remove them. Returns the number
        of components added.
        """
        m, n = self.m, self.n
        cands: list[tuple[float, int, int, int, int, torch.Tensor, torch.Tensor]] = []
        for d in splits:
            h, w = m // d, n // d
            if h < 1 or w < 1:
                continue
            ro = int(torch.randint(0, h, (1,), generator=gen))
            co = int(torch.randint(0, w, (1,), generator=gen))
            Rs = torch.roll(self.R, shifts=(-ro, -co), dims=(0, 1))[: d * h, : d * w]
            Bk = Rs.reshape(d, h, d, w).permute(0, 2, 1, 3).reshape(d * d, h, w)
            v = torch.randn(d * d, w, 1, generator=gen, dtype=self.R.dtype).to(self.R.device)
            for _ in range(4):
                u = Bk @ v
                v = Bk.mT @ u
                v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
            u = Bk @ v  # (d*d, h, 1): least-squares U for this unit v
            score = u.pow(2).sum((1, 2)) / (h + w)
            for b in torch.argsort(score, descending=True)[:count].tolist():
                sc = float(score[b])
                if sc > lam:
                    i, j = divmod(b, d)
                    cands.append((sc, (i * h + ro) % m, h, (j * w + co) % n, w, u[b], v[b]))
        cands.sort(key=lambda t: -t[0])
        added = 0
        for _sc, r0, h, c0, w, U, V in cands[:count]:
            c = IntervalComponent(r0, h, c0, w, U.clone(), V.clone())
            self.comps.append(c)
            self._add(c, -1.0)
            added += 1
        return added

    def sweep(self, lam: float) -> None:
        for c in self.comps:
            self.update(c, lam)
        self.comps = [c for c in self.comps if c.h > 0 and c.w > 0]

    def rel_error(self) -> float:
        if self._big:
            return math.sqrt(max(frob2(self.R), 0.0) / self.norm2)
        return math.sqrt(max(float(self.R.double().pow(2).sum()), 0.0) / self.norm2)

    def cost(self) -> int:
        return sum(c.cost() for c in self.comps)

    def to_gblr(self) -> GBLR:
        cs = self.comps
        return GBLR(
            (self.m, self.n),
            [c.r0 for c in cs],
            [c.h for c in cs],
            [c.c0 for c in cs],
            [c.w for c in cs],
            [(c.U.clone(), c.V.clone()) for c in cs],
            dtype=self.W.dtype,
            device=self.W.device,
        )

    # ------------------------------------------------------------------ driver
    def fit(
        self,
        budget: int,
        sweeps: int,
        lam: float,
        *,
        gain: float = 2.0,
        target: float = 0.998,
        tol: float | None = None,
        patience: int = 5,
        spawn_every: int = 0,
        spawn_count: int = 16,
        seed: int = 0,
    ) -> Iterator[tuple[int, float, int, float]]:
        """Run up to ``sweeps`` sweeps; yield ``(sweep, rel_error, cost, lam)`` after each.

        After every sweep the price is rescaled, ``lam *= (cost / (target * budget)) **
        gain``, so the cost is driven to just below the budget (iterates over the budget are
        still yielded; the caller keeps only feasible ones). With ``tol``, stop once the best
        feasible error improved by less than a factor ``tol`` over ``patience`` sweeps.
        """
        best: list[float] = []
        gen = torch.Generator().manual_seed(seed)
        self._cost = self.cost()
        self.budget = max(int(budget), self._cost)  # a start over the budget may only shrink
        for it in range(sweeps):
            if spawn_every and it > 0 and it % spawn_every == 0:
                self.spawn(lam, gen, spawn_count)
                self._cost = self.cost()
            self.sweep(lam)
            self.budget = max(int(budget), self._cost)
            cost = self.cost()
            err = self.rel_error()
            yield it, err, cost, lam
            if cost > 0:
                lam *= (cost / (target * budget)) ** gain
            else:
                lam *= 0.5
            cur = min(best[-1] if best else math.inf, err if cost <= budget else math.inf)
            best.append(cur)
            if (
                tol is not None
                and len(best) > patience
                and math.isfinite(best[-1])
                and best[-1] > (1.0 - tol) * best[-1 - patience]
            ):
                break


def split_rank_one(comps: list[IntervalComponent]) -> list[IntervalComponent]:
    """Split every component into rank-1 components on the same rectangle (same cost unless
    a block was cheaper dense)."""
    out = []
    for c in comps:
        for t in range(c.rank):
            out.append(
                IntervalComponent(
                    c.r0, c.h, c.c0, c.w, c.U[:, t : t + 1].clone(), c.V[:, t : t + 1].clone()
                )
            )
    return out


def components_from_gblr(G: GBLR) -> list[IntervalComponent]:
    """Factored components of a GBLR matrix (dense blocks become rank-min(h, w) factors)."""
    out = []
    for k in range(G.num_components):
        h, w = int(G.row_width[k]), int(G.col_width[k])
        if h == 0 or w == 0:
            continue
        if bool(G.is_dense[k]):
            U0, S, Vh = svd(G.block(k))
            s = S.sqrt()
            U, V = U0 * s, Vh.T * s
        else:
            U, V = G.component(k)
        out.append(IntervalComponent(int(G.row_start[k]), h, int(G.col_start[k]), w, U, V))
    return out


def interval_stage(
    W: torch.Tensor,
    budget: int,
    start: GBLR,
    sweeps: int,
    components: int | None = None,
    *,
    lam: float | None = None,
    gain: float = 2.0,
    tol: float | None = None,
    spawn_every: int = 0,
    spawn_count: int = 16,
    seed: int = 0,
    min_width: int = 1,
) -> Iterator[tuple[GBLR | None, float, int, int]]:
    """Structure learning from ``start`` by interval ALS; yields ``(G or None, err, cost,
    components)`` (``components``: of the sweep's iterate, as ``G.num_components``).

    Dense components of ``start`` are kept fixed; its factored components are split into
    rank-1 components, each of which then learns its own intervals. ``G`` is ``None`` for a
    sweep whose cost exceeds ``budget`` (the price is raised for the next sweep) or that did
    not improve on the best iterate so far. ``lam`` defaults to the marginal value of one
    MAC of the truncated SVD at this budget, ``sigma_{r+1}^2 / (m + n)``. ``gain`` is the
    exponent of the price update (:meth:`IntervalModel.fit`). ``min_width`` is the smallest
    row and column width an update may give a piece (:class:`IntervalModel`).
    """
    m, n = W.shape
    fixed_idx = [k for k in range(start.num_components) if bool(start.is_dense[k])]
    fixed_cost = sum(int(start.row_width[k]) * int(start.col_width[k]) for k in fixed_idx)
    Wr = W
    if fixed_idx:
        Wr = W.clone()
        for k in fixed_idx:
            ri, ci = start.row_indices(k), start.col_indices(k)
            Wr.index_put_((ri[:, None], ci[None, :]), -start.block(k), accumulate=True)
    factored = components_from_gblr(_without(start, fixed_idx) if fixed_idx else start)
    comps = split_rank_one(factored)
    if not comps:
        return
    B = budget - fixed_cost
    model = IntervalModel(Wr, comps, own=Wr is not W, min_width=min_width)
    model.norm2 = (frob2(W) if model._big else float(W.double().pow(2).sum())) or 1.0
    if lam is None:
        r = min(budget // (m + n), min(m, n) - 1)
        if choose_svd_method(m, n, r + 1) == "randomized":
            # large layers: only sigma_{r+1} is needed (randomized SVD, linalg.top_svd)
            S = top_svd(W, r + 1)[1].double()
        else:
            S = torch.linalg.svdvals(W).double()
        lam = float(S[r] ** 2) / (m + n)
    best = math.inf
    for _it, err, cost, _lam in model.fit(
        B,
        sweeps,
        lam,
        gain=gain,
        tol=tol,
        spawn_every=spawn_every,
        spawn_count=spawn_count,
        seed=seed,
    ):
        G = None
        if cost <= B and err < best:
            best = err
            G = _with_fixed(model.to_gblr(), start, fixed_idx)
        yield G, err, cost + fixed_cost, len(model.comps) + len(fixed_idx)


def _without(G: GBLR, drop: list[int]) -> GBLR:
    keep = [k for k in range(G.num_components) if k not in set(drop)]
    return GBLR(
        G.shape,
        G.row_start[keep],
        G.row_width[keep],
        G.col_start[keep],
        G.col_width[keep],
        [G.component(k) for k in keep],
        dtype=G.dtype,
        device=G.device,
    )


def _with_fixed(G: GBLR, start: GBLR, fixed_idx: list[int]) -> GBLR:
    if not fixed_idx:
        return G
    rs = G.row_start.tolist() + [int(start.row_start[k]) for k in fixed_idx]
    rw = G.row_width.tolist() + [int(start.row_width[k]) for k in fixed_idx]
    cs = G.col_start.tolist() + [int(start.col_start[k]) for k in fixed_idx]
    cw = G.col_width.tolist() + [int(start.col_width[k]) for k in fixed_idx]
    factors = [G.component(k) for k in range(G.num_components)]
    factors += [start.block(k) for k in fixed_idx]
    return GBLR(G.shape, rs, rw, cs, cw, factors, dtype=G.dtype, device=G.device)


def _threshold() -> int:
    from ... import linalg

    return linalg.RANDOMIZED_MIN_ENTRIES
