"""Findings of the issue-10 audit, each checked through the CLI as a user meets it.

Outputs never replace inputs (item 2), saved structured matrices are read by their metadata
(item 6), empty / all-failed results are refused with a non-zero exit (item 10), and the
"next in line" items: spectrum goes on past a bad matrix, damaged files say what is wrong,
--reshape-conv everywhere, one-line warnings and --quiet, sweep --seed -1 refused.
"""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import gblr_approx as ga
from gblr_approx.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture()
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    p = tmp_path / "model.safetensors"
    save_file({"fc.weight": torch.randn(24, 16, generator=g),
               "fc.bias": torch.randn(24, generator=g)}, str(p), metadata={"format": "pt"})
    return p


@pytest.fixture()
def saved(tmp_path):
    """A low-rank matrix saved by StructuredMatrix.save (factors U, V in the file)."""
    g = torch.Generator().manual_seed(1)
    A = ga.LowRank(torch.randn(20, 3, generator=g), torch.randn(12, 3, generator=g))
    return A, A.save(tmp_path / "layer_lr.safetensors")


# ------------------------------------------------------------ item 2: never overwrite input
@pytest.mark.parametrize("command", ["project", "fit"])
def test_output_is_never_the_input(ckpt, tmp_path, command):
    before = digest(ckpt)
    link = tmp_path / "link.safetensors"
    link.symlink_to(ckpt)
    hard = tmp_path / "hard.safetensors"
    os.link(ckpt, hard)
    sub = tmp_path / "sub"
    sub.mkdir()
    extra = ["--format", "lowrank"] if command == "project" else ["--steps", "2"]
    for out in (ckpt, link, hard, sub / ".." / "model.safetensors"):
        for force in ([], ["--force"]):  # --force never allows destroying the input
            r = cli(command, ckpt, "-b", "0.5", *extra, "-o", out, *force)
            assert r.exit_code == 2, r.output
            assert "is the input" in r.output and "destroy the input" in r.output
    # reading through the symlink and writing to the real file is caught too
    r = cli(command, link, "-b", "0.5", *extra, "-o", ckpt, "--force")
    assert r.exit_code == 2 and "is the input" in r.output
    assert digest(ckpt) == before and ckpt.stat().st_size > 1000


