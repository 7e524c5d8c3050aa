"""PT2E glue of safe data-aware rounding (:mod:`safeobs.core.rounding`): statistics from hooks on the input
observers of a ``prepare_pt2e`` graph, and rewriting the int8 constants of a ``convert_pt2e`` graph.
Needs no torchao import itself (the graphs come from torchao's PT2E flow).

**Activation compensation** (``quantize_pt2e``'s default for static activations).  The converted model feeds each
conv/linear ``x^``, its input quantized to u8 and dequantized, not the float input ``x``.  The output error is
``W x - W^ x^``; :func:`calibrate_quantized_pt2e` gathers ``E[x^ x^^T]``, ``E[x x^^T]``, ``E[x x^T]``, ``E[x^]``
and ``E[x]`` at the same receptive-field positions (``K x K`` per layer, one batch of activations held at a
time), and :func:`apply_pt2e` rounds on them (:func:`_round_compensated`): :func:`round_weight` of ``W`` on
``E[x^ x^^T]``, every channel checked against RTN on the exact ``E||W x - W^ x^||^2``, and the bias absorbs the
mean error ``W E[x] - W^ E[x^]``.

Which ``x^``: ``local=True`` (the default of ``quantize_pt2e``) quantizes the float ``x`` with the layer's own
input qparams: the error of this layer's activation quantization only.  ``local=False`` runs the converted
model (``x^`` then carries every upstream layer's error too).  Compensating that cumulative error in every layer
from ONE pass counts it twice: layer ``l`` removes its share of the upstream error from its output, and layer
``l + 1``, measured on the uncompensated model, removes it again; along MobileNetV2's 52 layers the
over-correction compounds.  MobileNetV2 draw 0, eager held-out SQNR: float statistics 17.75 dB, local 17.87 dB;
``x^`` of the RTN model -2.30 dB (17.36 dB without its bias part); the bias part alone, ``x^`` of the data-aware
model, 2.82 dB.  GPTQ's sequential mode (each layer measured after the layers above it are rounded, every
calibration activation held at the current node: measured on 2026-12-07, the pass checked to feed each layer
exactly the final model's input) is worse too: 10.07 dB on draw 0 (local 17.94 dB on 24 held-out crops), 10.14 dB
with the local ``H`` and only the bias from the real ``E[x^]``, 17.31 dB without any bias part.  Matching each
channel's output mean to the float model's, layer after layer, makes the final layers' error larger (in-sample
too: 13.0 against 17.1 dB; the means match to 1e-4 and the 320 -> 1280 conv's output loses 2.3 dB).  Also tried
and rejected: the least-squares target
``W* = W C M^-1`` in ridge form (:func:`compensation_target`), worse than ``W`` on held-out data at every ridge
tried."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import numpy as np
import torch

from ..core.progress import progress_bar
from ..core.rounding import DEFAULT_MULTIPLIERS, LayerStats, _batches, _receptive_fields, round_weight
from ..core.solver import quantize, safe_qparams

__all__ = ["QuantStats", "apply_pt2e", "calibrate_pt2e", "calibrate_quantized_pt2e", "compensation_target"]


# -- PT2E (prepare_pt2e / convert_pt2e) --------------------------------------------------------------


class _ConvParams:
    """What :func:`_receptive_fields` reads from a conv module, from an aten.conv call's arguments."""

    def __init__(self, weight, args):
        nd = weight.dim() - 2

        def tup(i, default):
            v = args[i] if len(args) > i else default
            return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * nd

        self.kernel_size = tuple(weight.shape[2:])
        self.stride, self.padding, self.dilation = tup(3, 1), tup(4, 0), tup(5, 1)
        self.groups = int(args[6]) if len(args) > 6 else 1


