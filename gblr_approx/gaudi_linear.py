"""Trainable Gaudi-GBLR layer: learnable factors, widths and locations (math.md 2.7, 5.2).

``GaudiGBLRLinear`` computes ``y = x W_sigma^T + bias`` with

    W_sigma = sum_k Diag(g_k^out) U_k V_k^T Diag(g_k^in),
    g_k = Gaudi(round_ste(w_k), round_ste(l_k); N, sigma)

(widths ``w`` and locations ``l`` are fractions of the side length ``N``; straight-through
rounding makes the forward use whole-entry intervals, math.md 2.4). Training follows the
paper's recipe: an optimiser step on all parameters, then :meth:`GaudiGBLRLinear.prox_step`:
the soft-threshold of the widths (the proximal step of ``penalty * sum(widths)``), the clamp to
``[0, 1]``, the exact budget projection and the wrap of the locations. :meth:`harden` returns a
:class:`~gblr_approx.nn.StructuredLinear` holding the hard :class:`~gblr_approx.GBLR` of the
current intervals, with ``flops <= budget``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from .budget import resolve_budget
from .calibration import find_linears, select_linears
from .fit.gblr.proximal import GaudiParams, hard_cost, project_budget, refit_factors
from .formats.gblr import GBLR
from .gaudi import gaudi_mask, round_ste

__all__ = ["GaudiGBLRLinear", "gaudi_model"]


class GaudiGBLRLinear(nn.Module):
    """Linear layer whose weight is a Gaudi-GBLR matrix with learnable structure.

    Parameters
    ----------
    start : GBLR, shape (out_features, in_features)
        Initial hard matrix; the layer reproduces it exactly at ``sigma=None`` (components are
        split into rank-``rank_per_component`` pieces on the same rectangles).
    budget : float or int
        MACs per input row (float in (0, 1]: fraction of ``out * in``) that :meth:`prox_step`
        and :meth:`harden` enforce.
    bias : Tensor (out_features,), optional
    penalty : float
        Width penalty ``lambda`` (per unit width fraction); :meth:`prox_step` shrinks every
        width by ``penalty * lr``.
    sigma : None, float or (start, end, steps)
        Gaudi smoothing. ``None`` = exact boxcars (the forward equals the hard matrix). A
        triple is a schedule: geometric from ``start`` to ``end`` over ``steps`` calls of
        :meth:`step_sigma`; after the last one ``sigma`` becomes ``None`` when ``end`` is
        ``inf``.
    rank_per_component : int
    weight : Tensor (out, in), optional
        The dense weight the start approximates; when given, the *dormant* factor entries
        (outside the intervals) get their least-squares values, so that a growing interval
        starts from sensible content.

    Attributes
    ----------
    U : Parameter (K, out_features, r)
    V : Parameter (K, in_features, r)
    widths, locations : Parameter (2, K)
        Row 0: output side (``out_features`` rows), row 1: input side (``in_features``).
        (The official code uses the opposite order, math.md 1.3.)

    Notes
    -----
    Forward cost per input row ``K r (in + out)`` MACs (the factors are applied as full-length
    vectors), plus ``O(K (m log m + n log n))`` per call for the masks; :attr:`flops` is the
    cost of the *hard* structure, which is what :meth:`harden` runs.
    """

    def __init__(
        self,
        start: GBLR,
        budget: float | int,
        bias: torch.Tensor | None = None,
        *,
        penalty: float = 0.0,
        sigma: Any = None,
        rank_per_component: int = 1,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(start, GBLR):
            raise TypeError(f"start must be a GBLR matrix; got {type(start).__name__}")
        m, n = start.shape
        self.out_features, self.in_features = m, n
        self.budget = resolve_budget(budget, m, n)
        if not (isinstance(penalty, numbers.Real) and penalty >= 0):
            raise ValueError(f"penalty must be a float >= 0; got {penalty!r}")
        self.penalty = float(penalty)
        r = int(rank_per_component)
        if r < 1:
            raise ValueError(f"rank_per_component must be >= 1; got {rank_per_component!r}")
        self.rank_per_component = r
        p = GaudiParams.from_gblr(start, r)
        if p.cost() > self.budget:
            p.wo, p.wi = project_budget(p.wo, p.wi, m, n, r, self.budget)
        if weight is not None:
            if tuple(weight.shape) != (m, n):
                raise ValueError(f"weight must have shape {(m, n)}; got {tuple(weight.shape)}")
            refit_factors(weight.detach().to(p.U.dtype), p, 0, sides="")
        K = p.K
        self.U = nn.Parameter(p.U.detach().reshape(m, K, r).permute(1, 0, 2).contiguous())
        self.V = nn.Parameter(p.V.detach().reshape(n, K, r).permute(1, 0, 2).contiguous())
        self.widths = nn.Parameter(torch.stack([p.wo, p.wi]).detach().clone())
        self.locations = nn.Parameter(torch.stack([p.lo, p.li]).detach().clone())
        if bias is not None:
            if tuple(bias.shape) != (m,):
                raise ValueError(f"bias must have shape ({m},); got {tuple(bias.shape)}")
            self.bias = nn.Parameter(bias.detach().clone().to(p.U.dtype))
        else:
            self.register_parameter("bias", None)
        self._schedule: tuple[float, float, int] | None = None
        self._sigma_step = 0
        self.sigma: float | None = None
        self.set_sigma(sigma)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        budget: float | int,
        *,
        penalty: float = 0.0,
        sigma: Any = None,
        **fit_options: Any,
    ) -> GaudiGBLRLinear:
        """Initialise from a dense ``nn.Linear`` with :func:`gblr_approx.fit_gblr`.

        ``fit_options`` go to ``fit_gblr`` (``algorithm``, ``steps``, ``rank_per_component``,
        ...; the progress bar is off by default). The layer's forward at ``sigma=None``
        equals the fitted hard matrix.
        """
        from .fit import fit_gblr

        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear; got {type(linear).__name__}")
        W = linear.weight.detach()
        fit_options.setdefault("progress", False)
        r = int(fit_options.get("rank_per_component", 1))
        res = fit_gblr(W, budget, **fit_options)
        layer = cls(
            res.matrix.to(dtype=W.dtype),
            res.budget,
            linear.bias,
            penalty=penalty,
            sigma=sigma,
            rank_per_component=r,
            weight=W,
        )
        layer.fit_info = {"rel_error": res.rel_error, "seconds": res.seconds}
        return layer

    # ------------------------------------------------------------------ sigma schedule
    def set_sigma(self, sigma: Any) -> None:
        """``None``/``inf`` (exact boxcars), a float, or a schedule ``(start, end, steps)``."""
        if sigma is None or (isinstance(sigma, numbers.Real) and math.isinf(sigma)):
            self.sigma, self._schedule = None, None
        elif isinstance(sigma, numbers.Real) and not isinstance(sigma, bool) and sigma > 0:
            self.sigma, self._schedule = float(sigma), None
        elif isinstance(sigma, (tuple, list)) and len(sigma) == 3:
            s0, s1, steps = float(sigma[0]), float(sigma[1]), int(sigma[2])
            if not (s0 > 0 and s1 > 0 and steps >= 1):
                raise ValueError(f"sigma schedule needs start, end > 0 and steps >= 1: {sigma}")
            self._schedule, self._sigma_step, self.sigma = (s0, s1, steps), 0, s0
        else:
            raise ValueError(f"sigma must be None, a positive float or (start, end, steps); "
                             f"got {sigma!r}")

    def step_sigma(self) -> float | None:
        """Advance the sigma schedule by one step (geometric); returns the new sigma."""
        if self._schedule is None:
            return self.sigma
        s0, s1, steps = self._schedule
        self._sigma_step = min(self._sigma_step + 1, steps)
        if self._sigma_step >= steps and math.isinf(s1):
            self.sigma = None
        elif math.isinf(s1):
            # towards inf: geometric growth of a factor 100 over the schedule, then exact
            self.sigma = s0 * 100.0 ** (self._sigma_step / steps)
        else:
            self.sigma = s0 * (s1 / s0) ** (self._sigma_step / steps)
        return self.sigma

    # ------------------------------------------------------------------ forward / cost
    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaudi masks ``(K, out)`` and ``(K, in)`` at the current sigma (STE-rounded)."""
        m, n = self.out_features, self.in_features
        go = gaudi_mask(round_ste(self.widths[0], m), round_ste(self.locations[0], m), m,
                        sigma=self.sigma)
        gi = gaudi_mask(round_ste(self.widths[1], n), round_ste(self.locations[1], n), n,
                        sigma=self.sigma)
        return go, gi

    def weight(self) -> torch.Tensor:
        """The current (smooth) weight ``W_sigma`` (out, in), differentiable."""
        go, gi = self.masks()
        A = self.U * go.unsqueeze(-1)
        B = self.V * gi.unsqueeze(-1)
        return torch.einsum("kmr,knr->mn", A, B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has {x.shape[-1]} features but the layer expects {self.in_features}"
            )
        go, gi = self.masks()
        K, m, r = self.U.shape
        A = (self.U * go.unsqueeze(-1)).permute(1, 0, 2).reshape(m, K * r)
        B = (self.V * gi.unsqueeze(-1)).permute(1, 0, 2).reshape(self.in_features, K * r)
        y = (x.to(B.dtype) @ B) @ A.T
        if self.bias is not None:
            y = y + self.bias
        return y

    @property
    def flops(self) -> int:
        """MACs per input row of the current *hard* structure (what :meth:`harden` runs)."""
        return hard_cost(self.widths[0], self.widths[1], self.out_features, self.in_features,
                         self.rank_per_component)

    # ------------------------------------------------------------------ proximal step
    @torch.no_grad()
    def prox_step(self, lr: float = 1.0) -> None:
        """Proximal step, to call after ``optimizer.step()``.

        ``w <- clamp(w - penalty * lr, 0, 1)`` (soft-threshold of the non-negative widths: the
        prox of ``lr * penalty * sum(w)``), then the exact budget projection (bisection,
        :func:`~gblr_approx.fit.gblr.proximal.project_budget`), then ``l <- l mod 1``. ``lr`` is the
        learning rate of the widths (math.md 5.2: ``lambda_t = thres * lr_t``).
        """
        m, n, r = self.out_features, self.in_features, self.rank_per_component
        w = self.widths
        if self.penalty:
            w.sub_(self.penalty * float(lr))
        w.clamp_(0, 1)
        wo, wi = project_budget(w[0], w[1], m, n, r, self.budget)
        w[0].copy_(wo)
        w[1].copy_(wi)
        self.locations.remainder_(1.0)

    # ------------------------------------------------------------------ hardening
    def to_gblr(self) -> GBLR:
        """The hard GBLR of the current rounded intervals, within the budget."""
        m, n, r = self.out_features, self.in_features, self.rank_per_component
        K = self.U.shape[0]
        wo, wi = project_budget(self.widths[0], self.widths[1], m, n, r, self.budget)
        p = GaudiParams(
            self.U.detach().permute(1, 0, 2).reshape(m, K * r),
            self.V.detach().permute(1, 0, 2).reshape(n, K * r),
            wo, self.locations[0].detach() % 1.0, wi, self.locations[1].detach() % 1.0, r,
        )
        G = p.to_gblr()
        assert G.flops <= self.budget
        return G

    def harden(self) -> nn.Module:
        """A :class:`~gblr_approx.nn.StructuredLinear` with the hard GBLR (``flops <= budget``)."""
        from .nn import StructuredLinear

        bias = self.bias.detach() if self.bias is not None else None
        return StructuredLinear(self.to_gblr(), bias)

    def structure_parameters(self) -> list[nn.Parameter]:
        """``[widths, locations]`` (give them their own optimiser group, as the paper does)."""
        return [self.widths, self.locations]

    def factor_parameters(self) -> list[nn.Parameter]:
        """``[U, V]`` and the bias."""
        return [self.U, self.V] + ([self.bias] if self.bias is not None else [])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"components={self.U.shape[0]}, rank={self.rank_per_component}, "
            f"flops={self.flops}, budget={self.budget}, sigma={self.sigma}"
        )


