"""Save and load the structured layers of a compressed model (one ``.safetensors`` file).

The file holds, for every :class:`~gblr_approx.nn.StructuredLinear` module of the model, its
stored tensors under ``"<module name>/<tensor name>"`` (factors, integer index tensors, bias)
and a JSON manifest in the metadata (key ``"gblr_approx_manifest"``): one entry per module with
its name, format, shape, configuration, provenance ``info`` and tensor names. Everything else
of the model comes from the original (dense) checkpoint: :func:`load_compressed` puts the
layers into a freshly loaded dense model, bit-exact when the model has the dtype the layers
were saved in (otherwise each layer is cast to the dtype of the module it replaces, as it is
moved to that module's device). A layer shared under several names (tied or reused) is saved
once and put back at every name.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .calibration import module_names

__all__ = ["save_compressed", "load_compressed", "MANIFEST_KEY"]

MANIFEST_KEY = "gblr_approx_manifest"
_VERSION = 1


def save_compressed(model: nn.Module, path: str | Path) -> Path:
    """Write every :class:`StructuredLinear` of ``model`` and a manifest to ``path``.

    Returns the path. Raises ``ValueError`` when the model has no structured layer. The
    write is atomic: an interrupted save leaves a previous file at ``path`` as it was.
    """
    from . import __version__
    from .formats.base import write_safetensors
    from .nn import StructuredLinear

    tensors: dict[str, torch.Tensor] = {}
    manifest = []
    every_name = module_names(model, StructuredLinear)
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
            "aliases": every_name[mod][1:],
        })
    if not manifest:
        raise ValueError("model has no StructuredLinear layer; nothing to save")
    meta = {
        MANIFEST_KEY: json.dumps(manifest, default=str),
        "gblr_approx_version": __version__,
        "manifest_version": str(_VERSION),
    }
    return write_safetensors(path, tensors, meta)  # atomic: a failed save keeps the old file


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
        ``StructuredLinear``) of the saved shape; ``ValueError`` names the first that is not,
        and a saved tensor missing from the file. Each new layer takes the floating-point
        dtype of the module it replaces (a float16 model stays float16; bit-exact when it is
        the saved dtype). A module that is reachable under several names (tied or reused),
        or that was saved with aliases, is replaced at every name by one layer. A saved
        layer and a replaced module that disagree on having a bias give a ``UserWarning``:
        the saved layer is used as saved (its bias, or none).
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
    modules = dict(model.named_modules(remove_duplicate=False))  # every name of every module
    every_name = module_names(model)
    for entry in manifest:
        name = entry["name"]
        out_f, in_f = entry["shape"]
        targets = []
        for alias in [name, *entry.get("aliases", [])]:
            old = modules.get(alias)
            if old is None:
                raise ValueError(f"the model has no module {alias!r} (listed in {path})")
            if not isinstance(old, (nn.Linear, StructuredLinear)):
                raise ValueError(f"module {alias!r} is a {type(old).__name__}, not an "
                                 "nn.Linear")
            if (old.out_features, old.in_features) != (out_f, in_f):
                raise ValueError(f"module {alias!r} has a different shape than the saved "
                                 f"({out_f}, {in_f}) layer")
            targets.append(old)
        old = targets[0]
        names = list(dict.fromkeys(n for t in targets for n in every_name.get(t, [])))

        def tensor(t: str, name: str = name) -> torch.Tensor:
            key = f"{name}/{t}"
            if key not in tensors:
                raise ValueError(f"{path} lacks the tensor {key!r} of module {name!r} "
                                 f"(its manifest lists it); the file is incomplete")
            return tensors[key]

        cls = get_format(entry["format"])
        A = cls._from_state({t: tensor(t) for t in entry["tensors"]}, entry["config"],
                            (out_f, in_f))
        bias = tensor("bias") if entry["bias"] else None
        if (bias is not None) != (old.bias is not None):
            has = "has a bias" if old.bias is not None else "has no bias"
            warnings.warn(
                f"module {name!r} {has} but its saved layer in {path} "
                f"{'has one' if bias is not None else 'has none'}; the saved layer is used "
                f"as saved ({'with' if bias is not None else 'without'} a bias)",
                UserWarning, stacklevel=2)
        new = StructuredLinear(A, bias)
        new.info = dict(entry.get("info", {}))
        ref = next((p for p in old.parameters() if p.is_floating_point()), None)
        dev = device if device is not None else (
            ref.device if ref is not None else torch.device("cpu"))
        new = new.to(device=dev, dtype=ref.dtype if ref is not None else None)
        for alias in names:
            replace_module(model, alias, new)
    return model
