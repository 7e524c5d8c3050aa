"""``safeobs.openvino.quantize``: NNCF's post-training quantization with safe int8 weights.

NNCF does everything (graph, calibration, FakeQuantize placement, presets, ignored scopes, bias correction);
safeobs forces ``overflow_fix=OverflowFix.DISABLE`` (full 8-bit weights; the user's other advanced parameters
are kept) and then rewrites only the int8 weight codes and scales NNCF emitted (see :mod:`.weights`) with the
tightest per-channel scales that are safe for the CPU plugin's pairs (layout ``"openvino"``).  The weights are
requantized from the float model's own weights where NNCF did not change them (checked: every NNCF code is
the float weight rounded), else from NNCF's dequantized weights.

Data-aware rounding (default, ``data_aware=True``): one extra plugin run of the float model over the
calibration subset, with every weight node's input as an extra output (:mod:`.capture`), gives
``H = E[x x^T]`` of each node's receptive fields (:func:`calibration_stats`); then
:func:`safeobs.core.rounding.round_weight` picks, per output channel, the codes and scale (scale search around
the tightest safe scale) that minimise ``e^T H e``, with every pair the plugin's kernels form clipped to the
bound as codes are chosen.  Per channel the result is never worse than the safe RTN codes on that objective
(RTN is a candidate), and every channel is checked again with :func:`.weights.unsafe_channels` on avx2 and
avx512 (a channel that fails, never expected, keeps its RTN codes).  NNCF's bias correction stays as NNCF
computed it (for its own weights).

Activation x activation MatMuls (attention ``Q K^T``, ``softmax V``): NNCF quantizes both inputs of a MatMul
that multiplies two activations, and the plugin runs it as an int8 gemm that pairs *activation* codes in
saturating int16 without VNNI (AVX2 ``jit_gemm_i8``, AVX-512 ``brgemm_avx512_i8``; probe: two rows at +max,
K = 64, give 127.5 instead of 16129).  No weight is involved, so safe weight codes cannot protect it.
``activation_matmuls="float"`` (default) adds every MatMul whose two inputs are both non-constant in the
float model (:func:`.weights.find_activation_matmuls`) to NNCF's ``ignored_scope`` (merged with the user's),
so they stay in float; ``"int8"`` leaves them to NNCF, with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

import numpy as np

from . import capture
from ._deps import require_nncf, require_openvino
from .weights import (
    QMAX,
    QMIN,
    WEIGHT_OPS,
    find_activation_matmuls,
    plugin_pairs,
    read_weights,
    replace_constants,
    safe_codes,
    unsafe_channels,
)

MAX_POSITIONS = 1024  # receptive fields per conv input and item (a fixed pseudo-random subset beyond)

LAYOUTS = ("openvino", "onednn", "x86", "any")
ACTIVATION_MATMULS = ("float", "int8")


def _ignored_scope(nncf, user, names: list[str]):
    """NNCF's ``IgnoredScope`` with ``names`` added to the user's (every other user entry kept)."""
    if user is None:
        return nncf.IgnoredScope(names=list(names)) if names else None
    if not isinstance(user, nncf.IgnoredScope):
        raise TypeError(f"ignored_scope must be nncf.IgnoredScope, got {type(user).__name__}")
    if not names:
        return user
    return dataclasses.replace(user, names=list(dict.fromkeys([*user.names, *names])))


def float_weights(model) -> dict[str, np.ndarray]:
    """Float weights (stored layout) of the Convolution / GroupConvolution / MatMul nodes of a float
    ``ov.Model``, by node name: input 1 a Constant (or a Convert of an f16 Constant)."""
    out = {}
    for op in model.get_ordered_ops():
        if op.get_type_name() not in WEIGHT_OPS or op.get_input_size() < 2:
            continue
        src = op.input_value(1).get_node()
        if src.get_type_name() == "Convert":
            src = src.input_value(0).get_node()
        if src.get_type_name() == "Constant" and src.get_element_type().get_type_name() in ("f32", "f16", "bf16"):
            out[op.get_friendly_name()] = np.asarray(src.get_data(), dtype=np.float32)
    return out


def _consistent(w: np.ndarray, qw) -> bool:
    """NNCF's codes are ``w / scale`` rounded (up to a tie): then ``w`` is the weight NNCF quantized."""
    if w.shape != tuple(qw.codes.shape):
        return False
    s = np.asarray(qw.scale, np.float32)
    return bool(np.all(np.abs(w / s - qw.codes) <= 0.5 + 1e-3))


