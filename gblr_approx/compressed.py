"""Save and load the structured layers of a compressed model (one ``.safetensors`` file).

The file holds, for every :class:`~gblr_approx.nn.StructuredLinear` module of the model, its
stored tensors under ``"<module name>/<tensor name>"`` (factors, integer index tensors, bias)
and a JSON manifest in the metadata (key ``"gblr_approx_manifest"``): one entry per module with
its name, format, shape, configuration, provenance ``info`` and tensor names. Everything else
of the model comes from the original (dense) checkpoint: :func:`load_compressed` puts the
layers into a freshly loaded dense model, bit-exact (the same tensors, same dtype).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

__all__ = ["save_compressed", "load_compressed", "MANIFEST_KEY"]

MANIFEST_KEY = "gblr_approx_manifest"
_VERSION = 1


def save_compressed(model: nn.Module, path: str | Path) -> Path:
    """Write every :class:`StructuredLinear` of ``model`` and a manifest to ``path``.

    Returns the path. Raises ``ValueError`` when the model has no structured layer.
    """
    from safetensors.torch import save_file

    from . import __version__
    from .nn import StructuredLinear

    tensors: dict[str, torch.Tensor] = {}
    manifest = []
    for name, mod in model.named_modules():
        if not isinstance(mod, StructuredLinear):
            continue
        names = []
        for t_name in mod._names:
            t = getattr(mod, f"factor_{t_name}").detach()
            tensors[f"{name}/{t_name}"] = t.contiguous().cpu()
            names.append(t_name)
        if mod.bias is not None:
            tensors[f"{name}/bias"] = mod.bias.detach().contiguous().cpu()
        manifest.append({
            "name": name,
            "format": mod.format_name,
            "shape": [mod.out_features, mod.in_features],
            "config": mod._config,
            "tensors": names,
            "bias": mod.bias is not None,
            "flops": mod.flops,
            "info": mod.info,
        })
    if not manifest:
        raise ValueError("model has no StructuredLinear layer; nothing to save")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        MANIFEST_KEY: json.dumps(manifest, default=str),
        "gblr_approx_version": __version__,
        "manifest_version": str(_VERSION),
    }
    save_file(tensors, str(path), metadata=meta)
    return path


def load_compressed(
    model: nn.Module, path: str | Path, device: torch.device | str | None = None
) -> nn.Module:
    """Replace the layers listed in the file at ``path`` by their saved structured versions.

    Parameters
    ----------
    model : torch.nn.Module
        The dense model, freshly loaded from its original checkpoint (modified in place).
    path : str or Path
        A file written by :func:`save_compressed`.
    device : optional
        Device of the new layers (default: that of the module each one replaces).

    Returns
    -------
    torch.nn.Module
        ``model``. Each replaced module must exist and be an ``nn.Linear`` (or a
        ``StructuredLinear``) of the saved shape; ``ValueError`` names the first that is not.
    """
    from .compress import replace_module
    from .formats.base import get_format, read_safetensors
    from .nn import StructuredLinear

    path = Path(path)
    meta, tensors = read_safetensors(path)
    if MANIFEST_KEY not in meta:
        raise ValueError(f"{path} has no {MANIFEST_KEY!r} metadata; it was not written by "
                         "save_compressed")
    manifest = json.loads(meta[MANIFEST_KEY])
    modules = dict(model.named_modules())
    for entry in manifest:
        name = entry["name"]
        old = modules.get(name)
        out_f, in_f = entry["shape"]
        if old is None:
            raise ValueError(f"the model has no module {name!r} (listed in {path})")
        if isinstance(old, nn.Linear):
            shape_ok = (old.out_features, old.in_features) == (out_f, in_f)
        elif isinstance(old, StructuredLinear):
            shape_ok = (old.out_features, old.in_features) == (out_f, in_f)
        else:
            raise ValueError(f"module {name!r} is a {type(old).__name__}, not an nn.Linear")
        if not shape_ok:
            raise ValueError(f"module {name!r} has a different shape than the saved "
                             f"({out_f}, {in_f}) layer")
        cls = get_format(entry["format"])
        ts = {t: tensors[f"{name}/{t}"] for t in entry["tensors"]}
        A = cls._from_state(ts, entry["config"], (out_f, in_f))
        bias = tensors[f"{name}/bias"] if entry["bias"] else None
        new = StructuredLinear(A, bias)
        new.info = dict(entry.get("info", {}))
        dev = device if device is not None else next(
            (p.device for p in old.parameters()), torch.device("cpu"))
        replace_module(model, name, new.to(dev))
    return model