def _pt2e_layers(gm):
    """(node name, input observer module name, weight, bias, op, conv params) of every conv1d/2d/linear node
    of a ``prepare_pt2e`` graph whose input and weight come from observers."""
    import operator

    aten = torch.ops.aten
    ops = {aten.conv1d.default: "conv", aten.conv2d.default: "conv", aten.linear.default: "linear"}
    for node in gm.graph.nodes:
        op = ops.get(node.target) if node.op == "call_function" else None
        if op is None or len(node.args) < 2:
            continue
        xin, wobs = node.args[0], node.args[1]
        if not (
            getattr(xin, "op", None) == "call_module"
            and getattr(wobs, "op", None) == "call_module"
            and wobs.args
            and getattr(wobs.args[0], "op", None) == "get_attr"
        ):
            continue
        w = operator.attrgetter(wobs.args[0].target)(gm).detach().float()
        b = node.args[2] if len(node.args) > 2 else None
        b = operator.attrgetter(b.target)(gm).detach().float() if getattr(b, "op", None) == "get_attr" else None
        yield node.name, xin.target, w, b, op, (None if op == "linear" else _ConvParams(w, node.args))


def _fields(x: torch.Tensor, st: LayerStats, params, max_positions: int) -> torch.Tensor | None:
    """The (G, P, K) receptive fields (a Linear's rows) of one layer input ``x`` at the positions every pass
    samples (a random subset of at most ``max_positions``, seeded by the position count), or None when ``x`` is
    not this layer's input (an observer module may be shared between several tensors)."""
    x = x.detach().to(torch.float32)
    k = st.xx.shape[-1]
    if st.op == "linear":
        if x.shape[-1] != k:
            return None
        c = x.reshape(1, -1, k)
        if c.shape[1] > max_positions:
            c = c[:, torch.randperm(c.shape[1], generator=torch.Generator().manual_seed(c.shape[1]))[:max_positions]]
        return c
    if x.dim() != st.weight.dim() or x.shape[1] != st.weight.shape[1] * params.groups:
        return None
    return _receptive_fields(x, params, max_positions)


def calibrate_pt2e(
    prepared: torch.fx.GraphModule, calibration: Iterable, *, progress: bool | None = None, max_positions: int = 16384
) -> dict:
    """:func:`calibrate` for a ``prepare_pt2e`` model: runs the calibration (feeding torchao's observers) and
    returns ``{conv/linear node name: LayerStats}`` from hooks on the input observers."""
    stats, handles = {}, []
    for name, obs, w, b, op, params in _pt2e_layers(prepared):
        g = 1 if op == "linear" else params.groups
        k = int(np.prod(w.shape[1:]))
        st = stats[name] = LayerStats(op, g, w, b, np.zeros((g, k, k)), np.zeros((g, k)))

        def hook(_m, _inp, out, st=st, params=params):
            with torch.no_grad():
                c = _fields(out, st, params, max_positions)
                if c is not None:
                    st.add(c)

        handles.append(prepared.get_submodule(obs).register_forward_hook(hook))
    bar = progress_bar(progress, "safeobs calibration", len(calibration) if hasattr(calibration, "__len__") else None)
    try:
        with torch.no_grad():
            for batch in _batches(calibration):
                prepared(*batch)
                bar.step()
    finally:
        for h in handles:
            h.remove()
        bar.close()
    if not any(s.n for s in stats.values()):
        raise ValueError("calibration was empty: no conv/linear node saw an input")
    return stats


# -- activation compensation: statistics of the quantized model's inputs ---------------------------------------


@dataclasses.dataclass
class QuantStats(LayerStats):
    """Statistics of a layer's input ``x^`` in the *quantized* model (the dequantized activation its conv/linear
    reads) and of the float model's input ``x`` at the same positions: ``xx`` = sum x^ x^^T and ``xsum`` = sum x^
    (so ``h`` = E[x^ x^^T], ``mean`` = E[x^], as :class:`LayerStats`), ``cross`` = sum x x^^T, ``fsum`` = sum x and
    ``ff`` = sum x x^T, all (G, K, K) / (G, K) float64 over ``n`` receptive fields."""

    cross: np.ndarray | None = None
    fsum: np.ndarray | None = None
    ff: np.ndarray | None = None


class _Recorder(torch.nn.Module):
    """A graph node that hands its input to ``sink(name, x)`` and changes nothing."""

    def __init__(self, name, sink):
        super().__init__()
        self.name, self.sink = name, sink

    def forward(self, x):
        self.sink(self.name, x)


