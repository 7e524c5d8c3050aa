"""``safeobs.openvino.quantize``: NNCF's post-training quantization with safe int8 weights.

NNCF does everything (graph, calibration, FakeQuantize placement, presets, ignored scopes, bias correction);
safeobs forces ``overflow_fix=OverflowFix.DISABLE`` (full 8-bit weights; the user's other advanced parameters
are kept) and then rewrites only the int8 weight codes and scales NNCF emitted (see :mod:`.weights`) with the
tightest per-channel scales that are safe for the CPU plugin's pairs (layout ``"openvino"``).  The weights are
requantized from the float model's own weights where NNCF did not change them (checked: every NNCF code is
the float weight rounded), or from the float weight divided by SmoothQuant's per input channel factor where NNCF
smoothed the node (``model_type=TRANSFORMER``: the activation is multiplied by ``a`` in front of its
FakeQuantize, the weight column divided by it; :func:`smooth_quant_factor`, checked the same way), else from
NNCF's dequantized weights (rounding an already rounded weight again: the errors add up).

Data-aware rounding (default, ``data_aware=True``): one extra plugin run of the float model over the
calibration subset, with every weight node's input as an extra output (:mod:`.capture`), gives
``H = E[x x^T]`` of each node's receptive fields (:func:`calibration_moments`), shrunk toward ``tr(H) / K * I``
by the Ledoit-Wolf intensity of its samples (:func:`shrink`: with few calibration items, e.g. 30 sentences of
~15 tokens for a 1536-wide MatMul, the sample ``H`` is rank-deficient and GPTQ's error feedback fits it rather
than the data; with many samples the intensity is ~0 and ``H`` is unchanged); a smoothed node's ``H`` is taken
into the smoothed coordinates (``diag(a) H diag(a)``).  Then :func:`safeobs.core.rounding.round_weight` picks,
per output channel, the codes and scale (the scale search ``SCALE_SEARCH`` around the tightest safe scale, for
per-channel scales) that minimise ``e^T H e``, with every pair the plugin's kernels form clipped to the
bound as codes are chosen.  Per channel the result is never worse than the safe RTN codes on that objective
(RTN is a candidate), and every channel is checked again with :func:`.weights.unsafe_channels` on avx2 and
avx512 (a channel that fails, never expected, keeps its RTN codes).  NNCF's bias correction stays as NNCF
computed it (for its own weights) unless ``bias_correction=True`` (:func:`rewrite`'s ``means``).

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

from ..core.rounding import ledoit_wolf_intensity as _ledoit_wolf
from ..core.rounding import shrink
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
    return calibration_moments(model, items, limit=limit, names=names, max_positions=max_positions)[0]


def calibration_moments(
    model, items, *, limit: int | None = None, names=None, max_positions: int = MAX_POSITIONS
) -> tuple[dict, dict]:
    """``({node name: E[x x^T]}, {node name: E[x]})``: :func:`calibration_stats` and the mean (float64, (G, K))
    of the same receptive fields, from the same single plugin run (the mean is what bias correction needs)."""
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
            sx = c.double().sum(1).numpy()
            x4 = (c.double().square().sum(-1) ** 2).sum(1).numpy()  # sum_i ||x_i||^4 per group (Ledoit-Wolf)
            prev = acc.get(name, (0.0, 0.0, 0.0, 0))
            acc[name] = (prev[0] + xx, prev[1] + sx, prev[2] + x4, prev[3] + c.shape[1])
    done = {k: v for k, v in acc.items() if v[3]}
    hs = {k: xx / n for k, (xx, _, _, n) in done.items()}
    return (
        hs,
        {k: sx / n for k, (_, sx, _, n) in done.items()},
        {k: _ledoit_wolf(hs[k], x4 / n, n) for k, (_, _, x4, n) in done.items()},
    )


def _round_layout(qw, v: np.ndarray, layout: str) -> str:
    """The narrowest of ``layout``, "x86", "any" whose pairs contain every pair the plugin forms for ``qw``
    (layout "openvino" does not know the grouping: :mod:`.weights`)."""
    from safeobs.core import solver

    need = plugin_pairs(qw)
    if not len(need):
        return layout
    n = np.int64(v.size)

    def keys(pairs):  # one int64 per unordered pair (flat indices < v.size)
        p = np.sort(np.asarray(pairs, np.int64).reshape(-1, 2), axis=1)
        return p[:, 0] * n + p[:, 1]

    need = keys(need)
    for lay in dict.fromkeys((layout, "x86")):
        if lay == "any":
            break
        have = keys(solver.layout_pairs(v, lay, qw.op, qw.groups if qw.op == "conv" else None))
        if np.isin(need, have).all():
            return lay
    return "any"


def _data_aware(
    qw,
    w: np.ndarray,
    codes: np.ndarray,
    scale: np.ndarray,
    h: np.ndarray,
    layout: str,
    mean: np.ndarray | None = None,
    multipliers=None,
):
    """``(codes, scale, objective, RTN objective)`` (stored shapes; per channel objectives) from
    :func:`safeobs.core.rounding.round_weight` at the safe RTN ``(codes, scale)``, per channel the better of the
    two on ``e^T H e``, or on ``e^T (H - mu mu^T) e`` with ``mean`` = ``mu`` (the bias absorbs the mean error:
    :func:`rewrite`); None when the shapes do not fit."""
    from safeobs.core.rounding import SCALE_SEARCH, SINGLE_SCALE, _objective, round_weight

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
            mean=mean,
            bias_correction=mean is not None,
            scale=s_rows,
            # a wider layout than the one the RTN codes are safe for: its own clipped RTN is the base candidate
            rtn_codes=np.ascontiguousarray(cv) if lay == layout else None,
            # per channel: the scale search (a per-tensor scale is shared by every channel: one candidate)
            multipliers=(SCALE_SEARCH if multipliers is None else multipliers) if per_channel else SINGLE_SCALE,
        )
    except (ValueError, AssertionError):  # a shape this path does not model: keep the RTN codes
        return None
    new_c = np.clip(r.codes.reshape(oc, -1).astype(np.float64), QMIN, QMAX)  # NNCF's narrow range [-127, 127]
    new_s = r.scale.astype(np.float32) if per_channel else s_rows
    if mean is not None:  # the objective round_weight minimised: the error left after the bias correction
        mu = np.asarray(mean, np.float64).reshape(h.shape[0], -1)
        h = h - mu[:, :, None] * mu[:, None, :]
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


def smooth_quant_factor(qw) -> np.ndarray | None:
    """The per input channel factor on the activation of ``qw``'s node, ``(G, K)`` like a row of the kernel view
    (each input channel repeated over the taps): the constant of the ``Multiply`` that feeds the node's activation
    FakeQuantize (through Reshape / Squeeze / Unsqueeze), with one value per input channel, as NNCF's SmoothQuant
    inserts it (``model_type=TRANSFORMER``: ``x -> x * a``, weight column ``w -> w / a``); None if there is none.
    :func:`rewrite` uses it only where the NNCF codes are exactly the float weight divided by it, rounded."""
    src = qw.node.input_value(0).get_node()
    seen_fq = False
    while src.get_type_name() in ("FakeQuantize", *capture._PASS):
        seen_fq |= src.get_type_name() == "FakeQuantize"
        src = src.input_value(0).get_node()
    if not seen_fq or src.get_type_name() != "Multiply":
        return None
    consts = [src.input_value(i).get_node() for i in range(2)]
    consts = [c for c in consts if c.get_type_name() == "Constant"]
    if len(consts) != 1:
        return None
    a = np.asarray(consts[0].get_data(), np.float64).reshape(-1)
    v_shape = qw.view(qw.codes).shape
    groups = qw.groups if qw.op == "conv" else 1
    icg, taps = int(v_shape[1]), int(np.prod(v_shape[2:]))
    if a.size != icg * groups or not np.all(np.isfinite(a) & (a > 0)):
        return None
    return np.repeat(a.reshape(groups, icg), taps, axis=1)


def _unsmooth(qw, w: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """The float weight ``w`` (stored layout) with each input column divided by SmoothQuant's ``factor``."""
    v = qw.view(np.asarray(w, np.float32))
    oc = v.shape[0]
    rows = factor[np.arange(oc) // max(oc // factor.shape[0], 1)]  # (OC, K): the factor of each row's group
    return qw.unview((v.reshape(oc, -1) / rows).astype(np.float32).reshape(v.shape))


def bias_constant(qw):
    """The bias of ``qw``'s node: the Constant (f32, one value per output channel) of the ``Add`` that is the
    node's only consumer (where NNCF's bias correction writes), else None."""
    targets = list(qw.node.output(0).get_target_inputs())
    if len(targets) != 1 or targets[0].get_node().get_type_name() != "Add":
        return None
    add = targets[0].get_node()
    c = add.input_value(1 - targets[0].get_index()).get_node()
    oc = qw.view(qw.codes).shape[0]
    if c.get_type_name() != "Constant" or c.get_element_type().get_type_name() != "f32":
        return None
    shape = tuple(c.get_output_shape(0))
    axis = len(add.get_output_partial_shape(0)) - 1 if qw.op == "linear" else 1
    if int(np.prod(shape)) != oc or (len(shape) > 1 and (len(shape) <= axis or shape[axis] != oc)):
        return None
    return c


def _bias_shift(qw, old_codes, old_scale, new_codes, new_scale, mean: np.ndarray) -> np.ndarray:
    """``(W_old - W_new) . E[x]`` per output channel (kernel view rows): what keeps the layer's mean output where
    NNCF's bias correction put it when its weights become the new ones."""

    def rows(c, s):
        v = qw.view(c).astype(np.float64)
        oc = v.shape[0]
        return v.reshape(oc, -1) * np.broadcast_to(np.asarray(s, np.float64).reshape(-1), (oc,))[:, None]

    d = rows(old_codes, old_scale) - rows(new_codes, new_scale)
    mu = np.asarray(mean, np.float64).reshape(-1, d.shape[1])
    mu_rows = mu[np.arange(d.shape[0]) // max(d.shape[0] // mu.shape[0], 1)]
    return np.einsum("ok,ok->o", d, mu_rows)


def rewrite(
    model,
    floats: dict | None = None,
    layout: str = "openvino",
    stats: dict | None = None,
    means: dict | None = None,
    *,
    smooth_quant: bool = True,
    multipliers=None,
) -> list[dict]:
    """Make every int8 weight of an NNCF-quantized ``ov.Model`` safe, in place; one info dict per weight.

    ``floats``: the float model's weights (:func:`float_weights`); used where NNCF's codes are that weight
    rounded, or that weight with SmoothQuant's per-column factor (:func:`smooth_quant_factor`) rounded (then the
    statistics are taken into the smoothed coordinates too); else the dequantized NNCF weight is the source.
    ``stats``: ``{node name: E[x x^T]}`` of the float model's node inputs (:func:`calibration_moments`) for
    data-aware codes; the info then holds ``objective`` and ``rtn_objective`` per output channel.
    ``means``: ``{node name: E[x]}``; where the node has a bias (:func:`bias_constant`), the bias gets
    ``(W_nncf - W_safe) . E[x]`` per output channel (NNCF's bias correction was computed for its own codes: this
    keeps the layer's mean output where NNCF put it) and the codes minimise ``e^T (H - mu mu^T) e``.
    ``smooth_quant=False`` / ``multipliers`` (candidate scales of per-channel weights, default
    ``safeobs.core.rounding.SCALE_SEARCH``): for ablations (benchmarks/bench_openvino.py ``--ablation``)."""
    floats, stats, means = floats or {}, stats or {}, means or {}
    infos = []
    for qw in read_weights(model):
        info = {"name": qw.name, "op": qw.op_type, "changed": 0, "source": "skipped"}
        if qw.int8 and not qw.depthwise:
            w = floats.get(qw.name)
            factor = None
            use = w is not None and _consistent(w, qw)
            if w is not None and not use and smooth_quant:
                factor = smooth_quant_factor(qw)
                if factor is not None:
                    ws = _unsmooth(qw, w, factor)
                    use = _consistent(ws, qw)
                    w, factor = (ws, factor) if use else (w, None)
            codes, scale = safe_codes(qw, w if use else None, layout)
            info.update(source=("float (SmoothQuant)" if factor is not None else "float") if use else "dequantized")
            h, mu = stats.get(qw.name), means.get(qw.name)
            if factor is not None:  # the node's input is x * factor: move the statistics with it
                h = None if h is None else h * factor[:, :, None] * factor[:, None, :]
                mu = None if mu is None else np.asarray(mu, np.float64).reshape(factor.shape) * factor
            bias = bias_constant(qw) if mu is not None else None
            if bias is None:
                mu = None
            if h is not None:
                wf = w if use else qw.codes.astype(np.float32) * np.asarray(qw.scale, np.float32)
                r = _data_aware(qw, wf, codes, scale, h, layout, mu, multipliers)
                if r is not None:
                    codes, scale = r[0], r[1]
                    info.update(objective=r[2], rtn_objective=r[3], data_aware=int(np.count_nonzero(r[2] < r[3])))
            old = np.asarray(qw.scale, np.float32).reshape(-1)
            changed = int(np.count_nonzero(scale.reshape(-1) != old)) if scale.size == old.size else old.size
            if changed or not np.array_equal(codes, qw.codes):
                if mu is not None:
                    shift = _bias_shift(qw, qw.codes, qw.scale, codes, scale, mu)
                    b = np.asarray(bias.get_data(), np.float64)
                    _replace(bias, (b + shift.reshape(b.shape)).astype(np.float32))
                    info.update(bias_shift=shift)
                replace_constants(qw, codes, scale)
            info.update(changed=changed, channels=old.size, bias_corrected=mu is not None)
        infos.append(info)
    return infos


def _replace(const, arr: np.ndarray) -> None:
    """Swap ``const`` for a new Constant holding ``arr`` (same name and type) in its model."""
    c = require_openvino().opset13.constant(np.ascontiguousarray(arr, dtype=np.float32))
    c.set_friendly_name(const.get_friendly_name())
    const.output(0).replace(c.output(0))


def quantize(
    model,
    calibration_dataset,
    *args,
    layout: str = "openvino",
    data_aware: bool = True,
    activation_matmuls: str = "float",
    bias_correction: bool = False,
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
    ``bias_correction``: ``True`` adds ``(W_nncf - W_safe) . E[x]`` to the bias of every node that has one (NNCF's
    bias correction was computed for NNCF's codes) and rounds on ``e^T (H - mu mu^T) e``; off by default: it
    lowered the held-out SQNR on both benchmark models (docs/openvino.md).
    """
    nncf = require_nncf()
    ov = require_openvino()
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if activation_matmuls not in ACTIVATION_MATMULS:
        raise ValueError(f"activation_matmuls must be one of {ACTIVATION_MATMULS}, got {activation_matmuls!r}")
    if not isinstance(bias_correction, bool):
        raise TypeError(f"bias_correction must be a bool, got {type(bias_correction).__name__}")
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
    stats = means = None
    if data_aware:
        subset = bound.arguments.get("subset_size", inspect.signature(nncf.quantize).parameters["subset_size"].default)
        items = calibration_dataset.get_inference_data()
        stats, means, lw = calibration_moments(model, items, limit=int(subset), names=set(floats))
        if bias_correction:  # shrink the covariance the objective then sees (H - mu mu^T), not E[x x^T]
            mm = {k: mu.reshape(mu.shape[0], -1, 1) * mu.reshape(mu.shape[0], 1, -1) for k, mu in means.items()}
            stats = {k: shrink(h - mm[k], lw[k]) + mm[k] for k, h in stats.items()}
        else:
            stats = {k: shrink(h, lw[k]) for k, h in stats.items()}
    q = nncf.quantize(*bound.args, **bound.kwargs)
    rewrite(q, floats, layout, stats, means if bias_correction and data_aware else None)
    return q
