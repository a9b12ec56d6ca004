"""Figures of ga.plot and the `gblr-approx plot` command, rendered headlessly (Agg).

No pixel comparisons: each figure is written to PNG and PDF and checked for what a reader
relies on (one line / bar / patch per format or component, labels with units, the same colour
for a format in every figure, embedded TrueType fonts).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import gblr_approx as ga  # noqa: E402
from gblr_approx import plot as gp  # noqa: E402
from gblr_approx.plot.command import plot as plot_command  # noqa: E402
from gblr_approx.plot.command import read_results  # noqa: E402
from gblr_approx.plot.style import FORMAT_ORDER  # noqa: E402

# The shared table holds formats without a successful fit on purpose; the warning that names
# them is checked in test_error_vs_budget_one_matrix and kept out of the report elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore:no successful fit:UserWarning")

FORMATS = ["lowrank", "blocksparse", "gblr"]
MATRICES = ["encoder.layer.0.q.weight", "encoder.layer.0.k.weight", "encoder.layer.0.v.weight"]
BUDGETS = [0.1, 0.25, 0.5]


@pytest.fixture(autouse=True)
def _close_figures(monkeypatch):
    """No figure may be shown; every figure is closed after the test."""

    def _no_show(*a, **k):  # pragma: no cover - failing path
        raise AssertionError("plotting functions must not call plt.show()")

    monkeypatch.setattr(plt, "show", _no_show)
    yield
    plt.close("all")


def _sweep_table() -> pd.DataFrame:
    """A deterministic sweep table of the contract's shape (3 matrices x 3 formats x 3 budgets),
    plus one infeasible and one failed row that must not be drawn."""
    rng = np.random.default_rng(0)
    rows = []
    for i, name in enumerate(MATRICES):
        for j, fmt in enumerate(FORMATS):
            for b in BUDGETS:
                frac = b * (1 - 0.02 * j)
                err = (1 - b) ** (1 + 0.3 * j) * (1 + 0.05 * i) + 0.01 * rng.random()
                rows.append(dict(matrix=name, rows=64, cols=96, format=fmt, budget=b,
                                 flops=int(frac * 64 * 96), budget_fraction=frac,
                                 rel_error=err, rel_error_2=0.8 * err, seconds=0.01,
                                 status="ok", message=""))
    rows.append(dict(matrix=MATRICES[0], rows=64, cols=96, format="monarch", budget=0.1,
                     flops=np.nan, budget_fraction=np.nan, rel_error=np.nan,
                     rel_error_2=np.nan, seconds=0.0, status="infeasible",
                     message="smallest feasible budget is 0.2"))
    rows.append(dict(matrix=MATRICES[1], rows=64, cols=96, format="blast", budget=0.5,
                     flops=100, budget_fraction=0.5, rel_error=0.1, rel_error_2=0.1,
                     seconds=0.0, status="failed", message="boom"))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return _sweep_table()


def _check_saved(fig, tmp_path, name: str) -> None:
    png = gp.save_figure(fig, tmp_path / f"{name}.png", dpi=100)
    pdf = gp.save_figure(fig, tmp_path / f"{name}.pdf")
    assert png.stat().st_size > 2000 and pdf.stat().st_size > 2000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    assert b"/FontFile2" in data, "fonts must be embedded as TrueType (pdf.fonttype 42)"
    assert b"/Type3" not in data


def _lines(ax):
    """Data lines of an axes (not reference lines), by legend label."""
    return {ln.get_label(): ln for ln in ax.get_lines()
            if not ln.get_label().startswith("_") and not ln.get_label().endswith(NOTE)}


NOTE = ": no successful fit"  # legend note of a format none of whose fits succeeded


# ----------------------------------------------------------------------------------- style
def test_format_colours_fixed_distinct_and_colour_blind_palette():
    keys = list(gp.FORMAT_COLORS)
    assert set(keys) == {"dense", "lowrank", "blocksparse", "blocklowrank", "monarch", "gblr",
                         "blast"}
    assert len(set(gp.FORMAT_COLORS.values())) == len(keys)
    okabe_ito = {"#000000", "#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00",
                 "#CC79A7"}
    assert set(gp.FORMAT_COLORS.values()) <= okabe_ito
    assert len(set(gp.FORMAT_MARKERS.values())) == len(keys)
    assert gp.format_color("Block-Low_Rank") == gp.FORMAT_COLORS["blocklowrank"]
    assert gp.format_color("myformat") == gp.format_color("myformat")  # stable for unknowns
    assert gp.format_label("gblr") == "GBLR"


def test_style_sheet_ships_and_sets_paper_defaults():
    assert gp.STYLE_PATH.is_file()
    rc = matplotlib.rc_params_from_file(str(gp.STYLE_PATH), use_default_template=False)
    assert rc["pdf.fonttype"] == 42 and rc["ps.fonttype"] == 42
    assert 7 <= rc["font.size"] <= 9
    assert rc["axes.spines.top"] is False and rc["axes.spines.right"] is False
    assert gp.figsize("single")[0] == pytest.approx(3.3)
    assert gp.figsize("double", 3.0) == (7.0, 3.0)
    with pytest.raises(ValueError, match="width"):
        gp.figsize("triple")


def test_import_does_not_load_pyplot():
    code = "import sys, gblr_approx; print('matplotlib.pyplot' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------ error vs budget
def test_error_vs_budget_one_matrix(table, tmp_path):
    with pytest.warns(UserWarning, match=r"no successful fit for format\(s\) monarch"):
        fig = gp.error_vs_budget(table, matrix=MATRICES[0])
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    lines = _lines(ax)
    # failed/infeasible rows are not drawn, but a format with no successful fit is named
    assert set(lines) == {"Low-rank", "Block-sparse", "GBLR"}
    note = [ln for ln in ax.get_lines() if ln.get_label() == "Monarch" + NOTE]
    assert len(note) == 1 and len(note[0].get_xdata()) == 0
    for fmt in FORMATS:
        ln = lines[gp.format_label(fmt)]
        assert to_hex(ln.get_color()).upper() == gp.format_color(fmt).upper()
        rows = table[(table.matrix == MATRICES[0]) & (table.format == fmt)]
        np.testing.assert_allclose(ln.get_xdata(), np.sort(rows.budget_fraction))
    assert "budget" in ax.get_xlabel() and "MACs" in ax.get_xlabel()
    assert "relative error" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "Low-rank", "Block-sparse", "GBLR", "Monarch: no successful fit"]
    assert fig.get_size_inches()[0] == pytest.approx(3.3)
    _check_saved(fig, tmp_path, "evb1")


def test_error_vs_budget_median_with_iqr_band(table, tmp_path):
    fig = gp.error_vs_budget(table, logy=True, error="rel_error_2", width="double")
    ax = fig.axes[0]
    lines = _lines(ax)
    assert len(lines) == 3 and len(ax.collections) == 3  # one band per format
    g = table[(table.format == "gblr") & (table.status == "ok")]
    med = g.groupby("budget")["rel_error_2"].median().sort_index().to_numpy()
    np.testing.assert_allclose(lines["GBLR"].get_ydata(), med)
    band = ax.collections[-1].get_paths()[0].vertices[:, 1]
    q1 = g.groupby("budget")["rel_error_2"].quantile(0.25).min()
    q3 = g.groupby("budget")["rel_error_2"].quantile(0.75).max()
    assert band.min() == pytest.approx(q1) and band.max() == pytest.approx(q3)
    assert ax.get_yscale() == "log" and "_2" in ax.get_ylabel()
    assert fig.get_size_inches()[0] == pytest.approx(7.0)
    _check_saved(fig, tmp_path, "evb_agg")


def test_error_vs_budget_per_matrix_curves_and_given_axes(table):
    fig0, ax = plt.subplots()
    n_before = len(plt.get_fignums())
    fig = gp.error_vs_budget(table, ax=ax, aggregate="none", formats=["gblr", "lowrank"],
                             legend=False)
    assert fig is fig0 and len(plt.get_fignums()) == n_before
    assert len(ax.get_lines()) == 2 * len(MATRICES)
    assert len(_lines(ax)) == 2 and ax.get_legend() is None


def test_error_vs_budget_rejects_bad_input(table):
    with pytest.raises(ValueError, match="columns|column"):
        gp.error_vs_budget(table.drop(columns="budget_fraction"))
    with pytest.raises(ValueError, match="not in the table"):
        gp.error_vs_budget(table, matrix="nope")
    with pytest.raises(ValueError, match="aggregate"):
        gp.error_vs_budget(table, aggregate="max")
    with pytest.raises(TypeError, match="DataFrame"):
        gp.error_vs_budget([1, 2, 3])


# ----------------------------------------------------------------------------- layer grid
def test_layer_grid_one_panel_per_layer(table, tmp_path):
    fig = gp.layer_grid(table, ncols=2)
    assert len(fig.axes) == len(MATRICES)
    for ax in fig.axes:
        assert len(ax.get_lines()) == len(FORMATS)
    assert [ax.get_title() for ax in fig.axes] == ["q", "k", "v"]  # shared prefix dropped
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts == ["Low-rank", "Block-sparse", "GBLR", "Monarch" + NOTE,
                            "BLAST" + NOTE]
    assert any("budget" in t.get_text() for t in fig.texts)  # one shared x label
    _check_saved(fig, tmp_path, "grid")


def _two_option_sets() -> pd.DataFrame:
    """Block-sparse fits of one matrix with two block shapes (two sweeps into one --out
    folder, as ``load_sweep`` reads them back: ``options`` as JSON text), plus low-rank."""
    rows = []
    for opts, fr, err in [('{"block_shape": [4, 4]}', (0.1, 0.247, 0.5), (0.919, 0.806, 0.611)),
                          ('{"block_shape": [20, 15]}', (0.25, 0.5), (0.861, 0.702))]:
        for f, e in zip(fr, err, strict=True):
            rows.append(dict(matrix="one", rows=40, cols=30, format="blocksparse", budget=f,
                             budget_fraction=f, rel_error=e, rel_error_2=e, status="ok",
                             message="", options=opts, seed=0))
    for f in (0.1, 0.25, 0.5):
        for name in ("one", "two"):
            rows.append(dict(matrix=name, rows=40, cols=30, format="lowrank", budget=f,
                             budget_fraction=f, rel_error=1 - f, rel_error_2=1 - f,
                             status="ok", message="", options="{}", seed=0))
    return pd.DataFrame(rows)


def test_error_vs_budget_keeps_option_sets_apart():
    """Fits of one format with other options are separate curves (not one zig-zag line)."""
    df = _two_option_sets()
    ax = gp.error_vs_budget(df[df.matrix == "one"]).axes[0]
    lines = _lines(ax)
    assert set(lines) == {"Low-rank", "Block-sparse (block_shape=4,4)",
                          "Block-sparse (block_shape=20,15)"}
    a, b = lines["Block-sparse (block_shape=4,4)"], lines["Block-sparse (block_shape=20,15)"]
    np.testing.assert_allclose(a.get_xdata(), [0.1, 0.247, 0.5])
    np.testing.assert_allclose(a.get_ydata(), [0.919, 0.806, 0.611])
    np.testing.assert_allclose(b.get_xdata(), [0.25, 0.5])
    np.testing.assert_allclose(b.get_ydata(), [0.861, 0.702])
    assert to_hex(a.get_color()) == to_hex(b.get_color())  # the format keeps its colour
    assert a.get_linestyle() != b.get_linestyle()
    assert lines["Low-rank"].get_linestyle() == "-"  # a format with one set: as always
    # aggregated over matrices: still one curve per set
    lines = _lines(gp.error_vs_budget(df).axes[0])
    assert len(lines) == 3 and len(lines["Block-sparse (block_shape=20,15)"].get_xdata()) == 2


def test_error_vs_budget_seeds_and_single_set_unchanged(table):
    df = _two_option_sets()
    df = df[df.format == "lowrank"].assign(seed=[0, 0, 1, 1, 2, 2])
    df.loc[df.seed == 1, "seed"] = 0  # seeds 0 and 2
    labels = set(_lines(gp.error_vs_budget(df, aggregate="none").axes[0]))
    assert labels == {"Low-rank (seed 0)", "Low-rank (seed 2)"}
    # one (options, seed) set per format: the figure is exactly as without those columns
    same = table.assign(options='{"block_shape": [4, 4]}', seed=0)
    for t in (table, same):
        ax = gp.error_vs_budget(t).axes[0]
        assert [ln.get_label() for ln in ax.get_lines()] == [
            "Low-rank", "Block-sparse", "GBLR", "Monarch" + NOTE, "BLAST" + NOTE]
    plain = [(ln.get_xdata(), ln.get_ydata(), ln.get_linestyle())
             for ln in gp.error_vs_budget(table).axes[0].get_lines()]
    other = [(ln.get_xdata(), ln.get_ydata(), ln.get_linestyle())
             for ln in gp.error_vs_budget(same).axes[0].get_lines()]
    for (x0, y0, s0), (x1, y1, s1) in zip(plain, other, strict=True):
        np.testing.assert_array_equal(x0, x1)
        np.testing.assert_array_equal(y0, y1)
        assert s0 == s1


def test_layer_grid_keeps_option_sets_apart():
    fig = gp.layer_grid(_two_option_sets())
    one, two = fig.axes
    assert set(_lines(one)) == {"Low-rank", "Block-sparse (block_shape=4,4)",
                                "Block-sparse (block_shape=20,15)"}
    assert set(_lines(two)) == {"Low-rank"}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "Low-rank", "Block-sparse (block_shape=4,4)", "Block-sparse (block_shape=20,15)"]
    styles = {ln.get_label(): ln.get_linestyle() for ln in one.get_lines()}
    handles = {h.get_label(): h.get_linestyle() for h in fig.legends[0].legend_handles}
    assert handles == styles  # the legend shows each set's line style


# ------------------------------------------------------------------------------- spectrum
def test_spectrum_overlay_matches_svd(tmp_path):
    g = torch.Generator().manual_seed(0)
    mats = {"a": torch.randn(40, 30, generator=g), "b": torch.randn(30, 50, generator=g),
            "c": torch.randn(20, 20, generator=g).numpy()}
    fig = gp.spectrum(mats, energy_levels=(0.9,))
    assert len(fig.axes) == 2
    sing, energy = fig.axes
    assert len(sing.get_lines()) == 3 and sing.get_yscale() == "log"
    assert len(_lines(energy)) == 3
    sv = torch.linalg.svdvals(mats["a"].double()).numpy()
    np.testing.assert_allclose(sing.get_lines()[0].get_ydata(), sv / sv[0], rtol=1e-10)
    np.testing.assert_allclose(sing.get_lines()[0].get_xdata(), np.arange(1, 31))
    e = energy.get_lines()[1].get_ydata()
    assert e[-1] == pytest.approx(1.0) and np.all(np.diff(e) >= 0)
    assert energy.get_legend() is not None
    _check_saved(fig, tmp_path, "spectrum")


def test_spectrum_accepts_reports_singular_values_and_axes():
    W = torch.randn(24, 16, generator=torch.Generator().manual_seed(1))
    stand_in = types.SimpleNamespace(singular_values=torch.linalg.svdvals(W))
    _, ax = plt.subplots()
    fig = gp.spectrum(stand_in, ax=ax)  # one Axes: singular values only
    assert len(fig.axes) == 1 and len(ax.get_lines()) == 1
    report = ga.spectrum(W)
    fig = gp.spectrum({"W": report, "sv": torch.linalg.svdvals(W)}, kind="energy", x="fraction")
    a = fig.axes[0]
    np.testing.assert_allclose(a.get_lines()[0].get_ydata(), a.get_lines()[1].get_ydata(),
                               rtol=1e-6)
    assert a.get_lines()[0].get_xdata()[-1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="Axes"):
        gp.spectrum(W, ax=[ax], kind="both")
    with pytest.raises(ValueError, match="matrix"):
        gp.spectrum(torch.zeros(2, 2, 2))


def test_spectrum_small_multiples(tmp_path):
    g = torch.Generator().manual_seed(2)
    mats = {f"layer.{i}.weight": torch.randn(16, 12, generator=g) for i in range(5)}
    fig = gp.spectrum(mats, layout="grid", ncols=3)
    assert len(fig.axes) == 5
    assert [a.get_title() for a in fig.axes] == [str(i) for i in range(5)]
    fig = gp.spectrum(mats, layout="grid", kind="both", ncols=3)
    assert len(fig.axes) == 10
    _check_saved(fig, tmp_path, "spectrum_grid")


# ---------------------------------------------------------------------------- GBLR layout
def _stand_in_gblr():
    # 4 components on a 20 x 30 matrix; #1 wraps in columns, #2 in rows, #3 in both.
    return types.SimpleNamespace(
        shape=(20, 30),
        row_start=torch.tensor([0, 5, 15, 18]), row_width=torch.tensor([10, 4, 10, 4]),
        col_start=torch.tensor([0, 25, 10, 28]), col_width=torch.tensor([12, 10, 5, 4]),
        ranks=torch.tensor([1, 2, 1, 3]))


def _brute_coverage(G):
    m, n = G.shape
    cov = np.zeros((m, n), dtype=int)
    for k in range(len(G.row_start)):
        rows = [(int(G.row_start[k]) + t) % m for t in range(int(G.row_width[k]))]
        cols = [(int(G.col_start[k]) + t) % n for t in range(int(G.col_width[k]))]
        cov[np.ix_(rows, cols)] += 1
    return cov


def test_gblr_layout_wraparound_pieces_and_overlap(tmp_path):
    G = _stand_in_gblr()
    np.testing.assert_array_equal(gp.coverage(G), _brute_coverage(G))
    pieces = gp.component_rectangles(G)
    assert [len(p) for p in pieces] == [1, 2, 2, 4]
    # the pieces of a component tile exactly its support
    for k, p in enumerate(pieces):
        assert sum(h * w for _, _, h, w in p) == int(G.row_width[k]) * int(G.col_width[k])
    fig = gp.gblr_layout(G)
    ax = fig.axes[0]
    rects = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rects) == 1 + 2 + 2 + 4
    assert {to_hex(r.get_edgecolor()).upper() for r in rects} == {gp.format_color("gblr")}
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), _brute_coverage(G))
    assert len(fig.axes) == 2  # + colour bar
    assert "row" in ax.get_ylabel() and "column" in ax.get_xlabel()
    _check_saved(fig, tmp_path, "layout")


def test_gblr_layout_rank_weight_and_errors():
    G = _stand_in_gblr()
    cov = gp.coverage(G, weight="rank")
    assert cov.max() >= 3 and cov.sum() == sum(
        int(G.ranks[k]) * int(G.row_width[k]) * int(G.col_width[k]) for k in range(4))
    with pytest.raises(TypeError, match="GBLR"):
        gp.gblr_layout(object())


@pytest.mark.skipif(not hasattr(ga, "GBLR"), reason="GBLR format not available yet")
def test_gblr_layout_real_gblr_matrix():
    W = ga.datasets.minilm_sample()["encoder.layer.0.attention.self.query.weight"][:64, :96]
    L = ga.project(W, "lowrank", 0.25)
    G = ga.GBLR.from_lowrank(L)
    fig = gp.gblr_layout(G, colorbar=False)
    ax = fig.axes[0]
    assert len(fig.axes) == 1
    assert len(ax.patches) >= len(G.row_start)
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array()), _brute_coverage(G))


# ------------------------------------------------------------------------------ Gaudi mask
@pytest.mark.skipif(not hasattr(ga, "gaudi_mask"), reason="ga.gaudi_mask not available yet")
def test_gaudi_mask_figure(tmp_path):
    fig = gp.gaudi_mask(0.25, 0.8, 64, sigmas=(2.0, 8.0, 32.0))  # wraps around
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 4
    box = ax.get_lines()[0].get_ydata()
    expected = np.zeros(64)
    expected[(51 + np.arange(16)) % 64] = 1
    np.testing.assert_array_equal(box, expected)
    sharp = ax.get_lines()[-1].get_ydata()
    assert np.abs(sharp - expected).max() < 0.5
    assert len(ax.get_legend().get_texts()) == 4
    _check_saved(fig, tmp_path, "gaudi")


def test_boxcar_is_the_cyclic_interval():
    from gblr_approx.plot.masks import boxcar

    b = boxcar(0.25, 0.9, 20)  # 5 entries from 18, wrapping around
    assert list(np.flatnonzero(b)) == [0, 1, 2, 18, 19]


# ---------------------------------------------------------------------------- block energy
def test_block_energy_heat_map(tmp_path):
    W = torch.ones(30, 40)
    W[:10, :10] = 3.0
    fig = gp.block_energy(W, (3, 4))
    ax = fig.axes[0]
    img = np.asarray(ax.images[0].get_array())
    assert img.shape == (3, 4) and img.sum() == pytest.approx(100.0)
    assert img[0, 0] == pytest.approx(img.max()) and img[0, 0] == pytest.approx(100 * 900 / 2000)
    assert len(ax.texts) == 12  # small grids are annotated
    assert "%" in fig.axes[1].get_ylabel()
    _check_saved(fig, tmp_path, "block_energy")
    fig = gp.block_energy(W, (3, 4), relative=True, annotate=False)
    dens = np.asarray(fig.axes[0].images[0].get_array())  # equal blocks: mean density 1
    assert dens.mean() == pytest.approx(1.0) and not fig.axes[0].texts


# ------------------------------------------------------------------------ budget allocation
def test_budget_allocation_from_sweep(table, tmp_path):
    fig = gp.budget_allocation(table, target_error=0.6)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == len(MATRICES) * len(FORMATS)
    alloc = gp.allocation_table(table, target_error=0.6)
    for _, r in alloc.iterrows():
        ok = table[(table.matrix == r.matrix) & (table.format == r.format)
                   & (table.rel_error <= 0.6)]
        assert r.budget_fraction == pytest.approx(ok.budget_fraction.min())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["q", "k", "v"]
    _check_saved(fig, tmp_path, "alloc")
    # an unreachable target: hatched bars and a legend entry saying so
    fig = gp.budget_allocation(table, target_error=1e-6, formats=["gblr"])
    ax = fig.axes[0]
    assert all(p.get_hatch() for p in ax.patches if isinstance(p, Rectangle))
    legend = fig.legends[0]  # above the figure, titled with the target
    assert "not reached" in [t.get_text() for t in legend.get_texts()]
    assert "1e-06" in legend.get_title().get_text()


def test_budget_allocation_from_fitted_matrices():
    g = torch.Generator().manual_seed(3)
    fits = {"a.weight": ga.project(torch.randn(32, 48, generator=g), "lowrank", 0.25),
            "b.weight": ga.project(torch.randn(48, 32, generator=g), "lowrank", 0.5)}
    fig = gp.budget_allocation(fits, unit="macs")
    ax = fig.axes[0]
    widths = sorted(p.get_width() for p in ax.patches)
    assert widths == pytest.approx(sorted(A.flops / 1e6 for A in fits.values()))
    assert "MACs" in ax.get_xlabel()


# ------------------------------------------------------------------------ colour across figures
def test_a_format_keeps_its_colour_across_figures(table):
    evb = _lines(gp.error_vs_budget(table).axes[0])
    grid = gp.layer_grid(table).axes[0]
    leg = gp.budget_allocation(table, target_error=0.9).legends[0]
    bar_colour = {t.get_text(): to_hex(h.get_facecolor())
                  for t, h in zip(leg.get_texts(), leg.legend_handles, strict=True)}
    for fmt in FORMATS:
        lab = gp.format_label(fmt)
        expected = gp.format_color(fmt).lower()
        assert to_hex(evb[lab].get_color()) == expected
        assert to_hex(_lines(grid)[lab].get_color()) == expected
        assert bar_colour[lab] == expected
    layout_edges = {to_hex(p.get_edgecolor()) for p in
                    gp.gblr_layout(_stand_in_gblr()).axes[0].patches}
    assert layout_edges == {gp.format_color("gblr").lower()}


# ---------------------------------------------------------------------------- save_figure
def test_save_figure_formats_and_dpi(table, tmp_path):
    import matplotlib.image as mpimg

    fig = gp.error_vs_budget(table)
    png = gp.save_figure(fig, tmp_path / "sub" / "f.png", dpi=120)
    assert mpimg.imread(png).shape[1] == round(3.3 * 120)
    svg = gp.save_figure(fig.axes[0], tmp_path / "f.svg")
    assert b"<svg" in svg.read_bytes()[:500]
    pdf1 = gp.save_figure(gp.error_vs_budget(table), tmp_path / "a.pdf").read_bytes()
    pdf2 = gp.save_figure(gp.error_vs_budget(table), tmp_path / "b.pdf").read_bytes()
    assert pdf1 == pdf2 and b"CreationDate" not in pdf1  # reproducible files
    with pytest.raises(ValueError, match="suffix"):
        gp.save_figure(fig, tmp_path / "nosuffix")


# -------------------------------------------------------------------------------- command
def _invoke(args):
    from click.testing import CliRunner

    return CliRunner().invoke(plot_command, [str(a) for a in args], catch_exceptions=False)


def test_command_from_csv_and_json(table, tmp_path):
    csv = tmp_path / "sweep.csv"
    table.to_csv(csv, index=False)
    res = _invoke([csv, "--kind", "error-vs-budget", "--out", tmp_path / "e.pdf", "--logy",
                   "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["kind"] == "error-vs-budget" and (tmp_path / "e.pdf").stat().st_size > 2000
    js = tmp_path / "sweep.json"
    js.write_text(table.to_json(orient="records"))
    assert len(read_results(js)) == len(table)
    res = _invoke([js, "--kind", "layer-grid", "--out", tmp_path / "g.png", "--dpi", "80",
                   "--matrix", "re:\\.q\\.|\\.k\\."])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "g.png").stat().st_size > 2000
    res = _invoke([csv, "--kind", "budget-allocation", "--target-error", "0.5",
                   "--out", tmp_path / "b.svg", "--width", "double"])
    assert res.exit_code == 0, res.output
    res = _invoke([csv, "--out", tmp_path / "x.pdf", "--matrix", "nope"])
    assert res.exit_code == 2 and "nope" in res.output
    res = _invoke([csv, "--kind", "budget-allocation", "--out", tmp_path / "y.pdf"])
    assert res.exit_code == 2 and "--target-error" in res.output


def test_command_matrix_kinds(tmp_path):
    res = _invoke(["--kind", "block-energy", "--grid", "4", "--out", tmp_path / "be.png",
                   "--matrix", "*query*", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["matrices"] == ["encoder.layer.0.attention.self.query.weight"]
    res = _invoke(["--kind", "spectrum", "--out", tmp_path / "s.pdf", "--matrix", "*value*"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "s.pdf").stat().st_size > 2000


def test_command_reads_a_sweep_folder(tmp_path):
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(5))
    ga.sweep({"w": W}, ["lowrank"], [0.25, 0.5], out=tmp_path / "run")
    res = _invoke([tmp_path / "run", "--out", tmp_path / "f.pdf", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["rows"] == 2


# ------------------------------------------------------------------- the gallery script runs
def test_gallery_figure_functions(tmp_path):
    """examples/figures_gallery.py keeps working (sweep replaced by a synthetic table)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "figures_gallery.py"
    spec = importlib.util.spec_from_file_location("figures_gallery", path)
    gallery = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gallery)
    names = list(ga.datasets.MINILM_SAMPLE_NAMES[:3])
    df = _sweep_table().replace({"matrix": dict(zip(MATRICES, names, strict=True))})
    for name, (func, width) in gallery.FIGURE_FUNCS.items():
        if name == "gblr_layout" and "gblr" not in ga.FORMATS:
            continue
        if name == "gaudi_mask" and not hasattr(ga, "gaudi_mask"):
            continue
        fig = func(df)
        assert fig.get_size_inches()[0] == pytest.approx(gp.WIDTHS[width]), name
        assert gp.save_figure(fig, tmp_path / f"{name}.png", dpi=60).stat().st_size > 1000
        plt.close(fig)


