"""PT2E glue of safe data-aware rounding (:mod:`safeobs.core.rounding`): statistics from hooks on the input
observers of a ``prepare_pt2e`` graph, and rewriting the int8 constants of a ``convert_pt2e`` graph.
Needs no torchao import itself (the graphs come from torchao's PT2E flow)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from ..core.progress import progress_bar
from ..core.rounding import DEFAULT_MULTIPLIERS, LayerStats, _batches, _receptive_fields, round_weight

__all__ = ["apply_pt2e", "calibrate_pt2e"]


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

        def hook(_m, _inp, out, st=st, op=op, params=params, k=k):
            x = out.detach().to(torch.float32)
            # an observer module may be shared between several tensors: only this node's input counts
            if (
                op == "linear"
                and x.shape[-1] != k
                or op == "conv"
                and (x.dim() != st.weight.dim() or x.shape[1] != st.weight.shape[1] * params.groups)
            ):
                return
            with torch.no_grad():
                if op == "linear":
                    c = x.reshape(1, -1, x.shape[-1])
                    if c.shape[1] > max_positions:
                        gen = torch.Generator().manual_seed(c.shape[1])
                        c = c[:, torch.randperm(c.shape[1], generator=gen)[:max_positions]]
                else:
                    c = _receptive_fields(x, params, max_positions)
                st.xx += torch.bmm(c.transpose(1, 2), c).double().numpy()
                st.xsum += c.sum(1).double().numpy()
                st.n += c.shape[1]

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


def apply_pt2e(
    converted: torch.fx.GraphModule,
    stats: dict,
    *,
    layout: str = "x86",
    bias_correction: bool = True,
    multipliers=DEFAULT_MULTIPLIERS,
    progress: bool | None = None,
) -> dict:
    """:func:`apply` for a ``convert_pt2e`` model: replaces the int8 weight constants, their per-channel
    scales and the float biases of the nodes in ``stats`` (node names are kept by convert_pt2e)."""
    import operator

    dq = torch.ops.quantized_decomposed.dequantize_per_channel.default
    nodes = {n.name: n for n in converted.graph.nodes}
    out = {}
    bar = progress_bar(progress, "safeobs rounding", len(stats))

    def put(target, value):
        *path, last = target.split(".")
        owner = operator.attrgetter(".".join(path))(converted) if path else converted
        if isinstance(getattr(owner, last), torch.nn.Parameter):
            value = torch.nn.Parameter(value, requires_grad=False)
        setattr(owner, last, value)

    for name, st in stats.items():
        node = nodes.get(name)
        if node is None or st.n == 0 or len(node.args) < 2:
            continue
        d = node.args[1]
        if (
            getattr(d, "target", None) is not dq
            or any(getattr(a, "op", None) != "get_attr" for a in d.args[:3])
            or int(d.args[3]) != 0
        ):
            continue
        codes_t, scale_t, zp_t = (operator.attrgetter(a.target)(converted) for a in d.args[:3])
        if codes_t.dtype != torch.int8 or tuple(codes_t.shape) != tuple(st.weight.shape) or bool(zp_t.any()):
            continue
        b = node.args[2] if len(node.args) > 2 else None
        has_bias = getattr(b, "op", None) == "get_attr"
        bar.step(name)
        r = round_weight(
            st.weight,
            st.h,
            st.mean,
            layout=layout,
            op=st.op,
            groups=st.groups,
            bias_correction=bias_correction and has_bias,
            multipliers=multipliers,
        )
        put(d.args[0].target, torch.from_numpy(r.codes.copy()))
        put(d.args[1].target, torch.from_numpy(r.scale).to(scale_t.dtype))
        if bias_correction and has_bias:
            bias = operator.attrgetter(b.target)(converted)
            put(b.target, (bias.detach().float() + torch.from_numpy(r.bias_delta).float()).to(bias.dtype))
        out[name] = r
    bar.close()
    return out
