"""ONNX Runtime adapter: safe 8-bit weights from ORT's own quantizer, and reading quantized models.

:func:`quantize_dynamic` and :func:`quantize_static` are drop-in for ``onnxruntime.quantization``'s
functions (same arguments, plus keyword-only ``layout``).  ORT does everything (graph rewriting,
calibration, QDQ / QOperator formats, bias quantization); safeobs replaces only the scales and codes
of the int8 weights, at ORT's two weight hooks:

* QOperator (``quantize_dynamic``, ``quantize_static(quant_format=QOperator)``):
  ``BaseQuantizer.quantize_initializer_impl`` / ``quantize_weight_per_channel_impl``;
* QDQ: ``QDQQuantizer._calc_initializer_quant_params``.

Both run before ORT quantizes the biases, which read the weight scale from the model, so int32
biases follow the new scales.  The scales are the tightest ones that :mod:`safeobs.core.solver` proves
safe for the kernels' pairs (layout ``"ort"``: MLAS's U8S8 kernels pair the flat (2m, 2m+1)
positions of K, or of (taps, input channel) for Conv), never below ORT's own scale; the codes use
ORT's formula ``clip(round(w / scale) + zp)``.  With calibration data (``quantize_static``'s reader,
``quantize_dynamic(calibration_data_reader=)``) the codes are data-aware instead, at the same scales
(:func:`safeobs.core.rounding.round_weight`'s default, one scale per channel), still proven safe, and
``quantize_dynamic`` subtracts each MatMul's mean output error on that data from its float bias.  Activations keep
the full u8 range and ``reduce_range`` is turned off: with safe weights no u8 activation can saturate a lane.

onnx and onnxruntime are imported lazily (``pip install 'safeobs[onnx]'``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import warnings
from dataclasses import dataclass, field

import numpy as np

INSTALL_HINT = "pip install 'safeobs[onnx]'  (or: pip install onnx onnxruntime)"
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
ISAS = ("avx2", "avx512", "vnni")


def require():
    """``(onnx, onnxruntime)``, imported lazily; a missing package raises ImportError naming the pip command."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(f"safeobs.onnx needs onnx and onnxruntime ({e.name} is missing): {INSTALL_HINT}") from None
    return onnx, onnxruntime


# -- how the kernels see an ONNX weight -------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """How a weight initializer enters its kernel: ``kind`` is "matmul" (B is (K, N)), "gemm_t" (B is
    (N, K), Gemm transB=1), "conv" ((OC, IC/G, *k)) or "other" (unknown consumer: layout "any")."""

    kind: str
    group: int = 1


def weight_roles(model) -> dict[str, Role]:
    """Role of every initializer consumed as a weight by MatMul / Gemm / Conv in a float model."""
    inits = {i.name for i in model.graph.initializer}
    roles: dict[str, Role] = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMul":
            role = Role("matmul")
        elif node.op_type == "Gemm":
            role = Role("gemm_t" if attrs.get("transB") is not None and attrs["transB"].i else "matmul")
        elif node.op_type == "Conv":
            role = Role("conv", int(attrs["group"].i) if "group" in attrs else 1)
        else:
            continue
        name = node.input[1]
        roles[name] = role if roles.get(name, role) == role else Role("other")
    return roles


def exact_depthwise(shape, role: Role) -> bool:
    """MLAS runs QLinearConv with IC/G == OC/G == 1 with exact depthwise kernels (pair discovery)."""
    return role.kind == "conv" and len(shape) >= 3 and shape[1] == 1 and shape[0] == role.group


def _kernel_view(w: np.ndarray, role: Role, axis: int | None):
    """``(V, ch_axis, op)``: the weight as the kernel's (OC, K...) array, and the channel axis in it."""
    if role.kind == "matmul" and w.ndim == 2:
        return w.T, (None if axis is None else 1 - axis % 2), "linear"
    if role.kind == "gemm_t" and w.ndim == 2:
        return w, axis, "linear"
    if role.kind == "conv" and 3 <= w.ndim <= 5:
        return w, axis, "conv"
    return w, axis, None


def layout_pairs_for(
    v: np.ndarray, op: str | None, layout: str, ch_axis: int | None, role: Role | None = None
) -> np.ndarray:
    """Pairs (indices into ``v.ravel()``) that must be safe; unknown ops use the top-two rule per channel."""
    from ..kernels import layout as L

    if layout == "ort" and role is not None and exact_depthwise(v.shape, role):
        return np.zeros((0, 2), np.int64)
    if op is not None and layout != "any":
        return L.weight_pairs(v.shape, layout, op)
    if op is not None:
        return L.any_pairs(v, op)
    axis = 0 if ch_axis is None else ch_axis  # unknown consumer: any pairing inside a channel
    rows = np.moveaxis(np.arange(v.size).reshape(v.shape), axis, 0).reshape(v.shape[axis], -1)
    if ch_axis is None:
        rows = rows.reshape(1, -1)
    vals = v.ravel()[rows]
    if rows.shape[1] < 2:
        return np.zeros((0, 2), np.int64)
    r = np.arange(rows.shape[0])[:, None]
    top, bottom = np.argpartition(-vals, 1, axis=1)[:, :2], np.argpartition(vals, 1, axis=1)[:, :2]
    return np.concatenate([rows[r, top], rows[r, bottom]]).astype(np.int64)


def ort_codes(w: np.ndarray, scale, zero_point, axis: int | None, qmin=-128, qmax=127) -> np.ndarray:
    """ORT's weight quantization (quant_utils.quantize_nparray): ``clip(round(w / scale) + zp)`` in float32."""
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    s = np.asarray(scale, dtype=np.float32).reshape(shape)
    z = np.asarray(zero_point).astype(np.float32).reshape(shape)
    q = np.asarray((w.astype(np.float32) / s).round() + z)
    return np.clip(q, qmin, qmax).astype(np.int8)