@contextlib.contextmanager
def _recording(gm: torch.fx.GraphModule, names, sink):
    """Within the block, every node of ``gm`` named in ``names`` first passes its input (args[0]) to ``sink``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    added = []
    for i, name in enumerate(names):
        node = nodes.get(name)
        if node is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        target = f"_safeobs_recorder_{i}"
        gm.add_submodule(target, _Recorder(name, sink))
        with gm.graph.inserting_before(node):
            added.append((gm.graph.call_module(target, (node.args[0],)), target))
    gm.recompile()
    try:
        yield
    finally:
        for node, target in added:
            gm.graph.erase_node(node)
            gm.delete_submodule(target)
        gm.recompile()


def calibrate_quantized_pt2e(
    float_model: torch.fx.GraphModule,
    converted: torch.fx.GraphModule,
    calibration: Iterable,
    *,
    progress: bool | None = None,
    max_positions: int = 16384,
    local: bool = False,
    cross: bool = True,
) -> dict:
    """``{conv/linear node name: QuantStats}``: one pass of the calibration through the float graph
    ``float_model`` (a calibrated ``prepare_pt2e`` graph or a copy of it; its observers are bypassed during the
    pass and keep their state) and the ``convert_pt2e`` graph ``converted`` (node names are shared), batch by
    batch.  Each layer's float input ``x`` and quantized-model input ``x^`` (the dequantized activation) are
    gathered at the same receptive-field positions (the subsample is seeded by the position count, equal for
    both).  Only one batch of float activations is held at a time; the statistics are ``K x K`` per layer (group).

    ``local``: ``x^`` is the float input ``x`` quantized and dequantized with the converted graph's qparams of the
    layer's input (its own activation quantization only, no error from upstream layers: module docstring); the
    converted graph is then not run, only read.  ``cross=False`` skips ``E[x x^^T]`` and ``E[x x^T]`` (``cross``
    and ``ff`` stay None: one ``K x K`` product per batch instead of three; :func:`apply_pt2e` then checks the
    codes against RTN on ``E||(W - W^) x^||^2``)."""
    fq = _input_fake_quants(converted) if local else {}
    layers = {name: (w, b, op, params) for name, _obs, w, b, op, params in _pt2e_layers(float_model)}
    stats = {}
    for name, (w, b, op, params) in layers.items():
        g = 1 if op == "linear" else params.groups
        k = int(np.prod(w.shape[1:]))
        z = np.zeros
        stats[name] = QuantStats(
            op,
            g,
            w,
            b,
            z((g, k, k)),
            z((g, k)),
            cross=z((g, k, k)) if cross else None,
            fsum=z((g, k)),
            ff=z((g, k, k)) if cross else None,
        )
    floats = {}

    def keep_float(name, x):
        if local:
            add(name, None, x)
        else:
            floats[name] = x

    def add(name, xh, x=None):
        x = floats.pop(name, None) if x is None else x
        st = stats[name]
        params = layers[name][3]
        if not isinstance(x, torch.Tensor) or not (xh is None or isinstance(xh, torch.Tensor) and x.shape == xh.shape):
            return
        c = _fields(x, st, params, max_positions)  # the positions calibrate_pt2e samples, equal for x and x^
        if c is None:
            return
        ch = None if xh is None else _fields(xh, st, params, max_positions)
        if ch is None:  # local: quantize the gathered fields (the zero padding stays 0: the zero point is exact)
            # (an input the converted graph does not quantize per tensor is read as is: x^ = x, the float statistics)
            ch = fq[name](c.contiguous()) if name in fq else c
        st.add(ch)  # E[x^ x^^T], E[x^], n
        if cross:
            st.cross += torch.bmm(c.transpose(1, 2), ch).numpy()  # float32 product added in float64
            st.ff += torch.bmm(c.transpose(1, 2), c).numpy()
        st.fsum += c.sum(1).double().numpy()

    bar = progress_bar(
        progress, "safeobs quantized-input statistics", len(calibration) if hasattr(calibration, "__len__") else None
    )
    try:
        with (
            torch.no_grad(),
            _observers_bypassed(float_model),
            _recording(float_model, stats, keep_float),
            _recording(converted, () if local else stats, add),
        ):
            for batch in _batches(calibration):
                float_model(*batch)
                if not local:
                    converted(*batch)
                floats.clear()
                bar.step()
    finally:
        bar.close()
    return {k: v for k, v in stats.items() if v.n}


def _identity(x, *args, **kwargs):
    return x


@contextlib.contextmanager
def _observers_bypassed(gm: torch.nn.Module):
    """Within the block the observers of a ``prepare_pt2e`` graph (modules with ``calculate_qparams``, torchao's
    observers and fake-quants) return their input untouched and record nothing."""
    mods = [m for m in gm.modules() if hasattr(m, "calculate_qparams") and "forward" not in vars(m)]
    for m in mods:
        m.forward = _identity
    try:
        yield
    finally:
        for m in mods:
            del m.forward


def _input_fake_quants(converted: torch.fx.GraphModule) -> dict:
    """``{conv/linear node name: x -> dequantize(quantize(x))}`` with the qparams of the node's input in a
    ``convert_pt2e`` graph (static per-tensor activations only)."""
    import operator

    qd = torch.ops.quantized_decomposed
    quant = {qd.quantize_per_tensor.default, qd.quantize_per_tensor.tensor}
    dequant = {qd.dequantize_per_tensor.default, qd.dequantize_per_tensor.tensor}

    def value(a):
        return operator.attrgetter(a.target)(converted) if getattr(a, "op", None) == "get_attr" else a

    out = {}
    for node in converted.graph.nodes:
        if node.op != "call_function" or not node.args or getattr(node.args[0], "target", None) not in dequant:
            continue
        d = node.args[0]
        qn = d.args[0]
        if getattr(qn, "target", None) not in quant:
            continue
        qargs = [value(a) for a in qn.args[1:5]]
        if any(isinstance(a, torch.fx.Node) for a in qargs) or len(qargs) < 4:
            continue
        scale, zp, qmin, qmax = (float(qargs[0]), int(qargs[1]), int(qargs[2]), int(qargs[3]))
        out[node.name] = lambda x, a=(scale, zp, qmin, qmax): _fake_quant(x, *a)
    return out


def _fake_quant(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """The converted graph's ``quantize_per_tensor`` + ``dequantize_per_tensor`` pair (the same float32 operations:
    ``(clamp(round(x * (1 / scale)) + zp, qmin, qmax) - zp) * scale``), in place on one new tensor (2x faster
    than torch's fused fake-quant, which also writes a mask)."""
    y = x * (1.0 / scale)
    return y.round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(scale)


def compensation_target(st: QuantStats, centered: bool, damp: float | None = None):
    """``(W*, M, Cw)`` of the objective ``E||W x - W^ x^||^2`` of one layer (``centered``: of the deviations from
    the means, the mean error going to the bias), float64 per group: ``M`` = E[x^ x^^T] (G, K, K), ``Cw`` =
    W E[x x^^T] (OC, K), and the rounding target ``W*``.  The objective is ``(W^ - W*) M (W^ - W*)^T`` + const
    for ``W* = W C M^-1``; ``damp`` (a float) gives its ridge form ``W* = W + W D (M + l I)^-1``, ``D = C - M`` =
    E[(x - x^) x^^T], ``l = damp * mean(diag M)``; ``None`` (the default) keeps ``W* = W`` (``l`` -> infinity).

    Why the default is ``W``: on MobileNetV2 every finite ridge tried (0.01, 0.1, 3) was worse on held-out data
    than ``W`` itself (the ``K x K`` cross term, estimated from a few thousand positions, fits the calibration
    set); the rounding still sees the quantized inputs through ``M`` and the bias gets their mean error."""
    n = max(st.n, 1)
    m, c = st.xx / n, st.cross / n
    if centered:
        mh, mf = st.xsum / n, st.fsum / n
        m = m - np.einsum("gi,gj->gij", mh, mh)
        c = c - np.einsum("gi,gj->gij", mf, mh)
    g, k = m.shape[0], m.shape[-1]
    w = st.weight.detach().double().numpy().reshape(g, -1, k)
    wstar = w.reshape(-1, k)
    if damp is not None:
        lam = damp * np.trace(m, axis1=1, axis2=2) / k
        md = m + np.where(lam > 0, lam, 1e-12)[:, None, None] * np.eye(k)
        a = np.linalg.solve(md, (c - m).transpose(0, 2, 1)).transpose(0, 2, 1)  # D (M + l I)^-1
        wstar = (w + w @ a).reshape(-1, k)
    return wstar, m, (w @ c).reshape(-1, k)


def _compensated_objective(v: np.ndarray, m: np.ndarray, cw: np.ndarray, groups: int) -> np.ndarray:
    """Per row ``v M v^T - 2 (W C) v^T`` (the compensating objective without its constant ``W E[x x^T] W^T``)."""
    oc, k = v.shape
    vg = v.reshape(m.shape[0], -1, k)
    return ((vg @ m) * vg).sum(-1).reshape(oc) - 2 * (cw * v).sum(-1)


def apply_pt2e(
    converted: torch.fx.GraphModule,
    stats: dict,
    *,
    layout: str = "x86",
    bias_correction: bool = True,
    multipliers=DEFAULT_MULTIPLIERS,
    target_damp: float | None = None,
    progress: bool | None = None,
) -> dict:
    """:func:`apply` for a ``convert_pt2e`` model: replaces the int8 weight constants, their per-channel
    scales and the float biases of the nodes in ``stats`` (node names are kept by convert_pt2e).

    ``stats`` from :func:`calibrate_pt2e` (float inputs): :func:`round_weight` on ``E[x x^T]``.  From
    :func:`calibrate_quantized_pt2e` (:class:`QuantStats`): the activation-compensating rounding of
    :func:`_round_compensated` (``target_damp``: the ridge of :func:`compensation_target`, ``None``: none)."""
    nodes = {n.name: n for n in converted.graph.nodes}
    out = {}
    bar = progress_bar(progress, "safeobs rounding", len(stats))
    for name, st in stats.items():
        node = nodes.get(name)
        if node is None or st.n == 0:
            continue
        bar.step(name)
        r = _apply_layer(converted, node, st, layout, bias_correction, multipliers, target_damp)
        if r is not None:
            out[name] = r
    bar.close()
    return out


def _put(converted: torch.fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace the constant ``target`` of ``converted`` (a Parameter stays a Parameter)."""
    import operator

    *path, last = target.split(".")
    owner = operator.attrgetter(".".join(path))(converted) if path else converted
    if isinstance(getattr(owner, last), torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=False)
    setattr(owner, last, value)


def _apply_layer(converted, node, st, layout, bias_correction, multipliers, target_damp):
    """Round one conv/linear node of a ``convert_pt2e`` graph on its statistics and write its int8 weight, scales
    and bias; None (nothing written) when the node does not read a symmetric per-channel int8 constant."""
    import operator

    dq = torch.ops.quantized_decomposed.dequantize_per_channel.default
    if len(node.args) < 2:
        return None
    d = node.args[1]
    if (
        getattr(d, "target", None) is not dq
        or any(getattr(a, "op", None) != "get_attr" for a in d.args[:3])
        or int(d.args[3]) != 0
    ):
        return None
    codes_t, scale_t, zp_t = (operator.attrgetter(a.target)(converted) for a in d.args[:3])
    if codes_t.dtype != torch.int8 or tuple(codes_t.shape) != tuple(st.weight.shape) or bool(zp_t.any()):
        return None
    b = node.args[2] if len(node.args) > 2 else None
    has_bias = getattr(b, "op", None) == "get_attr"
    if isinstance(st, QuantStats):
        r = _round_compensated(st, layout, bias_correction and has_bias, multipliers, target_damp)
    else:
        r = round_weight(
            st.weight,
            st.h_shrunk(bias_correction and has_bias),
            st.mean,
            layout=layout,
            op=st.op,
            groups=st.groups,
            bias_correction=bias_correction and has_bias,
            multipliers=multipliers,
        )
    _put(converted, d.args[0].target, torch.from_numpy(r.codes.copy()))
    _put(converted, d.args[1].target, torch.from_numpy(r.scale).to(scale_t.dtype))
    if bias_correction and has_bias:
        bias = operator.attrgetter(b.target)(converted)
        _put(converted, b.target, (bias.detach().float() + torch.from_numpy(r.bias_delta).float()).to(bias.dtype))
    return r


def _round_compensated(st: QuantStats, layout, bias_correction, multipliers, target_damp):
    """Codes for ``E||W x - W^ x^||^2`` (``x``: the float model's input, ``x^``: the quantized model's; with
    ``bias_correction`` of the deviations from the means, and the bias absorbs the mean error
    ``W E[x] - W^ E[x^]``, counted once): :func:`round_weight` of the target ``W*`` (:func:`compensation_target`,
    ``W`` by default) on ``E[x^ x^^T]`` at the tightest safe scale of ``W``, with RTN of ``W`` at that scale as
    its base candidate.

    With the cross statistics (``st.cross``), each channel then keeps whichever of the two is better on the exact
    objective ``E||W x - W^ x^||^2`` (``W E[x x^T] W^T`` included): never worse than RTN there, and ``error`` /
    ``rtn_error`` are that objective.  Without (``calibrate_quantized_pt2e(..., cross=False)``, the default of
    ``quantize_pt2e``), ``error`` / ``rtn_error`` are :func:`round_weight`'s: the weight error on the quantized
    inputs, ``E||(W - W^) x^||^2``, never worse than RTN's there."""
    oc = st.weight.shape[0]
    k = int(np.prod(st.weight.shape[1:]))
    n = max(st.n, 1)
    g = st.xx.shape[0]
    w = st.weight.detach().double().numpy().reshape(g, -1, k)
    if st.cross is None:
        if target_damp is not None:
            raise ValueError("target_damp needs the cross statistics (calibrate_quantized_pt2e(..., cross=True))")
        r = round_weight(
            st.weight,
            st.h_shrunk(bias_correction),
            st.mean,
            layout=layout,
            op=st.op,
            groups=st.groups,
            bias_correction=bias_correction,
            multipliers=multipliers,
        )
        q, s, err, rtn_err, choice = r.codes.reshape(oc, k), r.scale, r.error, r.rtn_error, r.choice
        extra = dict(r.extra, compensated=True, exact_objective=False)
    else:
        wstar, m, cw = compensation_target(st, bias_correction, target_damp)
        # RTN at the tightest safe scale of W (the converted graph's own scales are floored at the observer's eps)
        scale0 = safe_qparams(st.weight, layout=layout, op=st.op, groups=st.groups)[0].numpy().astype(np.float32)
        rtn = quantize(st.weight.reshape(oc, k).numpy(), scale0[:, None]).astype(np.int8)
        r = round_weight(
            wstar.reshape(st.weight.shape),
            st.h_shrunk(bias_correction),
            st.mean,
            layout=layout,
            op=st.op,
            groups=st.groups,
            bias_correction=bias_correction,
            multipliers=multipliers,
            scale=scale0,
            rtn_codes=rtn,
        )
        q = r.codes.reshape(oc, k)
        v = r.scale.astype(np.float64)[:, None] * q
        v_rtn = scale0.astype(np.float64)[:, None] * rtn
        ff = st.ff / n
        if bias_correction:
            mf = st.fsum / n
            ff = ff - np.einsum("gi,gj->gij", mf, mf)
        const = ((w @ ff) * w).sum(-1).reshape(oc)
        err = _compensated_objective(v, m, cw, st.groups) + const
        rtn_err = _compensated_objective(v_rtn, m, cw, st.groups) + const
        keep = err < rtn_err
        q = np.where(keep[:, None], q, rtn).astype(np.int8)
        s = np.where(keep, r.scale, scale0).astype(np.float32)
        err = np.where(keep, err, rtn_err)
        choice = np.where(keep, r.choice, -1)
        extra = dict(
            r.extra, compensated=True, exact_objective=True, reverted_exact=int((~keep & (r.choice >= 0)).sum())
        )
    delta = np.zeros(oc)
    if bias_correction:  # the mean output error W E[x] - W^ E[x^], counted once
        v = s.astype(np.float64)[:, None] * q
        delta = (w @ (st.fsum / n)[:, :, None]).reshape(oc) - (v.reshape(g, -1, k) @ (st.xsum / n)[:, :, None]).reshape(
            oc
        )
    return dataclasses.replace(
        r,
        codes=q.reshape(st.weight.shape),
        scale=np.asarray(s, np.float32),
        bias_delta=delta,
        error=err,
        rtn_error=rtn_err,
        choice=choice,
        extra=extra,
    )