def test_every_function_draws_into_given_axes(table):
    """ax= is honoured everywhere: same figure back, nothing new opened."""
    fig, axes = plt.subplots(3, 3)
    axes = axes.ravel()
    n_figs = len(plt.get_fignums())
    W = torch.randn(24, 32, generator=torch.Generator().manual_seed(7))
    calls = [
        lambda: gp.error_vs_budget(table, ax=axes[0]),
        lambda: gp.spectrum(W, ax=axes[1]),
        lambda: gp.gblr_layout(_stand_in_gblr(), ax=axes[2], colorbar=False),
        lambda: gp.block_energy(W, 4, ax=axes[3], colorbar=False),
        lambda: gp.budget_allocation(table, ax=axes[4], target_error=0.7),
        lambda: gp.layer_grid(table, ax=axes[5:8]),
    ]
    if hasattr(ga, "gaudi_mask"):
        calls.append(lambda: gp.gaudi_mask(ax=axes[8]))
    for call in calls:
        assert call() is fig
    assert len(plt.get_fignums()) == n_figs
    assert all(a.has_data() for a in axes[: len(calls) + 2])


def test_gallery_colour_table_matches_the_code():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "gallery.md").read_text()
    row = r"\|\s*([\w-]+)\s*\|[^|]*\|\s*`(#[0-9A-Fa-f]{6})`\s*\|\s*`([^`]+)`\s*\|"
    rows = re.findall(row, page)
    assert len(rows) == len(gp.FORMAT_COLORS)
    for label, colour, marker in rows:
        assert gp.format_color(label) == colour and gp.format_marker(label) == marker