@pytest.mark.parametrize("command", ["project", "fit"])
def test_existing_output_needs_force(ckpt, tmp_path, command):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    extra = ["--format", "lowrank"] if command == "project" else ["--steps", "2"]
    r = cli(command, ckpt, "-b", "0.5", *extra, "-o", out)
    assert r.exit_code == 2 and "already exists; pass --force" in r.output
    assert out.read_bytes() == b"precious"
    r = cli(command, ckpt, "-b", "0.5", *extra, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert ga.load(out).shape == (24, 16)


def test_convert_output_guarded(saved, tmp_path):
    _, path = saved
    before = digest(path)
    r = cli("convert", path, "--to", "dense", "-o", path, "--force")
    assert r.exit_code == 2 and "is the input" in r.output
    assert digest(path) == before
    out = tmp_path / "dense.safetensors"
    assert cli("convert", path, "--to", "dense", "-o", out).exit_code == 0
    r = cli("convert", path, "--to", "dense", "-o", out)
    assert r.exit_code == 2 and "--force" in r.output
    assert cli("convert", path, "--to", "dense", "-o", out, "--force").exit_code == 0


# ------------------------------------------------- item 6: structured files by their metadata
def test_inspect_describes_a_structured_matrix(saved):
    A, path = saved
    r = cli("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    rec = json.loads(r.output)
    assert rec["kind"] == "structured matrix" and rec["format"] == "lowrank"
    assert rec["shape"] == "20x12" and rec["flops"] == A.flops == 3 * 32
    assert {t["name"] for t in rec["tensors"]} == {"U", "V"}
    text = cli("inspect", path).output
    assert "structured matrix" in text and "lowrank" in text


def test_load_weights_reads_the_matrix_a_file_represents(saved, ckpt):
    A, path = saved
    store = ga.load_weights(path)
    assert list(store) == ["layer_lr"]  # not its factors U and V
    assert store.info("layer_lr").structured == "lowrank"
    assert torch.equal(store["layer_lr"], A.to_dense())
    # a Hugging Face file carries {"format": "pt"} metadata: still an ordinary weights file
    assert list(ga.load_weights(ckpt)) == ["fc.weight"]


def test_spectrum_and_sweep_analyse_the_structured_matrix(saved):
    A, path = saved
    r = cli("spectrum", path, "--json", "--values")
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(r.output)
    assert rec["matrix"] == "layer_lr" and rec["shape"] == "20x12"
    sv = torch.linalg.svdvals(A.to_dense().double())
    assert rec["singular_values"][:3] == pytest.approx(sv[:3].tolist(), rel=1e-5)
    assert max(rec["singular_values"][3:]) < 1e-4 * rec["singular_values"][0]  # rank 3
    r = cli("sweep", path, "-f", "lowrank", "-b", str(3 * 32), "--json")
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.output)
    assert row["matrix"] == "layer_lr" and row["status"] == "ok"
    assert row["rel_error"] < 1e-5  # rank 3 within 3 ranks: exact


def test_load_on_a_weights_file_points_to_load_weights(ckpt):
    with pytest.raises(ValueError, match=r"is a weights file .*format='pt'.*load_weights"):
        ga.load(ckpt)
    r = cli("convert", ckpt, "--to", "dense")
    assert r.exit_code == 1 and "load_weights" in r.output and "unknown format" not in r.output


def test_damaged_structured_file_says_what_is_wrong(tmp_path):
    g = torch.Generator().manual_seed(2)
    A = ga.Monarch(torch.randn(2, 4, 4, generator=g), torch.randn(2, 4, 4, generator=g))
    path = A.save(tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        meta, w1, w2 = f.metadata(), f.get_tensor("w1"), f.get_tensor("w2")
    save_file({"w2": w2}, str(path), metadata=meta)  # the tensor w1 removed
    r = cli("convert", path, "--to", "dense")
    assert r.exit_code == 1
    assert "damaged monarch file" in r.output and "'w1' is missing" in r.output
    assert r.output.strip() != "Error: w1"
    meta["shape"] = "[9, 8]"
    save_file({"w1": w1, "w2": w2}, str(path), metadata=meta)  # shape metadata edited
    with pytest.raises(ValueError, match="damaged monarch file"):
        ga.load(path)


# ------------------------------------------------ item 10: empty / all-failed -> non-zero
def _table(statuses, tmp_path, formats=("lowrank",)):
    rows = [dict(matrix=f"m{i}", rows=8, cols=8, format=f, budget=0.5, flops=32,
                 budget_fraction=0.5, rel_error=0.3 if s == "ok" else float("nan"),
                 rel_error_2=0.2, seconds=0.1, status=s,
                 message="" if s == "ok" else "ValueError: boom")
            for i, s in enumerate(statuses) for f in formats]
    p = tmp_path / "rows.json"
    p.write_text(json.dumps(rows))
    return p


def test_plot_refuses_empty_and_all_failed_tables(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    for kind in ("error-vs-budget", "layer-grid", "budget-allocation"):
        r = cli("plot", empty, "--kind", kind, "-o", tmp_path / "f.png")
        assert r.exit_code != 0 and "nothing to plot" in r.output, (kind, r.output)
        r = cli("plot", _table(["failed", "failed"], tmp_path), "--kind", kind,
                "-o", tmp_path / "f.png")
        assert r.exit_code != 0, r.output
        assert "none of the 2 fits" in r.output and "boom" in r.output
    assert not (tmp_path / "f.png").exists()


def test_plot_names_a_format_whose_fits_all_failed(tmp_path):
    rows = json.loads(_table(["ok", "ok"], tmp_path).read_text())
    rows += [{**r, "format": "blast", "status": "failed", "rel_error": None} for r in rows]
    p = tmp_path / "mixed.json"
    p.write_text(json.dumps(rows))
    r = cli("plot", p, "-o", tmp_path / "f.png")
    assert r.exit_code == 0, r.output
    warn = [ln for ln in r.stderr.splitlines() if "blast" in ln]
    assert len(warn) == 1 and warn[0].startswith("warning: no successful fit for format(s) blast")
    assert "warnings.warn" not in r.stderr and ".py:" not in r.stderr  # one line, no source
    r = cli("--quiet", "plot", p, "-o", tmp_path / "g.png")
    assert r.exit_code == 0 and r.stderr == ""


def test_sweep_where_every_fit_fails_exits_non_zero(tmp_path):
    W = torch.randn(12, 10)
    W[0, 0] = float("nan")
    p = tmp_path / "nan.safetensors"
    save_file({"bad.weight": W, "good.weight": torch.randn(6, 5)}, str(p))
    r = cli("sweep", p, "-i", "bad.weight", "-f", "lowrank", "-b", "0.5,0.25")
    assert r.exit_code == 1, r.output
    assert "2 of 2 fits did not succeed (2 x failed: ValueError: W contains 1 NaN" in r.stderr
    assert "no fit succeeded" in r.stderr
    r = cli("sweep", p, "-f", "lowrank", "-b", "0.5", "--json")  # one of two succeeds
    assert r.exit_code == 0 and "1 of 2 fits did not succeed" in r.stderr
    assert len(json.loads(r.stdout)) == 2


def test_sweep_seed_minus_one_refused_like_fit():
    for args in (["sweep", "--seed", "-1"], ["fit", "x", "-b", "0.5", "-o", "y", "--seed", "-1"]):
        r = cli(*args)
        assert r.exit_code == 2 and "--seed" in r.output


# ------------------------------------------------------------------------ next in line
def test_spectrum_records_a_bad_matrix_and_goes_on(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"a.weight": torch.zeros(6, 5), "b.weight": torch.randn(8, 6)}, str(p))
    r = cli("spectrum", p, "--json")
    assert r.exit_code == 0, r.output
    rows = {x["matrix"]: x for x in json.loads(r.stdout)}
    assert rows["b.weight"]["status"] == "ok" and rows["b.weight"]["rank_99"] >= 1
    assert rows["a.weight"]["status"] == "failed" and "zero matrix" in rows["a.weight"]["message"]
    assert "failed: a.weight: W is the zero matrix" in r.stderr
    save_file({"a.weight": torch.zeros(6, 5)}, str(p))
    r = cli("spectrum", p)
    assert r.exit_code == 1 and "no matrix could be analysed" in r.output


def test_reshape_conv_on_spectrum_project_and_plot(tmp_path):
    g = torch.Generator().manual_seed(3)
    p = tmp_path / "conv.safetensors"
    save_file({"conv.weight": torch.randn(8, 3, 3, 3, generator=g)}, str(p))
    assert cli("spectrum", p).exit_code != 0  # no matrix without the reshape
    r = cli("spectrum", p, "--reshape-conv", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["shape"] == "8x27"
    out = tmp_path / "lr.safetensors"
    r = cli("project", p, "--reshape-conv", "-f", "lowrank", "-b", "0.5", "-o", out)
    assert r.exit_code == 0, r.output
    assert ga.load(out).shape == (8, 27)
    r = cli("plot", p, "--kind", "spectrum", "--reshape-conv", "-o", tmp_path / "s.png")
    assert r.exit_code == 0, r.output


def test_plot_never_replaces_its_input(tmp_path):
    p = _table(["ok"], tmp_path)
    fig = tmp_path / "fig.png"
    fig.symlink_to(p)  # a figure path that is the results table
    before = digest(p)
    r = cli("plot", p, "-o", fig)
    assert r.exit_code == 2 and "is the input" in r.output
    assert digest(p) == before
    assert pd.read_json(p).shape[0] == 1


def test_python_warnings_are_one_line_and_quiet_hides_them(ckpt, tmp_path):
    out = tmp_path / "lr.safetensors"
    # 1000 MACs buys rank 16 = 640 MACs, more than the dense 384: projection warns
    r = cli("project", ckpt, "-f", "lowrank", "-b", "1000", "-o", out)
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    assert lines == ["warning: the lowrank result costs 640 MACs, more than the dense matrix "
                     "(384); storing W densely would be cheaper"]
    r = cli("--quiet", "project", ckpt, "-f", "lowrank", "-b", "1000", "-o", out, "--force")
    assert r.exit_code == 0 and r.stderr == ""


def test_ci_builds_the_docs_then_runs_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ci = [ln for ln in (root / ".ci" / "run").read_text().splitlines() if ln.strip()]
    readme = (root / "README.md").read_text()
    assert ci[-1] in readme.splitlines()  # the README's test command, verbatim, last
    assert "pytest" in ci[-1]
    docs = next(i for i, ln in enumerate(ci) if "mkdocs build --strict" in ln)
    assert docs < len(ci) - 1 and any('".[docs]"' in ln for ln in ci[:docs])
    assert (root / "mkdocs.yml").is_file() and "site/" in (root / ".gitignore").read_text()