def pair_violations(
    codes: np.ndarray, role: Role, axis: int | None, layout: str = "ort", weight: np.ndarray | None = None
) -> np.ndarray:
    """Channels (indices along ``axis``, [0] per tensor) with a kernel pair whose codes can saturate."""
    v, ch, op = _kernel_view(codes.astype(np.int16), role, axis)
    pairs = layout_pairs_for(v if weight is None else _kernel_view(weight, role, axis)[0], op, layout, ch, role)
    flat = v.ravel()
    tot = flat[pairs[:, 0]].astype(np.int32) + flat[pairs[:, 1]]
    bad = pairs[(tot > 128) | (tot < -128), 0]
    if ch is None:
        return np.array([0] if bad.size else [], dtype=np.int64)
    inner = int(np.prod(v.shape[ch + 1 :]))
    return np.unique((bad // inner) % v.shape[ch])


def safe_weight_params(
    w: np.ndarray, role: Role, scale, zero_point, axis: int | None, *, symmetric: bool = True, layout: str = "ort"
):
    """Tightest safe ``(scale, zero_point, codes)`` for an int8 ONNX weight, never below ORT's ``scale``.

    ``axis``: ORT's per-channel axis (None per tensor).  The solver works on the kernel's view of the
    weight; the codes are then made with ORT's formula and checked pair by pair, and the rare channel
    where float32 division rounds a code differently from the solver's reciprocal gets the next
    float32 scale until it is safe (an exact check, not a tolerance).
    """
    from ..core.solver import raise_scales

    w = np.ascontiguousarray(w, dtype=np.float32)
    v, ch, op = _kernel_view(w, role, axis)
    v = np.ascontiguousarray(v)
    pairs = layout_pairs_for(v, op, layout, ch, role)
    stock = np.asarray(scale, dtype=np.float32).reshape(-1)
    zp = np.asarray(zero_point).astype(np.int64).reshape(-1)
    if not symmetric or np.any(zp != 0):
        new_s, new_zp = raise_scales(v, pairs, stock, zp, ch_axis=ch, symmetric=False, check_pairs=False)
    else:
        new_s, new_zp = raise_scales(v, pairs, stock, 0, ch_axis=ch, symmetric=True, check_pairs=False)
    new_s = new_s.astype(np.float32)
    for _ in range(64):
        codes = ort_codes(w, new_s, new_zp, axis)
        bad = pair_violations(codes, role, axis, layout, weight=w)
        if bad.size == 0:
            break
        new_s[bad] = np.nextafter(new_s[bad], np.float32(np.inf))
    else:
        raise RuntimeError("no safe scale found (float32 rounding did not settle)")
    if symmetric and not np.any(new_zp):
        # round(w / s) is monotone in s, so safety is too: step raised channels down while still safe
        # (the solver rounds like torch, w * (1/s), which may differ from ORT's division by one ulp).
        for _ in range(64):
            raised = np.flatnonzero(new_s > stock)
            if raised.size == 0:
                break
            trial = new_s.copy()
            trial[raised] = np.maximum(np.nextafter(new_s[raised], np.float32(0)), stock[raised])
            bad = set(pair_violations(ort_codes(w, trial, new_zp, axis), role, axis, layout, weight=w).tolist())
            ok = np.array([c for c in raised if c not in bad], dtype=np.int64)
            if ok.size == 0:
                break
            new_s[ok] = trial[ok]
        codes = ort_codes(w, new_s, new_zp, axis)
    return new_s, new_zp.astype(np.asarray(zero_point).dtype), codes


# -- hooks into ORT's quantizer -------------------------------------------------------------------


@dataclass
class _Context:
    layout: str
    changed: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # weight name -> E[x x^T] (G, K, K) of its kernel's inputs
    codes: dict = field(default_factory=dict)  # QDQ: weight name -> data-aware codes for ORT's initializer
    rounded: dict = field(default_factory=dict)  # weight name -> (objective, RTN objective) per channel
    skipped: dict = field(default_factory=dict)  # weight name -> why it has no statistics
    fallbacks: dict = field(default_factory=dict)  # weight name -> why it keeps the RTN codes (data-aware asked)
    nodes: dict = field(default_factory=dict)  # weight name -> consumer node names (float model)
    means: dict = field(default_factory=dict)  # weight name -> (E[x], E[x_hat]) (quantize_dynamic's bias correction)
    final: dict = field(default_factory=dict)  # weight name -> (float weight, scale, codes, axis, codes name)
    data_aware: bool = False  # calibration data given: every int8 weight gets data-aware codes or a fallback


@dataclass(frozen=True)
class Fallback:
    """A weight whose data-aware codes were asked for (calibration data given) but that keeps ORT's RTN
    codes at the safe scales: ``nodes`` consume it, ``reason`` says why.  The codes are safe either way."""

    weight: str
    nodes: tuple
    reason: str


# -- data-aware weights: statistics from one ORT run of the float model (issue 19) -------------------


class _Replay:
    """A ``CalibrationDataReader`` over cached feeds (for readers without ``rewind``)."""

    def __init__(self, feeds):
        self._feeds, self._i = list(feeds), 0

    def get_next(self):
        if self._i >= len(self._feeds):
            return None
        self._i += 1
        return self._feeds[self._i - 1]

    def rewind(self):
        self._i = 0

    def __iter__(self):
        return self

    def __next__(self):
        r = self.get_next()
        if r is None:
            raise StopIteration
        return r

    def __len__(self):
        return len(self._feeds)


class _ConvAttrs:
    """What :func:`safeobs.core.rounding._receptive_fields` reads, from an ONNX Conv's attributes.  ``pads`` are
    ONNX's explicit ``(begin..., end...)`` pads, or None with ``auto_pad`` SAME_UPPER / SAME_LOWER / VALID
    (resolved per input shape by :func:`_pad_input`); ``padding`` stays 0: the input is padded beforehand."""

    def __init__(self, kernel_size, stride, pads, dilation, groups, auto_pad="NOTSET"):
        self.kernel_size, self.stride, self.dilation, self.groups = kernel_size, stride, dilation, groups
        self.pads, self.auto_pad = pads, auto_pad
        self.padding = (0,) * len(kernel_size)


def _pad_input(x: np.ndarray, conv: _ConvAttrs) -> np.ndarray:
    """``x`` (N, C, *spatial) zero-padded as the float Conv pads it (explicit, asymmetric or ``auto_pad``)."""
    nd = len(conv.kernel_size)
    if conv.pads is not None:
        begin, end = conv.pads[:nd], conv.pads[nd:]
    elif conv.auto_pad == "VALID":
        begin = end = (0,) * nd
    else:  # SAME_UPPER / SAME_LOWER: output = ceil(input / stride), the odd pad at the end (UPPER) or begin
        total = [
            max(
                (-(-x.shape[2 + i] // conv.stride[i]) - 1) * conv.stride[i]
                + (conv.kernel_size[i] - 1) * conv.dilation[i]
                + 1
                - x.shape[2 + i],
                0,
            )
            for i in range(nd)
        ]
        small = [t // 2 for t in total]
        big = [t - h for t, h in zip(total, small)]
        begin, end = (small, big) if conv.auto_pad == "SAME_UPPER" else (big, small)
    if not any(begin) and not any(end):
        return x
    return np.pad(x, [(0, 0), (0, 0)] + [(int(b), int(e)) for b, e in zip(begin, end)])


def _receptive_fields_nd(x: np.ndarray, conv: _ConvAttrs, max_positions: int):
    """(G, S, K) receptive fields of a padded (N, C, *spatial) input for any number of spatial dims (3-D Conv),
    K in ``weight[oc].ravel()`` order (ic, taps); the same fixed pseudo-random subset of at most
    ``max_positions`` positions as :func:`safeobs.core.rounding._receptive_fields`."""
    import torch

    n, c = x.shape[:2]
    nd = len(conv.kernel_size)
    k, st, dl = conv.kernel_size, conv.stride, conv.dilation
    out = [(x.shape[2 + i] - dl[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(nd)]
    total = n * int(np.prod(out))
    if total > max_positions:
        idx = torch.randperm(total, generator=torch.Generator().manual_seed(total))[:max_positions].numpy()
    else:
        idx = np.arange(total)
    pos = np.unravel_index(idx, (n, *out))
    taps = list(np.ndindex(*k))
    vals = np.stack(
        [x[(pos[0], slice(None)) + tuple(pos[1 + i] * st[i] + t[i] * dl[i] for i in range(nd))] for t in taps], -1
    )  # (S, C, taps)
    g = conv.groups
    vals = vals.reshape(vals.shape[0], g, c // g, len(taps)).transpose(1, 0, 2, 3)
    return torch.from_numpy(np.ascontiguousarray(vals.reshape(g, vals.shape[1], -1)))


_TRANS_A = "transA"  # Gemm with transA=1: its A is (K, M)


def _stat_consumers(model) -> tuple[dict, dict]:
    """``({weight name: [(activation name, role, conv attrs / "transA" / None)]}, {weight name: reason})``:
    the weights data-aware rounding covers (MatMul / Gemm on (.., K) inputs, Gemm with transA=1, Conv of any
    dimension with explicit, asymmetric or ``auto_pad`` pads), and why each other weight is not covered."""
    onnx, _ = require()
    roles = weight_roles(model)
    inits = {i.name: i for i in model.graph.initializer}
    out: dict = {}
    skipped: dict = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in roles:
            continue
        name = node.input[1]
        if roles[name].kind == "other":
            skipped[name] = "weight shared by nodes that use it differently"
            continue
        a = {x.name: onnx_attr(x) for x in node.attribute}
        role, conv = roles[name], None
        if node.op_type == "Gemm" and a.get("transA", 0):
            conv = _TRANS_A
        elif node.op_type == "Conv":
            nd = len(inits[name].dims) - 2
            auto = a.get("auto_pad", b"NOTSET")
            auto = auto.decode() if isinstance(auto, bytes) else str(auto)
            if nd < 1:
                skipped[name] = f"Conv weight of rank {nd + 2}"
                continue
            conv = _ConvAttrs(
                tuple(a.get("kernel_shape", inits[name].dims[2:])),
                tuple(a.get("strides", [1] * nd)),
                tuple(a.get("pads", [0] * 2 * nd)) if auto == "NOTSET" else None,
                tuple(a.get("dilations", [1] * nd)),
                int(a.get("group", 1)),
                auto,
            )
        out.setdefault(name, []).append((node.input[0], role, conv))
    return out, skipped


def onnx_attr(attr):
    onnx, _ = require()
    return onnx.helper.get_attribute_value(attr)


def _fields(x: np.ndarray, conv, max_positions: int):
    """(G, S, K) rows of the kernel's input matrix for one weight consumer (see :func:`_stat_consumers`)."""
    import torch

    from ..core.rounding import _receptive_fields

    if conv is None:
        return torch.from_numpy(np.ascontiguousarray(x.reshape(1, -1, x.shape[-1])))
    if isinstance(conv, str):  # Gemm transA=1: A is (K, M)
        return torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0], -1).T[None]))
    xp = _pad_input(x, conv)
    if len(conv.kernel_size) <= 2:
        return _receptive_fields(torch.from_numpy(np.ascontiguousarray(xp)), conv, max_positions)
    return _receptive_fields_nd(xp, conv, max_positions)


def dynamic_quantize(x: np.ndarray) -> np.ndarray:
    """ORT's ``DynamicQuantizeLinear`` round trip: ``x`` as the integer kernel sees it (float32, dequantized).

    One u8 scale and zero point for the whole tensor, its range widened to include 0:
    ``s = (max(x, 0) - min(x, 0)) / 255``, ``zp = clip(round(-min / s), 0, 255)``, ``q = clip(round(x / s) + zp)``
    (round half to even, as ORT); returns ``(q - zp) * s``."""
    x = np.asarray(x, np.float32)
    lo, hi = np.float32(min(float(x.min(initial=0.0)), 0.0)), np.float32(max(float(x.max(initial=0.0)), 0.0))
    s = np.float32((hi - lo) / np.float32(255))
    if s == 0:
        return np.zeros_like(x)
    zp = np.float32(np.clip(np.rint(-lo / s), 0, 255))
    return ((np.clip(np.rint(x / s) + zp, 0, 255) - zp) * s).astype(np.float32)


def calibration_stats(
    model_input,
    reader,
    *,
    max_positions: int = 16384,
    skipped: dict | None = None,
    means: dict | None = None,
    layout: str | None = None,
    intensity: dict | None = None,
):
    """``(stats, replay)``: ``{weight name: E[x x^T]}`` (float64, (G, K, K), K ordered like the kernel's row)
    of the inputs of every MatMul / Gemm / Conv weight, from one ONNX Runtime run of the float model over
    ``reader`` with those inputs exposed as extra graph outputs; and a reader to hand on to ORT (``reader``
    itself, rewound, if it has ``rewind()``; otherwise a replay of the cached feeds).  ``skipped``: a dict
    that receives ``{weight name: reason}`` for the weights without statistics.  ``means``: a dict that
    receives ``{weight name: (E[x], E[x_hat])}`` (float64, (G, K) each) for the same rows, ``x_hat`` being
    the input after ORT's per-run ``DynamicQuantizeLinear`` (:func:`dynamic_quantize`): what a dynamically
    quantized MatMul really multiplies.  ``layout="ort"``: no statistics for depthwise Conv weights, which MLAS
    runs exactly (they keep RTN codes; their receptive fields were most of the cost on MobileNetV2).
    ``intensity``: a dict that receives ``{weight name: Ledoit-Wolf intensity (G,)}`` of each ``E[x x^T]``
    (:func:`safeobs.core.rounding.ledoit_wolf_intensity`, from the same rows)."""
    onnx, ort = require()
    import torch

    from ..core.rounding import ledoit_wolf_intensity

    model = onnx.load(str(model_input)) if not isinstance(model_input, onnx.ModelProto) else model_input
    consumers, why = _stat_consumers(model)
    if layout == "ort":
        shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
        for name in [n for n, uses in consumers.items() if exact_depthwise(shapes[n], uses[0][1])]:
            del consumers[name]
            why[name] = "depthwise Conv: MLAS runs it exactly, RTN codes at ORT's scale"
    inputs = {i.name for i in model.graph.input}
    acts = sorted({act for uses in consumers.values() for act, _, _ in uses})
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for act in acts:
        if act not in have and act not in inputs:
            m.graph.output.append(onnx.helper.make_tensor_value_info(act, onnx.TensorProto.FLOAT, None))
    fetch = [a for a in acts if a not in inputs]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    rewind = callable(getattr(reader, "rewind", None))
    cached, acc, sums = [], {}, {}
    while True:
        feed = reader.get_next()
        if feed is None:
            break
        if not rewind:
            cached.append(feed)
        vals = dict(zip(fetch, sess.run(fetch, feed))) if fetch else {}
        vals.update({k: np.asarray(v) for k, v in feed.items() if k in acts})
        dq = {}
        for name, uses in consumers.items():
            for act, _role, conv in uses:
                c = _fields(vals[act].astype(np.float32), conv, max_positions)
                xx = torch.bmm(c.transpose(1, 2), c).double().numpy()
                if name in acc and acc[name][0].shape != xx.shape:
                    why[name] = "its consumers see inputs of different sizes"
                    continue
                # sum_i ||x_i||^4 per group: the Ledoit-Wolf intensity's only extra statistic
                x4 = (c.double().square().sum(-1) ** 2).sum(1).numpy() if intensity is not None else 0.0
                prev = acc.get(name, (0.0, 0, 0.0))
                acc[name] = (prev[0] + xx, prev[1] + c.shape[1], prev[2] + x4)
                if means is not None:
                    if act not in dq:
                        dq[act] = dynamic_quantize(vals[act])
                    cq = _fields(dq[act], conv, max_positions)
                    m0, m1 = sums.get(name, (0.0, 0.0))
                    sums[name] = (m0 + c.double().sum(1).numpy(), m1 + cq.double().sum(1).numpy())
    replay = reader if rewind else _Replay(cached)
    replay.rewind()
    if skipped is not None:
        skipped.update(why)
    if means is not None:
        means.update(
            {k: (m0 / acc[k][1], m1 / acc[k][1]) for k, (m0, m1) in sums.items() if acc[k][1] and k not in why}
        )
    out = {k: xx / n for k, (xx, n, _) in acc.items() if n and k not in why}
    if intensity is not None:
        intensity.update({k: ledoit_wolf_intensity(out[k], acc[k][2] / acc[k][1], acc[k][1]) for k in out})
    return out, replay


def _data_aware(ctx: _Context, name: str, w, role: Role, axis, s, z, codes):
    """``(scale, codes)``: ``round_weight``'s codes at ORT's safe scales (its default candidate scales per channel;
    per tensor: the one scale), per channel the better of those and ``codes`` on the exact float64
    ``E[(e.x)^2]`` (a channel that is not strictly better keeps ``codes``); or the
    inputs unchanged (a fallback, recorded in ``ctx.fallbacks`` with its reason) where the weight has no
    statistics or a layout data-aware rounding does not model."""
    from ..core.rounding import SINGLE_SCALE, round_weight

    def keep(reason):
        ctx.fallbacks[name] = reason
        return s, codes

    if np.any(np.asarray(z) != 0):
        return keep("asymmetric weight (zero point != 0): data-aware rounding is symmetric")
    h = ctx.stats.get(name)
    if h is None:
        return keep(ctx.skipped.get(name, "no calibration statistics for its input"))
    if ctx.layout == "ort" and exact_depthwise(w.shape, role):
        return keep("depthwise Conv: MLAS runs it exactly, RTN codes at ORT's scale")
    v, ch, op = _kernel_view(np.asarray(w, np.float32), role, axis)
    if op is None or ch not in (0, None):
        return keep(f"weight layout not modelled (shape {tuple(np.shape(w))}, axis {axis})")
    cv = _kernel_view(codes, role, axis)[0]
    oc = v.shape[0]
    s_rows = np.broadcast_to(np.asarray(s, np.float32).reshape(-1), (oc,)).copy()
    try:
        r = round_weight(
            np.ascontiguousarray(v),
            h,
            layout=ctx.layout,
            op=op,
            groups=role.group if op == "conv" else 1,
            bias_correction=False,
            scale=s_rows,
            rtn_codes=np.ascontiguousarray(cv),
            **({} if ch == 0 else dict(multipliers=SINGLE_SCALE)),
        )
    except (ValueError, AssertionError) as e:  # a shape or pairing this path does not model: keep ORT's codes
        return keep(f"round_weight: {e}")
    # Never worse than ORT's codes per channel on the exact float64 objective E[(e.x)^2]: they are round_weight's
    # base candidate (rtn_codes at scale s), kept in every channel where the winner is not strictly better.
    q2, s_da = r.codes.reshape(oc, -1), np.asarray(r.scale, np.float32).reshape(-1)
    q_kernel = q2.reshape(v.shape).astype(np.int8)
    new_codes = q_kernel.T if role.kind == "matmul" else q_kernel
    new_s = s_da if ch == 0 else np.asarray(s, np.float32)
    if pair_violations(new_codes, role, axis, ctx.layout, weight=np.asarray(w, np.float32)).size:
        return keep("data-aware codes failed the pair check")  # never expected
    ctx.rounded[name] = (r.error, r.rtn_error)
    return new_s.astype(np.float32).reshape(np.shape(s)), np.ascontiguousarray(new_codes).astype(np.int8)


def _roles_of(quantizer) -> dict:
    roles = getattr(quantizer, "_safeobs_roles", None)
    if roles is None:
        roles = quantizer._safeobs_roles = weight_roles(quantizer.model.model)
    return roles


def _replace_initializer(onnx_model, name: str, array: np.ndarray, like) -> None:
    onnx, _ = require()
    old = onnx_model.get_initializer(name)
    if old is None:
        return
    new = onnx.numpy_helper.from_array(
        np.asarray(array).astype(onnx.helper.tensor_dtype_to_np_dtype(like.data_type)).reshape(tuple(like.dims)), name
    )
    onnx_model.remove_initializer(old)
    onnx_model.add_initializer(new)


def _is_int8(qtype) -> bool:
    onnx, _ = require()
    return int(getattr(qtype, "tensor_type", qtype)) == onnx.TensorProto.INT8


@contextlib.contextmanager
def _hooks(ctx: _Context):
    onnx, _ = require()
    from onnxruntime.quantization import base_quantizer, qdq_quantizer

    base = base_quantizer.BaseQuantizer
    orig_init, orig_pc = base.quantize_initializer_impl, base.quantize_weight_per_channel_impl
    orig_qdq = qdq_quantizer.QDQQuantizer._calc_initializer_quant_params

    def _apply(quantizer, weight_name, axis, zp_name, scale_name, q_name):
        roles = _roles_of(quantizer)
        if weight_name not in roles:
            return
        w = onnx.numpy_helper.to_array(quantizer.model.get_initializer(weight_name))
        sc_init, zp_init = quantizer.model.get_initializer(scale_name), quantizer.model.get_initializer(zp_name)
        scale, zp = onnx.numpy_helper.to_array(sc_init), onnx.numpy_helper.to_array(zp_init)
        s, z, codes = safe_weight_params(
            w, roles[weight_name], scale, zp, axis, symmetric=bool(np.all(zp == 0)), layout=ctx.layout
        )
        if ctx.data_aware:
            s, codes = _data_aware(ctx, weight_name, w, roles[weight_name], axis, s, z, codes)
        ctx.final[weight_name] = (np.asarray(w, np.float32), np.asarray(s, np.float32), np.asarray(codes), axis, q_name)
        _replace_initializer(quantizer.model, scale_name, s, sc_init)
        _replace_initializer(quantizer.model, zp_name, z, zp_init)
        q_init = quantizer.model.get_initializer(q_name)
        if q_init is not None:
            _replace_initializer(quantizer.model, q_name, codes, q_init)
        ctx.changed[weight_name] = int(np.sum(s != scale.reshape(-1).astype(np.float32)))

    def quantize_initializer_impl(self, weight, qType, reduce_range=False, keep_float_weight=False):
        out = orig_init(self, weight, qType, reduce_range, keep_float_weight)
        if _is_int8(qType):
            _apply(self, weight.name, None, out[1], out[2], out[0])
        return out

    def quantize_weight_per_channel_impl(
        self, weight_name, weight_qType, channel_axis, reduce_range=True, keep_float_weight=False
    ):
        out = orig_pc(self, weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight)
        if _is_int8(weight_qType):
            rank = len(quantizer_dims(self, weight_name))
            _apply(self, weight_name, channel_axis % rank, out[1], out[2], out[0])
        return out

    def calc_initializer_quant_params(self):
        params = orig_qdq(self)
        roles = _roles_of(self)
        for name, qp in params.items():
            if name not in roles or not _is_int8(qp["quant_type"]) or qp.get("block_size", 0):
                continue
            w = onnx.numpy_helper.to_array(self.model.get_initializer(name))
            axis = qp.get("axis")
            axis = None if axis is None else axis % w.ndim
            zp = np.asarray(qp["zero_point"])
            s, z, codes = safe_weight_params(
                w, roles[name], qp["scale"], zp, axis, symmetric=bool(np.all(zp == 0)), layout=ctx.layout
            )
            if ctx.data_aware:
                s_da, c_da = _data_aware(ctx, name, w, roles[name], axis, s, z, codes)
                if name in ctx.fallbacks:
                    pass
                elif getattr(self, "add_qdq_pair_to_weight", False):
                    # ORT keeps the float weight and quantizes it at run time: store s * q, which its
                    # QuantizeLinear maps back to q (checked with ORT's formula), else RTN at the safe scale
                    shape = [1] * w.ndim
                    if axis is not None:
                        shape[axis] = -1
                    wq = (c_da.astype(np.float32) * np.asarray(s_da, np.float32).reshape(shape)).astype(np.float32)
                    if np.array_equal(ort_codes(wq, s_da, z, axis), c_da):
                        _replace_initializer(self.model, name, wq, self.model.get_initializer(name))
                        s, codes = s_da, c_da
                    else:
                        ctx.fallbacks[name] = "AddQDQPairToWeight: s * q does not quantize back to q"
                        ctx.rounded.pop(name, None)
                else:
                    s, codes = s_da, c_da
                ctx.codes[name] = codes
            ctx.changed[name] = int(np.sum(s != np.asarray(qp["scale"], np.float32).reshape(-1)))
            qp["scale"] = s.reshape(np.shape(qp["scale"])).astype(np.asarray(qp["scale"]).dtype)
            qp["zero_point"] = z.reshape(zp.shape).astype(zp.dtype)
        return params

    orig_qinit = getattr(qdq_quantizer, "quantize_onnx_initializer", None)

    def quantize_onnx_initializer(weight, *args, **kwargs):
        out = orig_qinit(weight, *args, **kwargs)
        codes = ctx.codes.get(weight.name)
        if codes is not None and tuple(out.dims) == codes.shape and out.data_type == onnx.TensorProto.INT8:
            out = onnx.numpy_helper.from_array(codes.astype(np.int8), out.name)
        return out

    base.quantize_initializer_impl = quantize_initializer_impl
    base.quantize_weight_per_channel_impl = quantize_weight_per_channel_impl
    qdq_quantizer.QDQQuantizer._calc_initializer_quant_params = calc_initializer_quant_params
    if orig_qinit is not None:
        qdq_quantizer.quantize_onnx_initializer = quantize_onnx_initializer
    try:
        yield ctx
    finally:
        base.quantize_initializer_impl, base.quantize_weight_per_channel_impl = orig_init, orig_pc
        qdq_quantizer.QDQQuantizer._calc_initializer_quant_params = orig_qdq
        if orig_qinit is not None:
            qdq_quantizer.quantize_onnx_initializer = orig_qinit


def quantizer_dims(quantizer, name: str) -> tuple:
    return tuple(quantizer.model.get_initializer(name).dims)


def _bind(fn, args, kwargs):
    bound = inspect.signature(fn).bind(*args, **kwargs)
    if bound.arguments.get("reduce_range"):
        warnings.warn(
            "safeobs: reduce_range=True ignored: safe weights keep the full 8-bit range exact",
            UserWarning,
            stacklevel=3,
        )
    bound.arguments["reduce_range"] = False
    return bound


def _check_layout(layout: str) -> None:
    from ..kernels.layout import LAYOUTS

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


_DATA_AWARE_DOC = """
    Data-aware weights (issue 19): with a ``calibration_data_reader``, ORT itself runs the float model once
    over it, the inputs of every MatMul / Gemm / Conv weight exposed as extra graph outputs
    (:func:`calibration_stats`), and each int8 weight's codes become
    :func:`safeobs.core.rounding.round_weight`'s at ORT's safe scales (``round_weight``'s default candidate
    scales per channel; per tensor, the one scale), per channel the better of those and the RTN codes on the
    exact ``E[(e.x)^2]``: never worse than without calibration on that objective.  ``quantize_dynamic`` then
    subtracts each MatMul's mean output error on the calibration data, ``E[x_hat] . w_hat - E[x] . w``
    (``x_hat``: the input after ORT's per-run ``DynamicQuantizeLinear``), from the float bias that follows it
    (``bias_correction=False`` keeps ORT's bias; ``Report.bias_corrected``: ``{weight: bias}``).  That mean
    depends on the dynamic scales of the runs, so calibrate with batches like the ones the model will run.
    The reader is rewound with its ``rewind()`` if it has one; otherwise its feeds are cached (in memory) and
    replayed.  ``E[x x^T]`` is float64, K x K per weight (K=4096: 128 MB).  Covered: symmetric int8 weights
    (ORT's default), MatMul / Gemm (transA=0) / 1-D and 2-D Conv with explicit symmetric pads; QDQ with
    ``AddQDQPairToWeight`` keeps ORT's codes.
"""


def _weight_nodes(model_input) -> dict:
    onnx, _ = require()
    model = model_input if isinstance(model_input, onnx.ModelProto) else onnx.load(str(model_input))
    out: dict = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type in WEIGHT_OPS and len(node.input) > 1:
            out.setdefault(node.input[1], []).append(node.name or f"{node.op_type}_{i}")
    return out


def _result(ctx: _Context, model_output, layout: str) -> Report:
    """The verification report of the written model, with the data-aware results and the fallbacks (each
    named in one UserWarning: the weight keeps ORT's RTN codes at the safe scales, safe either way)."""
    fallbacks = [Fallback(w, tuple(ctx.nodes.get(w, ())), why) for w, why in ctx.fallbacks.items()]
    if fallbacks:
        by_reason: dict = {}
        for f in fallbacks:
            by_reason.setdefault(f.reason, []).extend(f.nodes or (f.weight,))
        text = "; ".join(f"{why}: {', '.join(nodes)}" for why, nodes in by_reason.items())
        warnings.warn(
            f"safeobs: data-aware rounding kept the RTN codes (at the safe scales) of {len(fallbacks)} "
            f"weight(s): {text}",
            UserWarning,
            stacklevel=3,
        )
    report = verify(str(model_output), layout if layout != "any" else "ort")
    return dataclasses.replace(report, rounded=ctx.rounded, fallbacks=fallbacks)


_INT_MATMULS = ("MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")


def _dynamic_bias_correction(ctx: _Context, model_output) -> dict:
    """Add each calibrated MatMul's mean output error on the calibration data to its float bias, in place in
    ``model_output``; ``{weight name: bias initializer}`` of the corrected ones.

    ``quantize_dynamic`` keeps the bias in float (the ``Add`` after the integer MatMul and its rescaling), so the
    mean error of the layer as run, ``E[x_hat] . w_hat - E[x] . w`` per output channel (``x_hat``: the input after
    ORT's ``DynamicQuantizeLinear``, :func:`dynamic_quantize`; ``w_hat = s * q`` as written), can be subtracted
    exactly there: on the calibration data the mean squared output error drops by the square of that mean,
    channel by channel (``E[(d - m)^2] = E[d^2] - m^2``).  Corrected: an integer MatMul whose result reaches,
    through single-consumer ``Cast`` / ``Mul`` nodes, an ``Add`` with a float initializer of ``N`` values that
    nothing else uses (ORT's output for MatMul + Add, and for Gemm, which ORT rewrites into them)."""
    onnx, _ = require()
    q = onnx.load(str(model_output))
    inits = {i.name: i for i in q.graph.initializer}
    users: dict = {}
    for node in q.graph.node:
        for i in node.input:
            users.setdefault(i, []).append(node)
    by_codes = {}
    for node in q.graph.node:
        if node.op_type in _INT_MATMULS and len(node.input) > 1:
            by_codes.setdefault(node.input[1], []).append(node)
    done = {}
    for name, (w, s, codes, axis, q_name) in ctx.final.items():
        if name not in ctx.means or len(by_codes.get(q_name, ())) != 1 or w.ndim != 2 or axis not in (None, 1):
            continue
        mu, mu_hat = ctx.means[name]
        if mu.shape != (1, w.shape[0]) or codes.shape != w.shape:
            continue
        node = by_codes[q_name][0]
        while True:  # the rescaling after MatMulInteger, up to the bias Add
            nxt = users.get(node.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in ("Cast", "Mul", "Add"):
                node = None
                break
            node = nxt[0]
            if node.op_type == "Add":
                break
        if node is None:
            continue
        others = [i for i in node.input if i in inits]
        b = inits[others[0]] if len(others) == 1 else None
        if b is None or len(users.get(b.name, [])) != 1 or b.data_type != onnx.TensorProto.FLOAT:
            continue
        bv = onnx.numpy_helper.to_array(b)
        if bv.size != w.shape[1] or bv.ndim != 1:
            continue
        scale = np.asarray(s, np.float64).reshape(-1)
        w_hat = codes.astype(np.float64) * (scale[None, :] if axis is not None else scale[0])
        delta = mu_hat[0] @ w_hat - mu[0] @ w.astype(np.float64)
        b.CopyFrom(onnx.numpy_helper.from_array((bv.astype(np.float64) - delta).astype(np.float32), b.name))
        done[name] = b.name
    if done:
        onnx.save(q, str(model_output))
    return done


def quantize_dynamic(
    model_input,
    model_output,
    *args,
    layout: str = "ort",
    calibration_data_reader=None,
    bias_correction: bool = True,
    **kwargs,
):
    """``onnxruntime.quantization.quantize_dynamic`` with safe int8 weights (same arguments).

    ``layout``: the kernels to be safe for: ``"ort"`` (MLAS, default), ``"x86"`` (also FBGEMM/oneDNN)
    or ``"any"`` (every pairing).  ``reduce_range`` is forced off.  ``calibration_data_reader``: optional,
    an ORT ``CalibrationDataReader`` for data-aware weights (below).  Returns the verification
    :class:`Report` of the written model.
    """
    _, _ = require()
    q = importlib.import_module("onnxruntime.quantization.quantize")

    _check_layout(layout)
    bound = _bind(q.quantize_dynamic, (model_input, model_output, *args), kwargs)
    ctx = _Context(layout)
    if calibration_data_reader is not None:
        ctx.data_aware, ctx.nodes = True, _weight_nodes(bound.arguments["model_input"])
        from ..core.rounding import shrink

        lw: dict = {}
        ctx.stats, _ = calibration_stats(
            bound.arguments["model_input"],
            calibration_data_reader,
            skipped=ctx.skipped,
            means=ctx.means,
            layout=layout,
            intensity=lw,
        )
        ctx.stats = {k: shrink(h, lw[k]) for k, h in ctx.stats.items()}  # Ledoit-Wolf: see calibration_stats
    with _hooks(ctx):
        q.quantize_dynamic(*bound.args, **bound.kwargs)
    corrected = {}
    if bias_correction and ctx.means:
        corrected = _dynamic_bias_correction(ctx, model_output)
    return dataclasses.replace(_result(ctx, model_output, layout), bias_corrected=corrected)


def quantize_static(
    model_input,
    model_output,
    calibration_data_reader=None,
    *args,
    layout: str = "ort",
    data_aware: bool = True,
    **kwargs,
):
    """``onnxruntime.quantization.quantize_static`` with safe int8 weights (same arguments).

    Calibration, QDQ / QOperator, activation types and bias quantization are ORT's; ``reduce_range``
    is forced off.  The weights are data-aware on ``calibration_data_reader`` (below) unless
    ``data_aware=False`` (RTN at the tightest safe scales).  Returns the verification :class:`Report` of
    the written model (``report.rounded``: ``{weight: (objective, RTN objective)}`` per channel).
    """
    _, _ = require()
    q = importlib.import_module("onnxruntime.quantization.quantize")

    _check_layout(layout)
    ctx = _Context(layout)
    if data_aware and calibration_data_reader is not None:
        ctx.data_aware, ctx.nodes = True, _weight_nodes(model_input)
        from ..core.rounding import shrink

        lw: dict = {}
        ctx.stats, calibration_data_reader = calibration_stats(
            model_input, calibration_data_reader, skipped=ctx.skipped, layout=layout, intensity=lw
        )
        ctx.stats = {k: shrink(h, lw[k]) for k, h in ctx.stats.items()}  # Ledoit-Wolf: see calibration_stats
    bound = _bind(q.quantize_static, (model_input, model_output, calibration_data_reader, *args), kwargs)
    with _hooks(ctx):
        q.quantize_static(*bound.args, **bound.kwargs)
    return _result(ctx, model_output, layout)


quantize_dynamic.__doc__ += _DATA_AWARE_DOC
quantize_static.__doc__ += _DATA_AWARE_DOC


# -- reading a quantized model --------------------------------------------------------------------


@dataclass
class QWeight:
    """One integer weight of a quantized ONNX model and the node(s) that run it."""

    node: str  # the consuming node (QLinearConv, MatMulInteger, DequantizeLinear's consumer, ...)
    op_type: str  # the node's op type ("MatMul"/"Conv"/"Gemm" for QDQ)
    fmt: str  # "qoperator" or "qdq"
    codes_name: str
    scale_name: str | None
    zp_name: str | None
    axis: int | None
    role: Role
    codes: np.ndarray
    scale: np.ndarray | None
    zero_point: np.ndarray | None
    act_dtype: str  # "uint8", "int8" or "float" (activation not quantized)
    conv_attrs: dict = field(default_factory=dict)

    def kernel(self, isa: str, x64quantprecision: bool = False) -> tuple[str, bool]:
        """``(kernel, saturates)`` that ORT's CPU EP runs for this weight on ``isa`` (see :func:`kernel_for`)."""
        return kernel_for(self, isa, x64quantprecision)


def kernel_for(qw: QWeight, isa: str, x64quantprecision: bool = False) -> tuple[str, bool]:
    """Which MLAS kernel runs ``qw`` and whether it can saturate (pair discovery, tests/test_onnx.py).

    * u8 activations x s8 weights: QGEMM U8S8 (MatMulInteger, MatMulIntegerToFloat,
      DynamicQuantizeMatMul, QLinearMatMul, fused QDQ MatMul/Gemm) and QLinearConv (ConvSym when the
      weight zero points are 0 and IC % 4 == 0, im2col QGEMM otherwise): ``vpmaddubsw`` on AVX2 and
      AVX-512 without VNNI, flat pairs; VNNI / AMX exact.  Depthwise QLinearConv (IC/G = OC/G = 1):
      exact (MlasConvSymDepthwise / MlasConvDepthwise widen to int16 first).
    * ConvInteger: exact everywhere (ORT runs it as W x im2col(X): the S8U8 / U8U8 dispatch).
    * s8 activations in QOperator nodes (S8S8): exact on every x86 CPU (MLAS has no vpmaddubsw S8S8
      kernel; AVX-VNNI-INT8 is exact).  QDQ models with s8 activations are NOT: on x86 ORT's graph
      optimizer turns their Q/DQ pairs into u8 (x + 128, zp + 128) before fusing, so they run the
      U8S8 kernels above and saturate with the same pairs (measured, tests/test_onnx.py).
    * u8 weights (U8U8), and ``session.x64quantprecision=1``: exact.
    * activations left in float (weight-only DequantizeLinear): an FP32 kernel, exact.
    """
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    op = qw.op_type
    if qw.codes.dtype != np.int8:
        return "u8u8", False
    if qw.act_dtype == "float":
        return "fp32", False
    if qw.act_dtype == "int8" and qw.fmt == "qoperator":
        return "s8s8", False
    if op == "ConvInteger":
        return "convinteger", False
    if x64quantprecision:
        return "u8u8(x64quantprecision)", False
    if qw.role.kind == "conv":
        ocg, icg = qw.codes.shape[0] // qw.role.group, qw.codes.shape[1]
        if icg == 1 and ocg == 1:
            return "dwconv", False
        zp0 = qw.zero_point is None or not np.any(qw.zero_point)
        name = "convsym" if zp0 and (icg * qw.role.group) % 4 == 0 and qw.role.group == 1 else "im2col"
    else:
        name = "qgemm"
    return name, isa != "vnni"


def _attrs(node) -> dict:
    onnx, _ = require()
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def read_weights(model) -> list[QWeight]:
    """Every int8/uint8 weight of a quantized model with its scale, zero point, role and consumer."""
    onnx, _ = require()
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        model = onnx.load(str(model))
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    computed: dict = {}  # codes that ORT computes at run time (QuantizeLinear of a float weight)

    def arr(n):
        if n in computed:
            return computed[n]
        return onnx.numpy_helper.to_array(inits[n]) if n in inits else None

    producers = {o: n for n in g.node for o in n.output}

    def act_dtype(name: str) -> str:
        p = producers.get(name)
        if p is not None and p.op_type == "DequantizeLinear":
            z = arr(p.input[2]) if len(p.input) > 2 and p.input[2] else None
            return "int8" if z is not None and z.dtype == np.int8 else ("uint8" if p.input[0] not in inits else "float")
        if p is not None and p.op_type == "DynamicQuantizeLinear":
            return "uint8"
        if name in inits:
            return str(arr(name).dtype)
        for vi in list(g.input) + list(g.value_info):
            if vi.name == name:
                return str(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
        return "uint8"

    def base_of(codes_name: str) -> str:
        return codes_name[: -len("_quantized")] if codes_name.endswith("_quantized") else codes_name

    out = []
    for node in g.node:
        a = _attrs(node)
        t, ins = node.op_type, list(node.input)
        spec = None  # (codes, scale, zp, role, act input, act zp)
        if t == "QLinearConv":
            spec = (ins[3], ins[4], ins[5], Role("conv", a.get("group", 1)), ins[0], ins[2])
        elif t == "QLinearMatMul":
            spec = (ins[3], ins[4], ins[5], Role("matmul"), ins[0], ins[2])
        elif t == "QGemm":  # com.microsoft (QOperator Gemm): B is (K, N), or (N, K) with transB=1
            spec = (ins[3], ins[4], ins[5], Role("gemm_t" if a.get("transB", 0) else "matmul"), ins[0], ins[2])
        elif t == "MatMulInteger":
            b = base_of(ins[1])
            spec = (
                ins[1],
                b + "_scale",
                ins[3] if len(ins) > 3 else None,
                Role("matmul"),
                ins[0],
                ins[2] if len(ins) > 2 else None,
            )
        elif t == "ConvInteger":
            b = base_of(ins[1])
            spec = (
                ins[1],
                b + "_scale",
                ins[3] if len(ins) > 3 else None,
                Role("conv", a.get("group", 1)),
                ins[0],
                ins[2] if len(ins) > 2 else None,
            )
        elif t == "MatMulIntegerToFloat":
            spec = (
                ins[1],
                ins[3],
                ins[5] if len(ins) > 5 else None,
                Role("matmul"),
                ins[0],
                ins[4] if len(ins) > 4 else None,
            )
        elif t == "DynamicQuantizeMatMul":
            spec = (ins[1], ins[2], ins[3] if len(ins) > 3 else None, Role("matmul"), None, None)
        elif t in WEIGHT_OPS and len(ins) > 1:
            p = producers.get(ins[1])
            qn = producers.get(p.input[0]) if p is not None and p.op_type == "DequantizeLinear" else None
            if (
                qn is not None
                and qn.op_type == "QuantizeLinear"
                and qn.input[0] in inits
                and p.input[0] not in computed
            ):
                # AddQDQPairToWeight: a float weight that ORT quantizes at run time, QuantizeLinear's codes
                qs, qz = arr(qn.input[1]), arr(qn.input[2]) if len(qn.input) > 2 and qn.input[2] else None
                if qz is not None and qz.dtype in (np.int8, np.uint8):
                    lo, hi = (-128, 127) if qz.dtype == np.int8 else (0, 255)
                    qw_axis = _attrs(qn).get("axis", 1) % arr(qn.input[0]).ndim if qs.size > 1 else None
                    codes = ort_codes(arr(qn.input[0]), qs.reshape(-1), qz.reshape(-1), qw_axis, lo, hi)
                    computed[p.input[0]] = codes.astype(qz.dtype)
            if p is not None and p.op_type == "DequantizeLinear" and (p.input[0] in inits or p.input[0] in computed):
                role = (
                    Role("conv", a.get("group", 1))
                    if t == "Conv"
                    else Role("gemm_t" if t == "Gemm" and a.get("transB", 0) else "matmul")
                )
                pa = _attrs(p)
                codes = arr(p.input[0])
                spec = (p.input[0], p.input[1], p.input[2] if len(p.input) > 2 else None, role, ins[0], None)
                spec = spec + (pa.get("axis", 1) if arr(p.input[1]).size > 1 else None,)
        if spec is None or (spec[0] not in inits and spec[0] not in computed):
            continue
        codes = arr(spec[0])
        if codes.dtype not in (np.int8, np.uint8) or codes.ndim < 2:
            continue
        scale = arr(spec[1]) if spec[1] in inits else None
        zp = arr(spec[2]) if spec[2] and spec[2] in inits else None
        if len(spec) > 6:
            axis = None if spec[6] is None else spec[6] % codes.ndim
        elif scale is not None and scale.size > 1:
            axis = 0 if spec[3].kind in ("conv", "gemm_t") else 1
        else:
            axis = None
        if t == "DynamicQuantizeMatMul":
            ad = "uint8"
        elif spec[5] and spec[5] in inits:
            ad = str(arr(spec[5]).dtype)
        else:
            ad = act_dtype(spec[4])
        conv = {k: v for k, v in a.items() if k in ("strides", "pads", "dilations", "group", "auto_pad")}
        out.append(
            QWeight(
                node.name or f"{t}_{len(out)}",
                t,
                "qdq" if t in WEIGHT_OPS else "qoperator",
                spec[0],
                spec[1] if scale is not None else None,
                spec[2] if zp is not None else None,
                axis,
                spec[3],
                codes,
                scale,
                zp,
                ad,
                conv,
            )
        )
    return out


@dataclass
class Report:
    """Result of :func:`verify`: ``violations`` maps weight initializer -> unsafe channel indices."""

    layout: str
    weights: int
    violations: dict
    rounded: dict = field(default_factory=dict)  # quantize_*: weight -> (objective, RTN objective) per channel
    fallbacks: list = field(default_factory=list)  # quantize_* with calibration data: Fallback per RTN weight
    bias_corrected: dict = field(default_factory=dict)  # quantize_dynamic with calibration data: weight -> bias

    @property
    def ok(self) -> bool:
        return not self.violations

    def __repr__(self) -> str:
        n = sum(len(v) for v in self.violations.values())
        return f"Report(layout={self.layout!r}, weights={self.weights}, unsafe_channels={n}, ok={self.ok})"


def verify(model, layout: str = "ort") -> Report:
    """Check every int8 weight that a saturating kernel may run: no kernel pair may leave [-128, 128]."""
    weights = read_weights(model)
    bad = {}
    seen = set()
    for qw in weights:
        if qw.codes_name in seen:
            continue
        seen.add(qw.codes_name)
        if qw.codes.dtype != np.int8:
            continue
        ch = pair_violations(qw.codes, qw.role, qw.axis, layout)
        if ch.size:
            bad[qw.codes_name] = ch.tolist()
    return Report(layout, len(seen), bad)