def _advanced(nncf, adv):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    if adv is None:
        return AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE)
    if not isinstance(adv, AdvancedQuantizationParameters):
        raise TypeError(f"advanced_parameters must be nncf's AdvancedQuantizationParameters, got {type(adv).__name__}")
    return dataclasses.replace(adv, overflow_fix=OverflowFix.DISABLE)


class _ConvAttrs:
    """What :func:`safeobs.core.rounding._receptive_fields` reads, from an OpenVINO (Group)Convolution."""

    def __init__(self, kernel_size, stride, padding, dilation, groups):
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.groups = dilation, groups


def _stat_attrs(op) -> _ConvAttrs | None:
    """Receptive-field geometry of a 1-D / 2-D (Group)Convolution with symmetric explicit pads, else None."""
    a = op.get_attributes()
    shape = tuple(op.input_value(1).get_partial_shape().to_shape())
    g = shape[0] if op.get_type_name() == "GroupConvolution" else 1
    k = shape[3:] if g != 1 or op.get_type_name() == "GroupConvolution" else shape[2:]
    pb, pe = tuple(a["pads_begin"]), tuple(a["pads_end"])
    if len(k) not in (1, 2) or pb != pe or str(a.get("auto_pad", "explicit")).lower() not in ("explicit", "notset"):
        return None
    return _ConvAttrs(tuple(k), tuple(a["strides"]), pb, tuple(a["dilations"]), int(g))


def _pointwise(conv: _ConvAttrs) -> bool:
    return all(int(v) == 1 for v in conv.kernel_size + conv.stride + conv.dilation) and not any(conv.padding)


def calibration_stats(
    model, items, *, limit: int | None = None, names=None, max_positions: int = MAX_POSITIONS
) -> dict:
    """``{node name: E[x x^T]}`` (float64, (G, K, K), K ordered like the kernel view's row ``(ic, *k)``) of the
    input of every Convolution / GroupConvolution (not depthwise: its kernel is exact, it keeps RTN) / 2-D MatMul
    weight of the float ``ov.Model`` ``model``, from
    ONE plugin run over ``items`` (what the compiled model accepts, e.g. ``nncf.Dataset.get_inference_data()``),
    at most ``limit`` items; ``names``: only these nodes."""
    import torch

    from safeobs.core.rounding import _receptive_fields

    nodes = {}
    for op in model.get_ordered_ops():
        t = op.get_type_name()
        if (
            t not in WEIGHT_OPS
            or op.get_input_size() < 2
            or (names is not None and op.get_friendly_name() not in names)
        ):
            continue
        if t == "MatMul":
            a = op.get_attributes()
            if a.get("transpose_a", False) or op.input_value(1).get_partial_shape().rank.get_length() != 2:
                continue
            nodes[op.get_friendly_name()] = None
        else:
            conv = _stat_attrs(op)
            shape = tuple(op.input_value(1).get_partial_shape().to_shape())
            depthwise = t == "GroupConvolution" and shape[1] == 1 and shape[2] == 1  # exact kernel: keeps RTN
            if conv is not None and not depthwise:
                nodes[op.get_friendly_name()] = conv
    acc: dict = {}
    for vals in capture.run(model, list(nodes), items, limit=limit):
        for name, conv in nodes.items():
            x = torch.from_numpy(np.ascontiguousarray(vals[name], np.float32))
            if conv is None:
                c = x.reshape(1, -1, x.shape[-1])
            elif _pointwise(conv):  # 1x1, stride 1, no pad: the receptive fields are the pixels (no pad, no gather)
                flat = x.reshape(x.shape[0], conv.groups, -1, int(np.prod(x.shape[2:]))).permute(1, 0, 3, 2)
                flat = flat.reshape(conv.groups, -1, flat.shape[-1])  # (G, N*H*W, ICg)
                total = flat.shape[1]
                if total > max_positions:  # the same fixed subset _receptive_fields takes
                    idx = torch.randperm(total, generator=torch.Generator().manual_seed(total))[:max_positions]
                    flat = flat[:, idx]
                c = flat
            else:
                c = _receptive_fields(x, conv, max_positions)
            xx = torch.bmm(c.transpose(1, 2), c).double().numpy()
            prev = acc.get(name, (0.0, 0))
            acc[name] = (prev[0] + xx, prev[1] + c.shape[1])
    return {k: xx / max(n, 1) for k, (xx, n) in acc.items() if n}


