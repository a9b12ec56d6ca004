"""Figure for docs/gblr.md: the Gaudi mask of one interval for several sigma.

Run: python examples/gaudi_mask_figure.py  (writes docs/figures/gaudi_mask.png)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import gblr_approx as ga  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "figures" / "gaudi_mask.png"


def main(out: str | Path = OUT) -> None:
    n = 64
    width, location = 20 / n, 54 / n  # 20 entries starting at index 54: wraps around to 9
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), constrained_layout=True)
    colors = ["#0072B2", "#E69F00", "#009E73", "#CC79A7"]
    j = torch.arange(n)
    for sigma, col in zip([None, 20.0, 5.0, 1.5], colors, strict=True):
        g = ga.gaudi_mask(torch.tensor(width, dtype=torch.float64), location, n, sigma=sigma)
        lab = "sigma = inf (boxcar)" if sigma is None else f"sigma = {sigma:g}"
        axes[0].plot(j, g, marker="o" if sigma is None else None, ms=3, color=col, label=lab)
    axes[0].set_xlabel("index j (entries)")
    axes[0].set_ylabel("mask value g[j]")
    axes[0].set_title("width 20/64, location 54/64 (wraps around)")
    axes[0].legend(fontsize=8, frameon=False)
    # non-integer width: band-limited interpolation with Gibbs ringing
    for wd, col in zip([19.0, 19.5, 20.0], colors, strict=False):
        g = ga.gaudi_mask(torch.tensor(wd / n, dtype=torch.float64), 10 / n, n)
        axes[1].plot(j, g, color=col, label=f"width {wd:g} entries")
    axes[1].set_xlabel("index j (entries)")
    axes[1].set_title("sigma = inf, start 10: non-integer width rings")
    axes[1].legend(fontsize=8, frameon=False)
    for ax in axes:
        ax.axhline(0, color="0.7", lw=0.5)
        ax.spines[["top", "right"]].set_visible(False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
