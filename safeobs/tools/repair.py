"""``safeobs repair``: re-quantize only the unsafe channels of a converted model, in place.

The float weights are the dequantized stored ones (no calibration data).  Per layer, the stored
scales are the floor and :func:`safeobs.core.solver.raise_scales` raises only the channels where a
``layout`` pair is unsafe (per-tensor weights: the whole tensor).  Every other channel keeps its
codes, scale and zero point bit for bit; bias and output qparams are never touched.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..core.layers import QLayer
from ..core.solver import layout_pairs, pairs_stay_in_rows, raise_scales
from ..core.verify import check_codes
from ..kernels.layout import LAYOUTS
from .runtimes import layers, set_weight
from .serialization import ModelError
from .serialization import save as save_state

PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)


def sqnr(ref, approx) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``ref`` in dB (inf when equal)."""
    ref, approx = np.asarray(ref, np.float64), np.asarray(approx, np.float64)
    err = np.sum((ref - approx) ** 2)
    return float("inf") if err == 0 else float(10 * np.log10(np.sum(ref**2) / err))


def repair_layer(layer: QLayer, layout: str = "x86") -> dict:
    """Make one layer safe under ``layout`` (in place); returns what changed."""
    w = layer.weight
    codes = w.int_repr().numpy()
    info = {
        "name": layer.name,
        "kind": layer.kind,
        "channels": int(w.shape[0] if layer.op != "conv_transpose" else w.shape[1] * layer.groups),
        "changed": 0,
        "changed_channels": [],
        "bits_lost": 0.0,
        "weight_sqnr_db": None,
    }
    if not check_codes(codes, layout, op=layer.op, groups=layer.groups):
        return info
    wf = w.dequantize().numpy()
    per_tensor = w.qscheme() in PER_TENSOR
    if per_tensor:
        scale0 = np.array([w.q_scale()], dtype=np.float64)
        zp0 = np.array([w.q_zero_point()], dtype=np.int64)
        ch_axis = None
    else:
        if w.q_per_channel_axis() != 0:
            raise ValueError(f"{layer.name}: per-channel weights along axis {w.q_per_channel_axis()} are not supported")
        scale0 = w.q_per_channel_scales().numpy().astype(np.float64)
        zp0 = w.q_per_channel_zero_points().numpy().astype(np.int64)
        ch_axis = 0
    symmetric = bool(np.all(zp0 == 0))
    pairs = layout_pairs(wf, layout, layer.op, layer.groups)
    new_scale, new_zp = raise_scales(
        wf,
        pairs,
        scale0.astype(np.float32),
        zp0,
        ch_axis=ch_axis,
        symmetric=symmetric,
        check_pairs=not pairs_stay_in_rows(wf.ndim, layer.op, ch_axis),
    )
    changed = (new_scale > scale0.astype(np.float32)) | (new_zp != zp0)
    scale = np.where(changed, new_scale.astype(np.float64), scale0)  # unchanged: the stored double, exactly
    zp = np.where(changed, new_zp, zp0)
    if per_tensor:
        q = torch.quantize_per_tensor(torch.from_numpy(wf), float(scale[0]), int(zp[0]), torch.qint8)
    else:
        fresh = (
            torch.quantize_per_channel(
                torch.from_numpy(wf), torch.from_numpy(scale), torch.from_numpy(zp), 0, torch.qint8
            )
            .int_repr()
            .numpy()
        )
        mask = changed.reshape((-1,) + (1,) * (codes.ndim - 1))
        new_codes = np.where(mask, fresh, codes)  # unchanged channels keep their stored codes
        q = torch._make_per_channel_quantized_tensor(
            torch.from_numpy(new_codes), torch.from_numpy(scale), torch.from_numpy(zp), 0
        )
    left = check_codes(q.int_repr().numpy(), layout, op=layer.op, groups=layer.groups)
    if left:  # the solver's guarantee; never expected
        raise RuntimeError(f"{layer.name}: {len(left)} pairs still unsafe after repair")
    set_weight(layer, q)
    chans = np.flatnonzero(changed)
    info.update(
        changed=int(chans.size) if not per_tensor else info["channels"],
        changed_channels=chans.tolist() if not per_tensor else list(range(info["channels"])),
        bits_lost=float(np.log2(scale / scale0).max()),
        weight_sqnr_db=sqnr(wf, q.dequantize().numpy()),
        per_tensor=per_tensor,
    )
    return info


def repair(model, layout: str = "x86") -> list[dict]:
    """Repair every int8-weight layer of ``model`` in place; one dict per layer (see :func:`repair_layer`)."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError("model must be a torch.nn.Module; load a file with safeobs.load_model(path)")
    if layout not in LAYOUTS or layout == "any":
        raise ValueError(f"layout must be one of {LAYOUTS[:3]}, got {layout!r}")
    return [repair_layer(layer, layout) for layer in layers(model)]


def save(model, out: str, example_inputs: tuple | None = None, *, arch: str | None = None) -> str:
    """Save a repaired model: TorchScript stays TorchScript; an eager model is traced to TorchScript with
    ``example_inputs``, or else written as a safeobs state file (:func:`safeobs.tools.serialization.save`: state
    dict + layer list, which ``safeobs audit``/``repair`` read back without running code; ``arch``, the
    ``module:function`` that builds the model, is recorded).  Returns "torchscript" or "state"."""
    if isinstance(model, (str, os.PathLike)):
        raise TypeError("model must be a torch.nn.Module; load a file with safeobs.load_model(path)")
    if isinstance(model, torch.jit.ScriptModule):
        torch.jit.save(model, out)
        return "torchscript"
    if example_inputs is not None:
        with torch.no_grad():
            traced = torch.jit.trace(model, example_inputs, check_trace=False)
        torch.jit.save(traced, out)
        return "torchscript"
    try:
        save_state(model, out, arch=arch)
    except (TypeError, ValueError, RuntimeError) as e:
        if os.path.exists(out):
            os.remove(out)
        raise ModelError(
            f"cannot save this model as a state file ({str(e).splitlines()[0][:160]}); pass --inputs "
            "or --photos to save it as TorchScript instead"
        ) from None
    return "state"


def format_repair(infos: list[dict], only_changed: bool = True) -> str:
    """Table of the changed layers: channels changed, bits lost, weight SQNR vs the original float weights."""
    rows = [i for i in infos if i["changed"] or not only_changed]
    head = f"{'layer':<28} {'op':<16} {'changed':>11} {'bits lost':>9} {'weight SQNR':>12}"
    lines = [head, "-" * len(head)]
    for i in rows:
        sq = "-" if i["weight_sqnr_db"] is None else f"{i['weight_sqnr_db']:.1f} dB"
        lines.append(
            f"{i['name']:<28} {i['kind']:<16} {str(i['changed']) + '/' + str(i['channels']):>11} "
            f"{i['bits_lost']:>9.2f} {sq:>12}"
        )
    n = sum(1 for i in infos if i["changed"])
    lines.append(
        f"{n} of {len(infos)} layers changed; "
        f"{sum(i['changed'] for i in infos)} of {sum(i['channels'] for i in infos)} channels re-quantized"
    )
    return "\n".join(lines)