def _round_layout(qw, v: np.ndarray, layout: str) -> str:
    """The narrowest of ``layout``, "x86", "any" whose pairs contain every pair the plugin forms for ``qw``
    (layout "openvino" does not know the grouping: :mod:`.weights`)."""
    from safeobs.core import solver

    need = plugin_pairs(qw)
    if not len(need):
        return layout
    need = {tuple(p) for p in np.sort(need, axis=1).tolist()}
    for lay in dict.fromkeys((layout, "x86")):
        if lay == "any":
            break
        have = np.sort(np.asarray(solver.layout_pairs(v, lay, qw.op, qw.groups if qw.op == "conv" else None)), axis=1)
        if need <= {tuple(p) for p in have.tolist()}:
            return lay
    return "any"


def _data_aware(qw, w: np.ndarray, codes: np.ndarray, scale: np.ndarray, h: np.ndarray, layout: str):
    """``(codes, scale, objective, RTN objective)`` (stored shapes; per channel objectives) from
    :func:`safeobs.core.rounding.round_weight` at the safe RTN ``(codes, scale)``, per channel the better of the
    two on ``e^T H e``; None when the shapes do not fit."""
    from safeobs.core.rounding import SINGLE_SCALE, _objective, round_weight

    v = np.ascontiguousarray(qw.view(np.asarray(w, np.float32)))
    cv = qw.view(codes).astype(np.int8)
    oc = v.shape[0]
    s_rows = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (oc,)).copy()
    per_channel = np.asarray(scale).size == oc and oc > 1
    groups = qw.groups if qw.op == "conv" else 1
    lay = _round_layout(qw, v, layout)
    try:
        r = round_weight(
            v,
            h,
            layout=lay,
            op=qw.op,
            groups=groups,
            bias_correction=False,
            scale=s_rows,
            # a wider layout than the one the RTN codes are safe for: its own clipped RTN is the base candidate
            rtn_codes=np.ascontiguousarray(cv) if lay == layout else None,
            **({} if per_channel else dict(multipliers=SINGLE_SCALE)),
        )
    except (ValueError, AssertionError):  # a shape this path does not model: keep the RTN codes
        return None
    new_c = np.clip(r.codes.reshape(oc, -1).astype(np.float64), QMIN, QMAX)  # NNCF's narrow range [-127, 127]
    new_s = r.scale.astype(np.float32) if per_channel else s_rows
    rows = np.arange(oc) // max(oc // h.shape[0], 1) if h.shape[0] > 1 else None
    m = h[rows] if rows is not None else h[0]
    w2 = v.reshape(oc, -1).astype(np.float64)
    rtn_err = _objective(w2 - s_rows[:, None].astype(np.float64) * cv.reshape(oc, -1), m)
    err = _objective(w2 - new_s[:, None].astype(np.float64) * new_c, m)
    bad = np.zeros(oc, bool)
    for isa in ("avx2", "avx512"):  # verify: every pair the plugin forms, on the final codes
        bad[unsafe_channels(qw, isa, qw.unview(new_c.reshape(v.shape).astype(np.int8)))] = True
    keep = (err > rtn_err) | bad  # per channel: never worse than RTN, never unsafe
    new_c[keep] = cv.reshape(oc, -1)[keep]
    new_s = np.where(keep, s_rows, new_s).astype(np.float32)
    err = np.where(keep, rtn_err, err)
    out_c = qw.unview(new_c.reshape(v.shape).astype(np.int8))
    out_s = new_s.reshape(np.shape(scale)) if per_channel else np.asarray(scale, np.float32)
    return out_c, out_s, err, rtn_err


