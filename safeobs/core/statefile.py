"""The safeobs state file format: a state dict plus the int8 layer list audit and repair need.

Runtime-independent: the caller hands in the layer records (:mod:`safeobs.core.layers`), so every runtime
(:func:`safeobs.save`, :func:`safeobs.torchao.save`) writes the same format without importing the tools
layer.  Reading it back (without running code) is :mod:`safeobs.tools.serialization`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

FORMAT = "safeobs.state_dict"
VERSION = 1


def _keys(name: str, kind: str) -> tuple[str, str | None]:
    """State-dict keys of a layer's weight and bias (Linear: the packed ``(weight, bias)`` tuple, no bias key)."""
    p = f"{name}." if name else ""
    if kind in ("linear", "linear_dynamic"):
        return p + "_packed_params._packed_params", None
    return p + "weight", p + "bias"


def _layer_weight(mod, kind):
    if kind == "linear_torchao":
        return mod.weight.detach()
    return mod.weight()


def write(model: torch.nn.Module, f, found, *, arch: str | None = None) -> None:
    """Save ``model``'s state dict and its int8 layers ``found`` (layer records with ``name``, ``kind``,
    ``module`` and conv hyper-parameters) with ``torch.save``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("a TorchScript model: save it with torch.jit.save (loading that needs trust_pickle=True)")
    if arch is not None and not isinstance(arch, str):
        raise TypeError(f"arch must be a 'module:function' string, got {type(arch).__name__}")
    base = getattr(model, "_safeobs_state", None)
    sd = model.state_dict() if base is None else _copy(base["state_dict"])
    meta = []
    for lay in found:
        key, bias_key = _keys(lay.name, lay.kind)
        if key not in sd:
            raise ValueError(f"{lay.name}: no state-dict entry {key!r} for its weight; cannot save it as a state file")
        if base is not None:  # a stand-in: write the (repaired) weights back into the original state dict
            w = _layer_weight(lay.module, lay.kind)
            sd[key] = (w, sd[key][1]) if bias_key is None else w
        meta.append(
            {
                "name": lay.name,
                "kind": lay.kind,
                "key": key,
                "bias": bias_key if bias_key in sd else None,
                "groups": int(lay.groups),
                "stride": tuple(lay.stride),
                "padding": tuple(lay.padding),
                "dilation": tuple(lay.dilation),
                "output_padding": tuple(lay.output_padding),
            }
        )
    if arch is None and base is not None:
        arch = base.get("arch")
    torch.save({"format": FORMAT, "version": VERSION, "arch": arch, "layers": meta, "state_dict": sd}, f)


def _copy(sd):
    """A shallow copy of a state dict that keeps its ``_metadata`` (module versions ``load_state_dict`` reads)."""
    out = OrderedDict(sd)
    if getattr(sd, "_metadata", None) is not None:
        out._metadata = sd._metadata
    return out
