"""``safeobs audit``: which layers of a converted model can saturate, on which engine and CPU.

For every int8-weight layer and every engine/ISA pair, :mod:`safeobs.kernels.dispatch` names the kernel
torch would run and :func:`safeobs.kernels.layout.kernel_pairs` gives exactly the pairs that kernel forms;
a pair is violating when its positive codes sum above 128 or its negative codes below -128
(then some u8 activation saturates it).  With sample inputs and an eager model, the emulator
(:func:`safeobs.emulator.emulate`) also counts the lanes that actually saturate.  Layers, kernels and
emulation come from the runtime that owns each layer (:mod:`safeobs.tools.runtimes`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..core.layers import QLayer
from ..core.verify import NEG_LIMIT, POS_LIMIT
from ..kernels.layout import kernel_order, kernel_pairs
from . import runtimes
from .runtimes import COMBOS, TORCHAO_COMBOS, is_script, layers

SHORT_PATH = {"pointwise": "1x1", "depthwise": "dw", "groupwise": "group"}
NO_EMULATION_SCRIPT = (
    "TorchScript models are audited from their weights only: emulating with data needs the "
    "eager model (pass module:function)"
)
NO_EMULATION_STATE = (
    "a safeobs state file holds the layers, not the forward pass: emulating with data needs "
    "the eager model (pass --arch module:function)"
)


def kernel_for(layer: QLayer, engine: str, isa: str):
    """The :class:`safeobs.kernels.dispatch.Kernel` torch runs for ``layer`` with ``engine`` on ``isa`` (asked of
    the runtime that owns the layer: torchao Linears take a torchao path, "eager" | "compiled", as engine)."""
    return runtimes.kernel_for(layer, engine, isa)


def pair_violations(codes: np.ndarray, kernel, op: str, groups: int, isa: str) -> dict:
    """Violating pairs of ``kernel`` per output channel: counts, worst sums, and the worst pair of each channel."""
    shape = codes.shape
    pos = kernel_pairs(kernel, shape, op, groups, isa)
    oc = int(np.prod(kernel_order(shape, op, groups).shape[:2]))
    if len(pos) == 0:
        return {
            "pairs": 0,
            "violating_pairs": 0,
            "channels": [],
            "per_channel": {},
            "worst_positive": None,
            "worst_negative": None,
        }
    order = kernel_order(shape, op, groups).reshape(oc, -1)
    ia, ib = order[:, pos[:, 0]], order[:, pos[:, 1]]  # (OC, n) indices into codes.ravel()
    flat = codes.astype(np.int64).ravel()
    a, b = flat[ia], flat[ib]
    psum = np.maximum(a, 0) + np.maximum(b, 0)
    nsum = np.minimum(a, 0) + np.minimum(b, 0)
    excess = np.maximum(psum - POS_LIMIT, NEG_LIMIT - nsum)  # > 0: violating
    bad = excess > 0
    count = bad.sum(axis=1)
    chans = np.flatnonzero(count)
    worst = excess.argmax(axis=1)[chans]
    per_channel = {
        int(c): {
            "violating_pairs": int(count[c]),
            "indices": [int(ia[c, k]), int(ib[c, k])],
            "codes": [int(a[c, k]), int(b[c, k])],
        }
        for c, k in zip(chans, worst)
    }
    return {
        "pairs": int(pos.shape[0]) * oc,
        "violating_pairs": int(count.sum()),
        "channels": chans.tolist(),
        "per_channel": per_channel,
        "worst_positive": int(psum.max()),
        "worst_negative": int(nsum.min()),
    }


def audit_layer(layer: QLayer, combos=COMBOS) -> dict:
    """Kernel and violating pairs of one layer for each ``"engine/isa"`` in ``combos``."""
    codes = layer.codes
    out = {
        "name": layer.name,
        "kind": layer.kind,
        "shape": list(layer.weight.shape),
        "groups": layer.groups,
        "qscheme": str(layer.weight.qscheme()).replace("torch.", ""),
        "kernels": {},
    }
    for combo in combos:
        engine, isa = combo.split("/")
        k = kernel_for(layer, engine, isa)
        v = pair_violations(codes, k, layer.op, layer.groups, isa)
        out["kernels"][combo] = {"backend": k.backend, "path": k.path, "saturates": k.saturates, **v}
    out["unsafe"] = any(k["violating_pairs"] for k in out["kernels"].values())
    return out


def emulate_saturation(model, inputs: tuple, combos=COMBOS, progress=None) -> dict:
    """Saturated int16 lanes per layer when ``model(*inputs)`` runs each ``"engine/isa"`` kernel (emulated)."""
    out = {}
    for i, combo in enumerate(combos):
        engine, isa = combo.split("/")
        try:
            rt = runtimes.for_combo(combo)
            if rt is None:
                raise ValueError(f"no runtime emulates {combo!r}")
            ctx = rt.load().emulate(model, engine, isa)
            with torch.no_grad(), ctx as rep:
                model(*inputs)
            out[combo] = {"total": int(rep.total), "layers": {k: int(v) for k, v in rep.saturation.items()}}
        except Exception as e:  # report, don't abort the audit
            out[combo] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        if progress:
            progress(i + 1, len(combos), combo)
    return out


def audit(model, inputs: tuple | None = None, combos=None, progress=None) -> dict:
    """JSON-able audit of a converted model (see the module docstring); ``result["unsafe"]`` decides exit 1.

    ``combos`` default: :data:`TORCHAO_COMBOS` for a torchao ``quantize_`` model, else :data:`COMBOS`."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError("model must be a torch.nn.Module; load a file with safeobs.load_model(path)")
    found = layers(model)
    if combos is None:
        combos = runtimes.combos_for(found) if found else COMBOS
    combos = tuple(combos)
    for c in combos:
        if c not in COMBOS + TORCHAO_COMBOS:
            raise ValueError(f"unknown engine/isa {c!r}; choose from {', '.join(COMBOS + TORCHAO_COMBOS)}")
    result = {"combos": list(combos), "layers": [audit_layer(layer, combos) for layer in found]}
    result["unsafe_layers"] = [lay["name"] for lay in result["layers"] if lay["unsafe"]]
    result["unsafe"] = bool(result["unsafe_layers"])
    result["saturation"], result["emulation_note"] = None, None
    if inputs is not None:
        if is_script(model):
            result["emulation_note"] = NO_EMULATION_SCRIPT
        elif getattr(model, "_safeobs_state", None) is not None:  # layers only (safeobs.serialization)
            result["emulation_note"] = NO_EMULATION_STATE
        else:
            result["saturation"] = emulate_saturation(model, inputs, combos, progress)
    return result


