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
import sys

import numpy as np
import torch

from ..core.layers import QLayer
from ..core.pairsums import CHUNK, kernel_rows, natural_index
from ..core.progress import LARGE, rss_mb
from ..core.verify import NEG_LIMIT, POS_LIMIT
from ..kernels.layout import group_sizes, infer_op, kernel_pairs
from . import runtimes
from .runtimes import COMBOS, TORCHAO_COMBOS, is_script

SHORT_PATH = {"pointwise": "1x1", "depthwise": "dw", "groupwise": "group"}
_LITTLE = sys.byteorder == "little"
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


MAX_CHANNEL_DETAILS = 100  # per layer and kernel: worst pairs listed in the audit (every channel is in "channels")


def _empty() -> dict:
    return {
        "pairs": 0,
        "violating_pairs": 0,
        "channels": [],
        "per_channel": {},
        "worst_positive": None,
        "worst_negative": None,
    }


def pair_violations(
    codes: np.ndarray, kernel, op: str, groups: int, isa: str, *, max_channels: int | None = None, chunk: int = CHUNK
) -> dict:
    """Violating pairs of ``kernel`` per output channel: counts, worst sums, and the worst pair of each channel.

    Streams the weight in kernel-order row chunks (:func:`safeobs.core.pairsums.kernel_rows`, ``chunk`` codes at
    a time) against the kernel's pair positions in one output channel (:func:`safeobs.kernels.layout.kernel_pairs`):
    no per-pair table of the whole weight.  Pairs ``(2m, 2m+1)`` of the row (FBGEMM, oneDNN brg_matmul, the even
    K blocks of gemm:jit) are read as int16 words; other pairings gather their positions within the chunk.
    ``per_channel`` holds the worst pair of each violating channel, of the first ``max_channels`` of them only
    when given (then ``per_channel_omitted`` counts the others); ``channels`` always lists them all.
    """
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer):
        raise TypeError(f"codes must be integers, got dtype {c.dtype}")
    if max_channels is not None and (not isinstance(max_channels, (int, np.integer)) or max_channels < 0):
        raise ValueError(f"max_channels must be None or an int >= 0, got {max_channels!r}")
    shape = c.shape
    op = infer_op(shape, op)
    pos = kernel_pairs(kernel, shape, op, groups, isa)
    g, ocg, _, _ = group_sizes(shape, op, groups)
    oc = g * ocg
    out = _empty()
    if max_channels is not None:
        out["per_channel_omitted"] = 0
    if len(pos) == 0 or oc == 0:
        return out
    n = len(pos)
    small = c.dtype == np.int8 or (int(c.min()) >= -128 and int(c.max()) <= 127)
    x = c.astype(np.int8) if small and c.dtype != np.int8 else c if small else c.astype(np.int64)
    adjacent = small and _LITTLE and bool((pos[:, 0] == 2 * np.arange(n)).all() and (pos[:, 1] == pos[:, 0] + 1).all())
    p0, p1 = pos[:, 0], pos[:, 1]
    wpos, wneg, total = None, None, 0
    chans, details = [], {}
    for r0, ko in kernel_rows(x, op, groups, chunk):
        if small:  # int8 codes: a pair violates iff |a + b| > 128; psum = max(a+b, a, b, 0), nsum = min(...)
            if adjacent:
                u = ko[:, : 2 * n].view(np.int16)
                s = u << 8
                s >>= 8  # sign-extended low byte: position 2m
                s += u >> 8  # arithmetic shift: position 2m+1
                paired = lambda: ko[:, : 2 * n]  # noqa: E731
            else:
                a, b = ko[:, p0], ko[:, p1]
                s = a.astype(np.int16)
                s += b
                paired = lambda: np.concatenate([a, b], axis=1)  # noqa: E731
            hi, lo = int(s.max()), int(s.min())
            if hi < 127 or lo > -128:  # a lone code may be the worst sum
                both = paired()
                hi, lo = max(hi, int(both.max())), min(lo, int(both.min()))
            hi, lo = max(hi, 0), min(lo, 0)
            np.abs(s, out=s)
            score = s  # |a + b|: the worst pair of a violating row has the largest
            count = np.count_nonzero(s > POS_LIMIT, axis=1)
        else:
            a, b = ko[:, p0], ko[:, p1]
            psum = np.maximum(a, 0) + np.maximum(b, 0)
            nsum = np.minimum(a, 0) + np.minimum(b, 0)
            hi, lo = int(psum.max()), int(nsum.min())
            score = np.maximum(psum - POS_LIMIT, NEG_LIMIT - nsum)  # > 0: violating
            count = np.count_nonzero(score > 0, axis=1)
        wpos = hi if wpos is None else max(wpos, hi)
        wneg = lo if wneg is None else min(wneg, lo)
        rows = np.flatnonzero(count)
        if rows.size == 0:
            continue
        total += int(count.sum())
        chans.append(rows + r0)
        room = rows.size if max_channels is None else max(0, max_channels - len(details))
        take = rows[:room]
        if take.size:
            k = score[take].argmax(axis=1)
            ch = take + r0
            ia = natural_index(shape, op, groups, ch, p0[k])
            ib = natural_index(shape, op, groups, ch, p1[k])
            ca, cb = ko[take, p0[k]], ko[take, p1[k]]
            for j in range(take.size):
                details[int(ch[j])] = {
                    "violating_pairs": int(count[take[j]]),
                    "indices": [int(ia[j]), int(ib[j])],
                    "codes": [int(ca[j]), int(cb[j])],
                }
        if max_channels is not None:
            out["per_channel_omitted"] += int(rows.size - take.size)
    out.update(
        pairs=n * oc,
        violating_pairs=total,
        channels=np.concatenate(chans).tolist() if chans else [],
        per_channel=details,
        worst_positive=wpos,
        worst_negative=wneg,
    )
    return out