def rewrite(model, floats: dict | None = None, layout: str = "openvino", stats: dict | None = None) -> list[dict]:
    """Make every int8 weight of an NNCF-quantized ``ov.Model`` safe, in place; one info dict per weight.

    ``stats``: ``{node name: E[x x^T]}`` (:func:`calibration_stats`) for data-aware codes; the info then holds
    ``objective`` and ``rtn_objective`` per output channel."""
    floats, stats = floats or {}, stats or {}
    infos = []
    for qw in read_weights(model):
        info = {"name": qw.name, "op": qw.op_type, "changed": 0, "source": "skipped"}
        if qw.int8 and not qw.depthwise:
            w = floats.get(qw.name)
            use = w is not None and _consistent(w, qw)
            codes, scale = safe_codes(qw, w if use else None, layout)
            info.update(source="float" if use else "dequantized")
            h = stats.get(qw.name)
            if h is not None:
                wf = w if use else qw.codes.astype(np.float32) * np.asarray(qw.scale, np.float32)
                r = _data_aware(qw, wf, codes, scale, h, layout)
                if r is not None:
                    codes, scale = r[0], r[1]
                    info.update(objective=r[2], rtn_objective=r[3], data_aware=int(np.count_nonzero(r[2] < r[3])))
            old = np.asarray(qw.scale, np.float32).reshape(-1)
            changed = int(np.count_nonzero(scale.reshape(-1) != old)) if scale.size == old.size else old.size
            if changed or not np.array_equal(codes, qw.codes):
                replace_constants(qw, codes, scale)
            info.update(changed=changed, channels=old.size)
        infos.append(info)
    return infos


def quantize(
    model,
    calibration_dataset,
    *args,
    layout: str = "openvino",
    data_aware: bool = True,
    activation_matmuls: str = "float",
    **kwargs,
):
    """Drop-in for ``nncf.quantize`` (same arguments) on an ``openvino.Model``; returns the quantized
    ``ov.Model`` with safe int8 weights (it runs in int8 on the CPU plugin like NNCF's own result).

    ``layout``: the pairs made safe (``"openvino"``: measured on the plugin; ``"onednn"`` / ``"x86"`` /
    ``"any"``: wider unions).  ``advanced_parameters.overflow_fix`` is overridden to DISABLE.
    ``data_aware``: codes chosen on the calibration subset (module docstring; one extra plugin run of the
    float model); ``False``: round-to-nearest at the tightest safe scales.
    ``activation_matmuls``: ``"float"`` (default) keeps MatMuls of two activations (attention ``Q K^T``,
    ``softmax V``; :func:`.weights.find_activation_matmuls`) in float by adding them to NNCF's
    ``ignored_scope`` (the user's entries kept); ``"int8"`` lets NNCF quantize them (warning: they can
    saturate without VNNI, no weight is involved so safeobs cannot make them safe).
    """
    nncf = require_nncf()
    ov = require_openvino()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if activation_matmuls not in ACTIVATION_MATMULS:
        raise ValueError(f"activation_matmuls must be one of {ACTIVATION_MATMULS}, got {activation_matmuls!r}")
    if not isinstance(model, ov.Model):
        raise TypeError(
            f"safeobs.openvino.quantize needs an openvino.Model (ov.convert_model(...)), got {type(model).__name__}"
        )
    bound = inspect.signature(nncf.quantize).bind(model, calibration_dataset, *args, **kwargs)
    bound.arguments["advanced_parameters"] = _advanced(nncf, bound.arguments.get("advanced_parameters"))
    act = [op.get_friendly_name() for op in find_activation_matmuls(model)] if activation_matmuls == "float" else []
    scope = _ignored_scope(nncf, bound.arguments.get("ignored_scope"), act)
    if scope is not None:
        bound.arguments["ignored_scope"] = scope
    if activation_matmuls == "int8" and find_activation_matmuls(model):
        warnings.warn(
            "activation_matmuls='int8': MatMuls of two activations are quantized by NNCF and can saturate int16 "
            "without VNNI (AVX2 jit_gemm_i8, AVX-512 brgemm_avx512_i8); no weight is involved, so safeobs cannot "
            "make them safe",
            stacklevel=2,
        )
    floats = float_weights(model)
    stats = None
    if data_aware:
        subset = bound.arguments.get("subset_size", inspect.signature(nncf.quantize).parameters["subset_size"].default)
        items = calibration_dataset.get_inference_data()
        stats = calibration_stats(model, items, limit=int(subset), names=set(floats))
    q = nncf.quantize(*bound.args, **bound.kwargs)
    rewrite(q, floats, layout, stats)
    return q