# -- text output -----------------------------------------------------------------------------------


def _cell(k: dict) -> str:
    path = SHORT_PATH.get(k["path"], k["path"])
    if not k["saturates"]:
        return f"{path}:exact"
    return f"{path}:{len(k['channels'])}" if k["channels"] else f"{path}:ok"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def format_audit(result: dict, only_unsafe: bool = False) -> str:
    """Human tables: kernel path and violating channels per layer and engine/isa, then saturation counts."""
    combos = result["combos"]
    lines = [
        "Kernels and violating channels (path:N = N output channels hold a pair that can saturate;",
        "path:ok = saturating kernel, no violating pair; path:exact = kernel accumulates exactly)",
        "",
    ]
    rows = []
    for lay in result["layers"]:
        if only_unsafe and not lay["unsafe"]:
            continue
        shape = "x".join(map(str, lay["shape"]))
        rows.append([lay["name"], lay["kind"], shape] + [_cell(lay["kernels"][c]) for c in combos])
    lines += _table(["layer", "op", "weight"] + combos, rows)
    sat = result.get("saturation")
    if sat:
        lines += ["", "Saturated int16 lanes on the sample inputs (emulated):", ""]
        names = [lay["name"] for lay in result["layers"]]
        rows = []
        for name in names:
            counts = [sat[c].get("layers", {}).get(name) for c in combos]
            if any(counts):
                rows.append([name] + ["-" if v is None else str(v) for v in counts])
        rows.append(["TOTAL"] + [str(sat[c]["total"]) if "total" in sat[c] else "error" for c in combos])
        lines += _table(["layer"] + combos, rows)
        errors = [f"  {c}: {sat[c]['error']}" for c in combos if "error" in sat[c]]
        if errors:
            lines += ["emulation failed for:"] + errors
    elif result.get("emulation_note"):
        lines += ["", "note: " + result["emulation_note"]]
    n = len(result["layers"])
    if result["unsafe"]:
        bad = result["unsafe_layers"]
        more = f", ... ({len(bad)} in all)" if len(bad) > 6 else ""
        lines += [
            "",
            f"UNSAFE: {len(bad)} of {n} layers can saturate: {', '.join(bad[:6])}{more}",
            "        fix: safeobs repair MODEL -o OUT",
        ]
    else:
        lines += ["", f"SAFE: no pair of any of the {n} layers can saturate on any engine/isa audited"]
    return "\n".join(lines)
