"""The `gblr-approx` CLI through its entry point (subprocess): tables, JSON, exit codes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from gblr_approx.analysis.sweep import CONTRACT_COLUMNS, ROWS_FILE
from gblr_approx.cli import main

CMD = [sys.executable, "-m", "gblr_approx.cli"]


def run(*args, cwd=None, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CMD, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "enc.0.q.weight": torch.randn(32, 24, generator=g),
        "enc.0.q.bias": torch.randn(32, generator=g),
        "enc.1.fc.weight": torch.randn(20, 32, generator=g),
    }
    p = d / "model.safetensors"
    save_file(tensors, str(p))
    return p


def test_ctrl_c_exits_130(ckpt, tmp_path, monkeypatch):
    """A KeyboardInterrupt inside a command exits 130 (128 + SIGINT), as shells expect, with
    a one-line message; click's default was "Aborted!" and exit 1."""
    import gblr_approx.projection as projection

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(projection, "project", interrupted)
    r = CliRunner().invoke(main, ["project", str(ckpt), "-n", "enc.0.q.weight", "-f",
                                  "lowrank", "-b", "0.5", "-o", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 130, r.output
    assert "Interrupted." in r.output and not (tmp_path / "a.safetensors").exists()


def test_sweep_json_parsed_back(ckpt, tmp_path):
    r = run("sweep", ckpt, "--formats", "lowrank", "--budgets", "0.5,20", "--json",
            "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 4
    assert all(set(CONTRACT_COLUMNS) <= set(row) for row in rows)
    by = {(row["matrix"], row["budget"]): row for row in rows}
    ok = by[("enc.0.q.weight", 0.5)]
    assert ok["status"] == "ok" and ok["flops"] == 6 * 56  # rank floor(384 / (32 + 24)) = 6
    assert ok["budget_fraction"] == pytest.approx(336 / 768)
    W = torch.randn(32, 24, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(W.double())
    assert ok["rel_error"] == pytest.approx(float(s[6:].norm() / s.norm()), rel=1e-6)
    bad = by[("enc.0.q.weight", 20)]  # an int budget stays an int: 20 MACs < m + n = 56
    assert isinstance(bad["budget"], int)
    assert bad["status"] == "infeasible" and bad["rel_error"] is None and bad["flops"] is None
    assert (tmp_path / "out" / ROWS_FILE).is_file()


def test_sweep_default_sample_table():
    r = run("sweep", "--formats", "lowrank", "--budgets", "0.25")
    assert r.returncode == 0, r.stderr
    assert "encoder.layer.0.intermediate.dense.weight" in r.stdout
    assert "5 fits of 5 matrices from the embedded MiniLM sample" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.startswith("encoder.layer.0.attention.s"))
    assert float(line.split()[-1]) == pytest.approx(0.657, abs=2e-3)


def test_inspect_and_spectrum_json(ckpt, tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(ckpt), "--json"])
    assert res.exit_code == 0, res.output
    info = {t["name"]: t for t in json.loads(res.output)}
    assert info["enc.0.q.bias"]["matrix"] is False and info["enc.0.q.weight"]["shape"] == "32x24"
    assert info["enc.1.fc.weight"]["params"] == 640
    # spectrum of a matrix with singular values 5, 4, 3, 0, ...
    g = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(9, 3, generator=g, dtype=torch.float64))
    np.save(tmp_path / "w.npy", (U @ torch.diag(torch.tensor([5.0, 4.0, 3.0])).double() @ V.T)
            .numpy())
    r = run("spectrum", tmp_path / "w.npy", "--json")
    assert r.returncode == 0, r.stderr
    (rep,) = json.loads(r.stdout)
    assert rep["matrix"] == "w" and rep["numerical_rank"] == 3
    assert rep["stable_rank"] == pytest.approx(50 / 25) and rep["spectral_norm"] == pytest.approx(5)
    assert rep["rank_90"] == 3 and rep["rank_99"] == 3  # 25/50, 41/50 and 50/50
    assert rep["alpha"] is None and "too few" in rep["powerlaw_status"]


def test_project_then_convert(ckpt, tmp_path):
    out = tmp_path / "q.safetensors"
    r = run("project", ckpt, "-f", "lowrank", "-b", "0.5", "-o", out, "-n", "enc.0.q.weight",
            "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["flops"] == 336 and rec["format"] == "lowrank" and out.is_file()
    r = run("convert", out, "--to", "dense", "--json")
    if r.returncode == 0:
        assert json.loads(r.stdout)["rel_error_to_source"] < 1e-6
    else:  # gblr_approx.convert not installed yet: a clean one-line failure
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_failures_exit_1_with_one_line(ckpt, tmp_path):
    data = ckpt.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    r = run("inspect", cut)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "truncated or corrupt" in lines[0] and "Traceback" not in r.stderr
    res = CliRunner().invoke(main, ["sweep", str(ckpt), "--include", "decoder.*"])
    assert res.exit_code == 1 and "match none" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["--debug", "inspect", str(cut)])  # the exception escapes
    assert res.exit_code == 1 and isinstance(res.exception, ValueError)


def test_bad_usage_exit_2(ckpt):
    r = run("sweep", ckpt, "--formats", "nosuchformat")
    assert r.returncode == 2 and "unknown format 'nosuchformat'" in r.stderr
    # more usage errors in-process (same click code path, faster)
    runner = CliRunner()
    for args, msg in [
        (["sweep", str(ckpt), "--budgets", "1.5"], "is not a budget"),
        (["sweep", str(ckpt), "--workers", "0"], "--workers"),
        (["sweep", "--bogus"], "No such option"),
        (["project", str(ckpt), "-f", "lowrank", "-b", "0.5", "-o", "x.safetensors"],
         "choose one with --name"),
        (["project", str(ckpt), "-f", "lowrank", "-b", "0.5", "-o", "x.safetensors", "-n",
          "nope"], "no matrix 'nope'"),
        (["inspect", "/no/such/file"], "does not exist"),
        (["sweep", "--option", "lowrank.x"], "KEY=VALUE"),
        (["sweep", "--option", "rank=3"], "FORMAT.KEY=VALUE"),
        ([], "Usage"),
    ]:
        res = runner.invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert msg in res.output, (args, res.output)


def test_sweep_killed_and_resumed(tmp_path):
    g = torch.Generator().manual_seed(2)
    save_file({f"l.{i}.weight": torch.randn(96, 80, generator=g) for i in range(30)},
              str(tmp_path / "m.safetensors"))
    out = tmp_path / "out"
    args = ["sweep", tmp_path / "m.safetensors", "-f", "lowrank", "-b", "0.2,0.4",
            "--out", out, "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*CMD, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    rows_file = out / ROWS_FILE
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        if rows_file.is_file() and rows_file.read_text().count("\n") >= 6:  # header + 5 rows
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    killed = proc.returncode == -signal.SIGKILL
    before = {}
    if rows_file.is_file():
        text = rows_file.read_text()
        for line in text.splitlines()[1:]:
            if line.endswith("Z"):  # complete rows end with the finished_at timestamp
                f = line.split(",")
                before[(f[0], f[4])] = line
    if killed:
        assert 5 <= len(before) < 60
    r = run(*args)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert len(rows) == 60
    assert len({(x["matrix"], x["budget"]) for x in rows}) == 60  # no duplicates, none lost
    assert all(x["status"] == "ok" and math.isfinite(x["rel_error"]) for x in rows)
    # rows finished before the kill were kept, not recomputed: same timestamps
    final = {(x["matrix"], repr(x["budget"])): x["finished_at"] for x in rows}
    for key, line in before.items():
        assert final[key] == line.rsplit(",", 1)[1]
    assert rows_file.read_text().count("\n") == 61


def test_fit_gblr_in_process(ckpt, tmp_path):
    import gblr_approx as ga

    if "gblr" not in ga.FORMATS:
        pytest.skip("GBLR format not installed yet")
    out = tmp_path / "g.safetensors"
    res = CliRunner().invoke(main, ["fit", str(ckpt), "-n", "enc.1.fc.weight", "-b", "0.5",
                                    "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)
    assert rec["format"] == "gblr" and rec["budget"] == 0.5 and rec["flops"] <= 320
    G = ga.load(out)
    W = ga.load_weights(ckpt)["enc.1.fc.weight"]
    assert rec["rel_error"] == pytest.approx(ga.relative_error(W, G), rel=1e-6)
    # GBLR contains low-rank at the same cost: its error is no worse than the SVD's
    s = torch.linalg.svdvals(W.double())
    r = 160 // 52
    assert rec["rel_error"] <= float(s[r:].norm() / s.norm()) + 1e-6


# ------------------------------------------------------------------ usage checked up front
def test_structured_outputs_must_be_safetensors(ckpt, tmp_path):
    """project/fit/convert -o with another suffix would write safetensors under a .npy/.pt
    name that no reader recognises: a usage error, nothing written."""
    runner = CliRunner()
    for suffix in (".npy", ".pt", ""):
        out = tmp_path / f"proj{suffix}"
        res = runner.invoke(main, ["project", str(ckpt), "-n", "enc.1.fc.weight", "-f",
                                   "lowrank", "-b", "0.5", "-o", str(out)])
        assert res.exit_code == 2, res.output
        assert "does not end in .safetensors" in res.output and not out.exists()
    res = runner.invoke(main, ["fit", str(ckpt), "-n", "enc.1.fc.weight", "-b", "0.5", "-o",
                               str(tmp_path / "g.npy")])
    assert res.exit_code == 2 and "does not end in .safetensors" in res.output
    good = tmp_path / "proj.SafeTensors"  # the suffix is matched case-insensitively
    res = runner.invoke(main, ["project", str(ckpt), "-n", "enc.1.fc.weight", "-f", "lowrank",
                               "-b", "0.5", "-o", str(good)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(main, ["convert", str(good), "--to", "dense", "-o",
                               str(tmp_path / "d.pt")])
    assert res.exit_code == 2 and "does not end in .safetensors" in res.output
    assert not (tmp_path / "d.pt").exists()


def test_percent_budget_is_exact_and_resumes_as_the_fraction(ckpt, tmp_path):
    from gblr_approx.cli import _parse_budget

    for text, value in [("2.8%", 0.028), ("0.7%", 0.007), ("1.1%", 0.011), ("14%", 0.14),
                        ("57%", 0.57), ("100%", 1.0), (" 25 % ", 0.25)]:
        b = _parse_budget(text)
        assert isinstance(b, float) and b == value, (text, b)
    out = tmp_path / "pct"
    runner = CliRunner()
    args = ["sweep", str(ckpt), "-i", "enc.0.*", "-f", "lowrank", "-o", str(out), "--json"]
    res = runner.invoke(main, [*args, "-b", "57.1%"])
    assert res.exit_code == 0, res.output
    assert [r["budget"] for r in json.loads(res.stdout)] == [0.571]
    res = runner.invoke(main, [*args, "-b", "0.571"])  # the same fit: resumed, not added
    assert res.exit_code == 0, res.output
    assert (out / ROWS_FILE).read_text().count("\n") == 2  # header + one row
    res = runner.invoke(main, [*args, "-b", "x%"])
    assert res.exit_code == 2 and "is not a budget" in res.output


def test_empty_formats_or_budgets_are_usage_errors(ckpt):
    runner = CliRunner()
    for opt, value, what in [("-b", "", "budget"), ("-b", " , ", "budget"),
                             ("-f", ",", "format"), ("--formats", "", "format")]:
        res = runner.invoke(main, ["sweep", str(ckpt), opt, value, "--json"])
        assert res.exit_code == 2, (opt, value, res.output)
        assert f"names no {what}" in res.output


def test_option_keys_checked_before_any_fit(ckpt, tmp_path):
    runner = CliRunner()
    out = tmp_path / "badopt"
    res = runner.invoke(main, ["sweep", str(ckpt), "-f", "lowrank,blocksparse", "-b", "0.25",
                               "--option", "blocksparse.blok_shape=4,4", "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert "'blok_shape'" in res.output and "block_shape" in res.output
    assert not (out / ROWS_FILE).exists()  # nothing ran
    res = runner.invoke(main, ["project", str(ckpt), "-n", "enc.1.fc.weight", "-f",
                               "blocksparse", "-b", "0.5", "--option", "grid=2,2", "-o",
                               str(tmp_path / "p.safetensors")])
    assert res.exit_code == 2 and "'grid'" in res.output and "block_shape" in res.output
    res = runner.invoke(main, ["sweep", str(ckpt), "-i", "enc.1.*", "-f", "blocksparse", "-b",
                               "0.5", "--option", "blocksparse.block_shape=4,4", "--json"])
    assert res.exit_code == 0, res.output  # a correct key still reaches the projection
    assert json.loads(res.stdout)[0]["options"] == '{"block_shape": [4, 4]}'


def test_failure_causes_keep_words_around_short_matrix_names(tmp_path):
    from gblr_approx.cli import _cause

    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 16)).astype("f4")
    a[0, 0] = np.nan
    np.savez(tmp_path / "short.npz", a=a, b=rng.standard_normal((20, 16)).astype("f4"))
    res = CliRunner().invoke(main, ["sweep", str(tmp_path / "short.npz"), "-f", "lowrank", "-b",
                                    "0.25", "--no-progress"])
    assert res.exit_code == 0, res.output
    line = [ln for ln in res.stderr.splitlines() if "did not succeed" in ln]
    assert line == ["1 of 2 fits did not succeed (1 x failed: ValueError: W contains 1 NaN "
                    "or Inf entries)"]
    assert _cause("'a' is not a.b of a; more", "a") == \
        "'W' is not a.b of W"  # first clause only; "a.b" is another name
    assert _cause("a1 and a.", "a") == "a1 and W."
    assert _cause("a.b failed for enc.a.b", "a.b") == "W failed for enc.a.b"


# --------------------------------------------------------------- compress / evaluate (tiny)
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A one-layer BERT (hidden size 16) saved as a plain transformers folder: no download."""
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
             *"the a of to and is in matrix low rank weight".split()]
    (d / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(str(d))
    tok.save_pretrained(str(d))
    texts = d.parent / "texts.txt"
    texts.write_text("the matrix is low rank\na weight of the matrix\nlow rank and the weight\n"
                     "to the matrix\n", encoding="utf-8")
    return d, texts


def _compress_args(model, texts, out, *more):
    return ["compress", str(model), "--formats", "lowrank", "--no-sensitivity", "--allocation",
            "uniform", "--include", "*attention.self.query", "--calibration", str(texts),
            "--out", str(out), *more]


def test_compress_out_never_replaces_an_input_or_an_existing_file(tiny_model, tmp_path):
    import hashlib

    model, texts = tiny_model
    runner = CliRunner()
    weights = model / "model.safetensors"
    digest = hashlib.md5(weights.read_bytes()).hexdigest()
    for force in ([], ["--force"]):  # the model's own weights: refused even with --force
        res = runner.invoke(main, _compress_args(model, texts, weights, "--json", *force))
        assert res.exit_code == 2, res.output
        assert hashlib.md5(weights.read_bytes()).hexdigest() == digest
    beside = model / "compressed.safetensors"  # a new file in the model folder is fine
    res = runner.invoke(main, _compress_args(model, texts, beside, "--json"))
    assert res.exit_code == 0 and beside.stat().st_size > 100, res.output
    beside.unlink()
    out = tmp_path / "existing.safetensors"
    out.write_text("precious")
    res = runner.invoke(main, _compress_args(model, texts, out, "--json"))
    assert res.exit_code == 2 and "--force" in res.output and out.read_text() == "precious"
    res = runner.invoke(main, _compress_args(model, texts, out, "--json", "--force"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["layers"] == 1 and out.stat().st_size > 100


def test_quiet_compress_and_evaluate_print_nothing_on_stderr(tiny_model, tmp_path):
    from transformers.utils import logging as tf_logging

    model, texts = tiny_model
    runner = CliRunner()
    out = tmp_path / "c.safetensors"
    res = runner.invoke(main, _compress_args(model, texts, out))
    assert res.exit_code == 0, res.output
    assert "loading" in res.stderr  # the status lines without -q
    res = runner.invoke(main, ["-q", *_compress_args(model, texts, tmp_path / "q.safetensors")])
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and "formats: lowrank x1" in res.stdout
    res = runner.invoke(main, ["-q", "evaluate", str(model), str(out), "--texts", str(texts)])
    assert res.exit_code == 0, res.output
    assert res.stderr == "" and "mean_cosine" in res.stdout
    assert tf_logging.is_progress_bar_enabled()  # the switch is restored afterwards


def test_compress_counts_must_be_positive(tiny_model, tmp_path):
    model, texts = tiny_model
    runner = CliRunner()
    out = tmp_path / "c.safetensors"
    for more in (["--max-texts", "0"], ["--max-texts=-2"], ["--threads=-1"]):
        res = runner.invoke(main, _compress_args(model, texts, out, *more))
        assert res.exit_code == 2 and "x>=1" in res.output, (more, res.output)
        res = runner.invoke(main, ["evaluate", str(model), str(out), "--texts", str(texts),
                                   *more])
        assert res.exit_code == 2 and "x>=1" in res.output, (more, res.output)
    res = runner.invoke(main, _compress_args(model, texts, out, "--max-texts", "2", "--json"))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["summary"]["calibration_texts"] == 2
    res = runner.invoke(main, ["evaluate", str(model), str(out), "--texts", str(texts),
                               "--max-texts", "3", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["texts"] == 3
    res = runner.invoke(main, _compress_args(model, texts, out, "--formats", ","))
    assert res.exit_code == 2 and "names no format" in res.output
    res = runner.invoke(main, _compress_args(model, texts, out, "--option",
                                             "lowrank.rnak=2"))
    assert res.exit_code == 2 and "'rnak'" in res.output