# ------------------------------------------------------- many layers: legible, never clipped
_KINDS = ["attention.self.query", "attention.self.key", "attention.self.value",
          "attention.output.dense", "intermediate.dense", "output.dense"]


def _layer_names(k):
    return [f"encoder.layer.{i // 6}.{_KINDS[i % 6]}.weight" for i in range(k)]


def _many_matrices(k):
    g = torch.Generator().manual_seed(5)
    return {n: torch.randn(24, 20, generator=g) * torch.linspace(1, 0.05, 20) ** (1 + i / k)
            for i, n in enumerate(_layer_names(k))}


def _many_rows(k):
    rows = [dict(matrix=n, rows=24, cols=20, format=f, budget=b, flops=int(b * 480),
                 budget_fraction=b, rel_error=(1 - b) ** (1 + 0.2 * j), rel_error_2=0.5,
                 seconds=0.1, status="ok", message="")
            for n in _layer_names(k) for j, f in enumerate(FORMAT_ORDER[1:])
            for b in (0.1, 0.25, 0.5)]
    return pd.DataFrame(rows)


def _assert_legible(fig, max_height=9.0):
    """Everything drawn lies inside the figure; legends stay off the panels; titles apart."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    box = fig.bbox

    def inside(bb, what):
        assert (bb.x0 >= box.x0 - 1 and bb.y0 >= box.y0 - 1 and bb.x1 <= box.x1 + 1
                and bb.y1 <= box.y1 + 1), f"{what} {bb} is clipped by the figure {box}"

    assert fig.get_size_inches()[1] <= max_height + 1e-9
    panels = [a.get_window_extent(r) for a in fig.axes]
    for a in fig.axes:  # tick labels, axis labels and titles of every panel
        inside(a.get_tightbbox(r), f"axes {a.get_title()!r}")
    for t in (fig._supxlabel, fig._supylabel):
        if t is not None:
            inside(t.get_window_extent(r), "shared label")
    for leg in fig.legends:
        bb = leg.get_window_extent(r)
        inside(bb, "figure legend")
        assert not any(bb.overlaps(p) for p in panels), "the legend covers a panel"
    for a in fig.axes:
        if a.get_legend() is not None:
            inside(a.get_legend().get_window_extent(r), "axes legend")
    titles = [a.title.get_window_extent(r) for a in fig.axes if a.get_title()]
    for i, t1 in enumerate(titles):
        for t2 in titles[i + 1:]:
            assert not t1.overlaps(t2), "panel titles run into each other"


@pytest.mark.parametrize("k", [5, 18, 40])
def test_spectrum_readable_at_many_layers(k):
    mats = _many_matrices(k)
    fig = gp.spectrum(mats)
    _assert_legible(fig)
    texts = fig.legends[0].get_texts() if fig.legends else fig.axes[1].get_legend().get_texts()
    assert len(texts) == k  # every layer named
    if k > 6:
        assert fig.legends and fig.legends[0]._ncols >= 3  # below the panels, in columns
    plt.close(fig)
    fig = gp.spectrum(mats, layout="grid")
    assert len(fig.axes) == k
    _assert_legible(fig)


@pytest.mark.parametrize("k", [5, 18, 40])
def test_layer_grid_readable_at_many_layers(k):
    fig = gp.layer_grid(_many_rows(k))
    assert len(fig.axes) == k
    _assert_legible(fig)
    assert fig.get_size_inches()[0] == pytest.approx(7.0)


def test_layer_grid_pages_split_long_models():
    pages = gp.layer_grid_pages(_many_rows(40), per_page=16)
    assert [len(f.axes) for f in pages] == [14, 13, 13]  # balanced pages, every layer once
    titles = [a.get_title().replace("\n", "") for f in pages for a in f.axes]
    assert len(titles) == 40 and len(set(titles)) == 40
    for f in pages:
        _assert_legible(f)


def test_command_layer_grid_writes_pages_beyond_a_page(tmp_path):
    csv = tmp_path / "big.csv"
    _many_rows(60).to_csv(csv, index=False)  # 60 layers: more than one page holds (54)
    res = _invoke([csv, "--kind", "layer-grid", "--out", tmp_path / "grid.png", "--dpi", "40",
                   "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["pages"] == 2 and rec["height_in"] <= 9.0
    assert [Path(p).name for p in rec["out"]] == ["grid-p1.png", "grid-p2.png"]
    assert all(Path(p).stat().st_size > 2000 for p in rec["out"])