def audit_layer(layer: QLayer, combos=COMBOS, *, max_channels: int | None = MAX_CHANNEL_DETAILS) -> dict:
    """Kernel and violating pairs of one layer for each ``"engine/isa"`` in ``combos`` (kernels that form the
    same pairs are checked once).  ``max_channels``: see :func:`pair_violations`."""
    codes = layer.codes
    out = {
        "name": layer.name,
        "kind": layer.kind,
        "shape": list(codes.shape),
        "groups": layer.groups,
        "qscheme": layer.qscheme,
        "kernels": {},
    }
    seen = {}  # the pair positions a kernel forms -> its result
    for combo in combos:
        engine, isa = combo.split("/")
        k = kernel_for(layer, engine, isa)
        pos = kernel_pairs(k, codes.shape, layer.op, layer.groups, isa)
        key = pos.tobytes()
        if key not in seen:
            seen[key] = pair_violations(codes, k, layer.op, layer.groups, isa, max_channels=max_channels)
        out["kernels"][combo] = {"backend": k.backend, "path": k.path, "saturates": k.saturates, **seen[key]}
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


def audit(model, inputs: tuple | None = None, combos=None, progress=None, *, max_channels=MAX_CHANNEL_DETAILS) -> dict:
    """JSON-able audit of a converted model (see the module docstring); ``result["unsafe"]`` decides exit 1.

    ``combos`` default: :data:`TORCHAO_COMBOS` for a torchao ``quantize_`` model, else :data:`COMBOS`.
    Layer by layer: one layer's codes at a time are read (a model loaded with ``torch.load(mmap=True)``, as
    :func:`safeobs.load_model` does, stays on disk but for that layer), and the result grows with the number of
    output channels only (``max_channels`` worst pairs per layer and kernel).  ``progress(i, n, label)`` is
    called after each layer (``n`` layers) of a model of :data:`safeobs.core.progress.LARGE` weights or more,
    then after each emulated combo."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError("model must be a torch.nn.Module; load a file with safeobs.load_model(path)")
    if combos is not None:
        combos = tuple(combos)
        for c in combos:
            if c not in COMBOS + TORCHAO_COMBOS:
                raise ValueError(f"unknown engine/isa {c!r}; choose from {', '.join(COMBOS + TORCHAO_COMBOS)}")
    refs = runtimes.layer_refs(model)
    if combos is None:
        combos = runtimes.combos_for(refs) if refs else COMBOS
    audited, per_layer = [], progress if progress and sum(r.numel for r in refs) >= LARGE else None
    for i, ref in enumerate(refs):
        audited.append(audit_layer(ref.build(), combos, max_channels=max_channels))  # one layer's codes at a time
        if per_layer:
            per_layer(i + 1, len(refs), f"{ref.name} ({rss_mb():.0f} MB RSS)")
    result = {"combos": list(combos), "layers": audited}
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