def gaudi_model(
    model: nn.Module,
    budget: float | int,
    *,
    include: str | list[str] = "*",
    exclude: str | list[str] | None = None,
    **options: Any,
) -> dict[str, GaudiGBLRLinear]:
    """Replace every matching ``nn.Linear`` of ``model`` (in place) by a :class:`GaudiGBLRLinear`.

    Parameters
    ----------
    budget : float or int
        Per layer: float = fraction of that layer's dense MACs; int = MACs.
    include, exclude : glob pattern(s) on the module names (``model.named_modules()``).
        Selection as in :func:`~gblr_approx.compress.compress_model`: a Linear shared under
        several names gets one layer at every name; ``MultiheadAttention.out_proj`` and
        ``TransformerEncoderLayer.linear1/2`` are skipped (torch reads their weights).
    **options
        Passed to :meth:`GaudiGBLRLinear.from_linear` (``penalty``, ``sigma``, fit options).

    Returns
    -------
    dict
        Module name -> the new layer.
    """
    from .compress import replace_module

    select_linears(model, include, exclude)  # raises the ValueError when nothing matches
    selection = find_linears(model, include, exclude)
    out = {}
    for name, mod in selection.layers:
        new = GaudiGBLRLinear.from_linear(mod, budget, **options)
        for alias in selection.aliases.get(name, [name]):  # a shared Linear stays shared
            replace_module(model, alias, new)
        out[name] = new
    return out
