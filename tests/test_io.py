"""Checkpoint readers: every format, filters, conv reshape, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import gblr_approx as ga
from gblr_approx.io import WeightStore, match_names


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(0)
    return {
        "enc.0.attn.q.weight": torch.randn(12, 8, generator=g),
        "enc.0.attn.q.bias": torch.randn(12, generator=g),
        "enc.1.mlp.fc.weight": torch.randn(6, 8, generator=g, dtype=torch.float64),
        "enc.1.mlp.fc.half": torch.randn(5, 4, generator=g).to(torch.bfloat16),
        "conv.weight": torch.randn(4, 3, 2, 2, generator=g),
        "pos_ids": torch.arange(10).reshape(1, 10),
    }


MATRICES = ["enc.0.attn.q.weight", "enc.1.mlp.fc.weight", "enc.1.mlp.fc.half"]


def _check(store: WeightStore, state):
    assert sorted(store) == sorted(MATRICES)
    for k in MATRICES:
        t = store[k]
        assert t.dtype == state[k].dtype
        assert torch.equal(t, state[k])
    assert store.info("enc.1.mlp.fc.weight").shape == (6, 8)
    assert store.info("enc.1.mlp.fc.weight").nbytes == 6 * 8 * 8


def test_safetensors_lazy_and_exact(tmp_path, state):
    p = tmp_path / "m.safetensors"
    save_file(state, str(p))
    store = ga.load_weights(p)
    assert isinstance(store, WeightStore)
    _check(store, state)
    # every tensor, in file order, with matrices_only=False
    full = ga.load_weights(p, matrices_only=False)
    assert len(full) == 6
    assert full.info("pos_ids").dtype == "int64"
    assert not full.info("pos_ids").is_matrix


def test_torch_state_dict_mmap_and_legacy(tmp_path, state):
    p = tmp_path / "m.pt"
    torch.save(state, p)
    _check(ga.load_weights(p), state)
    q = tmp_path / "legacy.bin"
    torch.save(state, q, _use_new_zipfile_serialization=False)
    _check(ga.load_weights(q), state)
    nested = tmp_path / "nested.pth"
    torch.save({"state_dict": {"lin.weight": state["enc.0.attn.q.weight"]}, "epoch": 3}, nested)
    s = ga.load_weights(nested)
    assert list(s) == ["state_dict.lin.weight"]
    assert torch.equal(s["state_dict.lin.weight"], state["enc.0.attn.q.weight"])


def test_torch_file_without_state_dict(tmp_path):
    p = tmp_path / "x.pt"
    torch.save([1, 2, 3], p)
    with pytest.raises(ValueError, match="not a state dict"):
        ga.load_weights(p)


def test_torch_file_with_a_pickled_module_says_so(tmp_path):
    # torch.save(model) pickles the module, which weights_only loading refuses; the message
    # used to blame a truncated or corrupt file
    p = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(6, 8), p)
    with pytest.raises(ValueError, match="pickled Python objects") as err:
        ga.load_weights(p)
    msg = str(err.value)
    assert "corrupt?" not in msg and "state_dict()" in msg and "weights_only=False" in msg
    assert "torch.nn.modules.linear.Linear" in msg


def test_npz_and_npy_and_folder(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.ones((2, 5), dtype=np.float64)
    np.savez(tmp_path / "w.npz", a=a, vec=np.ones(3))
    s = ga.load_weights(tmp_path / "w.npz")
    assert list(s) == ["a"]
    assert torch.equal(s["a"], torch.from_numpy(a))
    d = tmp_path / "npy"
    d.mkdir()
    np.save(d / "first.npy", a)
    np.save(d / "second.npy", b)
    s = ga.load_weights(d)
    assert list(s) == ["first", "second"]
    assert s["second"].dtype == torch.float64 and float(s["second"].sum()) == 10.0


def test_folder_prefers_safetensors(tmp_path, state):
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save(state, tmp_path / "pytorch_model.bin")  # the same tensors: must not collide
    (tmp_path / "config.json").write_text("{}")
    s = ga.load_weights(tmp_path)
    assert [f.name for f in s.files] == ["model.safetensors"]
    _check(s, state)


def test_folder_duplicate_names_refused(tmp_path, state):
    save_file({"w": state["enc.0.attn.q.weight"]}, str(tmp_path / "a.safetensors"))
    save_file({"w": state["enc.0.attn.q.weight"]}, str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match="appears in both"):
        ga.load_weights(tmp_path)


def test_filters_glob_and_regex(tmp_path, state):
    p = tmp_path / "m.safetensors"
    save_file(state, str(p))
    assert sorted(ga.load_weights(p, include="enc.*.weight")) == sorted(MATRICES[:2])
    assert sorted(ga.load_weights(p, include="re:mlp")) == sorted(MATRICES[1:])
    assert list(ga.load_weights(p, exclude=["*half", "re:^enc\\.0"])) == ["enc.1.mlp.fc.weight"]
    assert sorted(ga.load_weights(p, include=["*q*", "*fc.weight"])) == sorted(MATRICES[:2])
    # a glob matches the whole name, a regex anywhere
    assert match_names(["a.weight", "b.weight.x"], "*.weight") == ["a.weight"]
    assert match_names(["a.weight", "b.weight.x"], "re:weight") == ["a.weight", "b.weight.x"]


def test_filter_matching_nothing(tmp_path, state):
    p = tmp_path / "m.safetensors"
    save_file(state, str(p))
    with pytest.raises(ValueError, match=r"match none of the 3 matrices.*enc\.0\.attn\.q\.weight"):
        ga.load_weights(p, include="decoder.*")
    with pytest.raises(ValueError, match="invalid regular expression"):
        ga.load_weights(p, include="re:(")


def test_reshape_conv(tmp_path, state):
    p = tmp_path / "m.safetensors"
    save_file(state, str(p))
    s = ga.load_weights(p, include="conv.*", reshape_conv=True)
    w = s["conv.weight"]
    assert w.shape == (4, 12)
    assert torch.equal(w, state["conv.weight"].reshape(4, 12))
    assert s.info("conv.weight").stored_shape == (4, 3, 2, 2)
    with pytest.raises(ValueError, match="match none"):
        ga.load_weights(p, include="conv.*")  # 4-D kernels are not matrices by default


def test_truncated_safetensors(tmp_path, state):
    p = tmp_path / "m.safetensors"
    save_file(state, str(p))
    data = p.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) - 40])
    with pytest.raises(ValueError, match=r"cut\.safetensors is not a readable \.safetensors"):
        ga.load_weights(bad)
    bad.write_bytes(data[:6])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ga.load_weights(bad)


def test_truncated_pt_and_npz(tmp_path, state):
    p = tmp_path / "m.pt"
    torch.save(state, p)
    (tmp_path / "cut.pt").write_bytes(p.read_bytes()[:300])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        ga.load_weights(tmp_path / "cut.pt")
    np.savez(tmp_path / "w.npz", a=np.ones((3, 3)))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "w.npz").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable .npz"):
        ga.load_weights(tmp_path / "cut.npz")


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ga.load_weights(tmp_path / "nope.safetensors")
    (tmp_path / "w.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        ga.load_weights(tmp_path / "w.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no checkpoint file"):
        ga.load_weights(empty)


def test_unknown_key_error_lists_names(tmp_path, state):
    p = tmp_path / "m.safetensors"
    save_file(state, str(p))
    s = ga.load_weights(p)
    with pytest.raises(KeyError, match="enc.0.attn.q.weight"):
        s["missing"]


# ------------------------------------------------- structured-matrix files, output guard
def test_structured_files_in_a_folder_are_matrices(tmp_path, state):
    from gblr_approx.io import structured_metadata

    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    g = torch.Generator().manual_seed(4)
    A = ga.BlockLowRank.project(torch.randn(12, 8, generator=g, dtype=torch.float64), 60)
    A.save(tmp_path / "q_blr.safetensors")
    assert structured_metadata(tmp_path / "q_blr.safetensors")["format"] == "blocklowrank"
    assert structured_metadata(tmp_path / "model.safetensors") is None  # HF: format "pt"
    assert structured_metadata(tmp_path) is None
    store = ga.load_weights(tmp_path)
    names = list(store)  # file order: the model's matrices, then the saved one
    assert set(names[:-1]) == set(MATRICES) and names[-1] == "q_blr"
    info = store.info("q_blr")
    assert info.structured == "blocklowrank" and info.shape == (12, 8)
    assert info.dtype == "float64" and info.nbytes < 12 * 8 * 8  # the stored factors
    assert torch.equal(store["q_blr"], A.to_dense())
    assert store.info(MATRICES[0]).structured is None


def test_check_output(tmp_path):
    from gblr_approx.io import check_output

    src = tmp_path / "in.safetensors"
    src.write_bytes(b"data")
    new = tmp_path / "sub" / "new.safetensors"
    assert check_output(new, [src]) == new  # not there yet: fine
    new.parent.mkdir()
    (tmp_path / "link").symlink_to(src)
    for same in (src, tmp_path / "link", tmp_path / "sub" / ".." / "in.safetensors"):
        with pytest.raises(FileExistsError, match="is the input"):
            check_output(same, [src], force=True)
    with pytest.raises(FileExistsError, match="is the input"):  # a folder's files count
        check_output(src, [tmp_path], force=True)
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"old")
    with pytest.raises(FileExistsError, match="already exists; pass --force"):
        check_output(other, [src])
    assert check_output(other, [src], force=True) == other
    with pytest.raises(IsADirectoryError):
        check_output(tmp_path, [src], force=True)
    assert src.read_bytes() == b"data" and other.read_bytes() == b"old"


def test_interrupted_saves_keep_the_previous_file(tmp_path, monkeypatch):
    """``A.save``, ``save_compressed`` and ``llm_like_checkpoint`` write atomically: a write
    that fails part-way (here: after writing a partial file, as a full disk or Ctrl-C would)
    leaves the previous file intact and no temporary file behind."""
    import safetensors.torch

    from gblr_approx.compressed import save_compressed

    g = torch.Generator().manual_seed(0)
    A = ga.LowRank(torch.randn(12, 3, generator=g), torch.randn(8, 3, generator=g))
    model = torch.nn.Sequential(ga.nn.StructuredLinear(A, torch.zeros(12)))
    saves = {
        "matrix": lambda p: A.save(p),
        "model": lambda p: save_compressed(model, p),
        "checkpoint": lambda p: ga.datasets.llm_like_checkpoint(p, layers=1, scale=1 / 64),
    }
    real = safetensors.torch.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(20)
        raise KeyboardInterrupt

    for name, save in saves.items():
        path = tmp_path / f"{name}.safetensors"
        save(path)
        before = path.read_bytes()
        monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            save(path)
        monkeypatch.setattr(safetensors.torch, "save_file", real)
        assert path.read_bytes() == before, name
        assert sorted(p.name for p in tmp_path.iterdir() if name in p.name) == [path.name]
    torch.testing.assert_close(ga.load(tmp_path / "matrix.safetensors").to_dense(), A.to_dense())
